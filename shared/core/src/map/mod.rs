//! Table maps: which entity of each side syncs with which, by which key, field by field.
//!
//! A map file (YAML, see `docs/MAP_FORMAT.md`) is parsed into a raw form that keeps line
//! numbers ([`raw`]), then validated into the typed [`TableMap`] below ([`validate`]), which is
//! what the engine uses. Everything here is data: applying a map is in [`apply`], filters in
//! [`filter`].

pub mod apply;
pub mod filter;
pub mod plan;
pub mod raw;
pub mod validate;

use serde::Serialize;

use crate::record::Side;
use crate::value::{Value, ValueType};

pub use filter::Filter;
pub use plan::{PlanCell, SideFieldsAt};

/// A validated table map.
///
/// A map must not be changed after its first use (build a new one instead): the per-record
/// path keeps a plan derived from it in its `plan` field (see [`plan`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableMap {
    /// Unique name, e.g. `customers-v3-accounts`.
    pub name: String,
    /// What the map is for, in a sentence.
    pub description: String,
    /// Where the map came from (a path, or `builtin:<file>` for shipped maps).
    pub source: String,
    /// The Dataverse side.
    pub crm: CrmEntity,
    /// The F&O side.
    pub erp: ErpEntity,
    /// Which way records flow.
    pub direction: MapDirection,
    /// Field mappings, in file order.
    pub fields: Vec<FieldMapping>,
    /// Only records matching the filter of their side are synced.
    pub filters: SideFilters,
    /// Maps whose records must be synced before this map's (lookups point at them).
    pub depends_on: Vec<String>,
    /// What to do when both sides changed since the last sync.
    pub conflict: ConflictPolicy,
    /// What to do on the other side when a record is deleted.
    pub delete: DeletePolicy,
    /// The per-record plan derived from the fields above on first use; `Default::default()`
    /// when building a map. Not part of the map's meaning (see [`plan`]).
    #[serde(skip)]
    pub plan: PlanCell,
}

/// The Dataverse table of a map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CrmEntity {
    /// Web API entity set, e.g. `accounts`.
    pub entity_set: String,
    /// Logical name, e.g. `account`.
    pub logical_name: String,
    /// Primary id column, e.g. `accountid`.
    pub primary_id: String,
    /// Alternate-key columns other than the company, in key order, e.g. `[accountnumber]`.
    pub key: Vec<String>,
    /// The company lookup column of a company-specific table (`msdyn_company`, a lookup to
    /// `cdm_companies` by `cdm_companycode`), `None` for global tables.
    pub company_field: Option<String>,
}

/// The F&O data entity of a map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErpEntity {
    /// OData entity set, e.g. `CustomersV3`.
    pub entity: String,
    /// Natural-key fields other than `dataAreaId`, in key order, e.g. `[CustomerAccount]`.
    pub key: Vec<String>,
    /// True when the entity is per legal entity (`dataAreaId` is part of its key).
    pub company_specific: bool,
    /// The entity's physical (AOT) name, e.g. `CustCustomerV3Entity`, when the map gives it.
    /// F&O data events come from the entity's Dataverse virtual table, which is named after
    /// the physical name (`mserp_custcustomerv3entity`), not the OData name.
    pub physical_name: Option<String>,
}

impl ErpEntity {
    /// The logical names of the entity's Dataverse virtual table that data events may carry:
    /// `mserp_<physical name>` when the map gives one, and `mserp_<OData name>`, lower case.
    pub fn virtual_entity_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .physical_name
            .iter()
            .map(|p| format!("mserp_{}", p.to_ascii_lowercase()))
            .collect();
        names.push(format!("mserp_{}", self.entity.to_ascii_lowercase()));
        names.dedup();
        names
    }
}

/// Which way a whole map syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapDirection {
    Bidirectional,
    ErpToCrm,
    CrmToErp,
}

impl MapDirection {
    /// True when changes from `source` are synced to the other side.
    pub fn flows_from(self, source: Side) -> bool {
        match self {
            MapDirection::Bidirectional => true,
            MapDirection::ErpToCrm => source == Side::Erp,
            MapDirection::CrmToErp => source == Side::Crm,
        }
    }
}

/// Which way one field flows. Microsoft's notation: `=` and `><` bidirectional, `>` and `>>`
/// F&O→Dataverse, `<` and `<<` Dataverse→F&O (the doubled forms carry a transform).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldDirection {
    Bidirectional,
    ErpToCrm,
    CrmToErp,
}

impl FieldDirection {
    /// True when this field is written when a change flows from `source`.
    pub fn flows_from(self, source: Side) -> bool {
        match self {
            FieldDirection::Bidirectional => true,
            FieldDirection::ErpToCrm => source == Side::Erp,
            FieldDirection::CrmToErp => source == Side::Crm,
        }
    }
}

/// One side of a field mapping: a field name and its type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldRef {
    pub name: String,
    pub ty: ValueType,
}

/// One line of a table map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldMapping {
    /// The F&O field, `None` for a constant written to Dataverse (`none >> col V`).
    pub erp: Option<FieldRef>,
    /// The Dataverse column, `None` for a constant written to F&O (`FIELD << none "V"`).
    pub crm: Option<FieldRef>,
    /// Which way the field flows.
    pub direction: FieldDirection,
    /// Microsoft's notation for the line, as written or implied (`=`, `><`, `>`, …).
    pub notation: String,
    /// True when the field is part of the integration key.
    pub is_key: bool,
    /// Enum/option-set value translation, both ways.
    pub value_map: Option<ValueMap>,
    /// Written when the source value is null or there is no source field.
    pub default: Option<Value>,
    /// Resolves the value through another map's links (e.g. a currency code to a
    /// `transactioncurrency` row).
    pub lookup: Option<LookupSpec>,
    /// Steps applied to the value on its way to Dataverse (after the value map).
    pub to_crm: Vec<TransformStep>,
    /// Steps applied to the value on its way to F&O (after the value map).
    pub to_erp: Vec<TransformStep>,
    /// For `conflict: field_level`: which side owns this field.
    pub source_of_truth: Option<Side>,
    /// Line in the map file, for messages.
    pub line: usize,
}

impl FieldMapping {
    /// The field on `side`, if any.
    pub fn field(&self, side: Side) -> Option<&FieldRef> {
        match side {
            Side::Crm => self.crm.as_ref(),
            Side::Erp => self.erp.as_ref(),
        }
    }

    /// A short label for messages: `CustomerAccount = accountnumber`.
    pub fn label(&self) -> String {
        let erp = self.erp.as_ref().map_or("none", |f| f.name.as_str());
        let crm = self.crm.as_ref().map_or("none", |f| f.name.as_str());
        format!("{erp} {} {crm}", self.notation)
    }
}

/// A value translation table: pairs of (F&O value, Dataverse value).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValueMap {
    pub pairs: Vec<(Value, Value)>,
}

/// A lookup: the field holds a reference to a record of another map.
///
/// On the F&O side the value is the referenced record's natural key (single field, e.g. `USD`);
/// on the Dataverse side it is a [`crate::value::LookupRef`] to the referenced row. Several maps
/// make a polymorphic lookup (`customerid` → account or contact): tried in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LookupSpec {
    /// Names of the maps whose links resolve the reference.
    pub maps: Vec<String>,
}

/// One transform step on a value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformStep {
    Trim,
    Upper,
    Lower,
    /// Keep at most N characters.
    Truncate(usize),
    /// Prepend a text.
    Prefix(String),
    /// Remove a leading text if present.
    StripPrefix(String),
    /// Replace every occurrence of `from` with `to`.
    Replace {
        from: String,
        to: String,
    },
    /// Explicit type coercion (text ↔ integer/decimal/boolean/date…, choice ↔ integer, enum ↔ text).
    Convert(ValueType),
}

/// Filters of each side; `None` lets every record through.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct SideFilters {
    pub crm: Option<Filter>,
    pub erp: Option<Filter>,
}

impl SideFilters {
    /// The filter of `side`.
    pub fn of(&self, side: Side) -> Option<&Filter> {
        match side {
            Side::Crm => self.crm.as_ref(),
            Side::Erp => self.erp.as_ref(),
        }
    }
}

/// What happens when both sides changed since the last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The change with the later source timestamp wins (the default).
    #[default]
    LastWriterWins,
    /// Dataverse's version wins.
    CrmWins,
    /// F&O's version wins.
    ErpWins,
    /// Each field takes the value of its `source_of_truth` side.
    FieldLevel,
    /// Nothing is overwritten: the conflict is parked for a person.
    Manual,
}

/// What a delete on one side does on the other.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeletePolicy {
    /// Delete the linked record (the default).
    #[default]
    Propagate,
    /// Keep the linked record but set these fields (e.g. Dataverse `statecode` 1, `statuscode` 2).
    Deactivate {
        crm: Vec<(String, Value)>,
        erp: Vec<(String, Value)>,
    },
    /// Leave the other side alone; only the link is removed.
    Ignore,
}
