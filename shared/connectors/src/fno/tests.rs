//! F&O connector tests against a scripted local server.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use dualwrite_core::map::filter::{CompareOp, Filter, Literal};
use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorErrorKind, Query, RecordRef, WriteCondition,
};
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
            ("SalesMemo".to_string(), ValueType::Text),
        ]),
        ..EntitySchema::default()
    });
    s.insert(EntitySchema {
        entity: "CDSSalesOrderLines".into(),
        key: vec![
            "SalesOrderNumber".into(),
            "LineCreationSequenceNumber".into(),
        ],
        company_specific: true,
        fields: BTreeMap::from([
            ("SalesOrderNumber".to_string(), ValueType::Text),
            ("LineCreationSequenceNumber".to_string(), ValueType::Integer),
            ("IsPrimary".to_string(), ValueType::Enum),
            ("LineAmount".to_string(), ValueType::Decimal),
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
        "/data/CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')?cross-company=true"
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
async fn a_create_refused_as_existing_is_re_read_whatever_status_and_error_shape_f_and_o_uses() {
    // F&O's Infolog sits in the inner error under a generic message, and a failed write in a
    // changeset may come back as 500: still "someone created it first" (re-read and decide
    // again, as on a 412), never a 500 to retry nor a permanent 400; the message keeps both.
    for status in [400, 500] {
        let (server, c) = connector().await;
        server.push(Canned::json(
            status,
            r#"{"error":{"code":"","message":"An error has occurred.","innererror":{"message":"Write failed for table row of type 'CustCustomerV3Entity'. Infolog: Error: Cannot create a record in Customers (CustTable). Customer account: US-001. The record already exists.","type":"Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException","stacktrace":""}}}"#,
        ));
        let key = RecordKey::new([("dataAreaId", "usmf"), ("CustomerAccount", "US-001")]);
        let err = c
            .upsert(
                "CustomersV3",
                &RecordRef::Key(key),
                &Record::new("CustomersV3"),
                WriteCondition::MustNotExist,
            )
            .await
            .unwrap_err();
        assert_eq!(server.seen()[0].method, "POST");
        assert_eq!(err.kind, ConnectorErrorKind::PreconditionFailed, "{status}");
        assert!(
            err.message
                .starts_with("An error has occurred. | Write failed")
                && err.message.contains("The record already exists."),
            "{}",
            err.message
        );
    }
}

#[tokio::test]
async fn a_null_text_field_is_written_as_empty_text_and_other_nulls_as_null() {
    // F&O has no null text: a cleared Dataverse column is sent as "" (its string properties
    // do not take null); a null number or enum stays null.
    let (server, c) = connector().await;
    server.push(Canned::json(404, "{}"));
    server.push(Canned::json(201, ROW));
    let key = RecordKey::new([("dataAreaId", "usmf"), ("CustomerAccount", "US-001")]);
    let record = Record::new("CustomersV3")
        .with("SalesMemo", Value::Null)
        .with("CreditLimit", Value::Null)
        .with("Undeclared", Value::Null);
    c.upsert(
        "CustomersV3",
        &RecordRef::Key(key),
        &record,
        WriteCondition::None,
    )
    .await
    .unwrap();
    let seen = server.seen();
    assert_eq!(
        seen[1].body,
        r#"{"CreditLimit":null,"SalesMemo":"","Undeclared":null,"CustomerAccount":"US-001","dataAreaId":"usmf"}"#
    );
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
        "/data/CustomersV3?cross-company=true&$filter=CreditLimitIsMandatory%20eq%20Microsoft.Dynamics.DataEntities.NoYes%27Yes%27%20and%20PartyType%20eq%20%27Organization%27&$orderby=dataAreaId,CustomerAccount"
    );
    assert_eq!(page.next, None, "no nextLink: the last page");
}

/// F&O's nextLink pages with `$skip`; the connector continues after the last key read
/// instead, keeping the query's filter, so a row deleted meanwhile cannot shift one past it.
#[tokio::test]
async fn pages_continue_after_the_last_key_read_not_at_the_servers_skip() {
    let (server, c) = connector().await;
    let base = c.data_url().to_string();
    let quoted = ROW.replace("US-001", "O'Brien 1");
    server.push(Canned::json(
        200,
        &format!(
            r#"{{"value":[{quoted}],"@odata.nextLink":"{base}/CustomersV3?cross-company=true&$skip=1"}}"#
        ),
    ));
    let query = Query {
        filter: Some(Filter::Compare {
            field: "CreditLimit".into(),
            op: CompareOp::Gt,
            value: Literal::Number(Decimal::from(5)),
        }),
        page_size: Some(1),
        ..Query::default()
    };
    let page = c.query("CustomersV3", &query).await.unwrap();
    let next = page.next.expect("more pages");
    let after =
        "(dataAreaId gt 'usmf') or (dataAreaId eq 'usmf' and CustomerAccount gt 'O''Brien 1')";
    assert_eq!(
        next,
        format!(
            "{base}/CustomersV3?cross-company=true&$filter={}&$orderby=dataAreaId,CustomerAccount",
            crate::http::encode_query(&format!("(CreditLimit gt 5) and ({after})"))
        )
    );
    // The token is followed as given; the last page has no nextLink.
    server.push(Canned::json(200, r#"{"value":[]}"#));
    let last = c
        .query(
            "CustomersV3",
            &Query {
                page_token: Some(next.clone()),
                ..query.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(last.next, None);
    // (The HTTP client sends a quote in a query as %27, as URLs of http: do.)
    let sent = server.seen()[1].uri.replace("%27", "'");
    assert_eq!(format!("{base}{}", &sent["/data".len()..]), next);
    assert_eq!(
        server.seen()[1].header("prefer"),
        Some("odata.maxpagesize=1")
    );

    // A last row that does not convert is reported with its id, and the next page starts
    // after it, not after the last row that converted.
    let unfit = ROW
        .replace("US-001", "US-002")
        .replace("100000.25", "\"lots\"");
    server.push(Canned::json(
        200,
        &format!(
            r#"{{"value":[{ROW},{unfit}],"@odata.nextLink":"{base}/CustomersV3?cross-company=true&$skip=2"}}"#
        ),
    ));
    let page = c.query("CustomersV3", &Query::default()).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.unfit.len(), 1);
    assert_eq!(
        page.unfit[0].id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-002'")
    );
    assert!(
        page.unfit[0].problem.contains("CreditLimit"),
        "{:?}",
        page.unfit
    );
    assert!(
        page.next
            .as_deref()
            .is_some_and(|n| n.contains("CustomerAccount%20gt%20'US-002'")),
        "{:?}",
        page.next
    );

    // An entity whose key is not declared follows the server's link.
    server.push(Canned::json(
        200,
        &format!(
            r#"{{"value":[{ROW}],"@odata.nextLink":"{base}/Unknown?cross-company=true&$skip=1"}}"#
        ),
    ));
    let page = c.query("Unknown", &Query::default()).await.unwrap();
    assert_eq!(
        page.next.as_deref(),
        Some(format!("{base}/Unknown?cross-company=true&$skip=1").as_str())
    );
    assert_eq!(server.seen()[3].uri, "/data/Unknown?cross-company=true");
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

/// A scripted `$batch` answer holding `parts` (each `HTTP/1.1 …` with headers and body).
fn batch_answer(status: u16, parts: &[&str]) -> Canned {
    let mut body = String::new();
    for part in parts {
        body.push_str("--batchresponse_9\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n");
        body.push_str(part);
        body.push_str("\r\n");
    }
    body.push_str("--batchresponse_9--\r\n");
    Canned {
        status,
        headers: vec![(
            "Content-Type".into(),
            "multipart/mixed; boundary=batchresponse_9".into(),
        )],
        body,
    }
}

fn key(account: &str) -> RecordRef {
    RecordRef::Key(RecordKey::new([
        ("dataAreaId", "usmf"),
        ("CustomerAccount", account),
    ]))
}

#[tokio::test]
async fn call_many_sends_reads_alone_and_each_write_in_its_own_changeset() {
    let (server, c) = connector().await;
    server.push(batch_answer(
        200,
        &[
            &format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{ROW}"),
            "HTTP/1.1 204 No Content\r\nETag: W/\"9\"\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"\",\"message\":\"Write failed for table row of type 'CustomersV3'. Infolog: Error: Cannot create a record. The record already exists.\"}}",
        ],
    ));
    let calls = vec![
        ConnectorCall::Read {
            entity: "CustomersV3".into(),
            at: key("US-001"),
        },
        ConnectorCall::Upsert {
            entity: "CustomersV3".into(),
            at: key("US-002"),
            record: Record::new("CustomersV3"),
            condition: WriteCondition::IfMatch("W/\"8\"".into()),
        },
        ConnectorCall::Upsert {
            entity: "CustomersV3".into(),
            at: key("US-003"),
            record: Record::new("CustomersV3"),
            condition: WriteCondition::MustNotExist,
        },
    ];
    let results = c.call_many(calls).await;
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "one $batch");
    let batch = &seen[0];
    assert_eq!(
        (batch.method.as_str(), batch.uri.as_str()),
        ("POST", "/data/$batch")
    );
    assert_eq!(batch.header("prefer"), Some("odata.continue-on-error"));
    let body = &batch.body;
    let get = body.find("GET http://").expect("the read");
    let first_changeset = body.find("boundary=changeset_").expect("a changeset");
    assert!(
        get < first_changeset,
        "the read is a top-level part, before the writes"
    );
    assert!(body.contains(
        "GET http://127.0.0.1"
    ) && body.contains("/data/CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')?cross-company=true HTTP/1.1\r\n"));
    assert_eq!(
        body.matches("Content-Type: multipart/mixed; boundary=changeset_")
            .count(),
        2,
        "each write in a changeset of its own"
    );
    assert!(body.contains("If-Match: W/\"8\"\r\n"));
    assert!(body.contains("Prefer: return=representation\r\n"));

    let CallResult::Read(Ok(Some(read))) = &results[0] else {
        panic!("{:?}", results[0]);
    };
    assert_eq!(read.company.as_deref(), Some("usmf"));
    let CallResult::Upsert(Ok(patched)) = &results[1] else {
        panic!("{:?}", results[1]);
    };
    assert_eq!(patched.etag.as_deref(), Some("W/\"9\""));
    assert_eq!(
        patched.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-002'")
    );
    assert!(!patched.created);
    let CallResult::Upsert(Err(duplicate)) = &results[2] else {
        panic!("{:?}", results[2]);
    };
    assert_eq!(duplicate.kind, ConnectorErrorKind::PreconditionFailed);
    assert_eq!(duplicate.status, Some(400));
}

#[tokio::test]
async fn a_batch_stopped_at_a_failure_sends_the_unanswered_calls_again() {
    let (server, c) = connector().await;
    // A server ignoring odata.continue-on-error: it answers up to the failing part only.
    server.push(batch_answer(
        200,
        &[
            &format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{ROW}"),
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"0x1\",\"message\":\"boom\"}}",
        ],
    ));
    server.push(batch_answer(
        200,
        &["HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n{}"],
    ));
    let calls = ["US-001", "US-002", "US-003"]
        .map(|a| ConnectorCall::Read {
            entity: "CustomersV3".into(),
            at: key(a),
        })
        .to_vec();
    let results = c.call_many(calls).await;
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body.matches("GET http://").count(), 1);
    assert!(seen[1].body.contains("US-003"));
    assert!(matches!(&results[0], CallResult::Read(Ok(Some(_)))));
    assert!(matches!(
        &results[1],
        CallResult::Read(Err(e)) if e.kind == ConnectorErrorKind::Transient && e.message == "0x1: boom"
    ));
    assert_eq!(results[2], CallResult::Read(Ok(None)));
}

#[tokio::test]
async fn a_batch_refused_as_a_whole_fails_every_call_with_its_error() {
    let (server, c) = connector().await;
    server.push(
        Canned::json(
            429,
            r#"{"error":{"code":"","message":"This request could not be processed at this time due to system experiencing high resource utilization."}}"#,
        )
        .with("Retry-After", "7"),
    );
    let results = c
        .call_many(vec![
            ConnectorCall::Read {
                entity: "CustomersV3".into(),
                at: key("US-001"),
            },
            ConnectorCall::Upsert {
                entity: "Currencies".into(),
                at: RecordRef::Key(RecordKey::new([("CurrencyCode", "EUR")])),
                record: Record::new("Currencies"),
                condition: WriteCondition::MustExist,
            },
            // Not sent: the id is no key, so it fails on its own as the single call does.
            ConnectorCall::Read {
                entity: "CustomersV3".into(),
                at: RecordRef::Id("not a key".into()),
            },
        ])
        .await;
    assert_eq!(server.seen().len(), 1);
    let throttled = ConnectorErrorKind::Throttled {
        retry_after_ms: 7000,
    };
    let CallResult::Read(Err(e)) = &results[0] else {
        panic!("{:?}", results[0]);
    };
    assert_eq!((&e.kind, e.entity.as_str()), (&throttled, "CustomersV3"));
    let CallResult::Upsert(Err(e)) = &results[1] else {
        panic!("{:?}", results[1]);
    };
    assert_eq!((&e.kind, e.entity.as_str()), (&throttled, "Currencies"));
    assert!(
        e.message
            .starts_with("the $batch carrying this call failed: ")
    );
    let CallResult::Read(Err(e)) = &results[2] else {
        panic!("{:?}", results[2]);
    };
    assert_eq!(e.kind, ConnectorErrorKind::BadRequest);
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

#[test]
fn a_write_answer_gives_what_the_full_row_would() {
    let schemas = schemas();
    let schema = schemas.get("CustomersV3");
    let bodies = [
        r#"{"@odata.etag":"W/\"JzEsNTYzNzE0NTMyOyc=\"","dataAreaId":"usmf","CustomerAccount":"US-0'1","CreditLimit":1500.50,"ModifiedDateTime":"2026-12-04T10:31:13.349Z","OrganizationName":"Contoso"}"#,
        // No version field, a name with an escape (read the long way), a key field missing.
        r#"{"@odata.etag":"W/\"1\"","dataAreaId":"USMF","Name\u0041":"x"}"#,
    ];
    for body in bodies {
        let full = wire::record_from_row(
            "CustomersV3",
            schema,
            &crate::odata::parse_object(body).unwrap(),
        )
        .unwrap();
        let written = wire::written_of_body(schema, body).unwrap();
        assert_eq!(written.etag, full.etag, "{body}");
        assert_eq!(written.version, full.version, "{body}");
        assert_eq!(written.id.as_deref(), full.id.as_deref(), "{body}");
    }
    let first = wire::written_of_body(schema, bodies[0]).unwrap();
    assert_eq!(
        first.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-0''1'")
    );
    assert!(first.version.is_some());
    assert!(wire::written_of_body(schema, "[1]").is_err());
}

fn line_key(order: &str, line: &str) -> RecordKey {
    RecordKey::new([
        ("dataAreaId", "usmf"),
        ("SalesOrderNumber", order),
        ("LineCreationSequenceNumber", line),
    ])
}

/// Regression: every F&O key value was quoted (`LineCreationSequenceNumber='3'`), which F&O
/// refuses for an integer key. Declared integer keys are unquoted, NoYes enum keys take the
/// enum literal, and a value that does not fit its declared type is refused before sending.
#[test]
fn key_values_are_written_as_the_literal_of_their_declared_type() {
    let schemas = schemas();
    let lines = schemas.get("CDSSalesOrderLines");
    assert_eq!(
        wire::render_key(lines, &line_key("SO-'1", "3")).unwrap(),
        "dataAreaId='usmf',SalesOrderNumber='SO-''1',LineCreationSequenceNumber=3"
    );
    let enum_key = RecordKey::new([("SalesOrderNumber", "SO-1"), ("IsPrimary", "Yes")]);
    assert_eq!(
        wire::render_key(lines, &enum_key).unwrap(),
        "SalesOrderNumber='SO-1',IsPrimary=Microsoft.Dynamics.DataEntities.NoYes'Yes'"
    );
    let e = wire::render_key(lines, &line_key("SO-1", "three")).unwrap_err();
    assert_eq!(
        e,
        "key field LineCreationSequenceNumber is declared a whole number in the table maps, but its value \"three\" is not one"
    );
    let other_enum = RecordKey::new([("IsPrimary", "Backorder")]);
    assert!(
        wire::render_key(lines, &other_enum)
            .unwrap_err()
            .starts_with("key field IsPrimary is an F&O enum whose enum type")
    );
    // Without a schema every value is text, as before.
    assert_eq!(
        wire::render_key(None, &line_key("SO-1", "3")).unwrap(),
        "dataAreaId='usmf',SalesOrderNumber='SO-1',LineCreationSequenceNumber='3'"
    );
}

/// Regression: F&O PATCH and DELETE by key went without `cross-company=true`, so a row of
/// another company than the caller's default was not found; the body sent the key fields the
/// record lacks as JSON strings whatever their type.
#[tokio::test]
async fn writes_and_deletes_by_key_are_typed_and_cross_company() {
    let (server, c) = connector().await;
    server.push(Canned::json(204, "").with("ETag", "W/\"2\""));
    server.push(Canned::json(201, "{}"));
    server.push(Canned::json(204, ""));
    let at = RecordRef::Key(line_key("SO-1", "3"));
    let record = Record::new("CDSSalesOrderLines").with(
        "LineAmount",
        Value::Decimal(Decimal::from_str("10.50").unwrap()),
    );
    c.upsert(
        "CDSSalesOrderLines",
        &at,
        &record,
        WriteCondition::MustExist,
    )
    .await
    .unwrap();
    let created = c
        .upsert(
            "CDSSalesOrderLines",
            &at,
            &record,
            WriteCondition::MustNotExist,
        )
        .await
        .unwrap();
    assert_eq!(
        created.id.as_deref(),
        Some("dataAreaId='usmf',SalesOrderNumber='SO-1',LineCreationSequenceNumber='3'"),
        "the record id stays the key's own text"
    );
    c.delete("CDSSalesOrderLines", &at).await.unwrap();
    let seen = server.seen();
    let row = "/data/CDSSalesOrderLines(dataAreaId='usmf',SalesOrderNumber='SO-1',LineCreationSequenceNumber=3)?cross-company=true";
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("PATCH", row)
    );
    let body = r#"{"LineAmount":10.50,"SalesOrderNumber":"SO-1","LineCreationSequenceNumber":3,"dataAreaId":"usmf"}"#;
    assert_eq!(seen[0].body, body);
    assert_eq!(
        (seen[1].method.as_str(), seen[1].uri.as_str()),
        ("POST", "/data/CDSSalesOrderLines")
    );
    assert_eq!(seen[1].body, body);
    assert_eq!(
        (seen[2].method.as_str(), seen[2].uri.as_str()),
        ("DELETE", row)
    );

    // A key that does not fit its type is refused without a request.
    let e = c
        .delete("CDSSalesOrderLines", &RecordRef::Key(line_key("SO-1", "x")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ConnectorErrorKind::BadRequest);
    assert_eq!(server.seen().len(), 3);
}

/// Regression: a `$batch` changeset of `upsert_batch` failing inside a non-2xx answer was a
/// BadRequest carrying the multipart text; inside a 200 it was already read by its part. Both
/// are classified by the failing part.
#[tokio::test]
async fn a_failed_changeset_of_upsert_batch_is_classified_by_its_failing_part() {
    let (server, c) = connector().await;
    let items = [(
        RecordRef::Id("dataAreaId='usmf',CustomerAccount='US-001'".into()),
        Record::new("CustomersV3"),
    )];
    for (status, part, kind) in [
        (
            400,
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 4\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"\",\"message\":\"This request could not be processed at this time due to system experiencing high resource utilization.\"}}",
            ConnectorErrorKind::Throttled {
                retry_after_ms: 4000,
            },
        ),
        (
            200,
            "HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"\",\"message\":\"The record has been changed.\"}}",
            ConnectorErrorKind::PreconditionFailed,
        ),
    ] {
        server.push(Canned::json(200, ROW));
        server.push(batch_answer(status, &[part]));
        let out = c.upsert_batch("CustomersV3", &items).await.unwrap();
        let e = out[0].as_ref().unwrap_err();
        assert_eq!(e.kind, kind, "{part}");
        assert!(!e.message.contains("batchresponse"), "{}", e.message);
        assert!(
            e.message.contains("high resource utilization")
                || e.message.contains("The record has been changed."),
            "{}",
            e.message
        );
    }
    assert_eq!(c.stats().snapshot().failures, 2, "one failing part each");
}
