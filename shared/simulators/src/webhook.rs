//! Outbound webhook delivery shared by the Dataverse and F&O simulators: ordered per record
//! (one lane per record hash), asynchronous, with each system's retry policy and a log of the
//! deliveries made and failed (the simulators' "System Jobs" / "Errors log").

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// How many lanes deliveries are spread over (records hash to a lane; order is kept per lane).
const LANES: usize = 8;

/// Which attempts a delivery gets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Retry only on 502/503/504 (Dataverse) instead of on any failure (F&O).
    pub only_gateway_errors: bool,
    /// Additional attempts after the first.
    pub retries: u32,
    /// Pause between attempts.
    pub delay: Duration,
    /// Timeout of one attempt.
    pub timeout: Duration,
}

/// One outbound POST to make.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub entity: String,
    pub message: String,
    pub record_id: String,
    pub policy: RetryPolicy,
}

/// The outcome of one webhook delivery (after all its attempts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The URL posted to (including any `?code=`).
    pub url: String,
    /// Entity / table logical name.
    pub entity: String,
    /// Message name (Create, Update, Delete, OnExternalUpdated, ...).
    pub message: String,
    /// Id of the changed record.
    pub record_id: String,
    /// Status code of the last attempt, `None` if no answer (timeout, refused, dropped).
    pub status: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// Why the delivery failed, for failed deliveries.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct DeliveryLog {
    pub made: Mutex<Vec<DeliveryRecord>>,
    pub failed: Mutex<Vec<DeliveryRecord>>,
    pub pending: AtomicU64,
}

/// The HTTP client of webhook deliveries. Only the status code is read and a 3xx is a
/// failure, as the services treat it: a redirect is not followed (reqwest follows up to 10 by
/// default).
pub(crate) fn delivery_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// Sends deliveries on ordered lanes.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    lanes: Vec<mpsc::UnboundedSender<Delivery>>,
    pub log: Arc<DeliveryLog>,
    client: reqwest::Client,
}

impl Dispatcher {
    /// Spawns the lanes on the current tokio runtime.
    pub fn start() -> Self {
        let client = delivery_client();
        let log = Arc::new(DeliveryLog::default());
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Delivery>();
                let client = client.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        let rec = deliver(&client, &d).await;
                        if rec.error.is_some() {
                            log.failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(rec.clone());
                        }
                        log.made.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
                        log.pending.fetch_sub(1, Ordering::AcqRel);
                    }
                });
                tx
            })
            .collect();
        Self { lanes, log, client }
    }

    /// Makes a delivery now, in the caller's task (a synchronous step: the change waits for
    /// it), and logs its outcome like any other.
    /// `client`: another client than the dispatcher's, for a caller on another runtime.
    pub async fn deliver_now(
        &self,
        d: &Delivery,
        client: Option<&reqwest::Client>,
    ) -> DeliveryRecord {
        let rec = deliver(client.unwrap_or(&self.client), d).await;
        if rec.error.is_some() {
            self.log
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(rec.clone());
        }
        self.log
            .made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rec.clone());
        rec
    }

    /// Queues a delivery; deliveries for the same record id keep their order.
    pub fn send(&self, d: Delivery) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        d.record_id.hash(&mut h);
        let lane = (h.finish() as usize) % self.lanes.len();
        self.log.pending.fetch_add(1, Ordering::AcqRel);
        if self.lanes[lane].send(d).is_err() {
            self.log.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits until every queued delivery has finished, or `timeout` passed; true if idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.log.pending.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    pub fn made(&self) -> Vec<DeliveryRecord> {
        self.log
            .made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn failed(&self) -> Vec<DeliveryRecord> {
        self.log
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn deliver(client: &reqwest::Client, d: &Delivery) -> DeliveryRecord {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut req = client
            .post(&d.url)
            .timeout(d.policy.timeout)
            .header("content-type", "application/json")
            .body(d.body.clone());
        for (k, v) in &d.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let (status, error) = match req.send().await {
            Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
            Ok(resp) => (
                Some(resp.status().as_u16()),
                Some(format!(
                    "the endpoint answered HTTP {}",
                    resp.status().as_u16()
                )),
            ),
            Err(e) => (
                None,
                Some(format!("the endpoint could not be reached: {e}")),
            ),
        };
        let retryable = match (error.is_some(), d.policy.only_gateway_errors) {
            (false, _) => false,
            (true, true) => matches!(status, Some(502..=504)),
            (true, false) => true,
        };
        if retryable && attempts <= d.policy.retries {
            tokio::time::sleep(d.policy.delay).await;
            continue;
        }
        return DeliveryRecord {
            url: d.url.clone(),
            entity: d.entity.clone(),
            message: d.message.clone(),
            record_id: d.record_id.clone(),
            status,
            attempts,
            error,
        };
    }
}
