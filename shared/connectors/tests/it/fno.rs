//! The F&O connector against FnoSim: cross-company reads, PATCH-or-POST upserts, enum fields,
//! exact money, ETags, deletes, filtered paging and `$batch` upserts.

use std::collections::BTreeSet;

use chrono::Utc;
use dualwrite_core::map::filter::parse_filter;
use dualwrite_core::ports::{Connector, ConnectorErrorKind, Query, RecordRef, WriteCondition};
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::Value;
use serde_json::json;

use crate::harness::{Env, customer, customer_key};

#[tokio::test]
async fn records_of_a_non_default_company_are_read_across_companies() {
    let env = Env::start().await;
    env.fno
        .user_create(
            "CustomersV3",
            json!({
                "dataAreaId": "demf",
                "CustomerAccount": "DE-001",
                "OrganizationName": "Contoso GmbH",
                "CreditLimit": 5000.5,
                "CreditLimitIsMandatory": "No",
            }),
        )
        .expect("seed");
    env.fno
        .user_create(
            "CustomersV3",
            json!({
                "dataAreaId": "usmf",
                "CustomerAccount": "US-001",
                "OrganizationName": "Contoso Inc",
            }),
        )
        .expect("seed");
    let key = customer_key("demf", "DE-001");
    let r = env
        .erp
        .read("CustomersV3", &RecordRef::Key(key.clone()))
        .await
        .expect("read")
        .expect("found although demf is not the default company");
    assert_eq!(r.company.as_deref(), Some("demf"));
    assert_eq!(r.id.as_deref(), Some(key.to_string().as_str()));
    assert_eq!(
        r.get("OrganizationName"),
        Some(&Value::Text("Contoso GmbH".into()))
    );
    assert_eq!(
        r.get("CreditLimitIsMandatory"),
        Some(&Value::Enum("No".into()))
    );
    assert!(r.etag.is_some());
    assert!(r.version.is_some(), "ModifiedDateTime is the version");

    // The rendered id reads the same record.
    let by_id = env
        .erp
        .read("CustomersV3", &RecordRef::Id(key.to_string()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_id, r);

    let all = env
        .erp
        .query("CustomersV3", &Query::default())
        .await
        .expect("query");
    let companies: BTreeSet<_> = all
        .records
        .iter()
        .filter_map(|r| r.company.as_deref().map(str::to_string))
        .collect();
    assert_eq!(
        companies,
        BTreeSet::from(["demf".to_string(), "usmf".to_string()])
    );
}

#[tokio::test]
async fn upsert_posts_a_new_record_then_patches_it() {
    let env = Env::start().await;
    let key = RecordRef::Key(customer_key("usmf", "US-100"));
    let created = env
        .erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("usmf", "US-100", "Fabrikam", "Yes"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    assert!(created.created);
    assert_eq!(
        created.id.as_deref(),
        Some("dataAreaId='usmf',CustomerAccount='US-100'")
    );
    let updated = env
        .erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("usmf", "US-100", "Fabrikam Inc.", "No"),
            WriteCondition::None,
        )
        .await
        .expect("update");
    assert!(!updated.created);
    assert_eq!(env.fno.rows("CustomersV3").len(), 1);

    let r = env
        .erp
        .read("CustomersV3", &key)
        .await
        .unwrap()
        .expect("found");
    assert_ne!(r.etag, created.etag, "the ETag changes with each write");
    assert_eq!(
        r.get("OrganizationName"),
        Some(&Value::Text("Fabrikam Inc.".into()))
    );
    assert_eq!(
        r.get("CreditLimitIsMandatory"),
        Some(&Value::Enum("No".into()))
    );
    assert_eq!(
        r.get("PartyType"),
        Some(&Value::Enum("Organization".into()))
    );
    assert_eq!(
        r.get("CreditLimit"),
        Some(&Value::Decimal("1234567.891".parse().unwrap()))
    );
    assert_eq!(r.company.as_deref(), Some("usmf"));

    // A global entity (no dataAreaId) works the same way.
    let eur = RecordRef::Key(RecordKey::new([("CurrencyCode", "EUR")]));
    let currency = Record::new("Currencies")
        .with("CurrencyCode", Value::Text("EUR".into()))
        .with("Name", Value::Text("Euro".into()));
    let out = env
        .erp
        .upsert("Currencies", &eur, &currency, WriteCondition::None)
        .await
        .unwrap();
    assert!(out.created);
    let read = env
        .erp
        .read("Currencies", &eur)
        .await
        .unwrap()
        .expect("found");
    assert_eq!(read.company, None);
    assert_eq!(read.get("Name"), Some(&Value::Text("Euro".into())));
}

#[tokio::test]
async fn a_stale_etag_is_precondition_failed_and_deletes_are_final() {
    let env = Env::start().await;
    let key = RecordRef::Key(customer_key("usmf", "US-200"));
    let first = env
        .erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("usmf", "US-200", "v1", "No"),
            WriteCondition::None,
        )
        .await
        .unwrap();
    let stale = first.etag.expect("etag");
    env.erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("usmf", "US-200", "v2", "No"),
            WriteCondition::IfMatch(stale.clone()),
        )
        .await
        .expect("write with the current ETag");
    let err = env
        .erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("usmf", "US-200", "v3", "No"),
            WriteCondition::IfMatch(stale),
        )
        .await
        .expect_err("stale ETag");
    assert_eq!(err.kind, ConnectorErrorKind::PreconditionFailed);
    assert_eq!(err.status, Some(412));
    let now = env.erp.read("CustomersV3", &key).await.unwrap().unwrap();
    assert_eq!(now.get("OrganizationName"), Some(&Value::Text("v2".into())));

    env.erp.delete("CustomersV3", &key).await.expect("delete");
    assert_eq!(env.erp.read("CustomersV3", &key).await.unwrap(), None);
    assert!(env.fno.rows("CustomersV3").is_empty());
    env.erp
        .delete("CustomersV3", &key)
        .await
        .expect("deleting a missing record is not an error");
}

#[tokio::test]
async fn enum_filters_and_incremental_paging_return_each_record_once() {
    let env = Env::start().await;
    let since = Utc::now() - chrono::Duration::seconds(1);
    let mut expected = BTreeSet::new();
    for n in 0..260 {
        let company = if n % 2 == 0 { "usmf" } else { "demf" };
        let account = format!("C-{n:04}");
        env.fno
            .user_create(
                "CustomersV3",
                json!({
                    "dataAreaId": company,
                    "CustomerAccount": account,
                    "CreditLimitIsMandatory": "Yes",
                    "PartyType": "Organization",
                }),
            )
            .expect("seed");
        expected.insert(customer_key(company, &account).to_string());
    }
    for n in 0..20 {
        env.fno
            .user_create(
                "CustomersV3",
                json!({
                    "dataAreaId": "usmf",
                    "CustomerAccount": format!("N-{n}"),
                    "CreditLimitIsMandatory": "No",
                    "PartyType": "Organization",
                }),
            )
            .expect("seed");
    }
    // A plain text against the enum field is refused by F&O (and the simulator), naming why.
    let untyped = Query {
        filter: Some(
            parse_filter("CreditLimitIsMandatory eq 'Yes' and PartyType eq 'Organization'")
                .unwrap(),
        ),
        modified_since: None,
        page_size: Some(50),
        page_token: None,
    };
    let refused = env.erp.query("CustomersV3", &untyped).await.unwrap_err();
    assert_eq!(refused.kind, ConnectorErrorKind::BadRequest, "{refused}");
    assert!(
        refused.message.contains("incompatible types"),
        "{}",
        refused.message
    );
    let filter = parse_filter(
        "CreditLimitIsMandatory eq 'Yes' and \
         PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'",
    )
    .unwrap();
    let mut query = Query {
        filter: Some(filter),
        modified_since: Some(since),
        page_size: Some(50),
        page_token: None,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = env.erp.query("CustomersV3", &query).await.expect("page");
        pages += 1;
        assert!(page.records.len() <= 50);
        for r in &page.records {
            assert_eq!(
                r.get("CreditLimitIsMandatory"),
                Some(&Value::Enum("Yes".into()))
            );
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
    assert_eq!(
        seen.into_iter()
            .map(|id| id.to_string())
            .collect::<BTreeSet<_>>(),
        expected,
        "no gaps"
    );

    let later = Query {
        modified_since: Some(Utc::now() + chrono::Duration::hours(1)),
        ..Query::default()
    };
    assert!(
        env.erp
            .query("CustomersV3", &later)
            .await
            .unwrap()
            .records
            .is_empty()
    );
}

#[tokio::test]
async fn upsert_batch_writes_new_and_existing_records_in_one_changeset() {
    let env = Env::start().await;
    for n in 0..3 {
        let account = format!("U-{n}");
        env.erp
            .upsert(
                "CustomersV3",
                &RecordRef::Key(customer_key("usmf", &account)),
                &customer("usmf", &account, "old", "No"),
                WriteCondition::None,
            )
            .await
            .unwrap();
    }
    let items: Vec<_> = (0..10)
        .map(|n| {
            let account = format!("U-{n}");
            (
                RecordRef::Key(customer_key("usmf", &account)),
                customer("usmf", &account, &format!("Batch {n}"), "Yes"),
            )
        })
        .collect();
    let requests_before = env.fno.stats().requests;
    let results = env
        .erp
        .upsert_batch("CustomersV3", &items)
        .await
        .expect("batch");
    assert_eq!(results.len(), 10);
    for (n, r) in results.iter().enumerate() {
        let out = r.as_ref().expect("item written");
        assert_eq!(out.created, n >= 3, "item {n}");
        assert_eq!(
            out.id,
            Some(customer_key("usmf", &format!("U-{n}")).to_string())
        );
    }
    // Ten existence reads and one $batch.
    assert_eq!(env.fno.stats().requests - requests_before, 11);
    assert_eq!(env.fno.rows("CustomersV3").len(), 10);
    for n in [0, 9] {
        let r = env
            .erp
            .read(
                "CustomersV3",
                &RecordRef::Key(customer_key("usmf", &format!("U-{n}"))),
            )
            .await
            .unwrap()
            .expect("present");
        assert_eq!(
            r.get("OrganizationName"),
            Some(&Value::Text(dualwrite_core::format_smolstr!("Batch {n}")))
        );
        assert_eq!(
            r.get("CreditLimitIsMandatory"),
            Some(&Value::Enum("Yes".into()))
        );
    }
}

#[tokio::test]
async fn creating_a_record_someone_created_first_asks_for_a_reread() {
    let env = Env::start().await;
    env.fno
        .user_create(
            "CustomersV3",
            json!({"dataAreaId": "usmf", "CustomerAccount": "US-009", "OrganizationName": "First"}),
        )
        .expect("seed");
    let key = customer_key("usmf", "US-009");
    let mut record = Record::new("CustomersV3");
    record.company = Some("usmf".into());
    record
        .fields
        .insert("OrganizationName", Value::Text("Second".into()));
    let err = env
        .erp
        .upsert(
            "CustomersV3",
            &RecordRef::Key(key),
            &record,
            WriteCondition::MustNotExist,
        )
        .await
        .expect_err("the key exists");
    // F&O says 400 "The record already exists"; the engine must re-read, as on a 412.
    assert_eq!(err.kind, ConnectorErrorKind::PreconditionFailed, "{err}");
    assert_eq!(err.status, Some(400));
    assert!(err.message.contains("already exists"), "{err}");
}

/// Regression: PATCH and DELETE by key went without `cross-company=true`, so (with FnoSim
/// applying F&O's default-company rule to them as to reads) a row of another company than the
/// default one could be read but not updated or deleted.
#[tokio::test]
async fn rows_of_a_non_default_company_are_updated_and_deleted_by_key() {
    let env = Env::start().await;
    let key = RecordRef::Key(customer_key("demf", "DE-100"));
    let created = env
        .erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("demf", "DE-100", "Contoso GmbH", "No"),
            WriteCondition::None,
        )
        .await
        .expect("create");
    assert!(created.created);
    let updated = env
        .erp
        .upsert(
            "CustomersV3",
            &key,
            &customer("demf", "DE-100", "Contoso Deutschland GmbH", "Yes"),
            WriteCondition::None,
        )
        .await
        .expect("update of a demf row (read, then PATCH by key)");
    assert!(!updated.created);
    let out = env
        .erp
        .upsert_batch(
            "CustomersV3",
            &[(key.clone(), customer("demf", "DE-100", "Batch GmbH", "Yes"))],
        )
        .await
        .expect("bulk");
    out[0].as_ref().expect("PATCH in a changeset");
    let r = env.erp.read("CustomersV3", &key).await.unwrap().unwrap();
    assert_eq!(
        r.get("OrganizationName"),
        Some(&Value::Text("Batch GmbH".into()))
    );
    env.erp.delete("CustomersV3", &key).await.expect("delete");
    assert!(
        env.fno.rows("CustomersV3").is_empty(),
        "the demf row is gone"
    );
}

/// Regression: integer key fields were quoted in URLs and sent as JSON strings. FnoSim (told
/// the line number is an integer key) refuses both, as F&O does; every route must pass.
#[tokio::test]
async fn an_integer_key_field_is_written_unquoted_on_every_route() {
    use dualwrite_core::ports::{CallResult, ConnectorCall};
    let env = Env::start().await;
    let line = |n: &str| {
        RecordRef::Key(RecordKey::new([
            ("dataAreaId", "usmf"),
            ("SalesOrderNumber", "SO-1"),
            ("LineCreationSequenceNumber", n),
        ]))
    };
    // The record lacks the key fields: the connector sends them from the key, typed.
    let amount = |a: &str| {
        let mut r = Record::new("CDSSalesOrderLines")
            .with("LineAmount", Value::Decimal(a.parse().unwrap()));
        r.company = Some("usmf".into());
        r
    };
    let created = env
        .erp
        .upsert(
            "CDSSalesOrderLines",
            &line("1"),
            &amount("10"),
            WriteCondition::None,
        )
        .await
        .expect("create: read by key, then POST");
    assert!(created.created);
    let rows = env.fno.rows("CDSSalesOrderLines");
    assert_eq!(rows[0]["LineCreationSequenceNumber"], json!(1));
    env.erp
        .upsert(
            "CDSSalesOrderLines",
            &line("1"),
            &amount("11"),
            WriteCondition::None,
        )
        .await
        .expect("update: read by key, then PATCH by key");
    for r in env
        .erp
        .upsert_batch(
            "CDSSalesOrderLines",
            &[(line("1"), amount("12")), (line("2"), amount("20"))],
        )
        .await
        .expect("bulk")
    {
        r.expect("changeset item");
    }
    let results = env
        .erp
        .call_many(vec![
            ConnectorCall::Read {
                entity: "CDSSalesOrderLines".into(),
                at: line("2"),
            },
            ConnectorCall::Upsert {
                entity: "CDSSalesOrderLines".into(),
                at: line("3"),
                record: amount("30"),
                condition: WriteCondition::None,
            },
        ])
        .await;
    let CallResult::Read(Ok(Some(second))) = &results[0] else {
        panic!("{:?}", results[0]);
    };
    assert_eq!(second.get("LineAmount"), Some(&Value::Decimal(20.into())));
    assert!(matches!(&results[1], CallResult::Upsert(Ok(o)) if o.created));
    let first = env
        .erp
        .read("CDSSalesOrderLines", &line("1"))
        .await
        .unwrap()
        .expect("line 1");
    assert_eq!(first.get("LineAmount"), Some(&Value::Decimal(12.into())));
    assert_eq!(
        first.get("LineCreationSequenceNumber"),
        Some(&Value::Integer(1))
    );
    env.erp
        .delete("CDSSalesOrderLines", &line("1"))
        .await
        .expect("delete by key");
    assert_eq!(env.fno.rows("CDSSalesOrderLines").len(), 2);
}

/// F&O pages with `$skip`: a row of an earlier page deleted while a query runs would shift the
/// rest down and one row would never be read. The connector pages by key, so every row that
/// still exists is read exactly once, and one deleted ahead of the reader is not.
#[tokio::test]
async fn rows_deleted_during_paging_make_no_other_row_missed() {
    let env = Env::start().await;
    let mut alive = BTreeSet::new();
    for n in 0..30 {
        let company = if n < 15 { "demf" } else { "usmf" };
        let account = format!("K-{n:02}");
        env.fno
            .user_create(
                "CustomersV3",
                json!({"dataAreaId": company, "CustomerAccount": account}),
            )
            .expect("seed");
        alive.insert(customer_key(company, &account).to_string());
    }
    let mut query = Query {
        page_size: Some(10),
        ..Query::default()
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = env.erp.query("CustomersV3", &query).await.expect("page");
        pages += 1;
        seen.extend(
            page.records
                .iter()
                .map(|r| r.id.clone().expect("id").to_string()),
        );
        if pages == 1 {
            // Two rows already read and one not read yet are deleted between pages.
            let ahead = "dataAreaId='usmf',CustomerAccount='K-25'";
            for gone in [seen[0].as_str(), seen[1].as_str(), ahead] {
                env.fno.user_delete("CustomersV3", gone).expect("delete");
            }
            alive.remove("dataAreaId='usmf',CustomerAccount='K-25'");
        }
        match page.next {
            Some(next) => query.page_token = Some(next),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    let read: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(read.len(), seen.len(), "a row read twice: {seen:?}");
    let missed: Vec<&String> = alive.difference(&read).collect();
    assert!(missed.is_empty(), "rows never read: {missed:?}");
    // The two deleted after they were read were read; K-25, deleted before, was not.
    assert_eq!(read.len(), 29);
    assert!(!read.contains("dataAreaId='usmf',CustomerAccount='K-25'"));
}
