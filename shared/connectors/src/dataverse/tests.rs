//! Dataverse connector tests against a scripted local server: URLs, headers and bodies sent,
//! answers turned into records and outcomes.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorErrorKind, Query, RecordRef, WriteCondition,
};
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::{LookupRef, Value, ValueType};
use rust_decimal::Decimal;

use super::*;
use crate::entra::{Secret, StaticToken};
use crate::schema::{EntitySchema, EntitySchemas};
use crate::test_server::{Canned, scripted};

const USMF: &str = "6d81597f-0f9f-e711-8122-000d3aa2331c";
const COMPANIES: &str = r#"{"value":[{"cdm_companyid":"6d81597f-0f9f-e711-8122-000d3aa2331c","cdm_companycode":"USMF"}]}"#;

fn schemas() -> Arc<EntitySchemas> {
    let mut s = EntitySchemas::default();
    s.insert(EntitySchema {
        entity: "accounts".into(),
        logical_name: Some("account".into()),
        primary_id: Some("accountid".into()),
        key: vec!["accountnumber".into()],
        company_field: Some("msdyn_company".into()),
        company_specific: true,
        fields: BTreeMap::from([
            ("creditlimit".to_string(), ValueType::Decimal),
            ("customertypecode".to_string(), ValueType::Choice),
            ("transactioncurrencyid".to_string(), ValueType::Lookup),
            ("msdyn_since".to_string(), ValueType::Date),
        ]),
        lookup_targets: BTreeMap::from([(
            "transactioncurrencyid".to_string(),
            "transactioncurrencies".to_string(),
        )]),
    });
    Arc::new(s)
}

async fn connector() -> (Arc<crate::test_server::Scripted>, DataverseConnector) {
    let (server, base) = scripted().await;
    let config = DataverseConfig::new(
        format!("{base}/api/data/v9.2"),
        Arc::new(StaticToken(Secret::new("t0k"))),
        schemas(),
    );
    (server, DataverseConnector::new(config).unwrap())
}

const ROW: &str = r#"{"@odata.etag":"W/\"468026\"","accountid":"0a1b","accountnumber":"A1","name":"Contoso","creditlimit":12345678901234.5678,"customertypecode":3,"_transactioncurrencyid_value":"c0ffee","_msdyn_company_value":"6D81597F-0F9F-E711-8122-000D3AA2331C","msdyn_since":"2026-05-01","modifiedon":"2026-05-02T10:00:00Z","versionnumber":468026,"_transactioncurrencyid_value@OData.Community.Display.V1.FormattedValue":"US Dollar"}"#;

#[tokio::test]
async fn read_by_alternate_key_resolves_the_company_and_converts_every_field() {
    let (server, c) = connector().await;
    server.push(Canned::json(200, COMPANIES));
    server.push(Canned::json(200, ROW));
    let key = RecordKey::new([("accountnumber", "A'1"), ("msdyn_company", "usmf")]);
    let record = c
        .read("accounts", &RecordRef::Key(key))
        .await
        .unwrap()
        .unwrap();
    let seen = server.seen();
    assert_eq!(
        seen[0].uri,
        "/api/data/v9.2/cdm_companies?$select=cdm_companyid,cdm_companycode"
    );
    assert_eq!(
        seen[1].uri,
        format!("/api/data/v9.2/accounts(accountnumber='A''1',_msdyn_company_value={USMF})")
    );
    assert_eq!(seen[1].header("authorization"), Some("Bearer t0k"));
    assert_eq!(seen[1].header("odata-version"), Some("4.0"));
    assert_eq!(seen[1].header("odata-maxversion"), Some("4.0"));
    assert_eq!(record.id.as_deref(), Some("0a1b"));
    assert_eq!(record.etag.as_deref(), Some("W/\"468026\""));
    assert_eq!(record.company.as_deref(), Some("USMF"));
    let v = record.version.unwrap();
    assert_eq!(v.sequence, 468026);
    assert_eq!(v.modified_on.to_rfc3339(), "2026-05-02T10:00:00+00:00");
    assert_eq!(
        record.get("creditlimit"),
        Some(&Value::Decimal(
            Decimal::from_str("12345678901234.5678").unwrap()
        ))
    );
    assert_eq!(record.get("customertypecode"), Some(&Value::Choice(3)));
    assert_eq!(
        record.get("transactioncurrencyid"),
        Some(&Value::Lookup(Arc::new(LookupRef {
            entity_set: "transactioncurrencies".into(),
            id: Some("c0ffee".into()),
            key: None
        })))
    );
    assert_eq!(
        record.get("msdyn_since"),
        Some(&Value::Date(
            chrono::NaiveDate::from_ymd_opt(2026, 5, 1).unwrap()
        ))
    );
    assert!(record.get("msdyn_company").is_none());
    assert!(record.fields.keys().all(|k| !k.contains('@')));
}

#[tokio::test]
async fn read_of_a_missing_record_is_none() {
    let (server, c) = connector().await;
    server.push(Canned::json(
        404,
        r#"{"error":{"code":"0x80040217","message":"Does Not Exist"}}"#,
    ));
    assert!(
        c.read("accounts", &RecordRef::Id("0a1b".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(server.seen()[0].uri, "/api/data/v9.2/accounts(0a1b)");
}

#[tokio::test]
async fn upsert_sends_typed_body_binds_and_conditions() {
    let (server, c) = connector().await;
    server.push(Canned::json(201, ROW));
    server.push(Canned::json(200, COMPANIES));
    let mut record = Record::new("accounts")
        .with(
            "creditlimit",
            Value::Decimal(Decimal::from_str("1000.10").unwrap()),
        )
        .with("customertypecode", Value::Choice(3))
        .with(
            "msdyn_since",
            Value::Date(chrono::NaiveDate::from_ymd_opt(2026, 5, 1).unwrap()),
        )
        .with(
            "transactioncurrencyid",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "transactioncurrencies".into(),
                id: Some("c0ffee".into()),
                key: None,
            })),
        );
    record.company = Some("USMF".into());
    let out = c
        .upsert(
            "accounts",
            &RecordRef::Id("0a1b".into()),
            &record,
            WriteCondition::IfMatch("W/\"1\"".into()),
        )
        .await
        .unwrap();
    let seen = &server.seen()[0];
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.header("if-match"), Some("W/\"1\""));
    assert_eq!(seen.header("prefer"), Some("return=representation"));
    assert_eq!(
        seen.body,
        r#"{"creditlimit":1000.10,"customertypecode":3,"msdyn_since":"2026-05-01","transactioncurrencyid@odata.bind":"/transactioncurrencies(c0ffee)","msdyn_company@odata.bind":"/cdm_companies(cdm_companycode='USMF')"}"#
    );
    assert!(out.created);
    assert_eq!(out.id.as_deref(), Some("0a1b"));
    assert_eq!(out.etag.as_deref(), Some("W/\"468026\""));
    assert_eq!(out.version.map(|v| v.sequence), Some(468026));
}

#[tokio::test]
async fn write_conditions_become_headers_and_412_is_precondition_failed() {
    let (server, c) = connector().await;
    server.push(Canned::json(412, r#"{"error":{"code":"0x80040237","message":"A record with matching key values already exists."}}"#));
    server.push(Canned {
        status: 204,
        headers: vec![(
            "OData-EntityId".into(),
            "http://x/api/data/v9.2/accounts(99)".into(),
        )],
        body: String::new(),
    });
    let at = RecordRef::Id("0a1b".into());
    let e = c
        .upsert(
            "accounts",
            &at,
            &Record::new("accounts"),
            WriteCondition::MustNotExist,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ConnectorErrorKind::PreconditionFailed);
    assert!(e.message.contains("0x80040237"));
    let out = c
        .upsert(
            "accounts",
            &at,
            &Record::new("accounts"),
            WriteCondition::MustExist,
        )
        .await
        .unwrap();
    assert_eq!(out.id.as_deref(), Some("99"));
    let seen = server.seen();
    assert_eq!(seen[0].header("if-none-match"), Some("*"));
    assert_eq!(seen[1].header("if-match"), Some("*"));
}

#[tokio::test]
async fn query_filters_pages_and_follows_next_link_verbatim() {
    let (server, c) = connector().await;
    let base = c.base_url().to_string();
    let next = format!("{base}/accounts?$skiptoken=%3Ccookie%20pagenumber=%222%22%20/%3E");
    server.push(Canned::json(
        200,
        &format!(r#"{{"value":[{{"accountid":"1"}}],"@odata.nextLink":"{next}"}}"#),
    ));
    server.push(Canned::json(200, r#"{"value":[{"accountid":"2"}]}"#));
    let filter = dualwrite_core::map::filter::Filter::Compare {
        field: "customertypecode".into(),
        op: dualwrite_core::map::filter::CompareOp::Eq,
        value: dualwrite_core::map::filter::Literal::Number(Decimal::from(3)),
    };
    let since = chrono::DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let q = Query {
        filter: Some(filter),
        modified_since: Some(since),
        page_size: Some(1),
        page_token: None,
    };
    let page = c.query("accounts", &q).await.unwrap();
    assert_eq!(page.records[0].id.as_deref(), Some("1"));
    assert_eq!(page.next.as_deref(), Some(next.as_str()));
    let page2 = c
        .query(
            "accounts",
            &Query {
                page_token: page.next.clone(),
                ..q.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(page2.records[0].id.as_deref(), Some("2"));
    assert_eq!(page2.next, None);
    let seen = server.seen();
    assert_eq!(
        seen[0].uri,
        "/api/data/v9.2/accounts?$filter=customertypecode%20eq%203%20and%20modifiedon%20ge%202026-05-01T00:00:00Z"
    );
    assert_eq!(seen[0].header("prefer"), Some("odata.maxpagesize=1"));
    assert_eq!(
        format!("{}{}", base.trim_end_matches("/api/data/v9.2"), seen[1].uri),
        next
    );
    let foreign = Query {
        page_token: Some("https://evil.example/x".into()),
        ..Query::default()
    };
    assert_eq!(
        c.query("accounts", &foreign).await.unwrap_err().kind,
        ConnectorErrorKind::BadRequest
    );
}

#[tokio::test]
async fn delete_of_a_missing_record_is_ok_and_errors_keep_the_status() {
    let (server, c) = connector().await;
    server.push(Canned::json(404, "{}"));
    server.push(Canned::json(
        403,
        r#"{"error":{"code":"0x80040220","message":"missing prvDeleteAccount"}}"#,
    ));
    c.delete("accounts", &RecordRef::Id("1".into()))
        .await
        .unwrap();
    let e = c
        .delete("accounts", &RecordRef::Id("1".into()))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind, e.status),
        (ConnectorErrorKind::Forbidden, Some(403))
    );
    assert_eq!(server.seen()[0].method, "DELETE");
}

#[tokio::test]
async fn upsert_batch_uses_upsert_multiple() {
    let (server, c) = connector().await;
    server.push(Canned::json(200, r#"{"Ids":["g1","g2"]}"#));
    let items = vec![
        (
            RecordRef::Key(RecordKey::new([("accountnumber", "A1")])),
            Record::new("accounts").with("name", Value::Text("a".into())),
        ),
        (
            RecordRef::Id("g2".into()),
            Record::new("accounts").with("name", Value::Text("b".into())),
        ),
    ];
    let out = c.upsert_batch("accounts", &items).await.unwrap();
    assert_eq!(
        out.iter()
            .map(|r| r.as_ref().unwrap().id.clone().unwrap())
            .collect::<Vec<_>>(),
        ["g1", "g2"]
    );
    let seen = &server.seen()[0];
    assert_eq!(
        seen.uri,
        "/api/data/v9.2/accounts/Microsoft.Dynamics.CRM.UpsertMultiple"
    );
    assert_eq!(
        seen.body,
        r#"{"Targets":[{"@odata.type":"Microsoft.Dynamics.CRM.account","@odata.id":"accounts(accountnumber='A1')","name":"a"},{"@odata.type":"Microsoft.Dynamics.CRM.account","@odata.id":"accounts(g2)","accountid":"g2","name":"b"}]}"#
    );
}

#[tokio::test]
async fn upsert_batch_falls_back_to_a_batch_changeset_when_refused() {
    let (server, c) = connector().await;
    server.push(Canned::json(404, r#"{"error":{"code":"0x8006088a","message":"Resource not found for the segment 'Microsoft.Dynamics.CRM.UpsertMultiple'."}}"#));
    let answer = "--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\nHTTP/1.1 204 No Content\r\nOData-EntityId: http://x/api/data/v9.2/accounts(g1)\r\n\r\n\r\n\
--changesetresponse_2--\r\n--batchresponse_1--\r\n";
    server.push(Canned {
        status: 200,
        headers: vec![(
            "Content-Type".into(),
            "multipart/mixed; boundary=batchresponse_1".into(),
        )],
        body: answer.into(),
    });
    let items = vec![(
        RecordRef::Key(RecordKey::new([("accountnumber", "A1")])),
        Record::new("accounts"),
    )];
    let out = c.upsert_batch("accounts", &items).await.unwrap();
    assert_eq!(out[0].as_ref().unwrap().id.as_deref(), Some("g1"));
    let seen = server.seen();
    assert_eq!(seen[1].uri, "/api/data/v9.2/$batch");
    assert!(
        seen[1]
            .header("content-type")
            .unwrap()
            .starts_with("multipart/mixed; boundary=batch_")
    );
    assert!(seen[1].body.contains("PATCH http://"));
    assert!(
        seen[1]
            .body
            .contains("/accounts(accountnumber='A1') HTTP/1.1")
    );
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once() {
    let (server, c) = connector().await;
    server.push(Canned::json(401, "{}"));
    server.push(Canned::json(401, "{}"));
    let e = c
        .read("accounts", &RecordRef::Id("1".into()))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ConnectorErrorKind::Unauthorized);
    assert_eq!(server.seen().len(), 2);
    assert_eq!(c.stats().snapshot().token_refreshes, 1);
}

#[test]
fn alternate_keys_render_with_escaping_and_typed_values() {
    let schemas = schemas();
    let s = schemas.get("accounts");
    let key = RecordKey::new([("accountnumber", "O'Neil"), ("msdyn_company", "USMF")]);
    assert_eq!(
        wire::render_key(s, &key, Some(USMF)).unwrap(),
        format!("accountnumber='O''Neil',_msdyn_company_value={USMF}")
    );
    assert!(wire::render_key(s, &key, None).is_err());
    let key = RecordKey::new([("customertypecode", "3")]);
    assert_eq!(
        wire::render_key(s, &key, None).unwrap(),
        "customertypecode=3"
    );
}

#[tokio::test]
async fn a_batch_stopped_with_400_answers_its_parts_and_sends_the_rest_again() {
    let (server, c) = connector().await;
    // Dataverse without odata.continue-on-error: 400, and the parts up to the failing one.
    let stopped = "--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\n\r\n\
{\"error\":{\"code\":\"0x80060882\",\"message\":\"The version of the existing record doesn't match the RowVersion property provided.\"}}\r\n\
--batchresponse_1--\r\n";
    server.push(Canned {
        status: 400,
        headers: vec![(
            "Content-Type".into(),
            "multipart/mixed; boundary=batchresponse_1".into(),
        )],
        body: stopped.into(),
    });
    let rest = format!(
        "--batchresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{ROW}\r\n--batchresponse_2--\r\n"
    );
    server.push(Canned {
        status: 200,
        headers: vec![(
            "Content-Type".into(),
            "multipart/mixed; boundary=batchresponse_2".into(),
        )],
        body: rest,
    });
    // The company of the row read, looked up as for a single read.
    server.push(Canned::json(200, COMPANIES));
    let results = c
        .call_many(vec![
            ConnectorCall::Upsert {
                entity: "accounts".into(),
                at: RecordRef::Id("0a1b".into()),
                record: Record::new("accounts"),
                condition: WriteCondition::IfMatch("W/\"1\"".into()),
            },
            ConnectorCall::Read {
                entity: "accounts".into(),
                at: RecordRef::Id("0a1b".into()),
            },
        ])
        .await;
    let seen = server.seen();
    assert_eq!(seen[0].uri, "/api/data/v9.2/$batch");
    assert_eq!(seen[0].header("prefer"), Some("odata.continue-on-error"));
    assert!(seen[0].body.contains("PATCH http://"));
    assert!(seen[0].body.contains("If-Match: W/\"1\"\r\n"));
    assert!(seen[0].body.contains("Prefer: return=representation\r\n"));
    assert_eq!(seen[1].uri, "/api/data/v9.2/$batch", "the read sent again");
    assert!(!seen[1].body.contains("PATCH"));
    assert!(seen[1].body.contains("GET http://"));
    let CallResult::Upsert(Err(e)) = &results[0] else {
        panic!("{:?}", results[0]);
    };
    assert_eq!(
        (e.kind.clone(), e.status),
        (ConnectorErrorKind::PreconditionFailed, Some(412))
    );
    let CallResult::Read(Ok(Some(r))) = &results[1] else {
        panic!("{:?}", results[1]);
    };
    assert_eq!(r.company.as_deref(), Some("USMF"));
}
