//! Receiver configuration: credentials per source, the body limit, which entities the enabled
//! table maps cover, and how F&O business events map to entities.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dualwrite_core::Side;
use dualwrite_core::map::TableMap;
use dualwrite_core::value::ValueType;

use crate::receive::ReceiverStats;

/// The default body limit: 1 MiB (Dataverse itself trims bodies above 256 KB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long a webhook's body may take to arrive once its headers did, by default. Dataverse
/// gives up on a webhook after 60 s and F&O after 10 s, so a body still missing after 30 s
/// comes from a sender that stalled.
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How a sender proves it is who it says.
#[derive(Clone, PartialEq, Eq)]
pub enum SourceAuth {
    /// Dataverse `WebhookKey` (authtype 4): the secret arrives as the query parameter `code`.
    WebhookKey {
        /// The expected value of `?code=`.
        secret: String,
    },
    /// Dataverse `HttpHeader` (authtype 5) or an F&O endpoint header: one header must carry
    /// the secret.
    HttpHeader {
        /// Header name, compared case-insensitively.
        name: String,
        /// The expected header value.
        value: String,
    },
}

/// Secrets never appear in logs.
impl std::fmt::Debug for SourceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceAuth::WebhookKey { .. } => f.write_str("WebhookKey { secret: <redacted> }"),
            SourceAuth::HttpHeader { name, .. } => {
                write!(f, "HttpHeader {{ name: {name:?}, value: <redacted> }}")
            }
        }
    }
}

/// How one F&O business event names the record it is about.
///
/// Business events carry no record, only a few fields of their own (`InvoiceId`, …): the route
/// says which entity the event is about and which envelope field holds each key field, so the
/// worker can read the record by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessEventRoute {
    /// The F&O data entity the event is about, e.g. `SalesInvoiceHeadersV2`.
    pub entity: String,
    /// `(entity key field, envelope field)` pairs in the entity's key order, without
    /// `dataAreaId` (taken from `BusinessEventLegalEntity`), e.g. `[("InvoiceNumber", "InvoiceId")]`.
    pub key: Vec<(String, String)>,
}

/// Everything a receiver needs besides the request and the queue.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Credentials Dataverse webhooks must present.
    pub dataverse_auth: SourceAuth,
    /// Credentials F&O data and business events must present.
    pub fno_auth: SourceAuth,
    /// Bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// A body not received whole this long after its headers is answered 408 (the HTTP layer
    /// times the read; [`crate::receive_incomplete`] answers and counts it).
    pub body_timeout: std::time::Duration,
    /// The entities the enabled maps cover; events of other entities are ignored.
    pub coverage: Coverage,
    /// Business events by `BusinessEventId`; events not listed are ignored.
    pub business_events: BTreeMap<String, BusinessEventRoute>,
    /// Counters shared by every call with this configuration.
    pub stats: Arc<ReceiverStats>,
}

impl ReceiverConfig {
    /// A configuration with the default body limit, no business-event routes and fresh counters.
    pub fn new(dataverse_auth: SourceAuth, fno_auth: SourceAuth, coverage: Coverage) -> Self {
        ReceiverConfig {
            dataverse_auth,
            fno_auth,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            coverage,
            business_events: BTreeMap::new(),
            stats: Arc::new(ReceiverStats::default()),
        }
    }
}

/// What the receivers need to know of one covered Dataverse table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrmCoverage {
    /// Logical name, e.g. `contact`.
    pub logical_name: String,
    /// Entity set the engine uses, e.g. `contacts`.
    pub entity_set: String,
    /// Primary id column, e.g. `contactid`.
    pub primary_id: String,
    /// The company lookup column, for company-specific tables.
    pub company_field: Option<String>,
    /// Columns the maps read from this table (mapped fields flowing to F&O, key columns and the
    /// company column). An event carrying all of them is complete (not `partial`).
    pub needed: BTreeSet<String>,
    /// The type the maps declare for each column they name (the first map's, as in the
    /// connectors' schemas). Event values are converted to it, so an event's values are typed
    /// like the connector's read of the same row and hash alike.
    pub types: BTreeMap<String, ValueType>,
}

/// What the receivers need to know of one covered F&O entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErpCoverage {
    /// OData entity set, e.g. `CustomersV3`.
    pub entity: String,
    /// Natural-key fields without `dataAreaId`, in key order.
    pub key: Vec<String>,
    /// True when `dataAreaId` is part of the key.
    pub company_specific: bool,
    /// Field names the maps know, by lower-case name (`customeraccount` → `CustomerAccount`):
    /// data events on virtual entities send `mserp_customeraccount`, this gives the real name.
    pub field_names: BTreeMap<String, String>,
    /// Fields the maps read from this entity (mapped fields flowing to Dataverse and key
    /// fields). An event carrying all of them is complete (not `partial`).
    pub needed: BTreeSet<String>,
    /// The type the maps declare for each field they name (the first map's, as in the
    /// connectors' schemas). Event values are converted to it, so an event's values are typed
    /// like the connector's read of the same row and hash alike.
    pub types: BTreeMap<String, ValueType>,
}

/// The entities the enabled maps cover, per side.
///
/// Only maps whose direction lets changes flow from a side make that side's entity covered:
/// a change of an `erp_to_crm` map's Dataverse table is not synced and so is ignored. When
/// several maps share an entity, the first map's key and company settings are kept and the
/// needed fields are the union.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Coverage {
    crm: BTreeMap<String, CrmCoverage>,
    erp: BTreeMap<String, ErpCoverage>,
    /// Lower-case F&O entity names and `mserp_<lowercase>` virtual-entity names (of the OData
    /// name, and of the physical name a map gives) → entity.
    erp_names: BTreeMap<String, String>,
    /// Dataverse logical name → entity set, for every table any map names.
    entity_sets: BTreeMap<String, String>,
    /// The Dataverse steps' post images are registered with all columns.
    complete_post_images: bool,
}

impl Coverage {
    /// Builds the coverage of the given (enabled) maps.
    pub fn from_maps(maps: &[TableMap]) -> Self {
        let mut cov = Coverage::default();
        for map in maps {
            cov.entity_sets
                .entry(map.crm.logical_name.clone())
                .or_insert_with(|| map.crm.entity_set.clone());
            if map.direction.flows_from(Side::Crm) {
                cov.add_crm(map);
            }
            if map.direction.flows_from(Side::Erp) {
                cov.add_erp(map);
            }
        }
        cov
    }

    fn add_crm(&mut self, map: &TableMap) {
        let entry = self
            .crm
            .entry(map.crm.logical_name.clone())
            .or_insert_with(|| CrmCoverage {
                logical_name: map.crm.logical_name.clone(),
                entity_set: map.crm.entity_set.clone(),
                primary_id: map.crm.primary_id.clone(),
                company_field: map.crm.company_field.clone(),
                needed: BTreeSet::new(),
                types: BTreeMap::new(),
            });
        entry.needed.extend(map.crm.key.iter().cloned());
        entry.needed.extend(map.crm.company_field.iter().cloned());
        for field in &map.fields {
            let Some(crm) = &field.crm else {
                continue;
            };
            entry.types.entry(crm.name.clone()).or_insert(crm.ty);
            if field.direction.flows_from(Side::Crm) {
                entry.needed.insert(crm.name.clone());
            }
        }
    }

    fn add_erp(&mut self, map: &TableMap) {
        let entity = map.erp.entity.clone();
        self.erp_names
            .insert(entity.to_ascii_lowercase(), entity.clone());
        // Data events name the entity's virtual table: `mserp_` and the physical name when
        // the map gives it (what F&O sends), and the OData name's form as well.
        for name in map.erp.virtual_entity_names() {
            self.erp_names.entry(name).or_insert_with(|| entity.clone());
        }
        let entry = self
            .erp
            .entry(entity.clone())
            .or_insert_with(|| ErpCoverage {
                entity,
                key: map.erp.key.clone(),
                company_specific: map.erp.company_specific,
                field_names: BTreeMap::new(),
                needed: BTreeSet::new(),
                types: BTreeMap::new(),
            });
        // Standard fields every entity has: the company and the modification time.
        entry
            .field_names
            .insert("dataareaid".into(), "dataAreaId".into());
        entry
            .field_names
            .insert("modifieddatetime".into(), "ModifiedDateTime".into());
        // The modification time is the event's version: read it as a date-time whatever form
        // it comes in (ISO 8601 text or a WCF date), so the version is the row's own, the one
        // the write's answer gave, and the echo of that write is a duplicate of it rather than
        // a change with a newer version.
        entry
            .types
            .entry("ModifiedDateTime".into())
            .or_insert(ValueType::DateTime);
        for key in &map.erp.key {
            entry
                .field_names
                .insert(key.to_ascii_lowercase(), key.clone());
            entry.needed.insert(key.clone());
        }
        for field in &map.fields {
            if let Some(erp) = &field.erp {
                entry
                    .field_names
                    .insert(erp.name.to_ascii_lowercase(), erp.name.clone());
                entry.types.entry(erp.name.clone()).or_insert(erp.ty);
                if field.direction.flows_from(Side::Erp) {
                    entry.needed.insert(erp.name.clone());
                }
            }
        }
    }

    /// States that the Dataverse webhook steps' post images are registered with all columns
    /// (an image registered without choosing attributes). Dataverse leaves null columns out of
    /// images, so with this a column an event's post image lacks is null and the event is
    /// complete without a read; without it (the default) such an event is partial.
    pub fn with_complete_post_images(mut self, complete: bool) -> Self {
        self.complete_post_images = complete;
        self
    }

    /// Whether the Dataverse steps' post images carry every non-null column.
    pub fn complete_post_images(&self) -> bool {
        self.complete_post_images
    }

    /// The covered Dataverse table with this logical name.
    pub fn crm(&self, logical_name: &str) -> Option<&CrmCoverage> {
        self.crm.get(logical_name)
    }

    /// The covered F&O entity named `name`: its entity-set name (any case) or its
    /// `mserp_<lowercase>` virtual-entity name.
    pub fn erp(&self, name: &str) -> Option<&ErpCoverage> {
        let entity = self.erp_names.get(&name.to_ascii_lowercase())?;
        self.erp.get(entity)
    }

    /// The entity set of a Dataverse table any map names (covered or not).
    pub fn entity_set(&self, logical_name: &str) -> Option<&str> {
        self.entity_sets.get(logical_name).map(String::as_str)
    }
}
