//! Regression tests: a webhook or data event must type its values as the connector's read of
//! the same row does (by the types the maps declare), or the engine's hash of the event differs
//! from the hash it stored for its own write and the echo is not recognised.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use dualwrite_connectors::odata::parse_object;
use dualwrite_connectors::{
    DataverseConfig, DataverseConnector, EntitySchemas, Secret, StaticToken,
};
use dualwrite_core::decision::side_hash;
use dualwrite_core::map::{FieldRef, TableMap};
use dualwrite_core::ports::{Connector, RecordRef};
use dualwrite_core::{Record, Side, Value, ValueType};
use dualwrite_receivers::{
    Coverage, SourceKind, WebhookRequest, parse_data_event, parse_dataverse,
};
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

// Dataverse: a webhook's RemoteExecutionContext against the connector's Web API read.

/// The account the Dataverse test syncs.
const ACCOUNT_ID: &str = "3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b";
/// The `cdm_companies` row of company USMF.
const USMF_ID: &str = "1c2d3e4f-e89e-e711-8122-000d3aa2331c";
/// The data-contract namespace of typed webhook values.
const CONTRACTS: &str = "http://schemas.microsoft.com/xrm/2011/Contracts";
/// `2026-05-01T12:00:00Z`, the account's `modifiedon`, as a WCF date.
const MODIFIED_WCF: &str = "/Date(1777636800000)/";
/// Decimal columns of `account` that are currency columns, sent in webhooks as `Money`; the
/// other decimal columns the map reads (latitudes, longitudes) are Float columns, sent as
/// plain JSON numbers.
const MONEY_COLUMNS: &[&str] = &["creditlimit"];
/// Columns an Update's Target carries (the changed ones); the post image carries them all.
const CHANGED_COLUMNS: &[&str] = &["name", "address1_latitude", "msdyn_onholdstatus"];

/// The shipped maps, all of them: the lookups of the customers map resolve through the maps
/// they name (currencies, customer groups, …), as in a deployment.
fn all_maps() -> Vec<TableMap> {
    dualwrite_maps::builtin_maps()
}

/// The Dataverse columns the customers map names, each once, in map order.
fn account_columns(map: &TableMap) -> Vec<&FieldRef> {
    let mut columns: Vec<&FieldRef> = Vec::new();
    for column in map.fields.iter().filter_map(|f| f.crm.as_ref()) {
        if !columns.iter().any(|c| c.name == column.name) {
            columns.push(column);
        }
    }
    columns
}

/// The logical name of the table the lookup column `column` points to: the Dataverse table of
/// the first map its `lookup:` names.
fn lookup_target(maps: &[TableMap], map: &TableMap, column: &str) -> String {
    let target = map
        .fields
        .iter()
        .find(|f| f.crm.as_ref().is_some_and(|c| c.name == column))
        .and_then(|f| f.lookup.as_ref())
        .and_then(|l| l.maps.first())
        .unwrap_or_else(|| panic!("lookup column {column} names no map in `lookup:`"));
    maps.iter()
        .find(|m| &m.name == target)
        .unwrap_or_else(|| panic!("lookup column {column}: map {target} is not shipped"))
        .crm
        .logical_name
        .clone()
}

/// An EntityReference as a webhook serializes it.
fn entity_reference(logical: &str, id: &str, name: Option<&str>) -> Json {
    json!({
        "__type": format!("EntityReference:{CONTRACTS}"),
        "Id": id, "KeyAttributes": [], "LogicalName": logical, "Name": name, "RowVersion": null,
    })
}

/// One `account` row as the Web API returns it and as a webhook serializes it, every column
/// the customers map names holding a value of its declared type: a currency column as `Money`,
/// a Float column as a whole JSON number (`2500`, which a receiver would type as an integer by
/// its shape alone), a choice as `OptionSetValue`, a lookup as an EntityReference (in the row:
/// a `_x_value` GUID), a two-option column as a JSON boolean.
struct AccountRow {
    /// The Web API row of `GET accounts(<id>)`.
    web_api: serde_json::Map<String, Json>,
    /// The webhook's post-image attributes, in `[{key, value}]` form.
    attributes: Vec<Json>,
}

fn account_row(maps: &[TableMap], map: &TableMap) -> AccountRow {
    let mut web_api = serde_json::Map::new();
    let mut attributes = Vec::new();
    for (i, column) in account_columns(map).into_iter().enumerate() {
        let name = column.name.as_str();
        let (row_value, webhook_value) = match column.ty {
            ValueType::Text => {
                let text = json!(format!("{name}-value"));
                (text.clone(), text)
            }
            ValueType::Integer => (json!(12), json!(12)),
            ValueType::Decimal if MONEY_COLUMNS.contains(&name) => (
                json!(2500),
                json!({"__type": format!("Money:{CONTRACTS}"), "Value": 2500}),
            ),
            ValueType::Decimal => (json!(2500), json!(2500)),
            ValueType::Boolean => (json!(true), json!(true)),
            ValueType::Choice => (
                json!(806_380_001),
                json!({"__type": format!("OptionSetValue:{CONTRACTS}"), "Value": 806_380_001}),
            ),
            ValueType::DateTime => (json!("2026-05-01T12:00:00Z"), json!(MODIFIED_WCF)),
            ValueType::Lookup => {
                let id = format!("{i:08x}-1aa2-ee11-be37-000d3a8e5c2b");
                let logical = lookup_target(maps, map, name);
                let column = format!("_{name}_value");
                web_api.insert(column.clone(), json!(id));
                web_api.insert(
                    format!("{column}@Microsoft.Dynamics.CRM.lookuplogicalname"),
                    json!(logical),
                );
                attributes.push(json!({
                    "key": name,
                    "value": entity_reference(&logical, &id, Some(&format!("{name} name"))),
                }));
                continue;
            }
            other => panic!(
                "the customers map reads Dataverse column {name} as {other:?}: add its Web API \
                 and webhook shapes to this test"
            ),
        };
        web_api.insert(name.to_string(), row_value);
        attributes.push(json!({"key": name, "value": webhook_value}));
    }
    web_api.insert("@odata.etag".into(), json!("W/\"5637144576\""));
    web_api.insert("accountid".into(), json!(ACCOUNT_ID));
    web_api.insert("_msdyn_company_value".into(), json!(USMF_ID));
    web_api.insert("modifiedon".into(), json!("2026-05-01T12:00:00Z"));
    web_api.insert("versionnumber".into(), json!(5_637_144_576_i64));
    attributes.extend([
        json!({"key": "accountid", "value": ACCOUNT_ID}),
        json!({"key": "msdyn_company", "value": entity_reference("cdm_company", USMF_ID, Some("USMF"))}),
        json!({"key": "modifiedon", "value": MODIFIED_WCF}),
        json!({"key": "versionnumber", "value": 5_637_144_576_i64}),
    ]);
    AccountRow {
        web_api,
        attributes,
    }
}

/// The webhook of an asynchronous PostOperation Update of the account (wire-formats §1): the
/// Target carries the changed columns, the post image every column.
fn account_update_webhook(row: &AccountRow) -> String {
    let entity = |attributes: Vec<Json>| {
        json!({
            "__type": format!("Entity:{CONTRACTS}"),
            "Attributes": attributes,
            "EntityState": null, "FormattedValues": [], "Id": ACCOUNT_ID, "KeyAttributes": [],
            "LogicalName": "account", "RelatedEntities": [], "RowVersion": null,
        })
    };
    let changed: Vec<Json> = row
        .attributes
        .iter()
        .filter(|a| CHANGED_COLUMNS.contains(&a["key"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    assert_eq!(
        changed.len(),
        CHANGED_COLUMNS.len(),
        "the customers map no longer reads every column of CHANGED_COLUMNS"
    );
    json!({
        "BusinessUnitId": "e2b9dd85-e89e-e711-8122-000d3aa2331c",
        "CorrelationId": "7b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
        "Depth": 1,
        "InitiatingUserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
        "InputParameters": [{"key": "Target", "value": entity(changed)}],
        "IsExecutingOffline": false, "IsInTransaction": false, "IsOfflinePlayback": false,
        "IsolationMode": 1,
        "MessageName": "Update",
        "Mode": 1,
        "OperationCreatedOn": "/Date(1777636801000)/",
        "OperationId": "d2e3f4a5-1aa2-ee11-be37-000d3a8e5c2b",
        "OrganizationId": "4ef5b371-e89e-e711-8122-000d3aa2331c",
        "OrganizationName": "OrgName",
        "OutputParameters": [],
        "OwningExtension": {
            "Id": "85417616-4ea2-e711-8122-000d3aa2331c", "KeyAttributes": [],
            "LogicalName": "sdkmessageprocessingstep", "Name": null, "RowVersion": null,
        },
        "ParentContext": null,
        "PostEntityImages": [{"key": "PostImage", "value": entity(row.attributes.clone())}],
        "PreEntityImages": [],
        "PrimaryEntityId": ACCOUNT_ID,
        "PrimaryEntityName": "account",
        "RequestId": null,
        "SecondaryEntityName": "none",
        "SharedVariables": [],
        "Stage": 40,
        "UserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
    })
    .to_string()
}

/// Serves a local Web API on a thread: `GET accounts(<ACCOUNT_ID>)` answers `row`, the company
/// table answers USMF, anything else 404. Returns the Web API root.
fn serve_web_api(row: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let root = format!("http://{}/api/data/v9.2", listener.local_addr().unwrap());
    let companies =
        json!({"value": [{"cdm_companyid": USMF_ID, "cdm_companycode": "USMF"}]}).to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            answer(stream, &row, &companies);
        }
    });
    root
}

/// Reads one request's head and answers it, closing the connection.
fn answer(stream: TcpStream, row: &str, companies: &str) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 0) && header.trim() != "" {
        header.clear();
    }
    let path = request_line.split(' ').nth(1).unwrap_or_default();
    let (status, body) = if path.starts_with("/api/data/v9.2/cdm_companies?") {
        ("200 OK", companies.to_string())
    } else if path == format!("/api/data/v9.2/accounts({ACCOUNT_ID})") {
        ("200 OK", row.to_string())
    } else {
        (
            "404 Not Found",
            json!({"error": {"code": "0x80040217", "message": format!("no route {path}")}})
                .to_string(),
        )
    };
    let _ = write!(
        &stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json; odata.metadata=minimal\r\n\
         OData-Version: 4.0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The account as the Dataverse connector reads it from the Web API answering `row`.
async fn dataverse_read(maps: &[TableMap], row: &serde_json::Map<String, Json>) -> Record {
    let root = serve_web_api(Json::Object(row.clone()).to_string());
    let config = DataverseConfig::new(
        root,
        Arc::new(StaticToken(Secret::new("t0k"))),
        Arc::new(EntitySchemas::from_maps(maps, Side::Crm)),
    );
    DataverseConnector::new(config)
        .unwrap()
        .read("accounts", &RecordRef::Id(ACCOUNT_ID.into()))
        .await
        .unwrap()
        .expect("the local Web API answers the account")
}

#[tokio::test]
async fn a_complete_dataverse_webhook_hashes_like_the_connectors_read_of_the_row() {
    let maps = all_maps();
    let map = maps.iter().find(|m| m.name == CUSTOMERS).unwrap();
    let row = account_row(&maps, map);
    let read = dataverse_read(&maps, &row.web_api).await;
    let req = WebhookRequest::new(SourceKind::Dataverse, account_update_webhook(&row));
    let event = event_of(parse_dataverse(&req, &Coverage::from_maps(&maps), now()).unwrap()).event;
    assert!(
        !event.partial,
        "every mapped column and the company are in the post image, so the engine hashes the \
         event without a read"
    );
    assert_eq!(event.record.id.as_deref(), Some(ACCOUNT_ID));
    assert_eq!(event.record.company.as_deref(), Some("USMF"));
    assert_eq!(read.company.as_deref(), Some("USMF"));

    let mut differing = Vec::new();
    for column in account_columns(map) {
        let name = &column.name;
        let (Some(from_event), Some(from_read)) = (event.record.get(name), read.get(name)) else {
            differing.push(format!(
                "{name}: in the event {}, in the read {}",
                event.record.get(name).is_some(),
                read.get(name).is_some()
            ));
            continue;
        };
        if from_event != from_read {
            differing.push(format!("{name}: event {from_event:?}, read {from_read:?}"));
        }
    }
    assert!(
        differing.is_empty(),
        "typed differently:\n{}",
        differing.join("\n")
    );
    assert_eq!(
        side_hash(map, Side::Crm, &event.record),
        side_hash(map, Side::Crm, &read)
    );
}
