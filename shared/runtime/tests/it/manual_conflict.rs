//! End-to-end test of a `conflict: manual` map (loaded from a map folder): a conflicting edit
//! on both sides is held with nothing written, later changes wait behind it, and a person's
//! resolution makes both sides converge.

use std::time::Duration;

use dualwrite_core::Side;
use dualwrite_core::ports::JournalStore;

use crate::harness::{CUSTOMERS, Source, Stack, StackOptions, number, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_conflict_is_held_until_a_person_resolves_it() {
    let s = Stack::start(StackOptions {
        manual_conflict: true,
        ..StackOptions::default()
    })
    .await;
    let id = s.synced_account("E2E-0030", "Fourth Coffee", 100).await;
    let key = Stack::customer_key("E2E-0030");

    // Both sides edited before either webhook is delivered.
    s.relay.set_forwarding(Source::Dataverse, false);
    s.relay.set_forwarding(Source::Fno, false);
    let mark = s.relay.captured().len();
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Fourth Coffee (CRM)"}),
    )
    .unwrap();
    s.fno
        .user_edit(
            "CustomersV3",
            &key,
            serde_json::json!({"OrganizationName": "Fourth Coffee (ERP)"}),
        )
        .unwrap();
    let (dv_call, fno_call) = wait_until("both edits' webhooks captured", || {
        let dv = s.relay.captured_since(mark, Source::Dataverse);
        let fno = s.relay.captured_since(mark, Source::Fno);
        (dv.len() == 1 && fno.len() == 1).then(|| (dv[0].clone(), fno[0].clone()))
    })
    .await;
    // A simulator records a delivery once the relay has answered it, a moment after the relay
    // captured it: wait for that, so the counts below start after the users' own edits.
    assert!(s.dv.wait_webhooks_idle(Duration::from_secs(5)).await);
    assert!(s.fno.wait_events_idle(Duration::from_secs(5)).await);
    let before = s.stats().await.engine;
    let (fno_events, dv_hooks) = (s.fno_events("CustomersV3"), s.dv_webhooks("account"));
    assert_eq!(s.replay(&dv_call).await.0, 202);
    assert_eq!(s.replay(&fno_call).await.0, 202);
    s.wait_idle().await;

    let held = s.stats().await.engine;
    assert_eq!(held.conflicts - before.conflicts, 1, "{held}");
    assert_eq!(held.writes, before.writes, "nothing written: {held}");
    assert_eq!(
        s.fno_events("CustomersV3"),
        fno_events,
        "no F&O write: {:#?}",
        s.fno.event_deliveries()
    );
    assert_eq!(s.dv_webhooks("account"), dv_hooks, "no Dataverse write");
    assert_eq!(
        s.customer("E2E-0030").unwrap()["OrganizationName"],
        "Fourth Coffee (ERP)"
    );
    assert_eq!(
        s.account("E2E-0030").unwrap()["name"],
        "Fourth Coffee (CRM)"
    );
    let open = s.rt.store().conflicts(true, 10).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    let conflict = open[0].clone();
    assert_eq!(conflict.map, CUSTOMERS);
    assert_eq!(conflict.policy, "manual");
    assert!(conflict.open && conflict.winner.is_none());
    let status: serde_json::Value = s
        .http
        .get(format!("{}/status", s.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["engine"]["conflicts"], held.conflicts, "{status}");

    // A later change of the record waits behind the open conflict.
    s.relay.set_forwarding(Source::Dataverse, true);
    s.relay.set_forwarding(Source::Fno, true);
    s.dv.user_edit("accounts", &id, serde_json::json!({"creditlimit": 999}))
        .unwrap();
    wait_until("the later change parked", || {
        let parked = s.rt.engine().stats().parked;
        (parked > held.parked).then_some(parked)
    })
    .await;
    s.wait_idle().await;
    assert!(s.rt.store().parked_count().await.unwrap() >= 1);
    let c = s.customer("E2E-0030").unwrap();
    assert_eq!(
        number(&c["CreditLimit"]),
        Some(100.0),
        "parked, not written"
    );
    assert_eq!(s.stats().await.engine.writes, before.writes);

    // A person keeps Dataverse's version: it is written to F&O, the conflict closes.
    s.rt.engine()
        .resolve_conflict(&conflict.id, Side::Crm)
        .await
        .unwrap();
    s.rt.engine()
        .sweep_parked(s.rt.queue().as_ref())
        .await
        .unwrap();
    wait_until("F&O to take Dataverse's version", || {
        s.customer("E2E-0030")
            .filter(|c| c["OrganizationName"] == "Fourth Coffee (CRM)")
    })
    .await;
    s.wait_idle().await;
    let c = s.customer("E2E-0030").unwrap();
    let a = s.account("E2E-0030").unwrap();
    assert_eq!(a["name"], "Fourth Coffee (CRM)", "the winner is kept");
    assert_eq!(c["OrganizationName"], a["name"]);
    assert_eq!(
        number(&c["CreditLimit"]),
        Some(999.0),
        "the latest change too"
    );
    assert_eq!(number(&a["creditlimit"]), Some(999.0));
    assert!(s.rt.store().conflicts(true, 10).await.unwrap().is_empty());
    let closed = s.rt.store().conflicts(false, 10).await.unwrap();
    let closed = closed.iter().find(|x| x.id == conflict.id).unwrap();
    assert_eq!(closed.winner, Some(Side::Crm));
    assert_eq!(s.rt.store().parked_count().await.unwrap(), 0);
    assert_eq!(s.stats().await.engine.errors, 0);
    s.rt.shutdown().await;
}
