//! F&O connector tests against a scripted local server.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use dualwrite_core::map::filter::{CompareOp, Filter, Literal};
use dualwrite_core::ports::{Connector, ConnectorErrorKind, Query, RecordRef, WriteCondition};
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::{Value, ValueType};
use rust_decimal::Decimal;

use super::*;
use crate::entra::{Secret, StaticToken};
use crate::schema::{EntitySchema, EntitySchemas};
use crate::test_server::{Canned, scripted};

fn schemas() -> Arc<EntitySchemas> {
    let mut s = EntitySchemas::default();
    s.insert(EntitySchema {
        entity: "CustomersV3".into(),
        key: vec!["CustomerAccount".into()],
        company_specific: true,
        fields: BTreeMap::from([
            ("CreditLimit".to_string(), ValueType::Decimal),
            ("CreditLimitIsMandatory".to_string(), ValueType::Enum),
            ("PartyType".to_string(), ValueType::Enum),
        ]),
        ..EntitySchema::default()
    });
    Arc::new(s)
}

async fn connector() -> (Arc<crate::test_server::Scripted>, FnoConnector) {
    let (server, base) = scripted().await;
    let config = FnoConfig::new(base, Arc::new(StaticToken(Secret::new("t"))), schemas());
    (server, FnoConnector::new(config).unwrap())
}

const ROW: &str = r#"{"@odata.etag":"W/\"JzEsNTYzNzE0NDU3Nic=\"","dataAreaId":"usmf","CustomerAccount":"US-001","CreditLimit":100000.25,"CreditLimitIsMandatory":"Yes","ModifiedDateTime":"2026-05-02T10:00:00Z"}"#;

#[tokio::test]
async fn read_uses_the_company_key_across_companies() {
    let (server, c) = connector().await;
    server.push(Canned::json(200, ROW));
    let key = RecordKey::new([("dataAreaId", "usmf"), ("CustomerAccount", "US 001")]);
    let r = c
        .read("CustomersV3", &RecordRef::Key(key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        server.seen()[0].uri,
        "/data/CustomersV3(dataAreaId='usmf',CustomerAccount='US%20001')?cross-company=true"
    );
    assert_eq!(
        r.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-001'")
    );
    assert_eq!(r.company.as_deref(), Some("usmf"));
    assert_eq!(
        r.get("CreditLimit"),
        Some(&Value::Decimal(Decimal::from_str("100000.25").unwrap()))
    );
    assert_eq!(
        r.get("CreditLimitIsMandatory"),
        Some(&Value::Enum("Yes".into()))
    );
    assert_eq!(
        r.version.unwrap().modified_on.to_rfc3339(),
        "2026-05-02T10:00:00+00:00"
    );
    assert!(r.etag.is_some());
}

#[tokio::test]
async fn upsert_reads_then_patches_with_the_etag() {
    let (server, c) = connector().await;
    server.push(Canned::json(200, ROW));
    server.push(Canned::json(204, "").with("ETag", "W/\"2\""));
    let mut record = Record::new("CustomersV3").with(
        "CreditLimit",
        Value::Decimal(Decimal::from_str("5.50").unwrap()),
    );
    record.company = Some("usmf".into());
    let at = RecordRef::Id("dataAreaId='usmf',CustomerAccount='US-001'".into());
    let out = c
        .upsert("CustomersV3", &at, &record, WriteCondition::None)
        .await
        .unwrap();
    let seen = server.seen();
    assert_eq!(seen[1].method, "PATCH");
    assert_eq!(
        seen[1].uri,
        "/data/CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')"
    );
    assert_eq!(
        seen[1].header("if-match"),
        Some("W/\"JzEsNTYzNzE0NDU3Nic=\"")
    );
    assert_eq!(
        seen[1].body,
        r#"{"CreditLimit":5.50,"CustomerAccount":"US-001","dataAreaId":"usmf"}"#
    );
    assert!(!out.created);
    assert_eq!(out.etag.as_deref(), Some("W/\"2\""));
    assert_eq!(
        out.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-001'")
    );
}

#[tokio::test]
async fn upsert_of_a_new_record_posts_it() {
    let (server, c) = connector().await;
    server.push(Canned::json(404, "{}"));
    server.push(Canned::json(201, ROW));
    let key = RecordKey::new([("dataAreaId", "usmf"), ("CustomerAccount", "US-001")]);
    let out = c
        .upsert(
            "CustomersV3",
            &RecordRef::Key(key),
            &Record::new("CustomersV3"),
            WriteCondition::None,
        )
        .await
        .unwrap();
    let seen = server.seen();
    assert_eq!(
        (seen[1].method.as_str(), seen[1].uri.as_str()),
        ("POST", "/data/CustomersV3")
    );
    assert_eq!(
        seen[1].body,
        r#"{"CustomerAccount":"US-001","dataAreaId":"usmf"}"#
    );
    assert!(out.created);
}

#[tokio::test]
async fn stale_etag_is_precondition_failed() {
    let (server, c) = connector().await;
    server.push(Canned::json(
        412,
        r#"{"error":{"code":"","message":"The record has been changed."}}"#,
    ));
    let at = RecordRef::Id("dataAreaId='usmf',CustomerAccount='US-001'".into());
    let e = c
        .upsert(
            "CustomersV3",
            &at,
            &Record::new("CustomersV3"),
            WriteCondition::IfMatch("W/\"1\"".into()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ConnectorErrorKind::PreconditionFailed);
}

#[tokio::test]
async fn query_renders_enum_literals_and_pages() {
    let (server, c) = connector().await;
    server.push(Canned::json(200, &format!(r#"{{"value":[{ROW}]}}"#)));
    let f = Filter::And(
        Box::new(Filter::Compare {
            field: "CreditLimitIsMandatory".into(),
            op: CompareOp::Eq,
            value: Literal::Text("Yes".into()),
        }),
        Box::new(Filter::Compare {
            field: "PartyType".into(),
            op: CompareOp::Eq,
            value: Literal::Text("Organization".into()),
        }),
    );
    let page = c
        .query(
            "CustomersV3",
            &Query {
                filter: Some(f),
                ..Query::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(
        server.seen()[0].uri,
        "/data/CustomersV3?cross-company=true&$filter=CreditLimitIsMandatory%20eq%20Microsoft.Dynamics.DataEntities.NoYes%27Yes%27%20and%20PartyType%20eq%20%27Organization%27"
    );
}

#[tokio::test]
async fn upsert_batch_writes_one_changeset() {
    let (server, c) = connector().await;
    server.push(Canned::json(200, ROW));
    server.push(Canned::json(404, "{}"));
    let answer = "--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=cs_2\r\n\r\n\
--cs_2\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\r\n\
--cs_2\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 201 Created\r\n\r\n{}\r\n--cs_2--\r\n--batchresponse_1--\r\n";
    server.push(Canned {
        status: 200,
        headers: vec![(
            "Content-Type".into(),
            "multipart/mixed; boundary=batchresponse_1".into(),
        )],
        body: answer.into(),
    });
    let items = vec![
        (
            RecordRef::Key(RecordKey::new([
                ("dataAreaId", "usmf"),
                ("CustomerAccount", "US-001"),
            ])),
            Record::new("CustomersV3"),
        ),
        (
            RecordRef::Key(RecordKey::new([
                ("dataAreaId", "usmf"),
                ("CustomerAccount", "US-002"),
            ])),
            Record::new("CustomersV3"),
        ),
    ];
    let out = c.upsert_batch("CustomersV3", &items).await.unwrap();
    assert!(!out[0].as_ref().unwrap().created);
    assert!(out[1].as_ref().unwrap().created);
    assert_eq!(
        out[1].as_ref().unwrap().id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-002'")
    );
    let batch = &server.seen()[2];
    assert_eq!(batch.uri, "/data/$batch");
    assert!(batch.body.contains("If-Match: *"));
    assert!(batch.body.contains("POST http://"));
}

#[test]
fn rendered_keys_parse_back() {
    let key = RecordKey::new([("dataAreaId", "usmf"), ("CustomerAccount", "O'Neil, Inc")]);
    assert_eq!(wire::parse_key(&key.to_string()), Some(key));
    assert_eq!(
        wire::parse_key("a=5,b='x'"),
        Some(RecordKey::new([("a", "5"), ("b", "x")]))
    );
    assert_eq!(wire::parse_key("a='x'junk"), None);
}

#[test]
fn only_no_yes_literals_of_enum_fields_take_the_enum_form() {
    let s = schemas();
    let schema = s.get("CustomersV3");
    let f = dualwrite_core::map::filter::parse_filter(
        "not (CreditLimitIsMandatory eq 'No') or (PartyType eq 'Organization' and \
         CreditLimitIsMandatory ne 'Yes') or Comment eq 'Yes' or CreditLimit gt 5",
    )
    .unwrap();
    assert_eq!(
        wire::filter_text(schema, &f),
        "not (CreditLimitIsMandatory eq Microsoft.Dynamics.DataEntities.NoYes'No') or \
         PartyType eq 'Organization' and CreditLimitIsMandatory ne \
         Microsoft.Dynamics.DataEntities.NoYes'Yes' or Comment eq 'Yes' or CreditLimit gt 5"
    );
    // Without enum literals the text is core's rendering, unchanged.
    let plain = dualwrite_core::map::filter::parse_filter("Comment eq '~enum~0~enum~'").unwrap();
    assert_eq!(wire::filter_text(schema, &plain), plain.to_odata());
    // A placeholder-looking text in the filter does not confuse the substitution.
    let tricky = dualwrite_core::map::filter::parse_filter(
        "Comment eq '~enum~0~enum~' and CreditLimitIsMandatory eq 'Yes'",
    )
    .unwrap();
    assert_eq!(
        wire::filter_text(schema, &tricky),
        "Comment eq '~enum~0~enum~' and CreditLimitIsMandatory eq \
         Microsoft.Dynamics.DataEntities.NoYes'Yes'"
    );
}
