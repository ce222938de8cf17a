//! End-to-end tests of `dualwrite serve` over HTTP: real simulator webhooks through the
//! runtime's endpoints, checked on both simulators and in the engine's counters — a round
//! trip, duplicate and out-of-order deliveries, and webhooks the runtime must refuse.

use crate::harness::{Source, Stack, StackOptions, number, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_edits_flow_both_ways_with_one_write_each_and_echoes_suppressed() {
    let s = Stack::start(StackOptions::default()).await;

    // Dataverse create -> F&O customer with mapped values and resolved lookups.
    let before = s.stats().await.engine;
    let fno_events = s.fno_events("CustomersV3");
    let id = s.create_account("E2E-0001", "Fabrikam Seattle", 1500);
    let c = wait_until("customer E2E-0001 in F&O", || s.customer("E2E-0001")).await;
    s.wait_idle().await;
    assert_eq!(c["dataAreaId"], "usmf");
    assert_eq!(c["OrganizationName"], "Fabrikam Seattle");
    assert_eq!(number(&c["CreditLimit"]), Some(1500.0));
    assert_eq!(c["DeliveryAddressCity"], "Seattle");
    assert_eq!(c["PrimaryContactPhone"], "+1 206 555 0100");
    assert_eq!(c["SalesCurrencyCode"], "USD", "currency lookup resolved");
    assert_eq!(c["CustomerGroupId"], "10", "customer group lookup resolved");
    assert_eq!(c["PartyType"], "Organization", "constant written");
    let after = s.stats().await.engine;
    assert_eq!(
        s.fno_events("CustomersV3") - fno_events,
        1,
        "exactly one F&O write for the create"
    );
    assert!(
        after.echoes_suppressed > before.echoes_suppressed,
        "the F&O event of our own write must come back as a suppressed echo: {after}"
    );

    // Dataverse edit -> F&O update, one write, nothing written back to Dataverse.
    let before = s.stats().await.engine;
    let (fno_events, dv_hooks) = (s.fno_events("CustomersV3"), s.dv_webhooks("account"));
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Fabrikam Tacoma", "creditlimit": 2500}),
    )
    .unwrap();
    wait_until("the name change in F&O", || {
        s.customer("E2E-0001")
            .filter(|c| c["OrganizationName"] == "Fabrikam Tacoma")
    })
    .await;
    s.wait_idle().await;
    let c = s.customer("E2E-0001").unwrap();
    assert_eq!(number(&c["CreditLimit"]), Some(2500.0));
    let after = s.stats().await.engine;
    assert_eq!(after.writes - before.writes, 1, "one write: {after}");
    assert_eq!(s.fno_events("CustomersV3") - fno_events, 1, "one F&O write");
    assert_eq!(
        s.dv_webhooks("account") - dv_hooks,
        1,
        "only the user's own edit changed the Dataverse account"
    );
    assert!(
        after.echoes_suppressed > before.echoes_suppressed,
        "{after}"
    );
    assert_eq!(s.account("E2E-0001").unwrap()["name"], "Fabrikam Tacoma");

    // F&O edit -> Dataverse update, one write, nothing written back to F&O.
    let before = s.stats().await.engine;
    let (fno_events, dv_hooks) = (s.fno_events("CustomersV3"), s.dv_webhooks("account"));
    s.fno
        .user_edit(
            "CustomersV3",
            "dataAreaId='usmf',CustomerAccount='E2E-0001'",
            serde_json::json!({"CreditLimit": 4321.5, "DeliveryAddressCity": "Redmond"}),
        )
        .unwrap();
    let a = wait_until("the F&O edit in Dataverse", || {
        s.account("E2E-0001")
            .filter(|a| number(&a["creditlimit"]) == Some(4321.5))
    })
    .await;
    s.wait_idle().await;
    assert_eq!(a["address1_city"], "Redmond");
    assert_eq!(a["name"], "Fabrikam Tacoma", "unchanged fields stay");
    let after = s.stats().await.engine;
    assert_eq!(after.writes - before.writes, 1, "one write: {after}");
    assert_eq!(
        s.dv_webhooks("account") - dv_hooks,
        1,
        "one Dataverse write"
    );
    assert_eq!(
        s.fno_events("CustomersV3") - fno_events,
        1,
        "only the user's own edit changed the F&O customer"
    );
    // The Dataverse webhook of our own write came back and was recognised by its hash: on
    // arrival (settled, not queued) when the write's commit was in the store already, else by
    // the worker. Which one is a race, so both count.
    assert_eq!(
        (after.events - before.events) + (after.screened - before.screened),
        2,
        "the edit and its echo: {after}"
    );
    assert_eq!(
        after.echoes_suppressed - before.echoes_suppressed,
        1,
        "the echo was suppressed: {after}"
    );
    assert_eq!(
        after.skipped, before.skipped,
        "no echo filed in_sync: {after}"
    );

    // F&O create -> Dataverse account, one write on each side (the user's and ours).
    let before = s.stats().await.engine;
    let (fno_events, dv_hooks) = (s.fno_events("CustomersV3"), s.dv_webhooks("account"));
    s.create_customer("ERP-0001", "Northwind Outlet", 500.0);
    let a = wait_until("customer ERP-0001 in Dataverse", || s.account("ERP-0001")).await;
    s.wait_idle().await;
    assert_eq!(a["name"], "Northwind Outlet");
    assert_eq!(a["_msdyn_customergroupid_value"], s.group10.as_str());
    assert_eq!(a["_transactioncurrencyid_value"], s.usd.as_str());
    assert_eq!(a["_msdyn_company_value"], s.usmf.as_str());
    let after = s.stats().await.engine;
    assert_eq!(
        s.dv_webhooks("account") - dv_hooks,
        1,
        "one Dataverse write"
    );
    // Regression: the echo of our Dataverse write carries its lookups by id where we wrote
    // them with id and key; it must still be recognised, or the CRM -> F&O constant
    // `LanguageId` would be written back to F&O as a second write.
    assert_eq!(
        s.fno_events("CustomersV3") - fno_events,
        1,
        "only the user's create changed the F&O customer"
    );
    assert_eq!(after.writes - before.writes, 1, "one write in all: {after}");
    assert_eq!(after.errors, 0);
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivered_three_times_writes_once() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0002", "Litware", 100).await;
    let mark = s.relay.captured().len();
    s.dv.user_edit("accounts", &id, serde_json::json!({"name": "Litware Inc"}))
        .unwrap();
    wait_until("the rename in F&O", || {
        s.customer("E2E-0002")
            .filter(|c| c["OrganizationName"] == "Litware Inc")
    })
    .await;
    s.wait_idle().await;
    let sent = s.relay.captured_since(mark, Source::Dataverse);
    assert_eq!(sent.len(), 1, "one webhook for the user's edit: {sent:?}");
    assert_eq!(sent[0].forwarded_status, Some(202));
    let before_row = s.customer("E2E-0002").unwrap();
    let before = s.stats().await;
    let fno_events = s.fno_events("CustomersV3");

    // The redeliveries carry what the link records already (same version, same values): they
    // are settled on arrival, answered 200 without being queued.
    for _ in 0..2 {
        let (status, body) = s.replay(&sent[0]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"settled\":1"), "{body}");
        // A webhook image has no `versionnumber`, so the replay is told from the echo of a
        // write by nothing: either reason means "already recorded".
        assert!(
            body.contains("duplicate") || body.contains("echo"),
            "{body}"
        );
    }
    s.wait_idle().await;

    let after = s.stats().await;
    assert_eq!(after.receivers.accepted, before.receivers.accepted);
    assert_eq!(after.receivers.settled - before.receivers.settled, 2);
    assert_eq!(
        after.engine.screened - before.engine.screened,
        2,
        "both redeliveries are settled on arrival: {}",
        after.engine
    );
    assert_eq!(after.engine.events, before.engine.events, "nothing queued");
    assert_eq!(after.engine.writes, before.engine.writes, "nothing written");
    assert_eq!(s.fno_events("CustomersV3"), fno_events, "no F&O write");
    let row = s.customer("E2E-0002").unwrap();
    assert_eq!(
        row["ModifiedDateTime"], before_row["ModifiedDateTime"],
        "the F&O row's version is unchanged"
    );
    assert_eq!(row, before_row);
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_webhook_arriving_after_a_newer_one_is_dropped_as_stale() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0003", "Proseware", 100).await;
    s.relay.set_forwarding(Source::Dataverse, false);
    let mark = s.relay.captured().len();
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Proseware v1", "creditlimit": 111}),
    )
    .unwrap();
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Proseware v2", "creditlimit": 222}),
    )
    .unwrap();
    let sent = wait_until("both edits captured", || {
        let c = s.relay.captured_since(mark, Source::Dataverse);
        (c.len() == 2).then_some(c)
    })
    .await;
    let (v1, v2) = (&sent[0], &sent[1]);
    assert!(v1.json().to_string().contains("Proseware v1"));
    assert!(v2.json().to_string().contains("Proseware v2"));
    let before = s.stats().await.engine;

    let (status, body) = s.replay(v2).await;
    assert_eq!(status, 202, "{body}");
    wait_until("v2 in F&O", || {
        s.customer("E2E-0003")
            .filter(|c| c["OrganizationName"] == "Proseware v2")
    })
    .await;
    s.wait_idle().await;
    let fno_events = s.fno_events("CustomersV3");
    let mid = s.stats().await.engine;
    let (status, body) = s.replay(v1).await;
    assert_eq!(status, 202, "{body}");
    s.wait_idle().await;

    let after = s.stats().await.engine;
    let c = s.customer("E2E-0003").unwrap();
    assert_eq!(c["OrganizationName"], "Proseware v2");
    assert_eq!(number(&c["CreditLimit"]), Some(222.0));
    assert_eq!(
        after.writes - before.writes,
        1,
        "only v2 was written: {after}"
    );
    assert_eq!(s.fno_events("CustomersV3"), fno_events, "v1 wrote nothing");
    // Dataverse Update webhooks carry only the changed columns, so the engine re-reads the
    // row (now v2) for v1: it finds data already applied and drops v1 without a write, as an
    // echo (a complete older event would be `stale`). Either way it counts as suppressed.
    assert_eq!(after.events - mid.events, 1, "{after}");
    assert_eq!(
        (after.stale_dropped + after.echoes_suppressed)
            - (mid.stale_dropped + mid.echoes_suppressed),
        1,
        "v1 dropped without a write: {after}"
    );
    assert_eq!(s.account("E2E-0003").unwrap()["name"], "Proseware v2");
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_over_http_change_nothing_on_either_side() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0004", "Adatum", 100).await;
    // A real webhook body to tamper with, captured but not delivered.
    s.relay.set_forwarding(Source::Dataverse, false);
    let mark = s.relay.captured().len();
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Adatum changed"}),
    )
    .unwrap();
    let real = wait_until("the edit's webhook captured", || {
        s.relay
            .captured_since(mark, Source::Dataverse)
            .into_iter()
            .next()
    })
    .await;
    s.wait_idle().await;
    let customers = s.fno.rows("CustomersV3");
    let accounts = s.dv.rows("accounts");
    let before = s.stats().await;
    let code = format!("code={}", crate::harness::DV_KEY);
    let fno_secret = vec![(
        crate::harness::FNO_SECRET_HEADER.to_string(),
        crate::harness::FNO_SECRET.to_string(),
    )];

    let (status, body) = s
        .post(
            Source::Dataverse,
            "code=wrong",
            &real.headers,
            real.body.clone(),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    let wrong_fno = vec![(
        crate::harness::FNO_SECRET_HEADER.to_string(),
        "wrong".to_string(),
    )];
    let (status, body) = s.post(Source::Fno, "", &wrong_fno, "{}").await;
    assert_eq!(status, 401, "{body}");

    let (status, body) = s
        .post(Source::Dataverse, &code, &[], "{\"MessageName\": ")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("not valid JSON"),
        "the problem is named: {body}"
    );
    let (status, body) = s
        .post(
            Source::Dataverse,
            &code,
            &[],
            r#"{"MessageName":"Update","PrimaryEntityName":"account","Depth":"deep"}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("missing field"),
        "the missing field is named: {body}"
    );
    let (status, body) = s.post(Source::Fno, "", &fno_secret, r#"{"hello":1}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("BusinessEventId"), "{body}");

    let mut big = real.body.to_vec();
    big.extend(std::iter::repeat_n(b' ', 1024 * 1024 + 10));
    let (status, body) = s.post(Source::Dataverse, &code, &[], big).await;
    assert_eq!(status, 413, "{body}");

    let uncovered = String::from_utf8(real.body.to_vec())
        .unwrap()
        .replace("\"account\"", "\"phonecall\"");
    assert_ne!(uncovered.as_bytes(), &real.body[..]);
    let (status, body) = s.post(Source::Dataverse, &code, &[], uncovered).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer, serde_json::json!({"ignored": 1}));

    s.wait_idle().await;
    let after = s.stats().await;
    assert_eq!(
        after.queue.ready + after.queue.in_flight + after.queue.delayed,
        0
    );
    assert_eq!(after.receivers.accepted, before.receivers.accepted);
    assert_eq!(
        after.receivers.rejected_unauthorized - before.receivers.rejected_unauthorized,
        2
    );
    assert_eq!(
        after.receivers.rejected_malformed - before.receivers.rejected_malformed,
        3
    );
    assert_eq!(
        after.receivers.rejected_too_large - before.receivers.rejected_too_large,
        1
    );
    assert_eq!(after.receivers.ignored - before.receivers.ignored, 1);
    assert_eq!(after.engine, before.engine, "the engine saw nothing");
    assert_eq!(s.fno.rows("CustomersV3"), customers, "F&O unchanged");
    assert_eq!(s.dv.rows("accounts"), accounts, "Dataverse unchanged");
    assert_eq!(
        s.customer("E2E-0004").unwrap()["OrganizationName"],
        "Adatum"
    );
    s.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_workers_leave_webhooks_queued_until_released() {
    let s = Stack::start(StackOptions::default()).await;
    let held = s.rt.hold_workers().await;
    s.create_account("HOLD-0001", "Held Ltd", 700);
    // The webhook is answered (queued durably) while no worker takes it.
    assert!(
        s.dv.wait_webhooks_idle(std::time::Duration::from_secs(10))
            .await
    );
    let depth = s.stats().await.queue;
    assert_eq!(depth.ready, 1, "{depth:?}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(s.customer("HOLD-0001").is_none(), "processed while held");
    assert_eq!(s.stats().await.queue.ready, 1);
    drop(held);
    let c = wait_until("customer HOLD-0001 in F&O", || s.customer("HOLD-0001")).await;
    assert_eq!(c["OrganizationName"], "Held Ltd");
}

/// F&O throttling (429 + `Retry-After`) and a 503 during a live sync: the change is retried
/// until it lands, once, and `/status` tells each outcome by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_outages_are_ridden_out_and_counted_by_kind() {
    let s = Stack::start(StackOptions::default()).await;
    s.synced_account("E2E-0010", "Litware", 100).await;
    let before = s.stats().await.connectors.fno;
    let fno_events = s.fno_events("CustomersV3");

    s.fno.throttle_next(1);
    s.fno
        .inject_faults([dualwrite_simulators::Fault::Status(503)]);
    s.create_account("E2E-0011", "Litware Outlet", 200);
    let c = wait_until(
        "customer E2E-0011 in F&O despite the 429 and the 503",
        || s.customer("E2E-0011"),
    )
    .await;
    s.wait_idle().await;
    assert_eq!(c["OrganizationName"], "Litware Outlet");
    assert_eq!(s.fno_events("CustomersV3") - fno_events, 1, "written once");

    let after = s.stats().await.connectors.fno;
    assert_eq!(after.throttled - before.throttled, 1, "{after:?}");
    assert_eq!(after.transient - before.transient, 1, "{after:?}");
    assert_eq!(after.refused, before.refused, "{after:?}");
    assert!(after.requests >= before.requests + 3, "{after:?}");
    assert!(after.token_fetches >= 1, "{after:?}");
    let status: serde_json::Value = reqwest::get(format!("{}/status", s.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["connectors"]["fno"]["throttled"], after.throttled,
        "{status}"
    );
    assert!(status["connectors"]["dataverse"]["requests"].as_u64() > Some(0));
    s.rt.shutdown().await;
}

/// A change refused for good (a 400) is logged with the change itself; once the cause is gone,
/// sending it again (what `dualwrite errors retry` does) syncs it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_refused_for_good_is_kept_and_syncs_when_sent_again() {
    use dualwrite_core::ports::{JournalStore, QueueMessage, WorkQueue};

    let s = Stack::start(StackOptions::default()).await;
    s.synced_account("E2E-0020", "Adatum", 100).await;
    let before = s.stats().await.engine;
    s.fno
        .inject_faults([dualwrite_simulators::Fault::Status(400)]);
    s.create_account("E2E-0021", "Adatum Outlet", 300);
    wait_until("the refusal logged", || {
        let errors = s.rt.engine().stats().errors;
        (errors > before.errors).then_some(errors)
    })
    .await;
    s.wait_idle().await;
    assert!(s.customer("E2E-0021").is_none(), "refused: not written");
    let logged = s.rt.store().errors(10).await.unwrap();
    let failed = logged
        .iter()
        .find(|e| e.event.is_some())
        .expect("the failed change is kept with its error");
    let event_id = failed.event_id.clone().unwrap();
    assert_eq!(failed.class, dualwrite_core::ports::ErrorClass::Permanent);

    let fno_events = s.fno_events("CustomersV3");
    let replay = dualwrite_engine::replay::failed_events(
        s.rt.store().as_ref(),
        std::slice::from_ref(&event_id),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(replay.events.len(), 1);
    s.rt.queue()
        .send(
            replay
                .events
                .into_iter()
                .map(QueueMessage::for_event)
                .collect(),
        )
        .await
        .unwrap();
    let c = wait_until("customer E2E-0021 in F&O after the retry", || {
        s.customer("E2E-0021")
    })
    .await;
    s.wait_idle().await;
    assert_eq!(c["OrganizationName"], "Adatum Outlet");
    assert_eq!(s.fno_events("CustomersV3") - fno_events, 1, "written once");
    s.rt.shutdown().await;
}

/// Deletes travel both ways over HTTP: an F&O delete (its data event carries the row as the
/// `PreImage` input parameter and a bare reference as the Target) removes the Dataverse
/// account, and a Dataverse delete removes the F&O customer; each once, nothing recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_flow_both_ways() {
    let s = Stack::start(StackOptions::default()).await;
    s.synced_account("E2E-0030", "Deleted in F&O", 100).await;
    let dv_id = s
        .synced_account("E2E-0031", "Deleted in Dataverse", 200)
        .await;
    let before = s.stats().await.engine;

    s.fno
        .user_delete(
            "CustomersV3",
            &crate::harness::Stack::customer_key("E2E-0030"),
        )
        .unwrap();
    wait_until("account E2E-0030 gone from Dataverse", || {
        s.account("E2E-0030").is_none().then_some(())
    })
    .await;
    s.dv.user_delete("accounts", &dv_id).unwrap();
    wait_until("customer E2E-0031 gone from F&O", || {
        s.customer("E2E-0031").is_none().then_some(())
    })
    .await;
    s.wait_idle().await;

    let after = s.stats().await.engine;
    assert_eq!(after.deletes - before.deletes, 2, "{after}");
    assert_eq!(after.errors, before.errors, "{after}");
    // Each delete's webhook from the side dualwrite deleted is an echo (before the link's
    // removal committed) or finds no link (after): never a delete sent back.
    assert_eq!(
        (after.echoes_suppressed + after.skipped) - (before.echoes_suppressed + before.skipped),
        2,
        "{after}"
    );
    assert!(s.customer("E2E-0030").is_none(), "not recreated in F&O");
    assert!(
        s.account("E2E-0031").is_none(),
        "not recreated in Dataverse"
    );
    s.rt.shutdown().await;
}

/// Text that reads as a date-time stays text end to end: the Dataverse webhook carries it as the
/// text column holds it (not as a WCF date), the receiver keeps it text, F&O gets it unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_looks_like_a_date_time_arrives_unchanged() {
    let s = Stack::start(StackOptions::default()).await;
    let name = "2026-05-01T10:00:00Z";
    s.synced_account("E2E-0040", name, 100).await;
    assert_eq!(s.customer("E2E-0040").unwrap()["OrganizationName"], name);
    s.rt.shutdown().await;
}

/// A Dataverse step registered synchronously calls the runtime inside the user's save: a step
/// the runtime refuses (a wrong key: 401) fails the save, and nothing changes on either side; a
/// step it accepts makes the save wait for the event to be durably queued (its 2xx), and the
/// change, whose webhook has no system job (empty OperationId), syncs like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_dataverse_step_vetoes_a_refused_save_and_syncs_an_accepted_one() {
    use dualwrite_simulators::{WebhookAuth, WebhookMessage, WebhookRegistration};

    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("E2E-0080", "Coho Winery", 100).await;
    s.relay.set_forwarding(Source::Dataverse, false);
    let url = format!("http://{}/webhooks/dataverse", s.rt.addr());
    let step = |key: &str| WebhookRegistration {
        url: url.clone(),
        entity_logical_names: vec!["account".into()],
        messages: vec![WebhookMessage::Update],
        auth: WebhookAuth::WebhookKey(key.into()),
    };

    s.dv.register_sync_webhook(step("wrong-key"));
    let err =
        s.dv.user_edit("accounts", &id, serde_json::json!({"name": "Vetoed"}))
            .unwrap_err()
            .to_string();
    assert!(err.contains("HTTP 401"), "{err}");
    s.wait_idle().await;
    assert_eq!(s.account("E2E-0080").unwrap()["name"], "Coho Winery");
    assert_eq!(
        s.customer("E2E-0080").unwrap()["OrganizationName"],
        "Coho Winery"
    );

    s.dv.clear_sync_webhooks();
    s.dv.register_sync_webhook(step(crate::harness::DV_KEY));
    let accepted = s.stats().await.receivers.accepted;
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Coho Winery East"}),
    )
    .unwrap();
    assert_eq!(
        s.stats().await.receivers.accepted,
        accepted + 1,
        "queued before the save returned"
    );
    wait_until("the synchronous step's change in F&O", || {
        s.customer("E2E-0080")
            .filter(|c| c["OrganizationName"] == "Coho Winery East")
    })
    .await;
    s.wait_idle().await;
    assert_eq!(s.stats().await.engine.errors, 0);
    s.rt.shutdown().await;
}
