//! F&O data events and business events parsed into change events.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use dualwrite_core::{Operation, Side, SourceVersion, Value};
use dualwrite_receivers::{
    Parsed, PayloadError, SourceKind, WebhookRequest, parse_business_event, parse_data_event,
    parse_fno,
};
use rust_decimal::Decimal;
use serde_json::json;

use crate::*;

fn fno(body: &str) -> WebhookRequest {
    WebhookRequest::new(SourceKind::Fno, body)
}

#[test]
fn data_event_maps_the_virtual_entity_back_to_the_fno_entity() {
    let accepted = event_of(parse_data_event(&fno(FNO_DATA_EVENT), &coverage(), now()).unwrap());
    let ev = accepted.event;
    let rec = &ev.record;
    assert_eq!(ev.source, Side::Erp);
    assert_eq!(ev.operation, Operation::Upsert);
    assert_eq!(ev.event_id, "f6a7b8c9-1aa2-ee11-be37-000d3a8e5c2b");
    assert_eq!(rec.entity, "CustomersV3");
    assert_eq!(
        rec.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-001'")
    );
    assert_eq!(rec.company.as_deref(), Some("usmf"));
    assert_eq!(
        ev.group_id(),
        "erp:CustomersV3:dataAreaId='usmf',CustomerAccount='US-001'"
    );
    // Field names as the maps know them; the Target's value wins over the pre image's.
    assert_eq!(
        rec.get("CustomerAccount"),
        Some(&Value::Text("US-001".into()))
    );
    assert_eq!(
        rec.get("OrganizationName"),
        Some(&Value::Text("Contoso Retail San Diego".into()))
    );
    assert_eq!(
        rec.get("CreditLimit"),
        Some(&Value::Decimal(Decimal::from_str("250000.5").unwrap()))
    );
    assert_eq!(
        rec.get("SalesCurrencyCode"),
        Some(&Value::Text("USD".into()))
    );
    assert_eq!(
        rec.get("CreditLimitIsMandatory"),
        Some(&Value::Choice(200_000_001))
    );
    // Unknown fields are kept under the name they were sent with.
    assert!(rec.get("mserp_customersv3id").is_some());
    // Every field the map reads is present, but the enum arrives as the virtual entity's
    // option value, not the symbol (`Yes`) the map and the connector's reads use: the payload
    // cannot be typed as declared, so the worker reads the record.
    assert!(
        ev.partial,
        "an enum sent as an option value makes the event partial"
    );
    assert_eq!(
        rec.version,
        Some(SourceVersion {
            modified_on: Utc.timestamp_millis_opt(1_714_568_400_000).unwrap(),
            sequence: 0
        })
    );
    assert_eq!(
        ev.depth,
        Some(1),
        "the context's Depth travels with the event"
    );
}

#[test]
fn data_event_missing_a_mapped_field_is_partial_not_null() {
    // F&O sends every field but null date-times: a text field absent means the event does
    // not carry the row (e.g. a trimmed payload), the worker reads the record.
    let body = edited(FNO_DATA_EVENT, |v| {
        v["InputParameters"][0]["value"]["Attributes"]
            .as_array_mut()
            .unwrap()
            .remove(5);
    });
    let ev = event_of(parse_data_event(&fno(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.record.get("SalesCurrencyCode"), None);
    assert!(ev.partial);
}

#[test]
fn data_event_missing_a_date_time_reads_it_as_null() {
    // The fixture has no LastInvoiceDateTime: F&O drops null date-times from data events.
    // With the enum sent as the symbol the connector reads, the event is complete.
    let body = edited(FNO_DATA_EVENT, |v| {
        for a in v["InputParameters"][0]["value"]["Attributes"]
            .as_array_mut()
            .unwrap()
        {
            if a["key"] == "mserp_creditlimitismandatory" {
                a["value"] = json!("Yes");
            }
        }
    });
    let ev = event_of(parse_data_event(&fno(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.record.get("LastInvoiceDateTime"), Some(&Value::Null));
    assert!(!ev.partial, "{ev:?}");
}

#[test]
fn data_event_delete_takes_the_key_from_key_attributes() {
    let body = edited(FNO_DATA_EVENT, |v| {
        v["MessageName"] = json!("OnExternalDeleted");
        v["PreEntityImages"] = json!([]);
        v["InputParameters"][0]["value"] = json!({
            "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
            "Id": "00000da5-0000-0000-e84d-005001000000",
            "KeyAttributes": [
                {"key": "mserp_dataareaid", "value": "USMF"},
                {"key": "mserp_customeraccount", "value": "US-002"}
            ],
            "LogicalName": "mserp_customersv3",
            "Name": null,
            "RowVersion": null
        });
    });
    let ev = event_of(parse_data_event(&fno(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.operation, Operation::Delete);
    assert_eq!(
        ev.record.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-002'")
    );
    assert!(ev.record.fields.is_empty());
    assert!(!ev.partial);
    assert_eq!(
        ev.record.version.map(|v| v.modified_on),
        Some(Utc.timestamp_millis_opt(1_714_568_401_000).unwrap())
    );
}

#[test]
fn data_event_delete_takes_the_key_from_the_pre_image_input_parameter() {
    // As the reference describes data events ("entity fields in InputParameters Target and
    // PreImage"): the delete's Target is a bare reference, the row is the PreImage parameter.
    let body = edited(FNO_DATA_EVENT, |v| {
        v["MessageName"] = json!("OnExternalDeleted");
        let pre = v["PreEntityImages"][0]["value"].clone();
        assert!(pre.is_object(), "the fixture has a pre image");
        v["PreEntityImages"] = json!([]);
        v["InputParameters"] = json!([
            {"key": "Target", "value": {
                "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
                "Id": "00000da5-0000-0000-e84d-005001000000", "KeyAttributes": [],
                "LogicalName": "mserp_customersv3", "Name": null, "RowVersion": null
            }},
            {"key": "PreImage", "value": pre}
        ]);
    });
    let ev = event_of(parse_data_event(&fno(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.operation, Operation::Delete);
    assert_eq!(
        ev.record.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-001'")
    );
}

#[test]
fn a_pre_image_input_parameter_that_is_not_an_entity_is_refused_naming_it() {
    let body = edited(FNO_DATA_EVENT, |v| {
        v["InputParameters"]
            .as_array_mut()
            .unwrap()
            .push(json!({"key": "PreImage", "value": 7}));
    });
    let err = parse_data_event(&fno(&body), &coverage(), now()).unwrap_err();
    assert!(
        err.to_string().contains("InputParameters[1].value"),
        "{err}"
    );
}

#[test]
fn data_event_without_its_key_is_refused() {
    let body = edited(FNO_DATA_EVENT, |v| {
        v["PreEntityImages"] = json!([]);
        v["InputParameters"][0]["value"]["Attributes"]
            .as_array_mut()
            .unwrap()
            .remove(2);
    });
    let err = parse_data_event(&fno(&body), &coverage(), now()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "CustomersV3: key field \"CustomerAccount\" is missing from the payload (looked in Target, its KeyAttributes and the entity images); the record key cannot be built"
    );
}

#[test]
fn data_event_messages_and_entities() {
    let cov = coverage();
    let plain_update = edited(FNO_DATA_EVENT, |v| v["MessageName"] = json!("Update"));
    assert!(matches!(
        parse_data_event(&fno(&plain_update), &cov, now()),
        Err(PayloadError::UnsupportedMessage { .. })
    ));
    let other = edited(FNO_DATA_EVENT, |v| {
        v["PrimaryEntityName"] = json!("mserp_vendorsv2")
    });
    assert_eq!(
        parse_data_event(&fno(&other), &cov, now()).unwrap(),
        Parsed::Ignored {
            entity: "mserp_vendorsv2".into()
        }
    );
    // An erp_to_crm map covers its F&O entity; its Dataverse table is not covered.
    let currency = edited(FNO_DATA_EVENT, |v| {
        v["PrimaryEntityName"] = json!("mserp_currencies");
        v["InputParameters"][0]["value"]["Attributes"] =
            json!([{"key": "mserp_currencycode", "value": "EUR"}]);
        v["PreEntityImages"] = json!([]);
    });
    let ev = event_of(parse_data_event(&fno(&currency), &cov, now()).unwrap()).event;
    assert_eq!(ev.record.entity, "Currencies");
    assert_eq!(ev.record.id.as_deref(), Some("CurrencyCode='EUR'"));
    assert_eq!(ev.record.company, None);
}

#[test]
fn business_event_routes_to_an_entity_and_is_partial() {
    let ev = event_of(
        parse_business_event(FNO_BUSINESS_EVENT.as_bytes(), &coverage(), &routes(), now()).unwrap(),
    )
    .event;
    assert_eq!(ev.event_id, "3C47A4CD-5C9E-4B0B-A7D6-2F1D2C9E7B11");
    assert_eq!(ev.source, Side::Erp);
    assert_eq!(ev.operation, Operation::Upsert);
    assert!(ev.partial);
    assert_eq!(ev.record.entity, "SalesInvoiceHeadersV2");
    assert_eq!(
        ev.record.id.as_deref(),
        Some("dataAreaId='usmf',InvoiceNumber='CIV-000666'")
    );
    assert_eq!(ev.record.company.as_deref(), Some("usmf"));
    assert_eq!(
        ev.record.get("InvoiceNumber"),
        Some(&Value::Text("CIV-000666".into()))
    );
    let time = DateTime::parse_from_rfc3339("2022-12-30T13:51:15.2942742Z")
        .unwrap()
        .to_utc();
    assert_eq!(
        ev.record.version,
        Some(SourceVersion {
            modified_on: time,
            sequence: 5_637_611_083
        })
    );
}

#[test]
fn business_event_time_falls_back_to_wcf_event_time() {
    let body = edited(FNO_BUSINESS_EVENT, |v| {
        v.as_object_mut().unwrap().remove("EventTimeIso8601");
    });
    let ev =
        event_of(parse_business_event(body.as_bytes(), &coverage(), &routes(), now()).unwrap())
            .event;
    assert_eq!(
        ev.record.version.map(|v| v.modified_on),
        Some(Utc.timestamp_millis_opt(1_672_408_275_000).unwrap())
    );
}

#[test]
fn business_event_problems() {
    let cov = coverage();
    let parse = |body: &str| parse_business_event(body.as_bytes(), &cov, &routes(), now());

    let unrouted = edited(FNO_BUSINESS_EVENT, |v| {
        v["BusinessEventId"] = json!("VendorCreatedBusinessEvent")
    });
    assert_eq!(
        parse(&unrouted).unwrap(),
        Parsed::Ignored {
            entity: "VendorCreatedBusinessEvent".into()
        }
    );
    let mut other_routes = routes();
    other_routes
        .get_mut("SalesInvoicePostedBusinessEvent")
        .unwrap()
        .entity = "ProjectsV2".into();
    assert_eq!(
        parse_business_event(FNO_BUSINESS_EVENT.as_bytes(), &cov, &other_routes, now()).unwrap(),
        Parsed::Ignored {
            entity: "ProjectsV2".into()
        }
    );

    let no_control = edited(FNO_BUSINESS_EVENT, |v| {
        v.as_object_mut().unwrap().remove("ControlNumber");
    });
    assert_eq!(
        parse(&no_control).unwrap_err(),
        PayloadError::Missing("ControlNumber".into())
    );
    let no_invoice = edited(FNO_BUSINESS_EVENT, |v| {
        v.as_object_mut().unwrap().remove("InvoiceId");
    });
    assert_eq!(
        parse(&no_invoice).unwrap_err().to_string(),
        "SalesInvoiceHeadersV2: key field \"InvoiceNumber\" is missing from the payload (looked in envelope field \"InvoiceId\"); the record key cannot be built"
    );
    let bad_time = edited(FNO_BUSINESS_EVENT, |v| {
        v["EventTimeIso8601"] = json!("yesterday")
    });
    assert_eq!(
        parse(&bad_time).unwrap_err().to_string(),
        "field \"EventTimeIso8601\": \"yesterday\" is not an ISO 8601 date-time"
    );
}

#[test]
fn fno_endpoint_tells_the_two_kinds_apart() {
    let cov = coverage();
    let data = event_of(parse_fno(&fno(FNO_DATA_EVENT), &cov, &routes(), now()).unwrap());
    assert_eq!(data.event.record.entity, "CustomersV3");
    let business = event_of(parse_fno(&fno(FNO_BUSINESS_EVENT), &cov, &routes(), now()).unwrap());
    assert_eq!(business.event.record.entity, "SalesInvoiceHeadersV2");
    assert_eq!(
        parse_fno(&fno("{\"hello\":1}"), &cov, &BTreeMap::new(), now()).unwrap_err(),
        PayloadError::UnknownFnoPayload
    );
}

#[test]
fn data_event_version_is_the_rows_modification_time_in_either_date_form() {
    // WCF date (as the vendor sends it) or ISO 8601 text: the version is the row's own
    // ModifiedDateTime, never the later OperationCreatedOn, so the echo of a write carries the
    // version that write's answer gave.
    let iso = edited(FNO_DATA_EVENT, |v| {
        for a in v["InputParameters"][0]["value"]["Attributes"]
            .as_array_mut()
            .unwrap()
        {
            if a["key"] == "mserp_modifieddatetime" {
                a["value"] = json!("2024-05-01T13:00:00.250Z");
            }
        }
    });
    let ev = event_of(parse_data_event(&fno(&iso), &coverage(), now()).unwrap()).event;
    assert_eq!(
        ev.record.version.map(|v| v.modified_on),
        Some(Utc.timestamp_millis_opt(1_714_568_400_250).unwrap())
    );
    let wcf = event_of(parse_data_event(&fno(FNO_DATA_EVENT), &coverage(), now()).unwrap()).event;
    assert_eq!(
        wcf.record.version.map(|v| v.modified_on),
        Some(Utc.timestamp_millis_opt(1_714_568_400_000).unwrap())
    );
}

/// F&O data events are RemoteExecutionContexts too: an empty-GUID `OperationId` (and
/// `RequestId`) is no id there either, and the derived id follows the Dataverse rule.
#[test]
fn data_events_with_the_empty_operation_id_get_distinct_ids() {
    let sync = |modified: &str| {
        edited(FNO_DATA_EVENT, |v| {
            v["OperationId"] = json!("{00000000-0000-0000-0000-000000000000}");
            v["RequestId"] = json!("00000000-0000-0000-0000-000000000000");
            v["InputParameters"][0]["value"]["Attributes"][7]["value"] = json!(modified);
        })
    };
    let id = |body: &str| {
        event_of(parse_data_event(&fno(body), &coverage(), now()).unwrap())
            .event
            .event_id
    };
    let first = sync("/Date(1714568400000)/");
    let second = sync("/Date(1714568460000)/");
    assert_ne!(id(&first), id(&second));
    // A redelivery: the same body received a minute later.
    let redelivered = event_of(
        parse_data_event(
            &fno(&first),
            &coverage(),
            now() + chrono::Duration::minutes(1),
        )
        .unwrap(),
    )
    .event
    .event_id;
    assert_eq!(id(&first), redelivered, "a redelivery keeps its id");
    assert!(
        id(&first).starts_with(
            "2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f:OnExternalUpdated:dataAreaId='usmf',CustomerAccount='US-001':2024-05-01T13:00:00+00:00:1:-:"
        ),
        "{}",
        id(&first)
    );
}

/// F&O's virtual tables are named after the entity's physical name (`CustCustomerV3Entity` →
/// `mserp_custcustomerv3entity`), not its OData name: a map giving `erp.physical_name` makes
/// such data events covered; without it they are ignored (the OData-name form stays covered).
#[test]
fn data_events_of_the_physical_name_virtual_table_are_covered_when_the_map_names_it() {
    let body = edited(FNO_DATA_EVENT, |v| {
        v["PrimaryEntityName"] = json!("mserp_custcustomerv3entity");
        v["InputParameters"][0]["value"]["LogicalName"] = json!("mserp_custcustomerv3entity");
    });
    let Ok(Parsed::Ignored { entity }) = parse_data_event(&fno(&body), &coverage(), now()) else {
        panic!("a virtual table no map names is ignored");
    };
    assert_eq!(entity, "mserp_custcustomerv3entity");

    let mut maps = test_maps();
    for m in &mut maps {
        if m.erp.entity == "CustomersV3" {
            m.erp.physical_name = Some("CustCustomerV3Entity".into());
        }
    }
    let named = Coverage::from_maps(&maps);
    let ev = event_of(parse_data_event(&fno(&body), &named, now()).unwrap()).event;
    assert_eq!(ev.record.entity, "CustomersV3");
    assert_eq!(
        ev.record.get("CustomerAccount"),
        Some(&Value::Text("US-001".into()))
    );
    // The OData-name form is still recognised.
    let event = event_of(parse_data_event(&fno(FNO_DATA_EVENT), &named, now()).unwrap()).event;
    assert_eq!(event.record.entity, "CustomersV3");
}
