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

/// The watermarks' exact boundaries, without the overlap (`scheduler.overlap: 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_now_makes_up_for_missed_webhooks_and_then_writes_nothing() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0010", "Contoso Pharma", 100).await;
    s.synced_account("E2E-0012", "Tailspin Toys", 100).await;
    miss_all_webhooks(&s);
    assert!(
        s.rt.store().map_state(CUSTOMERS).await.unwrap().is_none(),
        "no poll yet: no watermark"
    );
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

    let ingested = s.rt.catch_up_now_overlapping(Duration::ZERO).await.unwrap();
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

    // A second poll finds only dualwrite's own writes of the first one: nothing is written.
    let before = s.stats().await.engine;
    let (customers, accounts) = (s.fno.rows("CustomersV3"), s.dv.rows("accounts"));
    s.rt.catch_up_now_overlapping(Duration::ZERO).await.unwrap();
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
    let again = s.rt.catch_up_now_overlapping(Duration::ZERO).await.unwrap();
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
        crate::harness::WAIT,
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
    // And again, and again: every second.
    let polls = s.stats().await.catch_up.polls;
    let deadline = std::time::Instant::now() + crate::harness::WAIT;
    while s.stats().await.catch_up.polls < polls + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no two more scheduled polls within {:?}",
            crate::harness::WAIT
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.rt.shutdown().await;
}

/// A change stamped before the watermark but visible only after the poll that set it (a long
/// F&O transaction committing behind shorter ones) is read by the next poll's overlap; without
/// the overlap it would never be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_behind_the_watermark_is_read_through_the_overlap() {
    let s = Stack::start(StackOptions::default()).await;
    s.create_customer("ERP-0050", "Litware", 10.0);
    wait_until_within("ERP-0050 in Dataverse", Duration::from_secs(10), || {
        s.account("ERP-0050")
    })
    .await;
    s.wait_idle().await;
    // The lagging edit below must be stamped after this create (a transaction on the row
    // starts after the row's last commit) and before the watermark the next create sets.
    tokio::time::sleep(Duration::from_secs(3)).await;
    miss_all_webhooks(&s);
    s.create_customer("ERP-0051", "Proseware", 20.0);
    s.rt.catch_up_now_overlapping(Duration::ZERO).await.unwrap();
    s.wait_idle().await;
    assert!(
        s.account("ERP-0051").is_some(),
        "the missed create was polled"
    );
    let watermark =
        s.rt.store()
            .map_state(CUSTOMERS)
            .await
            .unwrap()
            .unwrap()
            .erp_watermark
            .unwrap();

    // Stamped a second before the watermark, visible now (however long the poll took).
    let lag = (chrono::Utc::now() - watermark)
        .to_std()
        .unwrap_or_default()
        + Duration::from_secs(1);
    s.fno.set_commit_lag(lag);
    s.fno
        .user_edit(
            "CustomersV3",
            &Stack::customer_key("ERP-0050"),
            serde_json::json!({"CreditLimit": 777.0}),
        )
        .unwrap();
    s.fno.set_commit_lag(Duration::ZERO);
    let stamped = s.customer("ERP-0050").unwrap()["ModifiedDateTime"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&stamped).unwrap() < watermark,
        "{stamped} is behind {watermark}"
    );
    s.rt.catch_up_now_overlapping(Duration::ZERO).await.unwrap();
    s.wait_idle().await;
    assert_eq!(
        number(&s.account("ERP-0050").unwrap()["creditlimit"]),
        Some(10.0),
        "read from the watermark alone, the change is not seen"
    );

    let before = s.stats().await.engine;
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert_eq!(
        number(&s.account("ERP-0050").unwrap()["creditlimit"]),
        Some(777.0),
        "the default overlap (two minutes) reads it"
    );
    let after = s.stats().await.engine;
    assert_eq!(
        after.writes - before.writes,
        1,
        "only that change is written: {after}"
    );
    assert_eq!(after.errors, before.errors, "{after}");
    s.rt.shutdown().await;
}

/// One map side that cannot be polled does not keep the others from being polled; it keeps its
/// watermark and is named in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_side_that_cannot_be_polled_does_not_stop_the_others() {
    let s = Stack::start(StackOptions::default()).await;
    miss_all_webhooks(&s);
    s.create_customer("ERP-0060", "Northwind", 30.0);
    // The poll's first Dataverse read fails for good.
    s.dv.inject_faults([dualwrite_simulators::Fault::Status(400)]);
    let err = s.rt.catch_up_now().await.unwrap_err();
    assert!(err.contains("1 map side(s) not polled"), "{err}");
    let counts = s.stats().await.catch_up;
    assert_eq!((counts.polls, counts.incomplete), (1, 1), "{counts:?}");
    let state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    assert_eq!(
        state.crm_watermark, None,
        "the failed side keeps its (no) watermark"
    );
    assert!(
        state.erp_watermark.is_some(),
        "the other side's moved: {state:?}"
    );
    assert!(err.contains("(crm)"), "{err}");
    s.wait_idle().await;
    assert!(
        s.account("ERP-0060").is_some(),
        "the F&O side of the customers map was polled: {err}"
    );
    // The next poll, without the fault, polls every side.
    s.rt.catch_up_now().await.unwrap();
    s.rt.shutdown().await;
}

/// A Dataverse delete whose webhook was missed is caught up through change tracking: a first
/// poll sets the map's cursor, the next one reads the delete and removes the F&O customer,
/// once. F&O has no change tracking: its side keeps no cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_dataverse_delete_is_caught_up_through_change_tracking() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0070", "Fourth Coffee", 100).await;
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    let state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    assert!(state.crm_deletions.is_some(), "{state:?}");
    assert!(state.erp_deletions.is_none(), "{state:?}");

    miss_all_webhooks(&s);
    s.dv.user_delete("accounts", &id).unwrap();
    s.wait_idle().await;
    assert!(
        s.customer("E2E-0070").is_some(),
        "no webhook: not deleted yet"
    );
    let before = s.stats().await.engine;
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert!(
        s.customer("E2E-0070").is_none(),
        "the caught-up delete reached F&O"
    );
    let after = s.stats().await.engine;
    assert_eq!(after.deletes - before.deletes, 1, "{after}");
    assert_eq!(s.stats().await.catch_up.deletes_read, 1);
    assert_eq!(after.errors, before.errors, "{after}");

    // The cursor moved on: the next poll deletes nothing more.
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert_eq!(s.stats().await.engine.deletes, after.deletes);
    s.rt.shutdown().await;
}

/// A change-tracking cursor Dataverse no longer takes (its tokens expire) does not stop the
/// catch-up: the poll drops it, and the next one starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_change_tracking_cursor_is_replaced() {
    use dualwrite_core::ports::{LinkStore, StoreOp};

    let s = Stack::start(StackOptions::default()).await;
    s.rt.catch_up_now().await.unwrap();
    let mut state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    let cursor = state.crm_deletions.clone().expect("a cursor");
    let (base, _) = cursor.split_once("$deltatoken=").unwrap();
    state.crm_deletions = Some(format!("{base}$deltatoken=expired"));
    s.rt.store()
        .commit(vec![StoreOp::PutMapState(state)])
        .await
        .unwrap();

    s.rt.catch_up_now()
        .await
        .expect("the refused cursor is no failure");
    let state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    assert_eq!(state.crm_deletions, None, "the refused cursor was dropped");
    s.rt.catch_up_now().await.unwrap();
    let state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    let fresh = state.crm_deletions.expect("a new cursor");
    assert!(!fresh.ends_with("expired"), "{fresh}");
    s.rt.shutdown().await;
}

/// A polled row that does not fit the table maps (a value of the wrong type) does not stop the
/// poll: the rows around it are synced, the watermark moves on, and the row is logged in the
/// error log by map and key with the field named (`dualwrite errors retry` can replay it); fixed
/// at the source, the next poll syncs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_row_that_does_not_fit_is_logged_by_key_and_the_others_sync() {
    let s = Stack::start(StackOptions::default()).await;
    miss_all_webhooks(&s);
    s.create_customer("ERP-0061", "Litware", 40.0);
    s.create_customer("ERP-0062", "Proseware", 50.0);
    s.create_customer("ERP-0063", "Adatum", 60.0);
    let bad = Stack::customer_key("ERP-0062");
    s.fno
        .user_edit(
            "CustomersV3",
            &bad,
            serde_json::json!({"CreditLimit": "lots"}),
        )
        .unwrap();
    s.rt.catch_up_now()
        .await
        .expect("one bad row does not fail the poll");
    s.wait_idle().await;
    let counts = s.stats().await.catch_up;
    assert_eq!((counts.polls, counts.incomplete), (1, 0), "{counts:?}");
    assert_eq!(counts.unfit_rows, 1, "{counts:?}");
    assert!(counts.rows_read >= 3, "{counts:?}");
    assert!(counts.changes_queued >= 3, "{counts:?}");
    assert!(counts.last_poll_ended_ms > 0, "{counts:?}");
    assert!(s.account("ERP-0061").is_some());
    assert!(s.account("ERP-0063").is_some());
    assert!(s.account("ERP-0062").is_none());
    let state = s.rt.store().map_state(CUSTOMERS).await.unwrap().unwrap();
    assert!(state.erp_watermark.is_some(), "{state:?}");
    let errors = s.rt.store().errors(10).await.unwrap();
    let logged = errors
        .iter()
        .find(|e| e.message.contains("CreditLimit"))
        .unwrap_or_else(|| panic!("the bad row is logged: {errors:?}"));
    assert_eq!(logged.map.as_deref(), Some(CUSTOMERS), "{logged:?}");
    assert!(
        logged
            .event
            .as_ref()
            .and_then(|e| e.record.id.as_deref())
            .is_some_and(|id| id.contains("ERP-0062")),
        "{logged:?}"
    );

    // Fixed at the source, the row is read by the next poll and syncs.
    s.fno
        .user_edit("CustomersV3", &bad, serde_json::json!({"CreditLimit": 55}))
        .unwrap();
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert_eq!(
        number(&s.account("ERP-0062").expect("synced after the fix")["creditlimit"]),
        Some(55.0)
    );
    s.rt.shutdown().await;
}

/// A catch-up read refused for now (5xx, throttling, a dropped connection) is retried as the
/// error policy says, not given up until the next poll: a poll has no queue to retry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_read_that_fails_for_now_is_retried() {
    let s = Stack::start(StackOptions::default()).await;
    miss_all_webhooks(&s);
    s.create_customer("ERP-0064", "Fabrikam", 30.0);
    s.fno.inject_faults([
        dualwrite_simulators::Fault::Status(503),
        dualwrite_simulators::Fault::DropConnection,
    ]);
    s.dv.inject_faults([dualwrite_simulators::Fault::Status(503)]);
    s.rt.catch_up_now()
        .await
        .expect("the failures were retried");
    s.wait_idle().await;
    assert!(s.account("ERP-0064").is_some());
    s.rt.shutdown().await;
}

/// A shutdown does not wait for a scheduled poll to finish: a poll stuck on a slow system is
/// stopped, and the runtime ends within its grace time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stops_a_scheduled_poll_in_progress() {
    let s = Stack::start(StackOptions {
        catch_up: Some("* * * * * *".into()),
        ..StackOptions::default()
    })
    .await;
    let before = s.fno.stats().requests;
    // Every F&O request from now on takes a minute.
    s.fno.inject_faults(vec![
        dualwrite_simulators::Fault::Delay(Duration::from_secs(
            60
        ));
        20
    ]);
    wait_until_within(
        "a scheduled poll to reach F&O",
        crate::harness::WAIT,
        || (s.fno.stats().requests > before).then_some(()),
    )
    .await;
    let started = std::time::Instant::now();
    s.rt.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown waited {:?} for the poll",
        started.elapsed()
    );
}

/// A row deleted, created again under the same id and deleted again, both deletes missed, is
/// deleted on the other side both times: the second delete is not taken for a repeat of the
/// first (their ids tell the change-tracking reads apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_twice_under_one_id_is_caught_up_twice() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0080", "Alpine Ski House", 100).await;
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    miss_all_webhooks(&s);

    s.dv.user_delete("accounts", &id).unwrap();
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert!(s.customer("E2E-0080").is_none(), "the first delete");

    s.dv.user_create(
        "accounts",
        serde_json::json!({
            "accountid": id,
            "accountnumber": "E2E-0080",
            "name": "Alpine Ski House",
            "customertypecode": 3,
            "creditlimit": 100,
            "msdyn_company@odata.bind": format!("/cdm_companies({})", s.usmf),
            "transactioncurrencyid@odata.bind": format!("/transactioncurrencies({})", s.usd),
            "msdyn_customergroupid@odata.bind": format!("/msdyn_customergroups({})", s.group10),
        }),
    )
    .unwrap();
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert!(
        s.customer("E2E-0080").is_some(),
        "created again under the same id: synced as a new pair"
    );

    s.dv.user_delete("accounts", &id).unwrap();
    s.rt.catch_up_now().await.unwrap();
    s.wait_idle().await;
    assert!(s.customer("E2E-0080").is_none(), "the second delete");
    s.rt.shutdown().await;
}

/// A polled row that does not convert and has no key to read it again by is logged in the
/// error log, and the rows around it are still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_row_without_its_key_is_logged_and_the_others_sync() {
    let s = Stack::start(StackOptions::default()).await;
    miss_all_webhooks(&s);
    s.create_customer("ERP-0065", "Lucerne", 40.0);
    s.fno
        .user_create(
            "CustomersV3",
            serde_json::json!({
                "dataAreaId": "usmf",
                "CustomerAccount": "",
                "OrganizationName": "No key",
                "CreditLimit": "lots",
            }),
        )
        .expect("the simulator keeps a row with an empty key");
    s.rt.catch_up_now().await.expect("the poll goes on");
    s.wait_idle().await;
    assert!(s.account("ERP-0065").is_some());
    let errors = s.rt.store().errors(10).await.unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("without its key") && e.message.contains("CreditLimit")),
        "{errors:?}"
    );
    s.rt.shutdown().await;
}
