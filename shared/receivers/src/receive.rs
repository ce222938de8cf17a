//! The receiver entry point: authenticate, bound, parse, enqueue, answer — and count.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use dualwrite_core::ChangeEvent;
use dualwrite_core::ports::{QueueMessage, WorkQueue};
use tracing::{debug, error, info, warn};

use crate::auth::authorize;
use crate::config::{ReceiverConfig, SourceAuth};
use crate::dataverse::parse_dataverse;
use crate::fno::parse_fno;
use crate::request::{SourceKind, WebhookRequest, WebhookResponse};
use crate::screen::{EventScreen, NoScreen};

/// A change event parsed from a payload. (Dataverse `Depth`, once kept here and only logged,
/// travels with the event: [`ChangeEvent::depth`].)
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The event to enqueue.
    pub event: ChangeEvent,
}

/// What a well-formed payload amounts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A change to enqueue.
    Event(Box<Accepted>),
    /// A change of an entity (or an F&O business event) no enabled map covers.
    Ignored {
        /// The entity or business event id, for the log.
        entity: String,
    },
}

/// Counters of everything the receivers answered, safe to share between threads.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    accepted: AtomicU64,
    ignored: AtomicU64,
    unauthorized: AtomicU64,
    too_large: AtomicU64,
    incomplete: AtomicU64,
    malformed: AtomicU64,
    queue_unavailable: AtomicU64,
    settled: AtomicU64,
    /// `source:entity` of the ignored payloads already warned about (see [`IGNORED_WARNINGS`]).
    ignored_warned: Mutex<BTreeSet<String>>,
}

/// How many distinct ignored entities are warned about per process. An ignored payload is
/// worth a warning (the default log filter shows only warnings): a webhook step or a business
/// event endpoint is registered for something no enabled map covers, so the source calls in
/// vain, or a map was disabled while its steps stayed registered. Once per entity is enough to
/// see that (the `ignored` counter of `/status` keeps the count); one warning per payload
/// would flood the log at the table's change rate. The cap keeps an authenticated but
/// misbehaving sender inventing entity names from growing the set without bound.
pub const IGNORED_WARNINGS: usize = 256;

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Events queued (202).
    pub accepted: u64,
    /// Payloads of uncovered entities (200 `ignored`).
    pub ignored: u64,
    /// Refused for missing or wrong credentials (401).
    pub rejected_unauthorized: u64,
    /// Refused for exceeding the body limit (413).
    pub rejected_too_large: u64,
    /// Bodies that did not arrive whole: the sender stalled (408) or went away mid-body.
    pub rejected_incomplete: u64,
    /// Refused as malformed (400).
    pub rejected_malformed: u64,
    /// Refused because the work queue failed (503).
    pub rejected_queue_unavailable: u64,
    /// Recognised as settled (echo, duplicate, stale) and answered without queueing (200).
    pub settled: u64,
}

impl ReceiverStats {
    /// The current counts.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: get(&self.accepted),
            ignored: get(&self.ignored),
            rejected_unauthorized: get(&self.unauthorized),
            rejected_too_large: get(&self.too_large),
            rejected_incomplete: get(&self.incomplete),
            rejected_malformed: get(&self.malformed),
            rejected_queue_unavailable: get(&self.queue_unavailable),
            settled: get(&self.settled),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// True the first time `entity` of `source` is ignored (while fewer than
    /// [`IGNORED_WARNINGS`] entities were): that payload is logged as a warning, later ones
    /// at debug.
    fn first_ignored(&self, source: &str, entity: &str) -> bool {
        let mut warned = self
            .ignored_warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned.len() >= IGNORED_WARNINGS {
            return false;
        }
        warned.insert(format!("{source}:{entity}"))
    }
}

/// Handles one webhook call; every accepted event is queued ([`receive_screened`] with
/// [`NoScreen`]).
pub async fn receive(
    req: &WebhookRequest,
    cfg: &ReceiverConfig,
    queue: &dyn WorkQueue,
    now: DateTime<Utc>,
) -> WebhookResponse {
    receive_screened(req, cfg, queue, &NoScreen, now).await
}

/// Answers a webhook call whose body the HTTP layer did not keep because it had more than
/// `cfg.max_body_bytes` (`req.body` is not looked at): `seen` bytes were read, the whole body
/// if `ended`. 401 for bad credentials as for any call, else 413, counted and logged like a
/// body [`receive_screened`] finds too large. Nothing is queued.
pub fn receive_oversized(
    req: &WebhookRequest,
    seen: u64,
    ended: bool,
    cfg: &ReceiverConfig,
) -> WebhookResponse {
    if let Some(refused) = refuse_unauthorized(req, cfg) {
        return refused;
    }
    let bytes = if ended {
        seen.to_string()
    } else {
        format!("more than {seen}")
    };
    too_large(req.source, &bytes, cfg)
}

/// Why a webhook's body did not arrive whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// Not all of it arrived within `cfg.body_timeout` of the headers: the sender stalled.
    TimedOut,
    /// The connection failed or closed before the body's end: the sender went away.
    Broken,
}

/// Answers a webhook call whose body did not arrive whole (the HTTP layer read it): 408 when
/// the sender stalled past `cfg.body_timeout` (the connection should then be closed), 400 when
/// the connection broke (nobody may be there to read it). Counted as `rejected_incomplete` and
/// logged; nothing was accepted, so nothing is queued and the sender sends again.
pub fn receive_incomplete(
    req: &WebhookRequest,
    why: Incomplete,
    cfg: &ReceiverConfig,
) -> WebhookResponse {
    ReceiverStats::bump(&cfg.stats.incomplete);
    match why {
        Incomplete::TimedOut => {
            let waited = cfg.body_timeout.as_secs_f64();
            warn!(
                source = req.source.as_str(),
                seconds = waited,
                "webhook refused: body not received in time (408), connection closed"
            );
            WebhookResponse::error(
                408,
                format!("the request body did not arrive within {waited} s"),
            )
        }
        Incomplete::Broken => {
            debug!(
                source = req.source.as_str(),
                "webhook body not read to its end: the connection broke"
            );
            WebhookResponse::error(400, "the request body ended before it was complete")
        }
    }
}

/// True when the call's credentials (query or headers; the body is not looked at) are right.
/// Nothing is counted: the answer to the call does that.
pub fn credentials_ok(req: &WebhookRequest, cfg: &ReceiverConfig) -> bool {
    authorize(req, auth_of(req, cfg)).is_ok()
}

/// What the endpoint `req` was posted to expects.
fn auth_of<'a>(req: &WebhookRequest, cfg: &'a ReceiverConfig) -> &'a SourceAuth {
    match req.source {
        SourceKind::Dataverse => &cfg.dataverse_auth,
        SourceKind::Fno => &cfg.fno_auth,
    }
}

/// The 401 answer when the call's credentials are missing or wrong (counted and logged).
fn refuse_unauthorized(req: &WebhookRequest, cfg: &ReceiverConfig) -> Option<WebhookResponse> {
    let e = authorize(req, auth_of(req, cfg)).err()?;
    ReceiverStats::bump(&cfg.stats.unauthorized);
    warn!(source = req.source.as_str(), reason = %e, "webhook refused: bad credentials");
    Some(WebhookResponse::error(401, e.to_string()))
}

/// The 413 answer for a body of `bytes` bytes (counted and logged).
fn too_large(source: SourceKind, bytes: &str, cfg: &ReceiverConfig) -> WebhookResponse {
    ReceiverStats::bump(&cfg.stats.too_large);
    warn!(
        source = source.as_str(),
        bytes,
        limit = cfg.max_body_bytes,
        "webhook refused: body too large"
    );
    WebhookResponse::error(
        413,
        format!(
            "body is {bytes} bytes, the limit is {} bytes",
            cfg.max_body_bytes
        ),
    )
}

/// Handles one webhook call.
///
/// In order: credentials (401, nothing read further), body size (413), payload (400 naming
/// what is wrong), coverage (200 `{"ignored":1}` for an entity no enabled map covers), the
/// screen (200 `{"settled":1}` for a change whose effect is already recorded, such as the echo
/// of dualwrite's own write: nothing is queued, nothing is lost), then `queue.send`; 202
/// `{"accepted":1}` only once the send returned Ok, 503 when it failed so the source retries
/// (Dataverse retries 502/503/504 once; F&O three times).
pub async fn receive_screened(
    req: &WebhookRequest,
    cfg: &ReceiverConfig,
    queue: &dyn WorkQueue,
    screen: &dyn EventScreen,
    now: DateTime<Utc>,
) -> WebhookResponse {
    let stats = &cfg.stats;
    let source = req.source.as_str();
    if let Some(refused) = refuse_unauthorized(req, cfg) {
        return refused;
    }
    if req.body.len() > cfg.max_body_bytes {
        return too_large(req.source, &req.body.len().to_string(), cfg);
    }
    let parsed = match req.source {
        SourceKind::Dataverse => parse_dataverse(req, &cfg.coverage, now),
        SourceKind::Fno => parse_fno(req, &cfg.coverage, &cfg.business_events, now),
    };
    let accepted = match parsed {
        Err(e) => {
            ReceiverStats::bump(&stats.malformed);
            warn!(source, problem = %e, "webhook refused: malformed payload");
            return WebhookResponse::error(400, e.to_string());
        }
        Ok(Parsed::Ignored { entity }) => {
            ReceiverStats::bump(&stats.ignored);
            if stats.first_ignored(source, &entity) {
                // F&O virtual tables are named after the entity's physical name, which a map
                // may not give yet: say so, as that is the likely cause.
                let hint = if entity.starts_with("mserp_") {
                    "; for an F&O virtual table, the name is the entity's physical name (mserp_custcustomerv3entity for CustomersV3): give it as `erp.physical_name` in the map"
                } else {
                    ""
                };
                warn!(
                    source,
                    entity = %entity,
                    "event ignored: no enabled map covers it; unregister the webhook step or business event for it, or enable a map{hint} (warned once per entity, counted in /status)"
                );
            } else {
                debug!(source, entity = %entity, "event ignored: no enabled map covers it");
            }
            return WebhookResponse::ignored();
        }
        Ok(Parsed::Event(accepted)) => *accepted,
    };
    let Accepted { event } = accepted;
    if let Some(reason) = screen.settled(&event).await {
        ReceiverStats::bump(&stats.settled);
        debug!(source, event_id = %event.event_id, entity = %event.record.entity, reason = reason.as_str(), "event settled on arrival, not queued");
        return WebhookResponse::settled(reason.as_str());
    }
    let (event_id, entity) = (event.event_id.clone(), event.record.entity.clone());
    let (record_id, partial, depth) = (
        event.record.id.clone().unwrap_or_default(),
        event.partial,
        event.depth,
    );
    match queue.send(vec![QueueMessage::for_event(event)]).await {
        Ok(()) => {
            ReceiverStats::bump(&stats.accepted);
            info!(source, event_id = %event_id, entity = %entity, record = %record_id, partial, depth, "event accepted");
            WebhookResponse::accepted()
        }
        Err(e) => {
            ReceiverStats::bump(&stats.queue_unavailable);
            error!(source, event_id = %event_id, error = %e, "event not queued: work queue failed");
            WebhookResponse::error(
                503,
                format!("the event could not be queued, retry later: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ignored_entity_is_warned_about_once() {
        let stats = ReceiverStats::default();
        assert!(stats.first_ignored("dataverse", "lead"));
        assert!(!stats.first_ignored("dataverse", "lead"), "warned already");
        assert!(stats.first_ignored("fno", "lead"), "another source");
        assert!(stats.first_ignored("dataverse", "opportunity"));
    }

    #[test]
    fn ignored_warnings_stop_at_the_cap() {
        let stats = ReceiverStats::default();
        for i in 0..IGNORED_WARNINGS {
            assert!(stats.first_ignored("dataverse", &format!("table{i}")));
        }
        assert!(!stats.first_ignored("dataverse", "one_more"));
        assert_eq!(stats.ignored_warned.lock().unwrap().len(), IGNORED_WARNINGS);
    }
}
