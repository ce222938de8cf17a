//! Dataverse connector tests against a scripted local server: URLs, headers and bodies sent,
//! answers turned into records and outcomes.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorErrorKind, Query, RecordRef, WriteCondition,
};
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::{LookupRef, Value, ValueType};
use rust_decimal::Decimal;

use super::client::upsert_multiple_unsupported;
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
    server.push(Canned {
        status: 204,
        headers: vec![],
        body: String::new(),
    });
    let row = |id: &str| {
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n".to_string()
            + &ROW.replace("\"accountid\":\"0a1b\"", &format!("\"accountid\":\"{id}\""))
    };
    server.push(batch_answer(200, &[&row("g1"), &row("g2")]));
    server.push(Canned::json(200, COMPANIES));
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

/// Dataverse's UpsertMultiple answers 204 without ids: the rows are read back in one `$batch`
/// of GETs, so each item's outcome carries its id, ETag and version; an item addressed by key
/// that cannot be read back is an error of its own (retried: an upsert by key is idempotent),
/// one addressed by id keeps its id.
#[tokio::test]
async fn upsert_multiple_answered_204_reads_the_rows_back() {
    let (server, c) = connector().await;
    server.push(Canned {
        status: 204,
        headers: vec![],
        body: String::new(),
    });
    let row = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n".to_string() + ROW;
    let missing = "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"0x80040217\",\"message\":\"account With Id = 9 Does Not Exist\"}}";
    server.push(batch_answer(200, &[&row, missing, missing]));
    server.push(Canned::json(200, COMPANIES));
    let items = vec![
        (
            RecordRef::Key(RecordKey::new([("accountnumber", "A1")])),
            Record::new("accounts").with("name", Value::Text("a".into())),
        ),
        (
            RecordRef::Key(RecordKey::new([("accountnumber", "A2")])),
            Record::new("accounts").with("name", Value::Text("b".into())),
        ),
        (
            RecordRef::Id("g3".into()),
            Record::new("accounts").with("name", Value::Text("c".into())),
        ),
    ];
    let out = c.upsert_batch("accounts", &items).await.unwrap();
    let seen = server.seen();
    assert_eq!(
        seen[0].uri,
        "/api/data/v9.2/accounts/Microsoft.Dynamics.CRM.UpsertMultiple"
    );
    assert_eq!(seen[1].uri, "/api/data/v9.2/$batch");
    assert_eq!(
        seen[1].body.matches("GET http://").count(),
        3,
        "{}",
        seen[1].body
    );
    assert!(seen[1].body.contains("accounts(accountnumber='A1')"));
    let first = out[0].as_ref().expect("read back");
    assert_eq!(first.id.as_deref(), Some("0a1b"));
    assert_eq!(first.etag.as_deref(), Some("W/\"468026\""));
    assert!(first.version.is_some());
    let e = out[1].as_ref().expect_err("not read back");
    assert_eq!(e.kind, ConnectorErrorKind::Transient, "{e:?}");
    assert!(e.message.contains("read back"), "{}", e.message);
    assert_eq!(out[2].as_ref().unwrap().id.as_deref(), Some("g3"));
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

/// A scripted `$batch` answer of `status` holding one part per entry of `parts` (each
/// `HTTP/1.1 …` with its headers and body).
fn batch_answer(status: u16, parts: &[&str]) -> Canned {
    let mut body = String::new();
    for part in parts {
        body.push_str("--batchresponse_7\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n");
        body.push_str(part);
        body.push_str("\r\n");
    }
    body.push_str("--batchresponse_7--\r\n");
    Canned {
        status,
        headers: vec![(
            "Content-Type".into(),
            "multipart/mixed; boundary=batchresponse_7".into(),
        )],
        body,
    }
}

/// Regression: the `$batch` fallback of `upsert_batch` (no `odata.continue-on-error`) turned
/// Dataverse's 400-with-the-failing-part into a permanent BadRequest whose message was the raw
/// multipart text; the failing part's status, `Retry-After` and message are the failure.
#[tokio::test]
async fn a_failed_changeset_of_the_batch_fallback_is_classified_by_its_failing_part() {
    let (server, c) = connector().await;
    c.upsert_multiple_refused.store(true, Ordering::Relaxed);
    let cases: [(&str, ConnectorErrorKind, u16, &str); 4] = [
        (
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Type: application/json\r\n\r\n\
{\"error\":{\"code\":\"0x80072322\",\"message\":\"Number of requests exceeded the limit of 6000 over time window of 300 seconds.\"}}",
            ConnectorErrorKind::Throttled {
                retry_after_ms: 7000,
            },
            429,
            "0x80072322: Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        ),
        (
            "HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\n\r\n\
{\"error\":{\"code\":\"0x80060882\",\"message\":\"The version of the existing record doesn't match the RowVersion property provided.\"}}",
            ConnectorErrorKind::PreconditionFailed,
            412,
            "0x80060882: The version of the existing record doesn't match the RowVersion property provided.",
        ),
        (
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n\
{\"error\":{\"code\":\"0x80040217\",\"message\":\"account With Id = 0a1b Does Not Exist\"}}",
            ConnectorErrorKind::NotFound,
            404,
            "0x80040217: account With Id = 0a1b Does Not Exist",
        ),
        (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n\
{\"error\":{\"code\":\"0x80040216\",\"message\":\"An unexpected error occurred.\"}}",
            ConnectorErrorKind::Transient,
            503,
            "0x80040216: An unexpected error occurred.",
        ),
    ];
    for (part, kind, status, message) in cases {
        server.push(batch_answer(400, &[part]));
        let items = vec![
            (RecordRef::Id("0a1b".into()), Record::new("accounts")),
            (RecordRef::Id("0a1c".into()), Record::new("accounts")),
        ];
        let out = c.upsert_batch("accounts", &items).await.unwrap();
        assert_eq!(out.len(), 2);
        for result in out {
            let e = result.unwrap_err();
            assert_eq!((e.kind, e.status), (kind.clone(), Some(status)), "{part}");
            assert_eq!(
                e.message,
                format!("the changeset was rolled back: {message}"),
                "{}",
                e.message
            );
            assert!(!e.message.contains("--batchresponse"), "{}", e.message);
        }
    }
    let seen = server.seen();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|s| s.uri == "/api/data/v9.2/$batch"));
}

/// Regression: parts failing inside a `$batch` (429, 412) were not counted; each failing part
/// counts as a failed single request would, and the 400 envelope of a batch stopped at its
/// failing part counts that failure once, not twice.
#[tokio::test]
async fn failures_inside_a_batch_are_counted_like_single_failures() {
    let (server, c) = connector().await;
    let row = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{ROW}");
    server.push(batch_answer(
        200,
        &[
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\n\r\n{\"error\":{\"code\":\"0x80072322\",\"message\":\"slow down\"}}",
            "HTTP/1.1 412 Precondition Failed\r\n\r\n{\"error\":{\"code\":\"0x80060882\",\"message\":\"stale\"}}",
            &row,
        ],
    ));
    server.push(Canned::json(200, COMPANIES));
    let read = |id: &str| ConnectorCall::Read {
        entity: "accounts".into(),
        at: RecordRef::Id(id.into()),
    };
    let results = c.call_many(vec![read("1"), read("2"), read("3")]).await;
    assert!(matches!(
        &results[0],
        CallResult::Read(Err(e)) if e.kind == ConnectorErrorKind::Throttled { retry_after_ms: 2000 }
    ));
    assert!(matches!(&results[2], CallResult::Read(Ok(Some(_)))));
    let after_first = c.stats().snapshot();
    assert_eq!(after_first.failures, 2, "the 429 and the 412 parts");
    assert_eq!(
        (after_first.throttled, after_first.precondition_failed),
        (1, 1),
        "each failing part counted by its kind"
    );

    server.push(batch_answer(
        400,
        &["HTTP/1.1 412 Precondition Failed\r\n\r\n{\"error\":{\"code\":\"0x80060882\",\"message\":\"stale\"}}"],
    ));
    c.upsert_multiple_refused.store(true, Ordering::Relaxed);
    let out = c
        .upsert_batch(
            "accounts",
            &[(RecordRef::Id("0a1b".into()), Record::new("accounts"))],
        )
        .await
        .unwrap();
    assert_eq!(
        out[0].as_ref().unwrap_err().kind,
        ConnectorErrorKind::PreconditionFailed
    );
    let now = c.stats().snapshot();
    assert_eq!(now.requests, 3, "two $batch requests and the company read");
    assert_eq!(now.failures - after_first.failures, 1);
    assert_eq!(now.precondition_failed - after_first.precondition_failed, 1);
}

/// A DataverseSim with `accounts` (alternate key `accountnumber`) and
/// `transactioncurrencies`, and a connector on it.
async fn simulated() -> (dualwrite_simulators::DataverseSim, DataverseConnector) {
    use dualwrite_simulators as sim;
    let table = |set: &str, logical: &str, key: &str| sim::TableDef {
        entity_set: set.into(),
        logical_name: logical.into(),
        primary_id: format!("{logical}id"),
        alternate_keys: vec![vec![key.into()]],
        key_lookups: Vec::new(),
    };
    let dv = sim::DataverseSim::start(sim::DataverseConfig {
        tables: vec![
            table("accounts", "account", "accountnumber"),
            table(
                "transactioncurrencies",
                "transactioncurrency",
                "isocurrencycode",
            ),
        ],
        ..sim::DataverseConfig::default()
    })
    .await
    .expect("DataverseSim starts");
    let config = DataverseConfig::new(
        dv.api_url(),
        Arc::new(StaticToken(Secret::new("t0k"))),
        schemas(),
    );
    (dv, DataverseConnector::new(config).unwrap())
}

fn number_key(number: &str) -> RecordRef {
    RecordRef::Key(RecordKey::new([("accountnumber", number)]))
}

fn named(number: &str, name: &str) -> Record {
    Record::new("accounts")
        .with("accountnumber", Value::Text(number.into()))
        .with("name", Value::Text(name.into()))
}

/// Regression: any 400 naming UpsertMultiple disabled it for the life of the connector, and
/// the simulator's own item failure ("UpsertMultiple failed at Targets[i]…") matched. An item
/// failure is that item's error, classified by the error policy; UpsertMultiple stays on.
#[tokio::test]
async fn an_upsert_multiple_item_failure_is_an_error_and_keeps_upsert_multiple_on() {
    let (dv, c) = simulated().await;
    c.upsert(
        "accounts",
        &number_key("A1"),
        &named("A1", "a"),
        WriteCondition::None,
    )
    .await
    .unwrap();
    let missing_currency = named("A2", "b").with(
        "transactioncurrencyid",
        Value::Lookup(Arc::new(LookupRef {
            entity_set: "transactioncurrencies".into(),
            id: None,
            key: Some(RecordKey::new([("isocurrencycode", "XXX")])),
        })),
    );
    let before = dv.stats().requests;
    let e = c
        .upsert_batch("accounts", &[(number_key("A2"), missing_currency)])
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind, e.status),
        (ConnectorErrorKind::BadRequest, Some(400))
    );
    assert!(
        e.message.contains("UpsertMultiple failed at Targets[0]"),
        "{}",
        e.message
    );
    assert_eq!(
        dv.stats().requests - before,
        1,
        "no $batch fallback was sent"
    );
    assert!(!c.upsert_multiple_refused.load(Ordering::Relaxed));

    // A duplicate alternate key (a new row given A1's number) is a 412: re-read and decide.
    let duplicate = named("A1", "dup");
    let e = c
        .upsert_batch(
            "accounts",
            &[
                (number_key("A3"), named("A3", "c")),
                (
                    RecordRef::Id("9d6a1b9e-0000-4000-8000-000000000009".into()),
                    duplicate,
                ),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind, e.status),
        (ConnectorErrorKind::PreconditionFailed, Some(412))
    );
    assert!(!c.upsert_multiple_refused.load(Ordering::Relaxed));
    assert_eq!(dv.rows("accounts").len(), 1, "a failed call writes nothing");

    let before = dv.stats().requests;
    let out = c
        .upsert_batch("accounts", &[(number_key("A3"), named("A3", "c"))])
        .await
        .unwrap();
    assert!(out[0].as_ref().unwrap().id.is_some());
    assert_eq!(
        dv.stats().requests - before,
        2,
        "UpsertMultiple (204, no ids) and the $batch reading the row back"
    );
    assert_eq!(dv.rows("accounts").len(), 2);
}

/// Answers that do say UpsertMultiple is unavailable for the table, and item failures that
/// merely name it.
#[test]
fn only_answers_saying_upsert_multiple_is_unavailable_disable_it() {
    let body = |m: &str| format!(r#"{{"error":{{"code":"0x80040265","message":"{m}"}}}}"#);
    for (status, message) in [
        (
            400,
            "The 'UpsertMultiple' method does not support entities of type 'msdyn_vendor'. MessageProcessorCache returned MessageProcessor.Empty.",
        ),
        (
            404,
            "Resource not found for the segment 'Microsoft.Dynamics.CRM.UpsertMultiple'.",
        ),
        (
            400,
            "The message UpsertMultiple is not supported for entity msdyn_vendor.",
        ),
        (
            400,
            "Could not find message 'UpsertMultiple' for entity 'msdyn_vendor'.",
        ),
        (405, "The HTTP method 'POST' is not allowed."),
        (501, "Not Implemented"),
    ] {
        assert!(
            upsert_multiple_unsupported(status, &body(message)),
            "{status} {message}"
        );
    }
    assert!(upsert_multiple_unsupported(404, ""));
    for (status, message) in [
        (
            400,
            "UpsertMultiple failed at Targets[3]; nothing was written. The lookup 'transactioncurrencyid@odata.bind' of account refers to '/transactioncurrencies(isocurrencycode='XXX')': transactioncurrency With the given key Does Not Exist.",
        ),
        (
            404,
            "UpsertMultiple failed at Targets[0]; nothing was written. A record with the specified key values does not exist in account entity",
        ),
        (
            400,
            "An UpsertMultiple target is not supported by plug-in X: Targets[1] has no name.",
        ),
        (
            400,
            "Each item of Targets needs \"@odata.type\": \"Microsoft.Dynamics.CRM.account\".",
        ),
        (
            412,
            "A record that has the attribute values A1 already exists.",
        ),
        (
            429,
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        ),
        (
            500,
            "The 'UpsertMultiple' method does not support entities of type 'account'.",
        ),
    ] {
        assert!(
            !upsert_multiple_unsupported(status, &body(message)),
            "{status} {message}"
        );
    }
}

/// Regression: the `$batch` fallback answered a changeset's 412 as a permanent BadRequest
/// carrying the multipart text (DataverseSim answers a stopped batch 400 with the failing
/// part inside).
#[tokio::test]
async fn the_batch_fallback_against_the_simulator_keeps_a_412() {
    let (dv, c) = simulated().await;
    c.upsert(
        "accounts",
        &number_key("A1"),
        &named("A1", "a"),
        WriteCondition::None,
    )
    .await
    .unwrap();
    c.upsert_multiple_refused.store(true, Ordering::Relaxed);
    let out = c
        .upsert_batch(
            "accounts",
            &[
                (number_key("A2"), named("A2", "b")),
                (
                    RecordRef::Id("9d6a1b9e-0000-4000-8000-000000000009".into()),
                    named("A1", "dup"),
                ),
            ],
        )
        .await
        .unwrap();
    // The failing part names its request (Content-ID 2): that item has the 412, the other
    // was rolled back with it and is retryable on its own.
    let failed = out[1].as_ref().unwrap_err();
    assert_eq!(
        (&failed.kind, failed.status),
        (&ConnectorErrorKind::PreconditionFailed, Some(412))
    );
    assert!(failed.message.contains("0x80040237"), "{}", failed.message);
    assert!(
        !failed.message.contains("batchresponse"),
        "{}",
        failed.message
    );
    let rolled_back = out[0].as_ref().unwrap_err();
    assert_eq!(
        (&rolled_back.kind, rolled_back.status),
        (&ConnectorErrorKind::Transient, None)
    );
    assert!(
        rolled_back
            .message
            .starts_with("not written: the changeset was rolled back because item 2 of 2 failed (HTTP 412): 0x80040237"),
        "{}",
        rolled_back.message
    );
    assert_eq!(
        dv.rows("accounts").len(),
        1,
        "the changeset was rolled back"
    );
}

/// Regression: UpsertMultiple's `@odata.id` is percent-encoded (it is a URL) but DataverseSim
/// read it undecoded, so a key with a space or non-ASCII text missed its row and created a
/// duplicate; and the simulator decoded a path before splitting it, so an encoded '/' in a key
/// was refused. Every write route must find the one row of each key.
#[tokio::test]
async fn keys_with_url_special_characters_address_one_row_on_every_route() {
    let (dv, c) = simulated().await;
    let numbers = ["A 1/2", "B#1&2=3", "O'Neil", "Ünïcødé 東京", "50% (net) ?"];
    for n in numbers {
        c.upsert(
            "accounts",
            &number_key(n),
            &named(n, "single"),
            WriteCondition::None,
        )
        .await
        .unwrap_or_else(|e| panic!("single upsert of {n:?}: {e}"));
    }
    let items = |name: &str| -> Vec<(RecordRef, Record)> {
        numbers
            .iter()
            .map(|n| (number_key(n), named(n, name)))
            .collect()
    };
    for r in c.upsert_batch("accounts", &items("bulk")).await.unwrap() {
        r.expect("UpsertMultiple item");
    }
    assert_eq!(dv.rows("accounts").len(), numbers.len(), "UpsertMultiple");

    let calls = items("batch")
        .into_iter()
        .map(|(at, record)| ConnectorCall::Upsert {
            entity: "accounts".into(),
            at,
            record,
            condition: WriteCondition::None,
        })
        .collect();
    for r in c.call_many(calls).await {
        assert!(matches!(r, CallResult::Upsert(Ok(_))), "{r:?}");
    }
    assert_eq!(dv.rows("accounts").len(), numbers.len(), "$batch");

    c.upsert_multiple_refused.store(true, Ordering::Relaxed);
    for r in c
        .upsert_batch("accounts", &items("changeset"))
        .await
        .unwrap()
    {
        r.expect("$batch changeset item");
    }
    assert_eq!(dv.rows("accounts").len(), numbers.len(), "changeset");

    for n in numbers {
        let r = c
            .read("accounts", &number_key(n))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{n:?} is found by its key"));
        assert_eq!(r.get("accountnumber"), Some(&Value::Text(n.into())));
        assert_eq!(r.get("name"), Some(&Value::Text("changeset".into())));
    }
}

/// A sales order line's alternate key holds a lookup (`salesorderid` + `sequencenumber`):
/// the Web API wants it as `_salesorderid_value=<guid>`, so the connector turns the order
/// number the key carries into the order's row id (read once), reads "no line" when the order
/// itself is not there, and the simulator refuses the lookup given as quoted text.
#[tokio::test]
async fn a_lookup_in_an_alternate_key_is_addressed_by_the_row_id_it_points_at() {
    use dualwrite_simulators as sim;
    let dv = sim::DataverseSim::start(sim::DataverseConfig {
        tables: vec![
            sim::TableDef {
                entity_set: "salesorders".into(),
                logical_name: "salesorder".into(),
                primary_id: "salesorderid".into(),
                alternate_keys: vec![vec!["msdyn_salesordernumber".into()]],
                key_lookups: Vec::new(),
            },
            sim::TableDef {
                entity_set: "salesorderdetails".into(),
                logical_name: "salesorderdetail".into(),
                primary_id: "salesorderdetailid".into(),
                alternate_keys: vec![vec!["salesorderid".into(), "sequencenumber".into()]],
                key_lookups: vec!["salesorderid".into()],
            },
        ],
        ..sim::DataverseConfig::default()
    })
    .await
    .expect("DataverseSim starts");
    let mut schemas = EntitySchemas::default();
    schemas.insert(EntitySchema {
        entity: "salesorders".into(),
        logical_name: Some("salesorder".into()),
        primary_id: Some("salesorderid".into()),
        key: vec!["msdyn_salesordernumber".into()],
        ..EntitySchema::default()
    });
    schemas.insert(EntitySchema {
        entity: "salesorderdetails".into(),
        logical_name: Some("salesorderdetail".into()),
        primary_id: Some("salesorderdetailid".into()),
        key: vec!["salesorderid".into(), "sequencenumber".into()],
        fields: BTreeMap::from([
            ("salesorderid".to_string(), ValueType::Lookup),
            ("sequencenumber".to_string(), ValueType::Integer),
        ]),
        lookup_targets: BTreeMap::from([("salesorderid".to_string(), "salesorders".to_string())]),
        ..EntitySchema::default()
    });
    let config = DataverseConfig::new(
        dv.api_url(),
        Arc::new(StaticToken(Secret::new("t0k"))),
        Arc::new(schemas),
    );
    let c = DataverseConnector::new(config).unwrap();
    let line_key = |order: &str, n: &str| {
        RecordRef::Key(RecordKey::new([
            ("salesorderid", order),
            ("sequencenumber", n),
        ]))
    };

    // No order SO-404: no line can be keyed by it.
    assert_eq!(
        c.read("salesorderdetails", &line_key("SO-404", "1"))
            .await
            .unwrap(),
        None
    );
    let results = c
        .call_many(vec![ConnectorCall::Read {
            entity: "salesorderdetails".into(),
            at: line_key("SO-404", "1"),
        }])
        .await;
    assert!(
        matches!(&results[0], CallResult::Read(Ok(None))),
        "{results:?}"
    );
    let err = c
        .upsert(
            "salesorderdetails",
            &line_key("SO-404", "1"),
            &Record::new("salesorderdetails"),
            WriteCondition::MustNotExist,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ConnectorErrorKind::NotFound, "{err}");
    assert!(err.message.contains("SO-404"), "{err}");

    let order = c
        .upsert(
            "salesorders",
            &RecordRef::Key(RecordKey::new([("msdyn_salesordernumber", "SO-1")])),
            &Record::new("salesorders").with("name", Value::Text("first order".into())),
            WriteCondition::None,
        )
        .await
        .unwrap();
    let order_id = order.id.unwrap();
    assert_eq!(
        c.read("salesorderdetails", &line_key("SO-1", "2"))
            .await
            .unwrap(),
        None
    );
    let line = Record::new("salesorderdetails")
        .with(
            "salesorderid",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "salesorders".into(),
                id: Some(order_id.clone()),
                key: None,
            })),
        )
        .with("sequencenumber", Value::Integer(2))
        .with("description", Value::Text("a line".into()));
    let written = c
        .upsert(
            "salesorderdetails",
            &line_key("SO-1", "2"),
            &line,
            WriteCondition::MustNotExist,
        )
        .await
        .unwrap();
    assert!(written.created);
    let read = c
        .read("salesorderdetails", &line_key("SO-1", "2"))
        .await
        .unwrap()
        .expect("the line, by its key");
    assert_eq!(read.id.as_deref(), written.id.as_deref());
    assert_eq!(
        read.fields.get("description"),
        Some(&Value::Text("a line".into()))
    );
    let rows = dv.rows("salesorderdetails");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["_salesorderid_value"], order_id.as_str());
    assert!(rows[0].get("salesorderid").is_none(), "{}", rows[0]);

    // The Web API (and the simulator) refuse the lookup spelled as the order number.
    let answer = reqwest::Client::new()
        .get(format!(
            "{}salesorderdetails(salesorderid='SO-1',sequencenumber=2)",
            dv.api_url()
        ))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let text = answer.text().await.unwrap();
    assert!(text.contains("_salesorderid_value=<guid>"), "{text}");
}
