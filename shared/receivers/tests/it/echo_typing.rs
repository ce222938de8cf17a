//! Regression tests: a webhook or data event must type its values as the connector's read of
//! the same row does (by the types the maps declare), or the engine's hash of the event differs
//! from the hash it stored for its own write and the echo is not recognised.

use dualwrite_connectors::EntitySchemas;
use dualwrite_connectors::odata::parse_object;
use dualwrite_core::decision::side_hash;
use dualwrite_core::map::TableMap;
use dualwrite_core::{Record, Side, Value, ValueType};
use dualwrite_receivers::{Coverage, SourceKind, WebhookRequest, parse_data_event};
use serde_json::{Value as Json, json};

use crate::{event_of, now};

const CUSTOMERS: &str = "customers-v3-accounts";

/// The shipped customers map alone (other shipped maps of `CustomersV3` need other fields).
fn customers() -> Vec<TableMap> {
    dualwrite_maps::builtin_maps()
        .into_iter()
        .filter(|m| m.name == CUSTOMERS)
        .collect()
}

/// An F&O CustomersV3 row as the F&O OData API returns it, every field the customers map
/// names holding a value of its declared type. Whole-number decimals and enum symbols are the
/// JSON shapes a receiver cannot type by shape alone.
fn customer_row(map: &TableMap) -> serde_json::Map<String, Json> {
    let mut row = serde_json::Map::new();
    row.insert("dataAreaId".into(), json!("usmf"));
    for field in map.fields.iter().filter_map(|f| f.erp.as_ref()) {
        let value = match field.ty {
            ValueType::Decimal => json!(2500),
            ValueType::Integer => json!(12),
            ValueType::Enum => json!("No"),
            ValueType::Boolean => json!(true),
            ValueType::Date => json!("2026-05-01T12:00:00Z"),
            _ => json!(format!("{}-value", field.name)),
        };
        row.insert(field.name.clone(), value);
    }
    row.insert("CustomerAccount".into(), json!("ECHO-1"));
    row.insert("PartyType".into(), json!("Organization"));
    row.insert("ModifiedDateTime".into(), json!("2026-05-01T12:00:00Z"));
    row
}

/// The F&O data event of `row`, as F&O sends it for the `mserp_` virtual entity: plain JSON
/// values under lower-cased `mserp_` names.
fn data_event(row: &serde_json::Map<String, Json>) -> String {
    let mut attributes: Vec<Json> = row
        .iter()
        .filter(|(name, _)| name.as_str() != "ModifiedDateTime")
        .map(|(name, value)| json!({"key": format!("mserp_{}", name.to_lowercase()), "value": value}))
        .collect();
    attributes.push(json!({"key": "mserp_modifieddatetime", "value": "/Date(1777636800000)/"}));
    json!({
        "CorrelationId": "2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f",
        "InputParameters": [{"key": "Target", "value": {
            "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
            "Attributes": attributes,
            "LogicalName": "mserp_customersv3",
        }}],
        "MessageName": "OnExternalUpdated",
        "OperationCreatedOn": "/Date(1777636800000)/",
        "OperationId": "f6a7b8c9-1aa2-ee11-be37-000d3a8e5c2b",
        "PostEntityImages": [],
        "PreEntityImages": [],
        "PrimaryEntityName": "mserp_customersv3",
    })
    .to_string()
}

/// The row as the F&O connector reads it.
fn connector_read(maps: &[TableMap], row: &serde_json::Map<String, Json>) -> Record {
    let schemas = EntitySchemas::from_maps(maps, Side::Erp);
    let raw = parse_object(&Json::Object(row.clone()).to_string()).unwrap();
    dualwrite_connectors::fno::wire::record_from_row(
        "CustomersV3",
        schemas.get("CustomersV3"),
        &raw,
    )
    .unwrap()
}

#[test]
fn a_complete_fno_data_event_hashes_like_the_connectors_read_of_the_row() {
    let maps = customers();
    let map = &maps[0];
    let row = customer_row(map);
    let read = connector_read(&maps, &row);
    let req = WebhookRequest::new(SourceKind::Fno, data_event(&row));
    let event = event_of(parse_data_event(&req, &Coverage::from_maps(&maps), now()).unwrap()).event;
    assert!(
        !event.partial,
        "every mapped field is in the event, so the engine hashes it without a read"
    );

    let mut differing = Vec::new();
    for field in map.fields.iter().filter_map(|f| f.erp.as_ref()) {
        let from_event = event.record.get(&field.name).unwrap_or(&Value::Null);
        let from_read = read.get(&field.name).unwrap_or(&Value::Null);
        if from_event != from_read {
            differing.push(format!(
                "{}: event {from_event:?}, read {from_read:?}",
                field.name
            ));
        }
    }
    assert!(
        differing.is_empty(),
        "typed differently:\n{}",
        differing.join("\n")
    );
    assert_eq!(
        side_hash(map, Side::Erp, &event.record),
        side_hash(map, Side::Erp, &read)
    );
}
