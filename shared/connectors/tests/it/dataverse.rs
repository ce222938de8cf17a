//! The Dataverse connector against DataverseSim: upsert by alternate key, reads, lookups,
//! the company, exact money, ETags, deletes, filtered and incremental paging, UpsertMultiple.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use dualwrite_core::map::filter::parse_filter;
use dualwrite_core::ports::{Connector, ConnectorErrorKind, Query, RecordRef, WriteCondition};
use dualwrite_core::value::{LookupRef, Value};
use rust_decimal::Decimal;
use serde_json::json;

use crate::harness::{Env, account, account_key};

#[tokio::test]
async fn upsert_by_alternate_key_creates_then_updates() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("A-100", "USMF"));
    let created = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-100", "Fabrikam", "1234567.891"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    assert!(created.created);
    let id = created.id.clone().expect("the new row's id");
    assert!(created.etag.is_some());

    let updated = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-100", "Fabrikam Inc.", "1234567.891"),
            WriteCondition::None,
        )
        .await
        .expect("update");
    assert!(!updated.created);
    assert_eq!(updated.id.as_deref(), Some(id.as_str()));
    assert_ne!(
        updated.etag, created.etag,
        "the ETag changes with each write"
    );
    assert!(updated.version > created.version);
    assert_eq!(
        env.dv.rows("accounts").len(),
        1,
        "the second write updated the same row"
    );

    // The row as stored: company and currency bound by their alternate keys.
    let stored = env.dv.row("accounts", &id).expect("stored row");
    assert_eq!(stored["_msdyn_company_value"], json!(env.usmf_id));
    assert_eq!(stored["_transactioncurrencyid_value"], json!(env.usd_id));
}

#[tokio::test]
async fn reads_by_id_and_by_key_return_company_lookups_and_exact_money() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("A-200", "USMF"));
    let written = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-200", "Northwind", "1234567.891"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    let id = written.id.clone().expect("id");

    let by_key = env
        .dataverse
        .read("accounts", &key)
        .await
        .expect("read by key")
        .expect("found");
    let by_id = env
        .dataverse
        .read("accounts", &RecordRef::Id(id.clone()))
        .await
        .expect("read by id")
        .expect("found");
    assert_eq!(by_key, by_id);
    let r = by_id;
    assert_eq!(r.id.as_deref(), Some(id.as_str()));
    assert_eq!(r.company.as_deref(), Some("USMF"));
    assert_eq!(r.etag, written.etag);
    assert_eq!(r.version, written.version);
    assert_eq!(r.get("name"), Some(&Value::Text("Northwind".into())));
    assert_eq!(
        r.get("creditlimit"),
        Some(&Value::Decimal(Decimal::new(1_234_567_891, 3)))
    );
    assert_eq!(r.get("customertypecode"), Some(&Value::Choice(3)));
    assert_eq!(
        r.get("transactioncurrencyid"),
        Some(&Value::Lookup(Arc::new(LookupRef {
            entity_set: "transactioncurrencies".into(),
            id: Some(env.usd_id.clone()),
            key: None,
        })))
    );
    assert!(
        r.get("msdyn_company").is_none(),
        "the company is Record.company, not a field"
    );
}

#[tokio::test]
async fn a_stale_etag_is_precondition_failed() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("A-300", "USMF"));
    let first = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-300", "v1", "1"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    let stale = first.etag.clone().expect("etag");
    let second = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-300", "v2", "2"),
            WriteCondition::IfMatch(stale.clone()),
        )
        .await
        .expect("write with the current ETag");
    let err = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-300", "v3", "3"),
            WriteCondition::IfMatch(stale),
        )
        .await
        .expect_err("the ETag is stale");
    assert_eq!(err.kind, ConnectorErrorKind::PreconditionFailed);
    assert_eq!(err.status, Some(412));
    assert!(err.message.contains("0x80060882"), "{}", err.message);
    let now = env.dataverse.read("accounts", &key).await.unwrap().unwrap();
    assert_eq!(now.get("name"), Some(&Value::Text("v2".into())));
    assert_eq!(now.etag, second.etag);

    // If-None-Match: * refuses to overwrite an existing row.
    let err = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-300", "v4", "4"),
            WriteCondition::MustNotExist,
        )
        .await
        .expect_err("the row exists");
    assert_eq!(err.kind, ConnectorErrorKind::PreconditionFailed);
}

#[tokio::test]
async fn a_deleted_record_reads_as_none_and_deleting_twice_is_fine() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("A-400", "USMF"));
    env.dataverse
        .upsert(
            "accounts",
            &key,
            &account("A-400", "Gone soon", "10"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    env.dataverse
        .delete("accounts", &key)
        .await
        .expect("delete");
    assert_eq!(
        env.dataverse.read("accounts", &key).await.expect("read"),
        None
    );
    assert!(env.dv.rows("accounts").is_empty());
    env.dataverse
        .delete("accounts", &key)
        .await
        .expect("deleting a missing row is not an error");
}

#[tokio::test]
async fn filtered_incremental_query_pages_through_every_row_once() {
    let env = Env::start().await;
    let since = Utc::now() - chrono::Duration::seconds(1);
    let mut expected = BTreeSet::new();
    for n in 0..260 {
        let row = env
            .dv
            .user_create(
                "accounts",
                json!({
                    "accountnumber": format!("P-{n:04}"),
                    "name": format!("Paged {n}"),
                    "customertypecode": 3,
                    "msdyn_company@odata.bind": "/cdm_companies(cdm_companycode='USMF')",
                }),
            )
            .expect("seed row");
        expected.insert(row["accountid"].as_str().unwrap().to_string());
    }
    for n in 0..15 {
        env.dv
            .user_create(
                "accounts",
                json!({
                    "accountnumber": format!("O-{n}"),
                    "name": format!("Other {n}"),
                    "customertypecode": 3,
                }),
            )
            .expect("seed row");
        env.dv
            .user_create(
                "accounts",
                json!({
                    "accountnumber": format!("V-{n}"),
                    "name": format!("Paged vendor {n}"),
                    "customertypecode": 11,
                }),
            )
            .expect("seed row");
    }
    let filter = parse_filter("startswith(name,'Paged') and customertypecode eq 3").unwrap();
    let mut query = Query {
        filter: Some(filter),
        modified_since: Some(since),
        page_size: Some(50),
        page_token: None,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = env.dataverse.query("accounts", &query).await.expect("page");
        pages += 1;
        assert!(page.records.len() <= 50);
        for r in &page.records {
            assert_eq!(r.company.as_deref(), Some("USMF"));
            seen.push(r.id.clone().expect("id"));
        }
        match page.next {
            Some(next) => query.page_token = Some(next),
            None => break,
        }
        assert!(pages < 20, "paging does not end");
    }
    assert_eq!(pages, 6);
    assert_eq!(seen.len(), 260, "no duplicates");
    let seen: BTreeSet<String> = seen.into_iter().map(|id| id.to_string()).collect();
    assert_eq!(seen, expected, "no gaps");

    // Nothing changed after a later instant.
    let later = Query {
        modified_since: Some(Utc::now() + chrono::Duration::hours(1)),
        ..Query::default()
    };
    let page = env.dataverse.query("accounts", &later).await.expect("page");
    assert!(page.records.is_empty());
    assert_eq!(page.next, None);
}

#[tokio::test]
async fn upsert_batch_of_1200_uses_upsert_multiple_in_chunks() {
    let env = Env::start().await;
    // Warm the company cache so the requests counted below are the bulk calls only.
    env.dataverse
        .read("accounts", &RecordRef::Key(account_key("WARM", "USMF")))
        .await
        .expect("read");
    // One existing row: the batch updates it.
    env.dataverse
        .upsert(
            "accounts",
            &RecordRef::Key(account_key("B-0000", "USMF")),
            &account("B-0000", "old", "1"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    let before = env.dv_stats.snapshot().requests;
    let items: Vec<_> = (0..1200)
        .map(|n| {
            let number = format!("B-{n:04}");
            (
                RecordRef::Key(account_key(&number, "USMF")),
                account(&number, &format!("Bulk {n}"), &format!("{n}.125")),
            )
        })
        .collect();
    let results = env
        .dataverse
        .upsert_batch("accounts", &items)
        .await
        .expect("bulk upsert");
    assert_eq!(results.len(), 1200);
    let ids: BTreeSet<String> = results
        .iter()
        .map(|r| r.as_ref().expect("item written").id.clone().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1200);
    assert_eq!(
        env.dv_stats.snapshot().requests - before,
        2 + 12,
        "two UpsertMultiple calls (1000 + 200), each answered 204 without ids as Dataverse \
         does, and the rows read back in $batches of 100 GETs (10 + 2)"
    );
    assert_eq!(env.dv.rows("accounts").len(), 1200);
    // Each outcome carries the id of the row it wrote (read back: the 204 has none).
    let id_of: std::collections::HashMap<String, String> = env
        .dv
        .rows("accounts")
        .into_iter()
        .map(|r| {
            let number = r["accountnumber"].as_str().unwrap().to_string();
            (number, r["accountid"].as_str().unwrap().to_string())
        })
        .collect();
    for ((at, _), result) in items.iter().zip(&results) {
        let RecordRef::Key(key) = at else {
            unreachable!()
        };
        let number = key.get("accountnumber").expect("key");
        let outcome = result.as_ref().unwrap();
        assert_eq!(outcome.id.as_ref(), id_of.get(number), "{number}");
        assert!(outcome.etag.is_some(), "{number}");
    }

    let last = env
        .dataverse
        .read("accounts", &RecordRef::Key(account_key("B-1199", "USMF")))
        .await
        .unwrap()
        .expect("present");
    assert_eq!(last.get("name"), Some(&Value::Text("Bulk 1199".into())));
    assert_eq!(
        last.get("creditlimit"),
        Some(&Value::Decimal("1199.125".parse().unwrap()))
    );
    assert_eq!(last.company.as_deref(), Some("USMF"));
    let first = env
        .dataverse
        .read("accounts", &RecordRef::Key(account_key("B-0000", "USMF")))
        .await
        .unwrap()
        .expect("present");
    assert_eq!(first.get("name"), Some(&Value::Text("Bulk 0".into())));
}

/// Dataverse decimal columns hold up to 10 decimals: 21 significant digits, more than f64 keeps.
#[tokio::test]
async fn money_keeps_every_digit_of_a_ten_decimal_value() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("M-1", "USMF"));
    env.dataverse
        .upsert(
            "accounts",
            &key,
            &account("M-1", "m", "99999999999.1234567891"),
            WriteCondition::None,
        )
        .await
        .unwrap();
    let r = env.dataverse.read("accounts", &key).await.unwrap().unwrap();
    assert_eq!(
        r.get("creditlimit"),
        Some(&Value::Decimal("99999999999.1234567891".parse().unwrap()))
    );
}

/// Deletes are read through Dataverse change tracking: the first read (paged, ids only) ends
/// with a deltaLink and reports nothing; following it reports exactly the rows deleted since,
/// and a row changed since is not taken for a delete. F&O has no change tracking.
#[tokio::test]
async fn deletions_are_read_through_change_tracking() {
    let env = Env::start().await;
    let mut ids = Vec::new();
    for n in 0..12 {
        let row = env
            .dv
            .user_create(
                "accounts",
                json!({"accountnumber": format!("T-{n:02}"), "name": format!("Tracked {n}")}),
            )
            .expect("seed row");
        ids.push(row["accountid"].as_str().unwrap().to_string());
    }
    // The first read (every page of it) ends with the cursor.
    let mut from: Option<String> = None;
    let mut pages = 0;
    let cursor = loop {
        let page = env
            .dataverse
            .deletions("accounts", from.as_deref())
            .await
            .unwrap()
            .expect("Dataverse tracks changes");
        pages += 1;
        assert!(page.deleted.is_empty(), "a first read reports no delete");
        match (page.next, page.cursor) {
            (Some(next), _) => from = Some(next),
            (None, Some(cursor)) => break cursor,
            (None, None) => panic!("no cursor"),
        }
    };
    assert!(pages >= 1);

    env.dv.user_delete("accounts", &ids[3]).unwrap();
    env.dv.user_delete("accounts", &ids[7]).unwrap();
    env.dv
        .user_edit("accounts", &ids[5], json!({"name": "Edited"}))
        .unwrap();
    let page = env
        .dataverse
        .deletions("accounts", Some(&cursor))
        .await
        .unwrap()
        .unwrap();
    let mut deleted = page.deleted.clone();
    deleted.sort();
    let mut want = vec![ids[3].clone(), ids[7].clone()];
    want.sort();
    assert_eq!(deleted, want);
    let next = page.cursor.expect("a new cursor");
    let page = env
        .dataverse
        .deletions("accounts", Some(&next))
        .await
        .unwrap()
        .unwrap();
    assert!(page.deleted.is_empty(), "nothing deleted since: {page:?}");

    env.dv.set_change_tracking("accounts", false).unwrap();
    assert!(
        env.dataverse
            .deletions("accounts", None)
            .await
            .unwrap()
            .is_none(),
        "a table without change tracking has none"
    );
    let foreign = env
        .dataverse
        .deletions(
            "accounts",
            Some("https://elsewhere.example/api/data/v9.2/accounts"),
        )
        .await
        .unwrap_err();
    assert_eq!(foreign.kind, ConnectorErrorKind::BadRequest);
    assert!(
        env.erp
            .deletions("CustomersV3", None)
            .await
            .unwrap()
            .is_none(),
        "F&O has no change tracking"
    );
}
