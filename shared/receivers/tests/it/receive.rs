//! `receive`: every answer, what is enqueued (and what is not), and the counters.

use async_trait::async_trait;
use dualwrite_core::ChangeEvent;
use dualwrite_core::decision::SkipReason;
use dualwrite_receivers::{
    EventScreen, SourceKind, StatsSnapshot, WebhookRequest, WebhookResponse, receive,
    receive_screened,
};
use serde_json::json;

use crate::*;

fn dataverse_with_key(body: &str) -> WebhookRequest {
    WebhookRequest::new(SourceKind::Dataverse, body).with_query("code", DATAVERSE_KEY)
}

fn error_of(resp: &WebhookResponse) -> String {
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    v["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn accepted_event_is_queued_grouped_by_record() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let resp = receive(&dataverse_with_key(CONTACT_UPDATE), &cfg, &queue, now()).await;
    assert_eq!(
        resp,
        WebhookResponse {
            status: 202,
            body: "{\"accepted\":1}".into()
        }
    );
    let sent = queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].group_id,
        "crm:contacts:6d81597f-0f9f-e711-8122-000d3aa2331c"
    );
    assert_eq!(sent[0].dedup_id, "4af10637-4ea2-e711-8122-000d3aa2331c");
    assert_eq!(sent[0].event.received_at, now());
    assert_eq!(
        cfg.stats.snapshot(),
        StatsSnapshot {
            accepted: 1,
            ..StatsSnapshot::default()
        }
    );
}

#[tokio::test]
async fn missing_or_wrong_secret_is_401_and_nothing_is_queued() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let no_code = WebhookRequest::new(SourceKind::Dataverse, CONTACT_UPDATE);
    let resp = receive(&no_code, &cfg, &queue, now()).await;
    assert_eq!(resp.status, 401);
    assert!(error_of(&resp).contains("code"));

    let wrong =
        WebhookRequest::new(SourceKind::Dataverse, CONTACT_UPDATE).with_query("code", "guess");
    let resp = receive(&wrong, &cfg, &queue, now()).await;
    assert_eq!(resp.status, 401);
    assert!(
        !resp.body.contains(DATAVERSE_KEY),
        "the secret is never echoed"
    );

    // The Dataverse key does not open the F&O endpoint, which wants its header.
    let fno_with_dv_key =
        WebhookRequest::new(SourceKind::Fno, FNO_DATA_EVENT).with_query("code", DATAVERSE_KEY);
    assert_eq!(
        receive(&fno_with_dv_key, &cfg, &queue, now()).await.status,
        401
    );

    assert!(queue.events().is_empty());
    assert_eq!(cfg.stats.snapshot().rejected_unauthorized, 3);
    assert_eq!(cfg.stats.snapshot().accepted, 0);
}

#[tokio::test]
async fn fno_header_secret_is_accepted() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let req = WebhookRequest::new(SourceKind::Fno, FNO_BUSINESS_EVENT)
        .with_header("x-dualwrite-key", FNO_SECRET);
    assert_eq!(receive(&req, &cfg, &queue, now()).await.status, 202);
    let events = queue.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].record.entity, "SalesInvoiceHeadersV2");
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let (mut cfg, queue) = (config(), RecordingQueue::default());
    cfg.max_body_bytes = 100;
    let resp = receive(&dataverse_with_key(CONTACT_UPDATE), &cfg, &queue, now()).await;
    assert_eq!(resp.status, 413);
    assert!(error_of(&resp).contains("the limit is 100 bytes"));
    assert!(queue.events().is_empty());
    assert_eq!(cfg.stats.snapshot().rejected_too_large, 1);
    // At exactly the limit the body is read.
    cfg.max_body_bytes = CONTACT_UPDATE.len();
    assert_eq!(
        receive(&dataverse_with_key(CONTACT_UPDATE), &cfg, &queue, now())
            .await
            .status,
        202
    );
}

#[tokio::test]
async fn malformed_payload_is_400_with_the_problem() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let no_target = edited(CONTACT_UPDATE, |v| {
        v["InputParameters"] = json!([{"key": "Other", "value": 1}])
    });
    let resp = receive(&dataverse_with_key(&no_target), &cfg, &queue, now()).await;
    assert_eq!(resp.status, 400);
    assert_eq!(error_of(&resp), "InputParameters: no \"Target\" entry");

    let bad_depth = edited(CONTACT_UPDATE, |v| v["Depth"] = json!(true));
    let resp = receive(&dataverse_with_key(&bad_depth), &cfg, &queue, now()).await;
    assert_eq!(
        (resp.status, error_of(&resp)),
        (400, "field \"Depth\": expected a number".to_string())
    );

    let resp = receive(&dataverse_with_key("[1,2]"), &cfg, &queue, now()).await;
    assert_eq!(
        (resp.status, error_of(&resp)),
        (400, "field \"(body)\": expected a JSON object".to_string())
    );

    assert!(queue.events().is_empty());
    assert_eq!(cfg.stats.snapshot().rejected_malformed, 3);
}

/// Regression: a malformed typed value was read as a default (option 0) and synced.
#[tokio::test]
async fn a_malformed_typed_value_is_400_naming_the_attribute() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let half_option = edited(ACCOUNT_CREATE, |v| {
        v["InputParameters"][0]["value"]["Attributes"][3]["value"]["Value"] = json!(2.5);
    });
    let resp = receive(&dataverse_with_key(&half_option), &cfg, &queue, now()).await;
    assert_eq!(
        (resp.status, error_of(&resp)),
        (
            400,
            "field \"InputParameters[0].value.Attributes.customertypecode.Value\": 2.5 is not an option value (a whole number within 32 bits)".to_string()
        )
    );
    let nameless_lookup = edited(ACCOUNT_CREATE, |v| {
        v["InputParameters"][0]["value"]["Attributes"][4]["value"]["Id"] = json!(null);
    });
    let resp = receive(&dataverse_with_key(&nameless_lookup), &cfg, &queue, now()).await;
    assert_eq!(resp.status, 400);
    assert!(
        error_of(&resp).starts_with(
            "field \"InputParameters[0].value.Attributes.transactioncurrencyid\": the EntityReference has neither an Id nor KeyAttributes"
        ),
        "{}",
        error_of(&resp)
    );
    assert!(queue.events().is_empty());
    assert_eq!(cfg.stats.snapshot().rejected_malformed, 2);
}

#[tokio::test]
async fn the_queued_event_carries_the_depth() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let nested = edited(CONTACT_UPDATE, |v| v["Depth"] = json!(3));
    let resp = receive(&dataverse_with_key(&nested), &cfg, &queue, now()).await;
    assert_eq!(resp.status, 202);
    let events = queue.events();
    assert_eq!(events[0].depth, Some(3));
    // …and keeps it through the queue's serialised form.
    let queued = serde_json::to_string(&events[0]).unwrap();
    let decoded: ChangeEvent = serde_json::from_str(&queued).unwrap();
    assert_eq!(decoded.depth, Some(3));
}

#[tokio::test]
async fn uncovered_entity_is_ignored_and_counted() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let lead = edited(CONTACT_UPDATE, |v| v["PrimaryEntityName"] = json!("lead"));
    let resp = receive(&dataverse_with_key(&lead), &cfg, &queue, now()).await;
    assert_eq!(
        resp,
        WebhookResponse {
            status: 200,
            body: "{\"ignored\":1}".into()
        }
    );
    assert!(queue.events().is_empty());
    assert_eq!(
        cfg.stats.snapshot(),
        StatsSnapshot {
            ignored: 1,
            ..StatsSnapshot::default()
        }
    );
}

#[tokio::test]
async fn queue_failure_is_503_so_the_source_retries() {
    let (cfg, queue) = (config(), RecordingQueue::failing());
    let resp = receive(&dataverse_with_key(CONTACT_UPDATE), &cfg, &queue, now()).await;
    assert_eq!(resp.status, 503);
    assert!(error_of(&resp).contains("retry later"));
    assert_eq!(cfg.stats.snapshot().rejected_queue_unavailable, 1);
    assert_eq!(cfg.stats.snapshot().accepted, 0);
}

/// A screen that settles the events of one record id as echoes and remembers what it saw.
#[derive(Default)]
struct EchoesOf {
    record_id: String,
    seen: std::sync::Mutex<Vec<String>>,
}

#[async_trait]
impl EventScreen for EchoesOf {
    async fn settled(&self, event: &ChangeEvent) -> Option<SkipReason> {
        self.seen.lock().unwrap().push(event.event_id.clone());
        (event.record.id.as_deref() == Some(self.record_id.as_str())).then_some(SkipReason::Echo)
    }
}

async fn screened(
    req: &WebhookRequest,
    cfg: &dualwrite_receivers::ReceiverConfig,
    queue: &RecordingQueue,
    screen: &EchoesOf,
) -> WebhookResponse {
    receive_screened(req, cfg, queue, screen, now()).await
}

#[tokio::test]
async fn a_settled_event_is_answered_200_and_not_queued() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let screen = EchoesOf {
        record_id: "6d81597f-0f9f-e711-8122-000d3aa2331c".into(),
        ..EchoesOf::default()
    };
    let resp = screened(&dataverse_with_key(CONTACT_UPDATE), &cfg, &queue, &screen).await;
    assert_eq!(
        resp,
        WebhookResponse {
            status: 200,
            body: "{\"reason\":\"echo\",\"settled\":1}".into()
        }
    );
    assert!(queue.events().is_empty(), "nothing queued");
    assert_eq!(
        cfg.stats.snapshot(),
        StatsSnapshot {
            settled: 1,
            ..StatsSnapshot::default()
        }
    );
    assert_eq!(
        screen.seen.lock().unwrap().as_slice(),
        ["4af10637-4ea2-e711-8122-000d3aa2331c"]
    );
}

#[tokio::test]
async fn the_screen_is_asked_only_about_authorised_well_formed_covered_events() {
    let (cfg, queue) = (config(), RecordingQueue::default());
    let screen = EchoesOf::default();
    let bad_key =
        WebhookRequest::new(SourceKind::Dataverse, CONTACT_UPDATE).with_query("code", "wrong");
    assert_eq!(screened(&bad_key, &cfg, &queue, &screen).await.status, 401);
    let malformed = dataverse_with_key("{");
    assert_eq!(
        screened(&malformed, &cfg, &queue, &screen).await.status,
        400
    );
    assert!(screen.seen.lock().unwrap().is_empty());
    // Not settled: queued as usual.
    let resp = screened(&dataverse_with_key(CONTACT_UPDATE), &cfg, &queue, &screen).await;
    assert_eq!(resp.status, 202);
    assert_eq!(queue.events().len(), 1);
    assert_eq!(cfg.stats.snapshot().settled, 0);
}
