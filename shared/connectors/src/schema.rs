//! Field types per entity, derived from the table maps.
//!
//! JSON carries no types a record can rely on (a choice and a whole number look alike, a date
//! is a string), so the connectors convert by the type the maps declare. Fields no map names
//! are converted by their JSON shape (see [`crate::odata::value_from_json`]).

use std::collections::BTreeMap;

use dualwrite_core::Side;
use dualwrite_core::map::TableMap;
use dualwrite_core::value::ValueType;

/// What the connectors know of one entity of one side.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntitySchema {
    /// Dataverse entity set (`accounts`) or F&O entity (`CustomersV3`).
    pub entity: String,
    /// Dataverse logical name (`account`), used as `@odata.type` in bulk calls.
    pub logical_name: Option<String>,
    /// Dataverse primary id column (`accountid`).
    pub primary_id: Option<String>,
    /// Key fields other than the company, in key order.
    pub key: Vec<String>,
    /// Dataverse company lookup column (`msdyn_company`).
    pub company_field: Option<String>,
    /// F&O: the entity is per legal entity (`dataAreaId` in its key).
    pub company_specific: bool,
    /// Declared type of each field.
    pub fields: BTreeMap<String, ValueType>,
    /// Dataverse lookup columns → entity set of the table they point to.
    pub lookup_targets: BTreeMap<String, String>,
}

/// The schemas of every entity of one side.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntitySchemas {
    side: Option<Side>,
    entities: BTreeMap<String, EntitySchema>,
}

impl EntitySchemas {
    /// The schemas of `side`'s entities as `maps` declare them. Several maps of one entity
    /// add up; a field typed differently by two maps keeps the first map's type.
    pub fn from_maps(maps: &[TableMap], side: Side) -> Self {
        let mut schemas = EntitySchemas {
            side: Some(side),
            entities: BTreeMap::new(),
        };
        for map in maps {
            let entity = match side {
                Side::Crm => map.crm.entity_set.clone(),
                Side::Erp => map.erp.entity.clone(),
            };
            let schema = schemas
                .entities
                .entry(entity.clone())
                .or_insert_with(|| match side {
                    Side::Crm => EntitySchema {
                        entity,
                        logical_name: Some(map.crm.logical_name.clone()),
                        primary_id: Some(map.crm.primary_id.clone()),
                        key: map.crm.key.clone(),
                        company_field: map.crm.company_field.clone(),
                        company_specific: map.crm.company_field.is_some(),
                        ..EntitySchema::default()
                    },
                    Side::Erp => EntitySchema {
                        entity,
                        key: map.erp.key.clone(),
                        company_specific: map.erp.company_specific,
                        ..EntitySchema::default()
                    },
                });
            for mapping in &map.fields {
                let Some(field) = mapping.field(side) else {
                    continue;
                };
                schema.fields.entry(field.name.clone()).or_insert(field.ty);
                if side == Side::Crm && field.ty == ValueType::Lookup {
                    let target = mapping
                        .lookup
                        .as_ref()
                        .and_then(|l| l.maps.first())
                        .and_then(|name| {
                            maps.iter()
                                .find(|m| &m.name == name)
                                .map(|m| m.crm.entity_set.clone())
                        });
                    if let Some(target) = target {
                        schema
                            .lookup_targets
                            .entry(field.name.clone())
                            .or_insert(target);
                    }
                }
            }
        }
        schemas
    }

    /// Adds or replaces one entity's schema (for entities no map names, and tests).
    pub fn insert(&mut self, schema: EntitySchema) {
        self.entities.insert(schema.entity.clone(), schema);
    }

    /// The schema of `entity`, if any map names it.
    pub fn get(&self, entity: &str) -> Option<&EntitySchema> {
        self.entities.get(entity)
    }

    /// The side these schemas were built for (`None` when built by hand).
    pub fn side(&self) -> Option<Side> {
        self.side
    }
}

impl EntitySchema {
    /// The declared type of `field`.
    pub fn type_of(&self, field: &str) -> Option<ValueType> {
        self.fields.get(field).copied()
    }
}

#[cfg(test)]
mod tests {
    use dualwrite_core::map::{
        ConflictPolicy, CrmEntity, DeletePolicy, ErpEntity, FieldDirection, FieldMapping, FieldRef,
        LookupSpec, MapDirection, SideFilters,
    };

    use super::*;

    fn mapping(
        erp: (&str, ValueType),
        crm: (&str, ValueType),
        lookup: Option<&str>,
    ) -> FieldMapping {
        FieldMapping {
            erp: Some(FieldRef {
                name: erp.0.into(),
                ty: erp.1,
            }),
            crm: Some(FieldRef {
                name: crm.0.into(),
                ty: crm.1,
            }),
            direction: FieldDirection::Bidirectional,
            notation: "=".into(),
            is_key: false,
            value_map: None,
            default: None,
            lookup: lookup.map(|m| LookupSpec {
                maps: vec![m.into()],
            }),
            to_crm: vec![],
            to_erp: vec![],
            source_of_truth: None,
            line: 1,
        }
    }

    fn map(name: &str, set: &str, logical: &str, erp: &str, fields: Vec<FieldMapping>) -> TableMap {
        TableMap {
            name: name.into(),
            description: String::new(),
            source: "test".into(),
            crm: CrmEntity {
                entity_set: set.into(),
                logical_name: logical.into(),
                primary_id: format!("{logical}id"),
                key: vec!["accountnumber".into()],
                company_field: Some("msdyn_company".into()),
            },
            erp: ErpEntity {
                entity: erp.into(),
                key: vec!["CustomerAccount".into()],
                company_specific: true,
                physical_name: None,
            },
            direction: MapDirection::Bidirectional,
            fields,
            filters: SideFilters::default(),
            depends_on: vec![],
            conflict: ConflictPolicy::default(),
            delete: DeletePolicy::default(),
            plan: Default::default(),
        }
    }

    #[test]
    fn schemas_come_from_the_maps_of_each_side() {
        let maps = vec![
            map(
                "customers",
                "accounts",
                "account",
                "CustomersV3",
                vec![
                    mapping(
                        ("CreditLimit", ValueType::Decimal),
                        ("creditlimit", ValueType::Decimal),
                        None,
                    ),
                    mapping(
                        ("SalesCurrencyCode", ValueType::Text),
                        ("transactioncurrencyid", ValueType::Lookup),
                        Some("currencies"),
                    ),
                    mapping(
                        ("CreditLimitIsMandatory", ValueType::Enum),
                        ("msdyn_creditlimitismandatory", ValueType::Boolean),
                        None,
                    ),
                ],
            ),
            map(
                "currencies",
                "transactioncurrencies",
                "transactioncurrency",
                "Currencies",
                vec![],
            ),
        ];
        let crm = EntitySchemas::from_maps(&maps, Side::Crm);
        let accounts = crm.get("accounts").unwrap();
        assert_eq!(accounts.primary_id.as_deref(), Some("accountid"));
        assert_eq!(accounts.logical_name.as_deref(), Some("account"));
        assert_eq!(accounts.company_field.as_deref(), Some("msdyn_company"));
        assert_eq!(accounts.type_of("creditlimit"), Some(ValueType::Decimal));
        assert_eq!(
            accounts.type_of("msdyn_creditlimitismandatory"),
            Some(ValueType::Boolean)
        );
        assert_eq!(
            accounts
                .lookup_targets
                .get("transactioncurrencyid")
                .map(String::as_str),
            Some("transactioncurrencies")
        );
        let erp = EntitySchemas::from_maps(&maps, Side::Erp);
        let customers = erp.get("CustomersV3").unwrap();
        assert_eq!(
            customers.type_of("CreditLimitIsMandatory"),
            Some(ValueType::Enum)
        );
        assert_eq!(
            customers.type_of("SalesCurrencyCode"),
            Some(ValueType::Text)
        );
        assert!(customers.company_specific);
        assert_eq!(customers.key, vec!["CustomerAccount".to_string()]);
        assert!(erp.get("accounts").is_none());
    }
}
