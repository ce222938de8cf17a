//! `call_many` of both connectors against the simulators: reads and writes of several
//! entities in one `$batch`, each call answered exactly as its single call is, one `$batch`
//! failure reaching every call, and batches split at `max_batch`.

use std::sync::Arc;

use dualwrite_connectors::ConnectorStats;
use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorErrorKind, RecordRef, WriteCondition,
};
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::Value;
use serde_json::json;

use crate::harness::{Env, account, account_key, customer, customer_key};

fn read(entity: &str, at: RecordRef) -> ConnectorCall {
    ConnectorCall::Read {
        entity: entity.into(),
        at,
    }
}

fn upsert(entity: &str, at: RecordRef, record: Record, condition: WriteCondition) -> ConnectorCall {
    ConnectorCall::Upsert {
        entity: entity.into(),
        at,
        record,
        condition,
    }
}

/// The single call `call` stands for, made on its own.
async fn single(c: &dyn Connector, call: &ConnectorCall) -> CallResult {
    match call {
        ConnectorCall::Read { entity, at } => CallResult::Read(c.read(entity, at).await),
        ConnectorCall::Upsert {
            entity,
            at,
            record,
            condition,
        } => CallResult::Upsert(c.upsert(entity, at, record, condition.clone()).await),
    }
}

fn read_result(r: &CallResult) -> Option<&Record> {
    match r {
        CallResult::Read(Ok(found)) => found.as_ref(),
        other => panic!("expected a successful read, got {other:?}"),
    }
}

fn write_error(r: &CallResult) -> (ConnectorErrorKind, Option<u16>) {
    match r {
        CallResult::Upsert(Err(e)) => (e.kind.clone(), e.status),
        other => panic!("expected a failed write, got {other:?}"),
    }
}

fn fno_customer(company: &str, account: &str, name: &str) -> serde_json::Value {
    json!({
        "dataAreaId": company,
        "CustomerAccount": account,
        "OrganizationName": name,
        "CreditLimitIsMandatory": "No",
    })
}

#[tokio::test]
async fn fno_reads_and_writes_in_one_batch_answer_as_single_calls() {
    let env = Env::start().await;
    for account in ["B-READ", "B-MATCH", "B-STALE", "B-DUP", "B-UPSERT"] {
        env.fno
            .user_create("CustomersV3", fno_customer("usmf", account, "seeded"))
            .expect("seed");
    }
    env.fno
        .user_create("Currencies", json!({"CurrencyCode": "EUR", "Name": "Euro"}))
        .expect("seed");
    let at = |account: &str| RecordRef::Key(customer_key("usmf", account));
    let current = |account: &str| {
        let erp = &env.erp;
        let key = at(account);
        async move {
            erp.read("CustomersV3", &key)
                .await
                .expect("read")
                .expect("exists")
        }
    };
    let matching = current("B-MATCH").await.etag.expect("etag");
    let stale = current("B-STALE").await.etag.expect("etag");
    env.fno
        .user_edit(
            "CustomersV3",
            "dataAreaId='usmf',CustomerAccount='B-STALE'",
            json!({"OrganizationName": "changed meanwhile"}),
        )
        .expect("edit");

    let calls = vec![
        read("CustomersV3", at("B-READ")),
        read("CustomersV3", at("B-MISSING")),
        read(
            "Currencies",
            RecordRef::Key(RecordKey::new([("CurrencyCode", "EUR")])),
        ),
        upsert(
            "CustomersV3",
            at("B-NEW"),
            customer("usmf", "B-NEW", "created", "Yes"),
            WriteCondition::MustNotExist,
        ),
        upsert(
            "CustomersV3",
            at("B-MATCH"),
            customer("usmf", "B-MATCH", "updated", "Yes"),
            WriteCondition::IfMatch(matching),
        ),
        upsert(
            "CustomersV3",
            at("B-STALE"),
            customer("usmf", "B-STALE", "lost update", "Yes"),
            WriteCondition::IfMatch(stale),
        ),
        upsert(
            "CustomersV3",
            at("B-DUP"),
            customer("usmf", "B-DUP", "second create", "Yes"),
            WriteCondition::MustNotExist,
        ),
        upsert(
            "CustomersV3",
            at("B-GONE"),
            customer("usmf", "B-GONE", "must exist", "Yes"),
            WriteCondition::MustExist,
        ),
        upsert(
            "CustomersV3",
            at("B-UPSERT"),
            customer("usmf", "B-UPSERT", "upserted", "Yes"),
            WriteCondition::None,
        ),
        upsert(
            "CustomersV3",
            at("B-UPSERT-NEW"),
            customer("usmf", "B-UPSERT-NEW", "upserted new", "Yes"),
            WriteCondition::None,
        ),
    ];
    let before = env.fno_stats.snapshot().requests;
    let results = env.erp.call_many(calls.clone()).await;
    assert_eq!(results.len(), calls.len(), "one result per call");
    assert_eq!(
        env.fno_stats.snapshot().requests - before,
        2,
        "one $batch, and one more for the writes of the two unconditioned upserts"
    );

    // Reads of records the batch did not write: exactly what a single read gives now.
    for i in 0..3 {
        assert_eq!(results[i], single(&env.erp, &calls[i]).await, "call {i}");
    }
    assert_eq!(
        read_result(&results[0]).and_then(|r| r.get("OrganizationName")),
        Some(&Value::Text("seeded".into()))
    );
    assert_eq!(read_result(&results[1]), None, "404 is None");
    assert_eq!(
        read_result(&results[2]).and_then(|r| r.get("Name")),
        Some(&Value::Text("Euro".into()))
    );
    // Refused writes: the same error as the single call (which is refused again).
    assert_eq!(
        write_error(&results[5]),
        (ConnectorErrorKind::PreconditionFailed, Some(412))
    );
    assert_eq!(
        write_error(&results[6]),
        (ConnectorErrorKind::PreconditionFailed, Some(400)),
        "F&O's duplicate create asks for a re-read, as a 412 does"
    );
    assert_eq!(
        write_error(&results[7]),
        (ConnectorErrorKind::NotFound, Some(404))
    );
    for i in 5..8 {
        assert_eq!(results[i], single(&env.erp, &calls[i]).await, "call {i}");
    }
    // Writes that landed: created or not as the single call says, id and ETag of the record
    // as it now stands.
    for (i, account, created, name) in [
        (3, "B-NEW", true, "created"),
        (4, "B-MATCH", false, "updated"),
        (8, "B-UPSERT", false, "upserted"),
        (9, "B-UPSERT-NEW", true, "upserted new"),
    ] {
        let CallResult::Upsert(Ok(outcome)) = &results[i] else {
            panic!("call {i} failed: {:?}", results[i]);
        };
        let now = current(account).await;
        assert_eq!(outcome.created, created, "call {i}");
        assert_eq!(outcome.id.as_deref(), now.id.as_deref(), "call {i}");
        if created {
            assert_eq!(outcome.etag, now.etag, "call {i}: POST returns the record");
            assert_eq!(outcome.version, now.version, "call {i}");
        }
        assert_eq!(now.get("OrganizationName"), Some(&Value::Text(name.into())));
    }
    let stale_now = current("B-STALE").await;
    assert_eq!(
        stale_now.get("OrganizationName"),
        Some(&Value::Text("changed meanwhile".into())),
        "the refused write changed nothing"
    );
}

#[tokio::test]
async fn dataverse_reads_and_writes_in_one_batch_answer_as_single_calls() {
    let env = Env::start().await;
    let at = |number: &str| RecordRef::Key(account_key(number, "USMF"));
    let mut etags = Vec::new();
    for number in ["D-READ", "D-DUP", "D-MATCH", "D-STALE"] {
        let out = env
            .dataverse
            .upsert(
                "accounts",
                &at(number),
                &account(number, "seeded", "10"),
                WriteCondition::None,
            )
            .await
            .expect("seed");
        etags.push((number, out.id.expect("id"), out.etag.expect("etag")));
    }
    let read_id = etags[0].1.clone();
    let matching = etags[2].2.clone();
    let stale = etags[3].2.clone();
    env.dv
        .user_edit(
            "accounts",
            &etags[3].1,
            json!({"name": "changed meanwhile"}),
        )
        .expect("edit");

    let calls = vec![
        read("accounts", at("D-READ")),
        read("accounts", RecordRef::Id(read_id)),
        read("accounts", at("D-MISSING")),
        read(
            "transactioncurrencies",
            RecordRef::Key(RecordKey::new([("isocurrencycode", "USD")])),
        ),
        upsert(
            "accounts",
            at("D-NEW"),
            account("D-NEW", "created", "1.5"),
            WriteCondition::None,
        ),
        upsert(
            "accounts",
            at("D-DUP"),
            account("D-DUP", "second create", "1"),
            WriteCondition::MustNotExist,
        ),
        upsert(
            "accounts",
            at("D-MATCH"),
            account("D-MATCH", "updated", "2"),
            WriteCondition::IfMatch(matching),
        ),
        upsert(
            "accounts",
            at("D-STALE"),
            account("D-STALE", "lost update", "3"),
            WriteCondition::IfMatch(stale),
        ),
        upsert(
            "accounts",
            at("D-GONE"),
            account("D-GONE", "must exist", "4"),
            WriteCondition::MustExist,
        ),
    ];
    let before = env.dv_stats.snapshot().requests;
    let results = env.dataverse.call_many(calls.clone()).await;
    assert_eq!(results.len(), calls.len(), "one result per call");
    assert_eq!(env.dv_stats.snapshot().requests - before, 1, "one $batch");

    for i in 0..4 {
        assert_eq!(
            results[i],
            single(&env.dataverse, &calls[i]).await,
            "call {i}"
        );
    }
    assert_eq!(read_result(&results[0]), read_result(&results[1]));
    assert_eq!(read_result(&results[2]), None, "404 is None");
    assert!(read_result(&results[3]).is_some());
    assert_eq!(
        write_error(&results[5]),
        (ConnectorErrorKind::PreconditionFailed, Some(412))
    );
    assert_eq!(
        write_error(&results[7]),
        (ConnectorErrorKind::PreconditionFailed, Some(412))
    );
    assert_eq!(
        write_error(&results[8]),
        (ConnectorErrorKind::NotFound, Some(404))
    );
    for i in 5..calls.len() {
        if i != 6 {
            assert_eq!(
                results[i],
                single(&env.dataverse, &calls[i]).await,
                "call {i}"
            );
        }
    }
    for (i, number, created, name) in [
        (4, "D-NEW", true, "created"),
        (6, "D-MATCH", false, "updated"),
    ] {
        let CallResult::Upsert(Ok(outcome)) = &results[i] else {
            panic!("call {i} failed: {:?}", results[i]);
        };
        let now = env
            .dataverse
            .read("accounts", &at(number))
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(outcome.created, created, "call {i}");
        assert_eq!(outcome.id.as_deref(), now.id.as_deref(), "call {i}");
        assert_eq!(outcome.etag, now.etag, "call {i}");
        assert_eq!(outcome.version, now.version, "call {i}");
        assert_eq!(now.get("name"), Some(&Value::Text(name.into())));
    }
}

#[tokio::test]
async fn a_throttled_batch_is_throttled_for_every_call() {
    let env = Env::start().await;
    let at = |account: &str| RecordRef::Key(customer_key("usmf", account));
    // The token first, so the throttled request is the $batch.
    env.erp.read("CustomersV3", &at("T-0")).await.expect("read");
    env.fno.throttle_next(1);
    let calls = vec![
        read("CustomersV3", at("T-1")),
        upsert(
            "CustomersV3",
            at("T-2"),
            customer("usmf", "T-2", "x", "No"),
            WriteCondition::MustNotExist,
        ),
        read(
            "Currencies",
            RecordRef::Key(RecordKey::new([("CurrencyCode", "EUR")])),
        ),
    ];
    let results = env.erp.call_many(calls.clone()).await;
    assert_eq!(results.len(), 3);
    for (call, result) in calls.iter().zip(&results) {
        let error = match result {
            CallResult::Read(Err(e)) => e,
            CallResult::Upsert(Err(e)) if matches!(call, ConnectorCall::Upsert { .. }) => e,
            other => panic!("expected the throttling error, got {other:?}"),
        };
        assert_eq!(
            error.kind,
            ConnectorErrorKind::Throttled {
                retry_after_ms: 1000
            }
        );
        assert_eq!(error.status, Some(429));
        assert_eq!(
            error.entity,
            call.entity(),
            "the error names the call's entity"
        );
        assert!(error.message.contains("$batch"), "{}", error.message);
    }
    assert!(
        env.fno.rows("CustomersV3").is_empty(),
        "nothing was written"
    );

    // Dataverse the same way (company ids cached first).
    let key = RecordRef::Key(account_key("T-1", "USMF"));
    env.dataverse.read("accounts", &key).await.expect("read");
    env.dv.throttle_next(1);
    let results = env
        .dataverse
        .call_many(vec![
            read("accounts", key.clone()),
            upsert(
                "accounts",
                key,
                account("T-1", "x", "1"),
                WriteCondition::None,
            ),
        ])
        .await;
    assert!(matches!(
        &results[0],
        CallResult::Read(Err(e)) if e.kind == ConnectorErrorKind::Throttled { retry_after_ms: 1000 }
    ));
    assert!(matches!(
        &results[1],
        CallResult::Upsert(Err(e)) if e.kind == ConnectorErrorKind::Throttled { retry_after_ms: 1000 }
    ));
    assert!(env.dv.rows("accounts").is_empty(), "nothing was written");
}

#[tokio::test]
async fn calls_over_max_batch_are_split_into_several_batches() {
    let env = Env::start().await;
    let stats = Arc::new(ConnectorStats::default());
    let erp = env.erp_batching(&stats, 2);
    for n in 0..5 {
        env.fno
            .user_create(
                "CustomersV3",
                fno_customer("usmf", &format!("S-{n}"), &format!("name {n}")),
            )
            .expect("seed");
    }
    let calls: Vec<_> = (0..5)
        .map(|n| {
            read(
                "CustomersV3",
                RecordRef::Key(customer_key("usmf", &format!("S-{n}"))),
            )
        })
        .collect();
    let before = env.fno.stats().requests;
    let results = erp.call_many(calls).await;
    assert_eq!(env.fno.stats().requests - before, 3, "2 + 2 + 1 calls");
    assert_eq!(stats.snapshot().requests, 3);
    for (n, result) in results.iter().enumerate() {
        assert_eq!(
            read_result(result).and_then(|r| r.get("OrganizationName")),
            Some(&Value::Text(format!("name {n}").into())),
            "result {n} is its own call's"
        );
    }
}
