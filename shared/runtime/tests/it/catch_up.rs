//! End-to-end tests of the catch-up scheduler: changes whose webhooks never reached the
//! runtime are found by polling both simulators, on demand and on the cron schedule, and
//! the map's watermarks advance so a poll without changes writes nothing.

use std::time::Duration;

use dualwrite_core::ports::JournalStore;

use crate::harness::{CUSTOMERS, Source, Stack, StackOptions, number, wait_until_within};

/// Stops delivering webhooks to the runtime: every notification from now on is "missed".
fn miss_all_webhooks(s: &Stack) {
    s.relay.set_forwarding(Source::Dataverse, false);
    s.relay.set_forwarding(Source::Fno, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_now_makes_up_for_missed_webhooks_and_then_writes_nothing() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0010", "Contoso Pharma", 100).await;
    s.synced_account("E2E-0012", "Tailspin Toys", 100).await;
    miss_all_webhooks(&s);
    let before_state = s.rt.store().map_state(CUSTOMERS).await.unwrap();
    // The simulators stamp rows to the second: let the setup's rows fall in an earlier second
    // than the missed changes, so the watermark below can tell them apart (regression: on a
    // fast run everything shared one second and the third poll re-read all rows).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    s.create_account("E2E-0011", "Wide World Importers", 700);
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Contoso Pharmaceuticals"}),
    )
    .unwrap();
    s.fno
        .user_edit(
            "CustomersV3",
            &Stack::customer_key("E2E-0012"),
            serde_json::json!({"CreditLimit": 1234.5, "DeliveryAddressCity": "Redmond"}),
        )
        .unwrap();
    s.wait_idle().await;
    assert!(s.customer("E2E-0011").is_none(), "no webhook, no sync yet");
    assert_eq!(
        number(&s.account("E2E-0012").unwrap()["creditlimit"]),
        Some(100.0),
        "no webhook, no sync yet"
    );
    assert_eq!(
        s.customer("E2E-0010").unwrap()["OrganizationName"],
        "Contoso Pharma"
    );
    let accepted = s.stats().await.receivers.accepted;
    // Likewise between the missed changes and dualwrite's own writes of them: the third poll
    // below re-reads what shares the newest second, and must not find the changes there
    // (regression: when the catch-up wrote within the second of the changes, the third poll
    // re-read every row the first one had, 12 of 12).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let ingested = s.rt.catch_up_now().await.unwrap();
    assert!(ingested >= 3, "at least the three changes: {ingested}");
    s.wait_idle().await;

    let c = s.customer("E2E-0011").expect("created account reached F&O");
    assert_eq!(c["OrganizationName"], "Wide World Importers");
    assert_eq!(number(&c["CreditLimit"]), Some(700.0));
    assert_eq!(c["SalesCurrencyCode"], "USD");
    assert_eq!(
        s.customer("E2E-0010").unwrap()["OrganizationName"],
        "Contoso Pharmaceuticals",
        "edited account reached F&O"
    );
    let a = s.account("E2E-0012").unwrap();
    assert_eq!(
        number(&a["creditlimit"]),
        Some(1234.5),
        "F&O edit reached Dataverse"
    );
    assert_eq!(a["address1_city"], "Redmond");
    assert_eq!(a["name"], "Tailspin Toys");
    let stats = s.stats().await;
    assert_eq!(
        stats.receivers.accepted, accepted,
        "nothing came by webhook"
    );
    assert_eq!(stats.engine.errors, 0, "{}", stats.engine);

    let state =
        s.rt.store()
            .map_state(CUSTOMERS)
            .await
            .unwrap()
            .expect("the catch-up stored the map's state");
    let (crm_mark, erp_mark) = (
        state.crm_watermark.expect("Dataverse watermark set"),
        state.erp_watermark.expect("F&O watermark set"),
    );
    if let Some(old) = before_state {
        assert!(old.crm_watermark.is_none_or(|w| w < crm_mark));
        assert!(old.erp_watermark.is_none_or(|w| w < erp_mark));
    }

    // A second poll finds only dualwrite's own writes of the first one: nothing is written.
    let before = s.stats().await.engine;
    let (customers, accounts) = (s.fno.rows("CustomersV3"), s.dv.rows("accounts"));
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    let after = s.stats().await.engine;
    assert_eq!(
        after.writes, before.writes,
        "second catch-up wrote: {after}"
    );
    assert_eq!(s.fno.rows("CustomersV3"), customers);
    assert_eq!(s.dv.rows("accounts"), accounts);
    let state2 = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    assert!(state2.crm_watermark.unwrap() >= crm_mark);
    assert!(state2.erp_watermark.unwrap() >= erp_mark);

    // A third poll reads only what is at or after the watermarks (`modified_since` is
    // inclusive): the newest rows again, which the engine drops as duplicates.
    let before = s.stats().await.engine;
    let again = s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    let after = s.stats().await.engine;
    assert!(
        again < ingested,
        "the watermarks limit the read: {again} vs {ingested}"
    );
    assert_eq!(after.events - before.events, again as u64, "{after}");
    assert_eq!(
        after.duplicates - before.duplicates,
        again as u64,
        "{after}"
    );
    assert_eq!(after.writes, before.writes);
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_schedule_polls_every_second() {
    let s = Stack::start(StackOptions {
        catch_up: Some("* * * * * *".into()),
        ..StackOptions::default()
    })
    .await;
    miss_all_webhooks(&s);
    let accepted = s.stats().await.receivers.accepted;
    s.create_customer("ERP-0020", "Blue Yonder Airlines", 42.0);
    let a = wait_until_within(
        "the scheduler to bring ERP-0020 to Dataverse",
        Duration::from_secs(3),
        || s.account("ERP-0020"),
    )
    .await;
    assert_eq!(a["name"], "Blue Yonder Airlines");
    assert_eq!(
        s.stats().await.receivers.accepted,
        accepted,
        "nothing came by webhook"
    );
    let state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    assert!(state.erp_watermark.is_some(), "{state:?}");
    s.rt.shutdown().await;
}
