//! End-to-end tests of F&O business events through `serve`'s configuration: a business event
//! routed in `webhooks.fno.business_events` makes the worker read the record it names by key and
//! sync it; the same event delivered again (F&O retries) is not synced twice; an event no route
//! names is answered 200 and counted as ignored.

use std::collections::BTreeMap;

use dualwrite_receivers::BusinessEventRoute;
use serde_json::json;

use crate::harness::{
    FNO_SECRET, FNO_SECRET_HEADER, Source, Stack, StackOptions, number, wait_until,
};

/// A business event a developer added to F&O, raised when a customer's credit limit changes.
const CREDIT_LIMIT_CHANGED: &str = "CustCreditLimitChangedBusinessEvent";

fn routes() -> BTreeMap<String, BusinessEventRoute> {
    BTreeMap::from([(
        CREDIT_LIMIT_CHANGED.to_string(),
        BusinessEventRoute {
            entity: "CustomersV3".into(),
            key: vec![("CustomerAccount".into(), "CustAccount".into())],
        },
    )])
}

/// The envelope F&O posts for `account` (the reference's shape, with the event's own fields).
fn envelope(event_id: &str, control_number: i64, account: &str) -> String {
    json!({
        "BusinessEventId": CREDIT_LIMIT_CHANGED,
        "BusinessEventLegalEntity": "USMF",
        "ContextRecordSubject": "",
        "ControlNumber": control_number,
        "EventId": event_id,
        "EventTime": "/Date(1796400000000)/",
        "EventTimeIso8601": "2026-12-04T17:20:00.1234567Z",
        "InitiatingUserAADObjectId": "{410A5B3C-0000-0000-0000-000000000000}",
        "MajorVersion": 0,
        "MinorVersion": 0,
        "ParentContextRecordSubjects": [],
        "CustAccount": account,
        "LegalEntity": "USMF"
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_business_event_syncs_the_record_it_names_once() {
    let s = Stack::start(StackOptions {
        fno_business_events: routes(),
        ..StackOptions::default()
    })
    .await;
    // Only business events reach the runtime from F&O from now on.
    s.relay.set_forwarding(Source::Fno, false);
    s.create_customer("E2E-BE-01", "Fabrikam Business Events", 2500.0);
    s.wait_idle().await;
    assert!(s.account("E2E-BE-01").is_none(), "no event, no sync yet");

    let secret = [(FNO_SECRET_HEADER.to_string(), FNO_SECRET.to_string())];
    let body = envelope(
        "3C47A4CD-1111-4A2B-9C3D-000000000001",
        5_637_611_083,
        "E2E-BE-01",
    );
    let (status, answer) = s.post(Source::Fno, "", &secret, body.clone()).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    let account = wait_until("account E2E-BE-01 in Dataverse", || {
        s.account("E2E-BE-01")
            .filter(|a| a["name"] == "Fabrikam Business Events")
    })
    .await;
    assert_eq!(number(&account["creditlimit"]), Some(2500.0), "{account}");
    s.wait_idle().await;
    let writes = s.stats().await.engine.writes;

    // F&O retries a delivery it saw fail: the same event again writes nothing.
    let (status, answer) = s.post(Source::Fno, "", &secret, body).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    s.wait_idle().await;
    assert_eq!(s.stats().await.engine.writes, writes);

    // A business event no route names is answered, counted as ignored, and enqueues nothing.
    let ignored = s.stats().await.receivers.ignored;
    let other = envelope(
        "3C47A4CD-1111-4A2B-9C3D-000000000002",
        5_637_611_090,
        "E2E-BE-01",
    )
    .replace(CREDIT_LIMIT_CHANGED, "SalesInvoicePostedBusinessEvent");
    let (status, answer) = s.post(Source::Fno, "", &secret, other).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    assert_eq!(s.stats().await.receivers.ignored, ignored + 1);
}

/// Business events of one record delivered out of order (F&O retries, several endpoints): the
/// newer event syncs the change; the older one (a lower ControlNumber) arriving afterwards makes
/// the worker read the record as F&O holds it now and writes nothing, so the record never goes
/// back to an older state. (A delivery of an event already processed, same `EventId`, is a
/// duplicate: see the test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_business_event_arriving_after_a_newer_one_writes_nothing() {
    let s = Stack::start(StackOptions {
        fno_business_events: routes(),
        ..StackOptions::default()
    })
    .await;
    s.relay.set_forwarding(Source::Fno, false);
    s.create_customer("E2E-BE-02", "Contoso Ordering", 1000.0);
    let secret = [(FNO_SECRET_HEADER.to_string(), FNO_SECRET.to_string())];
    let first = envelope(
        "3C47A4CD-2222-4A2B-9C3D-000000000001",
        5_637_700_000,
        "E2E-BE-02",
    );
    let (status, answer) = s.post(Source::Fno, "", &secret, first.clone()).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    wait_until("account E2E-BE-02 in Dataverse", || s.account("E2E-BE-02")).await;
    s.wait_idle().await;

    // The credit limit changes in F&O; its event (a higher ControlNumber) is delivered first,
    // the first event's delivery comes again after it.
    s.fno
        .user_edit(
            "CustomersV3",
            "dataAreaId='usmf',CustomerAccount='E2E-BE-02'",
            json!({"CreditLimit": 7777.0}),
        )
        .unwrap();
    let newer = envelope(
        "3C47A4CD-2222-4A2B-9C3D-000000000002",
        5_637_700_050,
        "E2E-BE-02",
    );
    let (status, answer) = s.post(Source::Fno, "", &secret, newer).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    wait_until("the new credit limit in Dataverse", || {
        s.account("E2E-BE-02")
            .filter(|a| number(&a["creditlimit"]) == Some(7777.0))
    })
    .await;
    s.wait_idle().await;
    let (before, dv_hooks) = (s.stats().await.engine, s.dv_webhooks("account"));
    let writes = before.writes;

    // An event raised before the edit (a lower ControlNumber), delivered only now.
    let older = envelope(
        "3C47A4CD-2222-4A2B-9C3D-000000000003",
        5_637_700_020,
        "E2E-BE-02",
    );
    let (status, answer) = s.post(Source::Fno, "", &secret, older).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    s.wait_idle().await;
    let after = s.stats().await.engine;
    assert_eq!(after.writes, writes, "the older event wrote nothing");
    assert_eq!(
        (after.stale_dropped + after.echoes_suppressed)
            - (before.stale_dropped + before.echoes_suppressed),
        1,
        "recognised as nothing new: {after}"
    );
    assert_eq!(s.dv_webhooks("account"), dv_hooks, "Dataverse untouched");
    let account = s.account("E2E-BE-02").unwrap();
    assert_eq!(number(&account["creditlimit"]), Some(7777.0), "{account}");
    s.rt.shutdown().await;
}
