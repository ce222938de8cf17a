//! Dataverse webhook payloads parsed into change events.

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use dualwrite_core::{ChangeEvent, LookupRef, Operation, Record, Side, SourceVersion, Value};
use dualwrite_receivers::{
    Coverage, Parsed, PayloadError, SourceKind, WebhookRequest, parse_dataverse,
};
use rust_decimal::Decimal;
use serde_json::json;

use crate::*;

fn dataverse(body: &str) -> WebhookRequest {
    WebhookRequest::new(SourceKind::Dataverse, body)
}

fn time(rfc3339: &str) -> Value {
    Value::DateTime(DateTime::parse_from_rfc3339(rfc3339).unwrap())
}

#[test]
fn vendor_fixture_parses_into_the_expected_event() {
    let req = dataverse(CONTACT_UPDATE)
        .with_header("x-ms-dynamics-organization", "orgname.crm.dynamics.com")
        .with_header("x-ms-dynamics-entity-name", "contact")
        .with_header("x-ms-dynamics-request-name", "Update")
        .with_header(
            "x-ms-correlation-request-id",
            "b374239d-4233-41a9-8b17-a86cb4f737b5",
        );
    let accepted = event_of(parse_dataverse(&req, &coverage(), now()).unwrap());

    let id = "6d81597f-0f9f-e711-8122-000d3aa2331c";
    let modified = Utc.timestamp_millis_opt(1_506_384_247_000).unwrap();
    let fields = dualwrite_core::Fields::from([
        ("firstname", Value::Text("James".into())),
        ("contactid", Value::Text(id.into())),
        ("fullname", Value::Text("James Glynn (sample)".into())),
        ("yomifullname", Value::Text("James Glynn (sample)".into())),
        ("modifiedon", time("2017-09-26T00:04:07+00:00")),
        (
            "modifiedby",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "systemuser".into(),
                id: Some("75c2dd85-e89e-e711-8122-000d3aa2331c".into()),
                key: None,
            })),
        ),
        ("modifiedonbehalfby", Value::Null),
    ]);
    let expected = ChangeEvent {
        event_id: "4af10637-4ea2-e711-8122-000d3aa2331c".into(),
        source: Side::Crm,
        operation: Operation::Upsert,
        record: Record {
            entity: "contacts".into(),
            id: Some(id.into()),
            company: None,
            fields,
            version: Some(SourceVersion {
                modified_on: modified,
                sequence: 0,
            }),
            etag: None,
        },
        // The contacts map also reads `lastname`, which this Update did not carry.
        partial: true,
        received_at: now(),
        correlation_id: Some("b374239d-4233-41a9-8b17-a86cb4f737b5".into()),
        depth: Some(1),
    };
    assert_eq!(accepted.event, expected);
    assert_eq!(accepted.event.group_id(), format!("crm:contacts:{id}"));
}

#[test]
fn an_event_carrying_every_mapped_column_is_complete() {
    let body = edited(CONTACT_UPDATE, |v| {
        v["PostEntityImages"][0]["value"]["Attributes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"key": "lastname", "value": "Glynn"}));
    });
    let accepted = event_of(parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap());
    assert!(!accepted.event.partial);
    assert_eq!(
        accepted.event.record.get("lastname"),
        Some(&Value::Text("Glynn".into()))
    );
}

#[test]
fn create_with_typed_values_and_full_post_image() {
    let accepted =
        event_of(parse_dataverse(&dataverse(ACCOUNT_CREATE), &coverage(), now()).unwrap());
    let ev = accepted.event;
    let rec = &ev.record;
    assert_eq!(ev.event_id, "c1d2e3f4-1aa2-ee11-be37-000d3a8e5c2b");
    assert_eq!(ev.operation, Operation::Upsert);
    assert_eq!(rec.entity, "accounts");
    assert_eq!(
        rec.id.as_deref(),
        Some("3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b")
    );
    // The post image names the company: complete event, company known.
    assert_eq!(rec.company.as_deref(), Some("USMF"));
    assert!(!ev.partial);
    assert_eq!(rec.get("name"), Some(&Value::Text("Fabrikam Inc.".into())));
    assert_eq!(
        rec.get("creditlimit"),
        Some(&Value::Decimal(Decimal::from_str("25000.75").unwrap()))
    );
    assert_eq!(rec.get("customertypecode"), Some(&Value::Choice(3)));
    assert_eq!(rec.get("statecode"), Some(&Value::Choice(0)));
    assert_eq!(rec.get("numberofemployees"), Some(&Value::Integer(120)));
    assert_eq!(rec.get("donotemail"), Some(&Value::Boolean(false)));
    assert_eq!(
        rec.get("createdon"),
        Some(&time("2024-05-01T10:00:00+00:00"))
    );
    // A covered table's lookup resolves to its entity set; an uncovered one keeps its name.
    assert_eq!(
        rec.get("transactioncurrencyid"),
        Some(&Value::Lookup(Arc::new(LookupRef {
            entity_set: "transactioncurrencies".into(),
            id: Some("0a5f9b3c-e89e-e711-8122-000d3aa2331c".into()),
            key: None,
        })))
    );
    assert_eq!(
        rec.get("msdyn_company"),
        Some(&Value::Lookup(Arc::new(LookupRef {
            entity_set: "cdm_company".into(),
            id: Some("1c2d3e4f-e89e-e711-8122-000d3aa2331c".into()),
            key: None,
        })))
    );
    assert_eq!(
        rec.version,
        Some(SourceVersion {
            modified_on: Utc.timestamp_millis_opt(1_714_557_600_000).unwrap(),
            sequence: 5_637_144_576,
        })
    );
    assert_eq!(
        ev.correlation_id.as_deref(),
        Some("9f4c1b2a-6d0e-4a51-9a1d-3f1c2b7e8a10")
    );
}

#[test]
fn company_given_by_guid_only_is_left_for_the_worker_to_resolve() {
    // The Target names the company by id only (no code, no name): the event is complete, its
    // company lookup carries the id, and the worker finds the code through the company's link.
    let body = edited(ACCOUNT_CREATE, |v| v["PostEntityImages"] = json!([]));
    let ev = event_of(parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.record.company, None);
    assert_eq!(
        ev.record.get("msdyn_company"),
        Some(&Value::Lookup(Arc::new(LookupRef {
            entity_set: "cdm_company".into(),
            id: Some("1c2d3e4f-e89e-e711-8122-000d3aa2331c".into()),
            key: None,
        })))
    );
    assert!(!ev.partial, "every needed column is there: {ev:?}");
}

#[test]
fn an_event_without_its_company_column_is_partial() {
    let body = edited(ACCOUNT_CREATE, |v| {
        v["PostEntityImages"] = json!([]);
        let attrs = v["InputParameters"][0]["value"]["Attributes"]
            .as_array_mut()
            .unwrap();
        attrs.retain(|a| a["key"] != "msdyn_company");
    });
    let ev = event_of(parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.record.company, None);
    assert!(
        ev.partial,
        "the worker must read the record to learn its company"
    );
}

/// The account create with `name` left out of the Target and the post image (Dataverse leaves
/// null columns out of images).
fn create_without_name(keep_post_image: bool) -> String {
    edited(ACCOUNT_CREATE, |v| {
        let strip = |entity: &mut serde_json::Value| {
            entity["Attributes"]
                .as_array_mut()
                .unwrap()
                .retain(|a| a["key"] != "name");
        };
        strip(&mut v["InputParameters"][0]["value"]);
        if keep_post_image {
            strip(&mut v["PostEntityImages"][0]["value"]);
        } else {
            v["PostEntityImages"] = json!([]);
        }
    })
}

#[test]
fn a_missing_column_is_null_only_when_post_images_carry_all_columns() {
    let body = create_without_name(true);
    // Default: a post image may have been registered with chosen columns, so a missing column
    // is unknown and the worker reads the row.
    let ev = event_of(parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap()).event;
    assert!(ev.partial);
    assert_eq!(ev.record.get("name"), None);

    // Images registered with all columns: the missing column is null, the event complete.
    let all_columns = coverage().with_complete_post_images(true);
    let ev = event_of(parse_dataverse(&dataverse(&body), &all_columns, now()).unwrap()).event;
    assert!(!ev.partial, "{ev:?}");
    assert_eq!(ev.record.get("name"), Some(&Value::Null));

    // Without a post image the Target holds only what changed: still partial.
    let body = create_without_name(false);
    let ev = event_of(parse_dataverse(&dataverse(&body), &all_columns, now()).unwrap()).event;
    assert!(ev.partial);
}

#[test]
fn delete_target_is_an_entity_reference() {
    let ev =
        event_of(parse_dataverse(&dataverse(ACCOUNT_DELETE), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.operation, Operation::Delete);
    assert_eq!(ev.event_id, "d4e5f6a7-1aa2-ee11-be37-000d3a8e5c2b");
    assert_eq!(ev.record.entity, "accounts");
    assert_eq!(
        ev.record.id.as_deref(),
        Some("3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b")
    );
    assert_eq!(
        ev.record.company.as_deref(),
        Some("USMF"),
        "from the pre image's KeyAttributes"
    );
    assert!(ev.record.fields.is_empty());
    assert!(!ev.partial);
    // The delete's version is when it happened (OperationCreatedOn, -0500), not the pre image's.
    let deleted_at = DateTime::parse_from_rfc3339("2024-05-01T06:00:00-05:00").unwrap();
    assert_eq!(
        ev.record.version.map(|v| v.modified_on),
        Some(deleted_at.to_utc())
    );
}

#[test]
fn size_exceeded_body_becomes_a_partial_event() {
    let req = dataverse(MSG_SIZE_EXCEEDED).with_header("x-ms-dynamics-msg-size-exceeded", "true");
    let ev = event_of(parse_dataverse(&req, &coverage(), now()).unwrap()).event;
    assert_eq!(ev.operation, Operation::Upsert);
    assert!(ev.partial);
    assert_eq!(ev.record.entity, "accounts");
    assert_eq!(
        ev.record.id.as_deref(),
        Some("3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b")
    );
    assert!(ev.record.fields.is_empty());
    assert_eq!(ev.event_id, "e5f6a7b8-1aa2-ee11-be37-000d3a8e5c2b");

    // The same body without the header is a malformed Update.
    let err = parse_dataverse(&dataverse(MSG_SIZE_EXCEEDED), &coverage(), now()).unwrap_err();
    assert_eq!(err, PayloadError::Missing("InputParameters".into()));
}

#[test]
fn event_id_falls_back_to_request_id_then_correlation() {
    let body = edited(CONTACT_UPDATE, |v| {
        v["OperationId"] = json!(null);
        v["RequestId"] = json!("req-1");
    });
    let ev = event_of(parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap()).event;
    assert_eq!(ev.event_id, "req-1");

    let body = edited(CONTACT_UPDATE, |v| v["OperationId"] = json!(null));
    let ev = event_of(parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap()).event;
    // Correlation, message, record, modifiedon, depth, row version (none), values' hash.
    let prefix = "b374239d-4233-41a9-8b17-a86cb4f737b5:Update:6d81597f-0f9f-e711-8122-000d3aa2331c:2017-09-26T00:04:07+00:00:1:-:";
    assert!(ev.event_id.starts_with(prefix), "{}", ev.event_id);
    let hash = &ev.event_id[prefix.len()..];
    assert!(
        hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
}

/// The vendor fixture as a synchronous step sends it: no system job, so `OperationId` is the
/// empty GUID (spelled `spelling`) and `RequestId` null; `edit` makes it another change.
fn sync_step(spelling: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    edited(CONTACT_UPDATE, |v| {
        v["Mode"] = json!(0);
        v["OperationId"] = json!(spelling);
        v["RequestId"] = json!(null);
        edit(v);
    })
}

fn event_id_of(body: &str) -> String {
    event_of(parse_dataverse(&dataverse(body), &coverage(), now()).unwrap())
        .event
        .event_id
}

const EMPTY_GUIDS: [&str; 5] = [
    "00000000-0000-0000-0000-000000000000",
    "{00000000-0000-0000-0000-000000000000}",
    "(00000000-0000-0000-0000-000000000000)",
    "00000000000000000000000000000000",
    "",
];

/// Regression: every event of a synchronous step took the empty GUID as its id, so all but
/// the first were dropped as duplicates for the idempotency window.
#[test]
fn sync_step_changes_with_the_empty_operation_id_get_distinct_ids() {
    for spelling in EMPTY_GUIDS {
        let first = sync_step(spelling, |_| {});
        let second = sync_step(spelling, |v| {
            v["InputParameters"][0]["value"]["Attributes"][4]["value"] =
                json!("/Date(1506384249000)/");
        });
        let (a, b) = (event_id_of(&first), event_id_of(&second));
        assert!(!a.contains("00000000"), "{spelling:?}: {a}");
        assert_ne!(a, b, "{spelling:?}: two changes, two ids");
        assert_eq!(
            a,
            event_id_of(&first),
            "{spelling:?}: a redelivery keeps its id"
        );
    }
}

#[test]
fn an_empty_request_id_is_no_id_either_and_a_real_one_is_used() {
    let empty = sync_step(EMPTY_GUIDS[0], |v| v["RequestId"] = json!(EMPTY_GUIDS[1]));
    let id = event_id_of(&empty);
    assert!(
        id.starts_with("b374239d-4233-41a9-8b17-a86cb4f737b5:Update:"),
        "{id}"
    );
    let with_request = sync_step(EMPTY_GUIDS[0], |v| {
        v["RequestId"] = json!("7e1d2c3b-4aa2-ee11-be37-000d3a8e5c2b")
    });
    assert_eq!(
        event_id_of(&with_request),
        "7e1d2c3b-4aa2-ee11-be37-000d3a8e5c2b"
    );
}

#[test]
fn sync_changes_of_one_record_within_one_correlation_and_second_are_told_apart() {
    let base = sync_step(EMPTY_GUIDS[0], |_| {});
    // Another update in the same second: other values (modifiedon has whole seconds).
    let other_values = sync_step(EMPTY_GUIDS[0], |v| {
        v["InputParameters"][0]["value"]["Attributes"][0]["value"] = json!("Jim");
    });
    // A plug-in's nested update of the same record: same values, one level deeper.
    let nested = sync_step(EMPTY_GUIDS[0], |v| v["Depth"] = json!(2));
    // The row's version, when the step's image carries it.
    let versioned = |n: i64| {
        sync_step(EMPTY_GUIDS[0], |v| {
            v["PostEntityImages"] = json!([{"key": "PostImage", "value": {
                "Attributes": [{"key": "versionnumber", "value": n}],
                "LogicalName": "contact"}}]);
        })
    };
    // The Target's RowVersion, when it carries one.
    let row_version = sync_step(EMPTY_GUIDS[0], |v| {
        v["InputParameters"][0]["value"]["RowVersion"] = json!("71004878");
    });
    let ids = [
        event_id_of(&base),
        event_id_of(&other_values),
        event_id_of(&nested),
        event_id_of(&versioned(1001)),
        event_id_of(&versioned(1002)),
        event_id_of(&row_version),
    ];
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
        }
    }
    assert!(ids[5].contains(":71004878:"), "{}", ids[5]);
    assert_eq!(event_id_of(&versioned(1001)), ids[3], "redelivery");
}

#[test]
fn sync_deletes_and_creates_within_one_correlation_are_told_apart() {
    let delete = |record: &str| {
        edited(ACCOUNT_DELETE, |v| {
            v["Mode"] = json!(0);
            v["OperationId"] = json!(EMPTY_GUIDS[0]);
            v["PrimaryEntityId"] = json!(record);
            v["InputParameters"][0]["value"]["Id"] = json!(record);
        })
    };
    let first = delete("3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b");
    // A cascade: another account deleted by the same request, at the same instant.
    let second = delete("4a3b2c1d-1aa2-ee11-be37-000d3a8e5c2b");
    assert_ne!(event_id_of(&first), event_id_of(&second));
    // A redelivery: the same body received a minute later.
    let redelivered = event_of(
        parse_dataverse(
            &dataverse(&first),
            &coverage(),
            now() + chrono::Duration::minutes(1),
        )
        .unwrap(),
    )
    .event
    .event_id;
    assert_eq!(event_id_of(&first), redelivered, "redelivery");
    // A delete has no modifiedon: its time is OperationCreatedOn.
    assert!(
        event_id_of(&first)
            .contains(":Delete:3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b:2024-05-01T11:00:00+00:00:"),
        "{}",
        event_id_of(&first)
    );

    // The same record created and deleted within one correlation.
    let create = edited(ACCOUNT_CREATE, |v| {
        v["Mode"] = json!(0);
        v["OperationId"] = json!(EMPTY_GUIDS[0]);
        v["CorrelationId"] = json!("5a6b7c8d-0e1f-4a2b-9c3d-4e5f6a7b8c9d");
    });
    let (created, deleted) = (event_id_of(&create), event_id_of(&first));
    assert_ne!(created, deleted);
    assert!(created.starts_with("5a6b7c8d-0e1f-4a2b-9c3d-4e5f6a7b8c9d:Create:3f2e1d0c"));
}

#[test]
fn uncovered_entity_is_ignored() {
    let body = edited(CONTACT_UPDATE, |v| {
        v["PrimaryEntityName"] = json!("lead");
    });
    let parsed = parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap();
    assert_eq!(
        parsed,
        Parsed::Ignored {
            entity: "lead".into()
        }
    );
    // With no maps at all, nothing is covered.
    let parsed = parse_dataverse(&dataverse(CONTACT_UPDATE), &Coverage::default(), now()).unwrap();
    assert_eq!(
        parsed,
        Parsed::Ignored {
            entity: "contact".into()
        }
    );
}

#[test]
fn erp_to_crm_map_does_not_cover_its_dataverse_table() {
    let body = edited(CONTACT_UPDATE, |v| {
        v["PrimaryEntityName"] = json!("transactioncurrency")
    });
    let parsed = parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap();
    assert_eq!(
        parsed,
        Parsed::Ignored {
            entity: "transactioncurrency".into()
        }
    );
}

#[test]
fn text_that_looks_like_a_wcf_date_stays_text_in_a_text_column() {
    // A user may type "/Date(0)/" into a first name: the map declares the column text, so it
    // is neither turned into a date nor refused.
    for typed in ["/Date(0)/", "/Date(soon)/"] {
        let body = edited(CONTACT_UPDATE, |v| {
            let attributes = v["InputParameters"][0]["value"]["Attributes"]
                .as_array_mut()
                .unwrap();
            let first = attributes
                .iter_mut()
                .find(|a| a["key"] == "firstname")
                .expect("the fixture sets firstname");
            first["value"] = json!(typed);
        });
        let Parsed::Event(event) = parse_dataverse(&dataverse(&body), &coverage(), now()).unwrap()
        else {
            panic!("an event");
        };
        assert_eq!(
            event.event.record.fields.get("firstname"),
            Some(&Value::Text(typed.into())),
            "{typed}"
        );
    }
}

#[test]
fn bad_payloads_name_the_problem() {
    let cov = coverage();
    let parse = |body: &str| {
        parse_dataverse(&dataverse(body), &cov, now())
            .unwrap_err()
            .to_string()
    };

    assert!(parse("{not json").starts_with("body is not valid JSON"));
    let no_target = edited(CONTACT_UPDATE, |v| v["InputParameters"] = json!([]));
    assert_eq!(parse(&no_target), "InputParameters: no \"Target\" entry");
    let bad_depth = edited(CONTACT_UPDATE, |v| v["Depth"] = json!("one"));
    assert_eq!(parse(&bad_depth), "field \"Depth\": expected a number");
    let no_message = edited(CONTACT_UPDATE, |v| {
        v.as_object_mut().unwrap().remove("MessageName");
    });
    assert_eq!(parse(&no_message), "missing field \"MessageName\"");
    let assoc = edited(CONTACT_UPDATE, |v| v["MessageName"] = json!("Associate"));
    assert_eq!(
        parse(&assoc),
        "MessageName \"Associate\" is not handled here: expected one of Create, Update, Delete"
    );
    let bad_date = edited(CONTACT_UPDATE, |v| {
        v["InputParameters"][0]["value"]["Attributes"][4]["value"] = json!("/Date(soon)/");
    });
    assert_eq!(
        parse(&bad_date),
        "field \"InputParameters[0].value.Attributes.modifiedon\": \"/Date(soon)/\" is not a WCF date like /Date(1506384247000-0700)/"
    );
    let bad_attrs = edited(CONTACT_UPDATE, |v| {
        v["InputParameters"][0]["value"]["Attributes"] = json!(3)
    });
    assert_eq!(
        parse(&bad_attrs),
        "field \"InputParameters[0].value.Attributes\": expected a list of {key, value}"
    );
    let update_with_reference = edited(ACCOUNT_DELETE, |v| v["MessageName"] = json!("Update"));
    assert_eq!(
        parse(&update_with_reference),
        "field \"InputParameters[0].value\": expected an Entity with Attributes (the Target of a Create/Update)"
    );
}

#[test]
fn headers_must_agree_with_the_body() {
    let cov = coverage();
    let req = dataverse(CONTACT_UPDATE).with_header("x-ms-dynamics-entity-name", "account");
    assert_eq!(
        parse_dataverse(&req, &cov, now()).unwrap_err().to_string(),
        "header x-ms-dynamics-entity-name is \"account\" but the body's PrimaryEntityName is \"contact\""
    );
    let req = dataverse(CONTACT_UPDATE).with_header("X-MS-Dynamics-Request-Name", "Create");
    assert!(matches!(
        parse_dataverse(&req, &cov, now()),
        Err(PayloadError::HeaderMismatch {
            header: "x-ms-dynamics-request-name",
            ..
        })
    ));
}
