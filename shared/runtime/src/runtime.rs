//! The running pipeline: connectors built from the configuration (behind [`Coalescing`], so
//! concurrent reads and writes share `$batch` requests), the engine over the SQLite store and
//! queue, the HTTP server, N worker tasks and the catch-up scheduler, with a
//! graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use dualwrite_connectors::http::DEFAULT_MAX_BATCH;
use dualwrite_connectors::{
    Coalescing, CoalescingConfig, CoalescingSnapshot, CoalescingStats, ConnectorStats,
    DataverseConfig, DataverseConnector, EntitySchemas, EntraConfig, EntraTokenProvider, FnoConfig,
    FnoConnector, RetryingConnector, StatsSnapshot as ConnectorSnapshot, TokenSource,
};
use dualwrite_core::Side;
use dualwrite_core::error_policy::Backoff;
use dualwrite_core::ports::{
    Connector, DeadLetter, Delivery, QueueDepth, QueueError, QueueMessage, RetryOutcome, WorkQueue,
};
use dualwrite_engine::{Engine, StatsSnapshot, SystemClock, WorkerConfig, handle_delivery};
use dualwrite_logqueue::LogQueue;
use dualwrite_receivers::{Coverage, EventScreen, ReceiverConfig};
use dualwrite_sqlite::{SqliteQueue, SqliteStore};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

use crate::config::{Config, Environment};
use crate::scheduler::run_scheduler;
use crate::server::{AppState, router};

/// The web API path of Dataverse under the environment URL.
pub const DATAVERSE_API_PATH: &str = "/api/data/v9.2";

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened.
    #[error("cannot open the database {path}: {message}; check the `db` path and its folder")]
    Database {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// The work queue could not be opened.
    #[error("cannot open the work queue {dir}: {message}")]
    QueueUnavailable {
        /// The queue directory.
        dir: String,
        /// What failed.
        message: String,
        /// True when another process (a running `dualwrite serve`) holds the queue; false for
        /// any other failure (damage, permissions, a full disk).
        held: bool,
    },
    /// A connector could not be built.
    #[error("cannot set up the {side} connector for {url}: {message}")]
    Connector {
        /// `dataverse` or `fno`.
        side: &'static str,
        /// The environment URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free port in `listen`")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What `GET /status` answers and [`RuntimeHandle::stats`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RuntimeStats {
    /// Engine counters.
    pub engine: StatsSnapshot,
    /// Queue counts.
    pub queue: QueueCounts,
    /// Receiver counters.
    pub receivers: ReceiverCounts,
    /// The database writer: transactions committed and the writes they held (group commit:
    /// `writes / batches` writes share one fsync).
    pub database: DatabaseCounts,
    /// The work queue's log writer (group commit: `synced_callers / syncs` sends share one
    /// `fdatasync`).
    pub queue_log: QueueLogCounts,
    /// Reads and writes coalesced into `$batch` requests, per environment (zero when batching
    /// is off).
    pub batching: BatchingCounts,
    /// What the connectors' requests to each environment came to: every request and every
    /// failure, by kind (throttled, 412, 404, transient, refused), token fetches and refreshes.
    pub connectors: ConnectorCounts,
    /// The catch-up polls: how many ran and how they ended, and the rows they read (growing
    /// while a poll runs: a long first, full read shows its progress here).
    pub catch_up: CatchUpCounts,
}

/// The catch-up polls' counters ([`RuntimeStats::catch_up`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CatchUpCounts {
    /// Polls started (scheduled or on demand).
    pub polls: u64,
    /// Polls that ended with a map side not polled (named in the log; its watermark kept).
    pub incomplete: u64,
    /// Rows read, over all polls.
    pub rows_read: u64,
    /// Rows read that did not fit the table maps, queued to be read again by id (the
    /// worker logs each in the error log).
    pub unfit_rows: u64,
    /// Deletes read through change tracking.
    pub deletes_read: u64,
    /// Changes queued (rows and deletes; re-reads are recognised by the workers and write
    /// nothing).
    pub changes_queued: u64,
    /// When the last poll ended, in milliseconds since the Unix epoch (0: none yet).
    pub last_poll_ended_ms: u64,
}

/// The live counters behind [`CatchUpCounts`].
#[derive(Debug, Default)]
pub(crate) struct CatchUpStats {
    pub polls: AtomicU64,
    pub incomplete: AtomicU64,
    pub rows_read: AtomicU64,
    pub unfit_rows: AtomicU64,
    pub deletes_read: AtomicU64,
    pub changes_queued: AtomicU64,
    pub last_poll_ended_ms: AtomicU64,
}

impl CatchUpStats {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn counts(&self) -> CatchUpCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CatchUpCounts {
            polls: get(&self.polls),
            incomplete: get(&self.incomplete),
            rows_read: get(&self.rows_read),
            unfit_rows: get(&self.unfit_rows),
            deletes_read: get(&self.deletes_read),
            changes_queued: get(&self.changes_queued),
            last_poll_ended_ms: get(&self.last_poll_ended_ms),
        }
    }
}

/// The connectors' counters of both environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ConnectorCounts {
    /// Dataverse.
    pub dataverse: CallCounts,
    /// F&O.
    pub fno: CallCounts,
}

/// One environment's requests and their outcomes ([`ConnectorSnapshot`] as JSON). A `$batch`
/// is one request; each of its failing parts counts as one failure of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CallCounts {
    /// HTTP requests sent (each attempt counts).
    pub requests: u64,
    /// Answers that were not a success, and requests not answered; the sum of the kinds below.
    pub failures: u64,
    /// 429, and 503 with `Retry-After` (service protection): retried after the wait.
    pub throttled: u64,
    /// 412: the record moved (or exists already) since it was read; decided again.
    pub precondition_failed: u64,
    /// 404: for a read, the record is absent (an answer, not a problem).
    pub not_found: u64,
    /// 5xx, timeouts and dropped connections: retried with backoff.
    pub transient: u64,
    /// 400, 403 and other refusals of the request as sent (401 after a fresh token): logged
    /// as errors for a person, the server's message kept.
    pub refused: u64,
    /// Tokens fetched from Entra ID.
    pub token_fetches: u64,
    /// Tokens refused with a 401, fetched again.
    pub token_refreshes: u64,
}

impl From<ConnectorSnapshot> for CallCounts {
    fn from(s: ConnectorSnapshot) -> Self {
        CallCounts {
            requests: s.requests,
            failures: s.failures,
            throttled: s.throttled,
            precondition_failed: s.precondition_failed,
            not_found: s.not_found,
            transient: s.transient,
            refused: s.refused,
            token_fetches: s.token_fetches,
            token_refreshes: s.token_refreshes,
        }
    }
}

/// The counters of the two connectors.
#[derive(Debug, Clone, Default)]
pub struct ConnectorCounters {
    /// Dataverse.
    pub dataverse: Arc<ConnectorStats>,
    /// F&O.
    pub fno: Arc<ConnectorStats>,
}

impl ConnectorCounters {
    /// The counters now.
    pub fn counts(&self) -> ConnectorCounts {
        ConnectorCounts {
            dataverse: self.dataverse.snapshot().into(),
            fno: self.fno.snapshot().into(),
        }
    }
}

/// The coalescing counters of both environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BatchingCounts {
    /// Dataverse.
    pub dataverse: CoalescedCounts,
    /// F&O.
    pub fno: CoalescedCounts,
}

/// One environment's coalescing counters ([`CoalescingSnapshot`] as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CoalescedCounts {
    /// Requests sent: single calls and `$batch` requests.
    pub requests: u64,
    /// Reads and writes they carried (`calls / requests` per request).
    pub calls: u64,
    /// Most calls in one request.
    pub largest_batch: u64,
}

impl From<CoalescingSnapshot> for CoalescedCounts {
    fn from(s: CoalescingSnapshot) -> Self {
        CoalescedCounts {
            requests: s.requests,
            calls: s.calls,
            largest_batch: s.largest_batch,
        }
    }
}

/// The counters of the connectors' [`Coalescing`] wrappers; `None` where batching is off.
#[derive(Debug, Clone, Default)]
pub struct BatchingStats {
    /// Dataverse.
    pub dataverse: Option<Arc<CoalescingStats>>,
    /// F&O.
    pub fno: Option<Arc<CoalescingStats>>,
}

impl BatchingStats {
    /// The counters now.
    pub fn counts(&self) -> BatchingCounts {
        let of = |s: &Option<Arc<CoalescingStats>>| {
            s.as_ref().map(|s| s.snapshot().into()).unwrap_or_default()
        };
        BatchingCounts {
            dataverse: of(&self.dataverse),
            fno: of(&self.fno),
        }
    }
}

/// The database writer's counters ([`dualwrite_sqlite::WriterStats`] as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DatabaseCounts {
    /// Transactions committed.
    pub batches: u64,
    /// Store commits they held.
    pub writes: u64,
}

/// The work queue's writer ([`dualwrite_logqueue::QueueStats`] as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueLogCounts {
    /// Batches appended to the log (one `pwrite` each).
    pub batches: u64,
    /// `fdatasync`s: one per batch that a send (or retry) waited for.
    pub syncs: u64,
    /// Sends and retries answered after a sync (`synced_callers / syncs` share one sync).
    pub synced_callers: u64,
    /// Bytes appended to the log.
    pub bytes_written: u64,
}

/// Queue counts ([`QueueDepth`] as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueCounts {
    /// Deliverable now.
    pub ready: u64,
    /// Being processed.
    pub in_flight: u64,
    /// Waiting for a retry delay.
    pub delayed: u64,
    /// Dead-lettered.
    pub dead: u64,
}

impl From<QueueDepth> for QueueCounts {
    fn from(d: QueueDepth) -> Self {
        QueueCounts {
            ready: d.ready,
            in_flight: d.in_flight,
            delayed: d.delayed,
            dead: d.dead,
        }
    }
}

/// Receiver counters (the receivers' snapshot as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ReceiverCounts {
    /// Events queued (202).
    pub accepted: u64,
    /// Uncovered entities (200).
    pub ignored: u64,
    /// 401s.
    pub rejected_unauthorized: u64,
    /// 413s.
    pub rejected_too_large: u64,
    /// Bodies that did not arrive whole: 408 after `webhooks.body_timeout` (a stalled
    /// sender), or the connection broke mid-body.
    pub rejected_incomplete: u64,
    /// 400s.
    pub rejected_malformed: u64,
    /// 503s.
    pub rejected_queue_unavailable: u64,
    /// Settled on arrival (200): echoes of dualwrite's own writes, duplicates and stale
    /// changes recognised from the store and not queued.
    pub settled: u64,
}

/// One event the workers finished: processed (or found to be a duplicate), its effects
/// committed, and its queue message being acked. See [`RuntimeHandle::completions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The event's id (a Dataverse `OperationId`, an F&O `EventId`, ...).
    pub event_id: String,
    /// The side the change came from.
    pub source: Side,
    /// When the worker finished it (just before the ack).
    pub at: Instant,
}

/// How long a shutdown waits for open webhook requests to be answered before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long an idle worker waits for a wake-up before looking at the queue anyway: delayed
/// retries and expired visibility timeouts become deliverable without any `send`.
const IDLE_FALLBACK_POLL: Duration = Duration::from_millis(250);

/// The engine's backoff for a queue that dead-letters after `max_attempts` deliveries: the
/// default delays, and transient failures (5xx, timeouts, throttling) retried on every one of
/// those deliveries, never given up by the engine first. A dead letter keeps the event (and
/// `dualwrite queue redrive` sends it again); an error the engine gives up on is only logged.
fn engine_backoff(max_attempts: u32) -> Backoff {
    Backoff {
        max_attempts: max_attempts.saturating_add(1),
        ..Backoff::default()
    }
}

/// How often worker 0 releases parked events whose dependency arrived meanwhile (what the
/// engine's own `run_worker` does every 30 s when idle).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How often worker 0 forgets the ids of events processed before the idempotency window
/// (`worker.idempotency_hours`), and how many it deletes per store transaction (the writer is
/// shared with every commit: many small deletes rather than one long one).
const FORGET_EVERY: Duration = Duration::from_secs(600);
const FORGET_CHUNK: usize = 2_000;

/// Forgets the completion records written before `window` ago, [`FORGET_CHUNK`] per
/// transaction, until none is left or `stop` turns true (a shutdown does not wait for a long
/// backlog: the next round goes on); returns how many.
async fn forget_expired_events(
    store: &SqliteStore,
    window: Duration,
    stop: &watch::Receiver<bool>,
) -> Result<usize, dualwrite_core::ports::StoreError> {
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let before = chrono::Utc::now()
        .checked_sub_signed(window)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let mut forgotten = 0;
    loop {
        let n = store.forget_completed_events(before, FORGET_CHUNK).await?;
        forgotten += n;
        if n < FORGET_CHUNK || *stop.borrow() {
            return Ok(forgotten);
        }
        tokio::task::yield_now().await;
    }
}

/// The queue as the workers and receivers see it: the SQLite queue, plus
/// - a wake-up: every `send` wakes as many idle workers as messages were sent, so a webhook is
///   picked up at once instead of at the next poll;
/// - completion notices: the event of every acked delivery is reported to the subscribers of
///   [`RuntimeHandle::completions`] (bookkeeping only while someone subscribes).
pub(crate) struct WorkerQueue {
    inner: Arc<LogQueue>,
    wake: Notify,
    /// Receipt of each delivery in hand → its event (only while observed).
    receipts: Mutex<HashMap<String, (String, Side)>>,
    observed: AtomicBool,
    observers: Mutex<Vec<mpsc::UnboundedSender<Completion>>>,
    workers: usize,
}

impl std::fmt::Debug for WorkerQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerQueue")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl WorkerQueue {
    fn new(inner: Arc<LogQueue>, workers: usize) -> Self {
        WorkerQueue {
            inner,
            wake: Notify::new(),
            receipts: Mutex::new(HashMap::new()),
            observed: AtomicBool::new(false),
            observers: Mutex::new(Vec::new()),
            workers: workers.max(1),
        }
    }

    fn subscribe(&self) -> mpsc::UnboundedReceiver<Completion> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.observers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tx);
        self.observed.store(true, Ordering::Release);
        rx
    }

    fn take_receipt(&self, receipt: &str) -> Option<(String, Side)> {
        if !self.observed.load(Ordering::Acquire) {
            return None;
        }
        self.receipts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(receipt)
    }

    fn complete(&self, event_id: String, source: Side) {
        let done = Completion {
            event_id,
            source,
            at: Instant::now(),
        };
        let mut observers = self
            .observers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        observers.retain(|tx| tx.send(done.clone()).is_ok());
        if observers.is_empty() {
            self.observed.store(false, Ordering::Release);
        }
    }
}

#[async_trait]
impl WorkQueue for WorkerQueue {
    async fn send(&self, messages: Vec<QueueMessage>) -> Result<(), QueueError> {
        let n = messages.len();
        self.inner.send(messages).await?;
        for _ in 0..n.min(self.workers) {
            self.wake.notify_one();
        }
        Ok(())
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deliveries = self.inner.receive(max, visibility).await?;
        if self.observed.load(Ordering::Acquire) && !deliveries.is_empty() {
            let mut receipts = self
                .receipts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for d in &deliveries {
                receipts.insert(
                    d.receipt.clone(),
                    (d.message.event.event_id.clone(), d.message.event.source),
                );
            }
        }
        Ok(deliveries)
    }

    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        if let Some((event_id, source)) = self.take_receipt(receipt) {
            self.complete(event_id, source);
        }
        self.inner.ack(receipt).await
    }

    async fn retry(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        self.take_receipt(receipt);
        self.inner.retry(receipt, delay, error).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.inner.dead_letters(limit).await
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        self.inner.depth().await
    }

    /// Wakes the workers for the messages moved, as `send` does.
    async fn redrive(&self, limit: usize) -> Result<u64, QueueError> {
        let moved = self.inner.redrive(limit).await?;
        let n = usize::try_from(moved).unwrap_or(usize::MAX);
        for _ in 0..n.min(self.workers) {
            self.wake.notify_one();
        }
        Ok(moved)
    }
}

/// Receiver loops per runtime: each receives up to [`MAX_RECEIVE`] deliveries at a time and
/// hands them to processing tasks. Several, so one receive's commit does not hold up the next.
const RECEIVERS: usize = 4;

/// Most deliveries one receive asks for.
const MAX_RECEIVE: usize = 64;

/// One receiver loop of the worker pool. The pool processes at most `permits` deliveries at
/// once (the configured worker concurrency, shared by every receiver loop): the loop waits for
/// a free permit, receives as many deliveries as permits are free (at most [`MAX_RECEIVE`]),
/// and processes each in its own task (ack on success, retry with the error's delay
/// otherwise). The queue's per-group order makes that safe: no later message of a record is
/// delivered while one is in hand. When the queue has nothing deliverable the loop sleeps until
/// a `send` wakes it (or [`IDLE_FALLBACK_POLL`]). Loop 0 also sweeps parked events at start and
/// every [`SWEEP_EVERY`]. When `stop` turns true it stops receiving and waits for the
/// deliveries in hand.
///
/// Compared with N loops that each receive 10 and process them one after the other, this
/// receives far less often (each receive is a queue transaction) and never leaves a delivery
/// waiting behind a slow one of the same batch.
async fn run_receiver(
    shared: Arc<Shared>,
    n: usize,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let lease = shared.engine.config().lease;
    let mut in_hand = JoinSet::new();
    let mut last_sweep: Option<Instant> = None;
    let mut last_forget: Option<Instant> = None;
    loop {
        while in_hand.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        if n == 0 && last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(Instant::now());
            match shared.engine.sweep_parked(shared.work.as_ref()).await {
                Ok(0) => {}
                Ok(released) => info!(released, "parked events released by the sweep"),
                Err(e) => {
                    warn!(error = %e, "sweeping parked events failed; the next sweep retries")
                }
            }
        }
        if n == 0 && last_forget.is_none_or(|t| t.elapsed() >= FORGET_EVERY) {
            last_forget = Some(Instant::now());
            match forget_expired_events(&shared.store, shared.idempotency_window, &stop).await {
                Ok(0) => {}
                Ok(forgotten) => info!(
                    forgotten,
                    "ids of events processed before the idempotency window forgotten"
                ),
                Err(e) => {
                    warn!(error = %e, "forgetting old event ids failed; the next round retries")
                }
            }
        }
        let first = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        // Registered before looking at the queue, so a send between an empty receive and the
        // wait still wakes this loop.
        let woken = shared.work.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let free = (permits.available_permits() + 1).min(MAX_RECEIVE);
        let deliveries = match shared.work.receive(free, lease).await {
            Ok(d) => d,
            Err(e) => {
                drop(first);
                error!(receiver = n, error = %e, "receiving from the queue failed; retrying in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        if deliveries.is_empty() {
            drop(first);
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(IDLE_FALLBACK_POLL) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            continue;
        }
        let mut first = Some(first);
        for delivery in deliveries {
            let permit = match first.take() {
                Some(p) => p,
                // Cannot fail for want of permits: `free` were available and only this loop's
                // own tasks or other loops take them; waiting is the fallback.
                None => match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let shared = shared.clone();
            in_hand.spawn(async move {
                let event_id = delivery.message.event.event_id.clone();
                if let Err(e) =
                    handle_delivery(shared.work.as_ref(), &shared.engine, delivery).await
                {
                    warn!(%event_id, error = %e, "ack or retry failed; the event is redelivered after its visibility timeout");
                }
                drop(permit);
            });
        }
    }
    while in_hand.join_next().await.is_some() {}
}

/// The receivers' screen ([`EventScreen`]): the engine's [`Engine::settled`], so an echo of
/// dualwrite's own write is answered from the store without going through the queue.
pub(crate) struct EngineScreen(pub Arc<Engine>);

#[async_trait]
impl EventScreen for EngineScreen {
    async fn settled(
        &self,
        event: &dualwrite_core::ChangeEvent,
    ) -> Option<dualwrite_core::decision::SkipReason> {
        self.0.settled(event).await
    }
}

/// Shared parts of a running pipeline.
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub queue: Arc<LogQueue>,
    /// The queue the workers receive from and the receivers send to (wake-ups, completions).
    pub work: Arc<WorkerQueue>,
    pub store: Arc<SqliteStore>,
    pub receiver: Arc<ReceiverConfig>,
    /// What the receivers ask before queueing an event.
    pub screen: EngineScreen,
    /// Where receivers and the scheduler send events: the queue, behind key-lookup completion.
    pub inbound: Arc<dyn WorkQueue>,
    pub crm: Arc<dyn Connector>,
    pub erp: Arc<dyn Connector>,
    /// The connectors the catch-up polls read with: `crm` and `erp` behind the error policy's
    /// retries of throttling and passing failures (a batch read has no queue to retry it).
    pub crm_polls: Arc<dyn Connector>,
    pub erp_polls: Arc<dyn Connector>,
    /// The connectors' coalescing counters.
    pub batching: BatchingStats,
    /// The connectors' request counters.
    pub calls: ConnectorCounters,
    /// How long processed events' ids are remembered.
    pub idempotency_window: Duration,
    /// How far before its watermark a catch-up poll reads (`scheduler.overlap`).
    pub catch_up_overlap: Duration,
    /// The catch-up polls' counters.
    pub catch_up_stats: CatchUpStats,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("engine", &self.engine)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) async fn stats(&self) -> RuntimeStats {
        let depth = self.queue.depth().await.unwrap_or_default();
        let r = self.receiver.stats.snapshot();
        RuntimeStats {
            engine: self.engine.stats(),
            queue: depth.into(),
            receivers: ReceiverCounts {
                accepted: r.accepted,
                ignored: r.ignored,
                rejected_unauthorized: r.rejected_unauthorized,
                rejected_too_large: r.rejected_too_large,
                rejected_incomplete: r.rejected_incomplete,
                rejected_malformed: r.rejected_malformed,
                rejected_queue_unavailable: r.rejected_queue_unavailable,
                settled: r.settled,
            },
            database: {
                let w = self.store.writer_stats();
                DatabaseCounts {
                    batches: w.batches,
                    writes: w.writes,
                }
            },
            queue_log: {
                let q = self.queue.stats();
                QueueLogCounts {
                    batches: q.batches,
                    syncs: q.syncs,
                    synced_callers: q.synced_callers,
                    bytes_written: q.bytes_written,
                }
            },
            batching: self.batching.counts(),
            connectors: self.calls.counts(),
            catch_up: self.catch_up_stats.counts(),
        }
    }
}

/// Starts the local pipeline. See [`Runtime::start`].
#[derive(Debug, Clone, Copy)]
pub struct Runtime;

/// A running pipeline: its address, its counters, and the way to stop it.
#[derive(Debug)]
pub struct RuntimeHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    stop_workers: watch::Sender<bool>,
    server: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    scheduler: Option<JoinHandle<()>>,
    /// The workers' permits (one per event in progress) and how many there are.
    permits: Arc<Semaphore>,
    concurrency: u32,
}

/// Every worker held ([`RuntimeHandle::hold_workers`]); they resume when this is dropped.
#[derive(Debug)]
pub struct WorkersHeld {
    _permits: tokio::sync::OwnedSemaphorePermit,
}

impl Runtime {
    /// Opens the store and queue, builds the connectors (Entra tokens per environment scope),
    /// binds the listen address and starts the server, the workers and the scheduler.
    ///
    /// # Errors
    /// [`StartError`] naming what could not be set up.
    pub async fn start(config: Config) -> Result<RuntimeHandle, StartError> {
        if let Some(parent) = config.db.parent()
            && !parent.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(parent);
        }
        let Parts {
            store,
            crm,
            erp,
            engine,
            batching,
            calls,
        } = Parts::build(&config)?;
        let queue = open_queue(&config, &store).await?;
        let work = Arc::new(WorkerQueue::new(queue.clone(), config.worker.concurrency));
        let mut receiver = ReceiverConfig::new(
            config.dataverse_auth.clone(),
            config.fno_auth.clone(),
            Coverage::from_maps(&config.maps)
                .with_complete_post_images(config.dataverse_post_image_all_columns),
        );
        receiver.business_events = config.fno_business_events.clone();
        receiver.body_timeout = config.webhook_body_timeout;
        let receiver = Arc::new(receiver);
        let inbound: Arc<dyn WorkQueue> = work.clone();
        let shared = Arc::new(Shared {
            screen: EngineScreen(engine.clone()),
            engine,
            inbound,
            queue,
            work,
            store,
            receiver,
            crm_polls: Arc::new(RetryingConnector::new(
                crm.clone(),
                Backoff::default(),
                calls.dataverse.clone(),
            )),
            erp_polls: Arc::new(RetryingConnector::new(
                erp.clone(),
                Backoff::default(),
                calls.fno.clone(),
            )),
            crm,
            erp,
            batching,
            calls,
            idempotency_window: config.worker.idempotency_window,
            catch_up_overlap: config
                .catch_up
                .as_ref()
                .map_or(crate::config::DEFAULT_CATCH_UP_OVERLAP, |c| c.overlap),
            catch_up_stats: CatchUpStats::default(),
        });

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (stop_http, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(AppState {
            shared: shared.clone(),
        });
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = result {
                error!(error = %e, "webhook server stopped with an error");
            }
        });

        let (stop_workers, stop_workers_rx) = watch::channel(false);
        let concurrency = config.worker.concurrency.max(1);
        let permits = Arc::new(Semaphore::new(concurrency));
        let workers = (0..RECEIVERS.min(config.worker.concurrency.max(1)))
            .map(|n| {
                let shared = shared.clone();
                let rx = stop_workers_rx.clone();
                let permits = permits.clone();
                tokio::spawn(run_receiver(shared, n, permits, rx))
            })
            .collect();
        let scheduler = config.catch_up.clone().map(|catch_up| {
            let shared = shared.clone();
            let rx = stop_workers_rx.clone();
            tokio::spawn(async move { run_scheduler(shared, catch_up, rx).await })
        });
        info!(%addr, maps = config.maps.len(), workers = config.worker.concurrency, "dualwrite runtime started");
        Ok(RuntimeHandle {
            addr,
            shared,
            stop_http: Some(stop_http),
            stop_workers,
            server,
            workers,
            scheduler,
            permits,
            concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
        })
    }
}

impl RuntimeHandle {
    /// The address the webhook endpoints listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds every worker: returns once the events in progress are finished, and no delivery
    /// is taken from the queue until the guard is dropped. Webhooks are still answered and
    /// queued meanwhile. `dualwrite demo` uses it to let two edits made on both sides reach the
    /// queue before either is processed: a conflict, whatever the timing of the deliveries.
    pub async fn hold_workers(&self) -> WorkersHeld {
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(self.concurrency)
            .await
            .expect("the workers' semaphore is never closed");
        WorkersHeld { _permits: permit }
    }

    /// Engine, queue and receiver counters now.
    pub async fn stats(&self) -> RuntimeStats {
        self.shared.stats().await
    }

    /// The engine (its maps and counters).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// The state store (links, conflicts, errors, map states).
    pub fn store(&self) -> &Arc<SqliteStore> {
        &self.shared.store
    }

    /// The work queue.
    pub fn queue(&self) -> &Arc<LogQueue> {
        &self.shared.queue
    }

    /// A stream of every event the workers finish from now on (processed or duplicate, effects
    /// committed), with the instant it finished: how `dualwrite bench live` times each webhook
    /// to the moment its write is done. Each call gets its own stream; drop it to unsubscribe.
    pub fn completions(&self) -> mpsc::UnboundedReceiver<Completion> {
        self.shared.work.subscribe()
    }

    /// The connector of `side`.
    pub fn connector(&self, side: Side) -> &Arc<dyn Connector> {
        match side {
            Side::Crm => &self.shared.crm,
            Side::Erp => &self.shared.erp,
        }
    }

    /// Runs one catch-up poll now (what the scheduler does on its schedule, reading from
    /// `scheduler.overlap` before each watermark); returns how many changes were ingested.
    ///
    /// # Errors
    /// Every map side that could not be polled, as text (the others were polled and their
    /// watermarks kept).
    pub async fn catch_up_now(&self) -> Result<usize, String> {
        crate::scheduler::catch_up(&self.shared, self.shared.catch_up_overlap).await
    }

    /// [`RuntimeHandle::catch_up_now`] reading from `overlap` before each watermark.
    ///
    /// # Errors
    /// As [`RuntimeHandle::catch_up_now`].
    pub async fn catch_up_now_overlapping(&self, overlap: Duration) -> Result<usize, String> {
        crate::scheduler::catch_up(&self.shared, overlap).await
    }

    /// Stops gracefully: the server stops accepting and finishes open requests, the workers
    /// finish the deliveries in hand, then everything stops. Queued events stay in the
    /// database for the next start.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_http.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server)
            .await
            .is_err()
        {
            // A connection still open (a sender stalled before its body, which the body
            // timeout does not cover) must not keep the process up: it is closed unanswered,
            // so its sender sends again; nothing it sent was acknowledged.
            warn!(
                seconds = SHUTDOWN_GRACE.as_secs(),
                "webhook connections still open after the grace period: closed unanswered"
            );
            self.server.abort();
            let _ = (&mut self.server).await;
        }
        let _ = self.stop_workers.send(true);
        for w in self.workers.drain(..) {
            let _ = w.await;
        }
        if let Some(s) = self.scheduler.take() {
            let _ = s.await;
        }
        info!(addr = %self.addr, "dualwrite runtime stopped");
    }
}

/// The Entra ID token provider of `env`, counting its fetches in `stats` (the connector's).
fn token_provider(
    env: &Environment,
    side: &'static str,
    stats: Arc<ConnectorStats>,
) -> Result<Arc<dyn TokenSource>, StartError> {
    let mut entra = EntraConfig::new(&env.tenant, &env.client_id, env.client_secret.clone());
    entra.authority.clone_from(&env.authority);
    EntraTokenProvider::new(entra, stats)
        .map(|p| Arc::new(p) as Arc<dyn TokenSource>)
        .map_err(|e| StartError::Connector {
            side,
            url: env.url.clone(),
            message: e.to_string(),
        })
}

/// The store, connectors and engine of a configuration: what `serve` runs around its queue
/// ([`open_queue`]), and what a one-off command (resolving a conflict) needs while `serve` may
/// hold the queue.
pub struct Parts {
    pub store: Arc<SqliteStore>,
    /// Dataverse, behind [`Coalescing`] unless `batching` turns it off for Dataverse.
    pub crm: Arc<dyn Connector>,
    /// F&O, behind [`Coalescing`] unless `batching` turns it off for F&O.
    pub erp: Arc<dyn Connector>,
    pub engine: Arc<Engine>,
    /// The counters of the coalescing wrappers.
    pub batching: BatchingStats,
    /// The connectors' request counters.
    pub calls: ConnectorCounters,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Parts {
    /// Opens the store of `config.db` and builds the connectors and the engine.
    ///
    /// # Errors
    /// [`StartError`] naming what could not be set up.
    pub fn build(config: &Config) -> Result<Parts, StartError> {
        let db_err = |e: &dyn std::fmt::Display| StartError::Database {
            path: config.db.display().to_string(),
            message: e.to_string(),
        };
        let store = Arc::new(SqliteStore::open(&config.db).map_err(|e| db_err(&e))?);
        let (dataverse, fno) = (build_dataverse(config)?, build_fno(config)?);
        let calls = ConnectorCounters {
            dataverse: dataverse.stats().clone(),
            fno: fno.stats().clone(),
        };
        let (crm, dataverse_batching) = coalesced(dataverse, config.batching.dataverse);
        let (erp, fno_batching) = coalesced(fno, config.batching.fno);
        let batching = BatchingStats {
            dataverse: dataverse_batching,
            fno: fno_batching,
        };
        let worker_config = WorkerConfig {
            lease: config.worker.visibility_timeout,
            idle_poll: IDLE_FALLBACK_POLL,
            backoff: engine_backoff(config.worker.max_attempts),
            events_remembered: config.worker.idempotency_window,
            ..WorkerConfig::default()
        };
        let engine = Arc::new(Engine::new(
            store.clone(),
            crm.clone(),
            erp.clone(),
            config.maps.clone(),
            Arc::new(SystemClock),
            worker_config,
        ));
        Ok(Parts {
            store,
            crm,
            erp,
            engine,
            batching,
            calls,
        })
    }
}

/// The work queue's directory for the database file `db`: `dualwrite.db` → `dualwrite.queue`.
pub fn queue_dir(db: &Path) -> PathBuf {
    db.with_extension("queue")
}

/// Opens the work queue of `config` ([`queue_dir`] of its database; one process at a time), and
/// moves into it the messages an earlier version left in the database's own queue table, so
/// nothing accepted before an upgrade is lost.
///
/// # Errors
/// [`StartError::QueueUnavailable`] when the directory is held by another process or cannot be
/// opened; [`StartError::Database`] when the earlier messages cannot be moved (they stay where
/// they were).
pub async fn open_queue(config: &Config, store: &SqliteStore) -> Result<Arc<LogQueue>, StartError> {
    open_queue_of(&config.db, config.worker.max_attempts, store).await
}

/// [`open_queue`] for the database file `db`.
async fn open_queue_of(
    db: &Path,
    max_attempts: u32,
    store: &SqliteStore,
) -> Result<Arc<LogQueue>, StartError> {
    let dir = queue_dir(db);
    let queue = LogQueue::open(
        &dir,
        dualwrite_logqueue::QueueConfig {
            max_attempts,
            ..dualwrite_logqueue::QueueConfig::default()
        },
    )
    .map_err(|e| StartError::QueueUnavailable {
        dir: dir.display().to_string(),
        held: matches!(e, dualwrite_logqueue::OpenError::Locked { .. }),
        message: e.to_string(),
    })?;
    let moved = move_earlier_messages(store, &queue)
        .await
        .map_err(|e| StartError::Database {
            path: db.display().to_string(),
            message: format!("moving the queued messages of an earlier version: {e}"),
        })?;
    if moved > 0 {
        info!(moved, dir = %dir.display(), "messages queued by an earlier version moved to the work queue");
    }
    Ok(Arc::new(queue))
}

/// Moves every message of the database's queue table (where versions before the log queue
/// kept them) to `queue`, each group in its order: received (whatever its delay or visibility:
/// the process that held them is gone), sent durably to `queue`, then acked in the table. A
/// crash in between leaves a message in both, delivered twice, which idempotency makes
/// harmless; never in neither. Dead letters stay in the table (`dualwrite status` lists them).
async fn move_earlier_messages(store: &SqliteStore, queue: &LogQueue) -> Result<usize, String> {
    if !store.has_queued_messages().map_err(|e| e.to_string())? {
        return Ok(0);
    }
    // A clock a year ahead makes delayed and in-flight messages deliverable now; a retry count
    // high enough that none is dead-lettered on the way.
    let ahead: Arc<dyn dualwrite_core::ports::Clock> = Arc::new(
        dualwrite_engine::ManualClock::new(chrono::Utc::now() + chrono::TimeDelta::days(365)),
    );
    let table = SqliteQueue::open_beside(
        store,
        dualwrite_sqlite::QueueConfig {
            max_attempts: u32::MAX,
            clock: ahead,
        },
    )
    .map_err(|e| e.to_string())?;
    // An earlier move interrupted by a crash left its messages in flight: release them first.
    table.release_all().await.map_err(|e| e.to_string())?;
    let mut moved = 0;
    loop {
        let deliveries = table
            .receive(1_000, Duration::from_secs(3_600))
            .await
            .map_err(|e| e.to_string())?;
        if deliveries.is_empty() {
            return Ok(moved);
        }
        let messages = deliveries.iter().map(|d| d.message.clone()).collect();
        queue.send(messages).await.map_err(|e| e.to_string())?;
        for d in &deliveries {
            table.ack(&d.receipt).await.map_err(|e| e.to_string())?;
        }
        moved += deliveries.len();
    }
}

/// `connector` behind a [`Coalescing`] wrapper configured by `batching` (with its counters),
/// or as it is when batching is off.
fn coalesced<C: Connector + 'static>(
    connector: C,
    batching: Option<CoalescingConfig>,
) -> (Arc<dyn Connector>, Option<Arc<CoalescingStats>>) {
    match batching {
        Some(config) => {
            let coalescing = Coalescing::new(connector, config);
            let stats = coalescing.stats();
            (Arc::new(coalescing), Some(stats))
        }
        None => (Arc::new(connector), None),
    }
}

/// The connector's calls per `$batch`: the coalescer's batch size, so one coalesced batch is
/// one `$batch`.
fn max_batch(batching: Option<CoalescingConfig>) -> usize {
    batching.map_or(DEFAULT_MAX_BATCH, |b| b.max_batch)
}

fn build_dataverse(config: &Config) -> Result<DataverseConnector, StartError> {
    let env = &config.dataverse;
    let stats = Arc::new(ConnectorStats::default());
    let tokens = token_provider(env, "dataverse", stats.clone())?;
    let schemas = Arc::new(EntitySchemas::from_maps(&config.maps, Side::Crm));
    let mut dv = DataverseConfig::new(format!("{}{DATAVERSE_API_PATH}", env.url), tokens, schemas);
    dv.connection.max_batch = max_batch(config.batching.dataverse);
    dv.connection.stats = stats;
    DataverseConnector::new(dv).map_err(|e| StartError::Connector {
        side: "dataverse",
        url: env.url.clone(),
        message: e.to_string(),
    })
}

fn build_fno(config: &Config) -> Result<FnoConnector, StartError> {
    let env = &config.fno;
    let stats = Arc::new(ConnectorStats::default());
    let tokens = token_provider(env, "fno", stats.clone())?;
    let schemas = Arc::new(EntitySchemas::from_maps(&config.maps, Side::Erp));
    let mut fno = FnoConfig::new(env.url.clone(), tokens, schemas);
    fno.connection.max_batch = max_batch(config.batching.fno);
    fno.connection.stats = stats;
    FnoConnector::new(fno).map_err(|e| StartError::Connector {
        side: "fno",
        url: env.url.clone(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use dualwrite_core::ports::{QueueMessage, WorkQueue};
    use dualwrite_core::{ChangeEvent, Operation, Record, Side};

    use super::*;

    fn message(event_id: &str, record_id: &str) -> QueueMessage {
        let mut record = Record::new("accounts");
        record.id = Some(record_id.into());
        QueueMessage::for_event(ChangeEvent {
            event_id: event_id.into(),
            source: Side::Crm,
            operation: Operation::Upsert,
            record,
            partial: false,
            received_at: chrono::Utc::now(),
            correlation_id: None,
            depth: None,
        })
    }

    #[test]
    fn transient_failures_are_retried_on_every_delivery_until_the_queue_dead_letters() {
        use dualwrite_core::error_policy::{Disposition, disposition};
        use dualwrite_core::ports::{ConnectorError, ConnectorErrorKind};
        let outage = ConnectorError {
            kind: ConnectorErrorKind::Transient,
            status: Some(503),
            message: "service unavailable".into(),
            side: Side::Erp,
            entity: "CustomersV3".into(),
        };
        let throttled = ConnectorError {
            kind: ConnectorErrorKind::Throttled {
                retry_after_ms: 300_000,
            },
            ..outage.clone()
        };
        for max_attempts in [1, 5, 10, 40] {
            let backoff = engine_backoff(max_attempts);
            for attempt in 1..=max_attempts {
                for error in [&outage, &throttled] {
                    assert!(
                        matches!(
                            disposition(error, attempt, &backoff, 0.5),
                            Disposition::RetryAfter(_)
                        ),
                        "delivery {attempt} of {max_attempts}: {error:?} must go back to the \
                         queue (dead-lettered with its event after the last), not be given up"
                    );
                }
            }
        }
        // The default rides out about a minute or two of an outage before the dead letters.
        let backoff = engine_backoff(10);
        let waited: Duration = (1..10).map(|a| backoff.delay(a, 0.0)).sum();
        assert!(waited >= Duration::from_secs(50), "{waited:?}");
    }

    #[tokio::test]
    async fn expired_event_ids_are_forgotten_in_chunks_and_recent_ones_kept() {
        use dualwrite_core::ports::{LinkStore, StoreOp};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("db.sqlite")).unwrap();
        let ids: Vec<String> = (0..FORGET_CHUNK + 5).map(|i| format!("e{i}")).collect();
        for chunk in ids.chunks(50) {
            let ops = chunk
                .iter()
                .map(|id| StoreOp::CompleteEvent {
                    event_id: id.clone(),
                })
                .collect();
            store.commit(ops).await.unwrap();
        }
        // A week's window keeps them all.
        let week = Duration::from_secs(7 * 24 * 3_600);
        let (stop_tx, stop) = watch::channel(false);
        assert_eq!(forget_expired_events(&store, week, &stop).await.unwrap(), 0);
        assert_eq!(store.counts().unwrap().completed_events, ids.len() as u64);
        // Once outside the window (here: none), every one goes, over several transactions.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let batches = store.writer_stats().batches;
        // A shutdown stops after the chunk in hand.
        stop_tx.send(true).unwrap();
        assert_eq!(
            forget_expired_events(&store, Duration::ZERO, &stop)
                .await
                .unwrap(),
            FORGET_CHUNK
        );
        stop_tx.send(false).unwrap();
        assert_eq!(
            forget_expired_events(&store, Duration::ZERO, &stop)
                .await
                .unwrap(),
            ids.len() - FORGET_CHUNK
        );
        assert!(store.writer_stats().batches >= batches + 2);
        assert_eq!(store.counts().unwrap().completed_events, 0);
    }

    #[tokio::test]
    async fn messages_an_earlier_version_queued_in_the_database_move_to_the_queue_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("dualwrite.db");
        let store = SqliteStore::open(&db).unwrap();
        {
            let table =
                SqliteQueue::open_beside(&store, dualwrite_sqlite::QueueConfig::default()).unwrap();
            table
                .send(vec![
                    message("e1", "a"),
                    message("e2", "b"),
                    message("e3", "a"),
                ])
                .await
                .unwrap();
            // One of them in flight, one delayed by a retry: all move.
            let d = table.receive(1, Duration::from_secs(600)).await.unwrap();
            table
                .retry(&d[0].receipt, Duration::from_secs(600), "boom")
                .await
                .unwrap();
            table.receive(1, Duration::from_secs(600)).await.unwrap();
        }
        assert!(store.has_queued_messages().unwrap());

        let queue = open_queue_of(&db, 5, &store).await.unwrap();
        let ids: Vec<String> = queue
            .pending(10)
            .unwrap()
            .into_iter()
            .map(|m| m.event.event_id)
            .collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
        let pos = |id: &str| ids.iter().position(|i| i == id).unwrap();
        assert!(pos("e1") < pos("e3"), "group a keeps its order: {ids:?}");
        assert!(!store.has_queued_messages().unwrap(), "nothing left behind");
        assert_eq!(queue.dir(), queue_dir(&db));
        drop(queue);

        // Opening again moves nothing twice.
        let queue = open_queue_of(&db, 5, &store).await.unwrap();
        assert_eq!(queue.pending(10).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_move_interrupted_by_a_crash_is_done_again_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("dualwrite.db");
        let store = SqliteStore::open(&db).unwrap();
        {
            let table =
                SqliteQueue::open_beside(&store, dualwrite_sqlite::QueueConfig::default()).unwrap();
            table
                .send(vec![message("e1", "a"), message("e2", "b")])
                .await
                .unwrap();
        }
        {
            // A move received them (its clock a year ahead, an hour's visibility), then the
            // process died before sending them on.
            let ahead: Arc<dyn dualwrite_core::ports::Clock> =
                Arc::new(dualwrite_engine::ManualClock::new(
                    chrono::Utc::now() + chrono::TimeDelta::days(365),
                ));
            let table = SqliteQueue::open_beside(
                &store,
                dualwrite_sqlite::QueueConfig {
                    max_attempts: u32::MAX,
                    clock: ahead,
                },
            )
            .unwrap();
            assert_eq!(
                table
                    .receive(1_000, Duration::from_secs(3_600))
                    .await
                    .unwrap()
                    .len(),
                2
            );
        }
        // Restarted at once: the messages move all the same.
        let queue = open_queue_of(&db, 5, &store).await.unwrap();
        assert_eq!(queue.pending(10).unwrap().len(), 2);
        assert!(!store.has_queued_messages().unwrap(), "nothing left behind");
    }

    #[tokio::test]
    async fn a_queue_held_by_another_process_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("dualwrite.db");
        let store = SqliteStore::open(&db).unwrap();
        let _held = open_queue_of(&db, 5, &store).await.unwrap();
        let err = open_queue_of(&db, 5, &store).await.unwrap_err();
        assert!(
            matches!(&err, StartError::QueueUnavailable { message, held: true, .. } if message.contains("in use")),
            "{err}"
        );
    }
}
