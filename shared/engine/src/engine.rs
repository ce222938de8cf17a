//! The worker step: one change event in, connector writes and one store commit out.
//!
//! [`Engine::process`] claims the event, and for each map covering the record gathers what
//! [`decide`](dualwrite_core::decision::decide) needs (full source record, link, the other
//! side's current record, resolved lookups), executes the decision through the connectors and
//! commits the new link together with the event's completion; the steps of one map are in
//! [`map_run`]. A 412 from a connector or a concurrent link update makes it read again and
//! decide again (bounded). It knows nothing of HTTP, SQLite or Lambda: those wrap it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::decision::{ParkCause, SkipReason, entity_of, side_hash};
use dualwrite_core::error_policy::{Backoff, Disposition, disposition, error_class};
use dualwrite_core::map::apply::{
    CRM_COMPANY_ENTITY_SET, LookupResolution, LookupTarget, ResolvedLookups, integration_key,
    lookup_requests_at, record_key,
};
use dualwrite_core::map::{SideFieldsAt, TableMap};
use dualwrite_core::ports::{
    Clock, Connector, ConnectorError, ErrorClass, ErrorRecord, EventClaim, Link, MAX_COMMIT_OPS,
    ParkedEvent, QueueError, QueueMessage, RecordRef, SideState, StateStore, StoreError, StoreOp,
    WorkQueue,
};
use dualwrite_core::{
    ChangeEvent, IntegrationKey, LookupRef, Operation, Record, Side, SmolStr, Value,
};
use tracing::{debug, info, warn};

use crate::stats::{Counter, EngineStats, StatsSnapshot};

mod map_run;
mod references;

use map_run::MapRun;
use references::ReferenceLinks;

/// How a worker behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// How long a claimed event is reserved for this worker (also the queue visibility timeout).
    pub lease: Duration,
    /// Backoff for retryable connector failures.
    pub backoff: Backoff,
    /// How deep a missing lookup may be synced on the spot (a dependency of a dependency …)
    /// before the change is parked instead.
    pub max_dependency_depth: u32,
    /// How many times one change may be decided again after a 412 or a concurrent link update
    /// before the event is handed back to the queue for later.
    pub max_redecisions: u32,
    /// Messages received per batch by [`crate::run_worker`].
    pub batch_size: usize,
    /// How long [`crate::run_worker`] waits when the queue is empty.
    pub idle_poll: Duration,
    /// How long completed event ids are remembered (`worker.idempotency_hours`). An event
    /// older than that (a dead letter redriven late) may have been applied and forgotten: one
    /// carrying no version, which the stale check could not place, is decided on its source
    /// record read again instead of its own values.
    pub events_remembered: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            lease: Duration::from_secs(60),
            backoff: Backoff::default(),
            max_dependency_depth: 3,
            max_redecisions: 8,
            batch_size: 10,
            idle_poll: Duration::from_millis(200),
            events_remembered: Duration::from_secs(168 * 3_600),
        }
    }
}

/// What became of an event as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    /// Processed under every map covering it (each map's action is in [`ProcessOutcome::maps`]).
    Processed,
    /// Processed to completion before: nothing was done (idempotency).
    Duplicate,
    /// No map covers the record's side and entity: completed without effect.
    NoMap,
}

/// What one map did with the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapAction {
    /// Nothing written, for this reason.
    Skipped(SkipReason),
    /// The source record no longer exists (read for a partial event): nothing to sync.
    SourceGone,
    /// Records written (`writes` connector upserts, 0 when only a conflict was recorded).
    Written {
        /// Connector writes made.
        writes: usize,
        /// Id of the conflict resolved by the write, if any.
        conflict: Option<String>,
    },
    /// A delete applied per the map's delete policy.
    Deleted,
    /// Policy `manual`: an open conflict was recorded; nothing written.
    ConflictHeld {
        /// The conflict's id.
        conflict_id: String,
    },
    /// Parked until `waiting_map`/`waiting_key` is linked (or its conflict resolved).
    Parked {
        /// The map whose link is awaited.
        waiting_map: String,
        /// The awaited key.
        waiting_key: IntegrationKey,
        /// Why, in words.
        reason: String,
    },
    /// A permanent failure, logged in the error log; the event is completed.
    Failed {
        /// The logged message.
        message: String,
    },
}

/// The result of one map for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapResult {
    /// The map's name.
    pub map: String,
    /// The pair's integration key, when it could be computed.
    pub key: Option<IntegrationKey>,
    /// What was done.
    pub action: MapAction,
}

/// The result of [`Engine::process`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOutcome {
    /// The event's id.
    pub event_id: String,
    /// What became of the event.
    pub status: EventStatus,
    /// One entry per map covering the record (empty for a duplicate).
    pub maps: Vec<MapResult>,
    /// Parked events released because a link they waited for exists now. They are still in
    /// the parked list: the caller sends them to the work queue and only then removes them
    /// ([`Engine::release`]), so a crash in between can duplicate them but never lose them.
    pub released: Vec<ParkedEvent>,
}

/// Why an event could not be processed now. Every variant is retryable: the caller hands the
/// event back to the queue with [`ProcessError::retry_after`] (its claim was released).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Another worker holds the event's claim.
    #[error("event {event_id} is being processed by another worker; retry after {retry_after:?}")]
    InProgress {
        /// The event.
        event_id: String,
        /// When the other worker's lease runs out.
        retry_after: Duration,
    },
    /// A connector failed in a way that may pass (throttling, 5xx, timeout).
    #[error("event {event_id}, map {map}: {source}; retry after {retry_after:?}")]
    Retry {
        /// The event.
        event_id: String,
        /// The map being processed.
        map: String,
        /// How long to wait (from the error policy).
        retry_after: Duration,
        /// The connector's error.
        #[source]
        source: ConnectorError,
    },
    /// The state store failed.
    #[error("event {event_id}: {source}; retry after {retry_after:?}")]
    Store {
        /// The event.
        event_id: String,
        /// How long to wait.
        retry_after: Duration,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The pair kept changing under the worker (412s or concurrent link updates).
    #[error(
        "event {event_id}, map {map}, key {key}: the pair changed concurrently {attempts} times in a row; retry after {retry_after:?}"
    )]
    Contention {
        /// The event.
        event_id: String,
        /// The map.
        map: String,
        /// The pair's key.
        key: String,
        /// Decisions taken.
        attempts: u32,
        /// How long to wait.
        retry_after: Duration,
    },
}

impl ProcessError {
    /// How long the caller should wait before the event is delivered again.
    pub fn retry_after(&self) -> Duration {
        match self {
            ProcessError::InProgress { retry_after, .. }
            | ProcessError::Retry { retry_after, .. }
            | ProcessError::Store { retry_after, .. }
            | ProcessError::Contention { retry_after, .. } => *retry_after,
        }
    }
}

/// The sync engine: maps, store, connectors and clock, shared by every worker task.
pub struct Engine {
    store: Arc<dyn StateStore>,
    crm: Arc<dyn Connector>,
    erp: Arc<dyn Connector>,
    maps: Vec<TableMap>,
    by_entity: HashMap<(Side, String), Vec<usize>>,
    by_name: HashMap<String, usize>,
    clock: Arc<dyn Clock>,
    config: WorkerConfig,
    stats: EngineStats,
    /// Links of referenced records read a moment ago (lookups, companies).
    references: ReferenceLinks,
    /// Where the next [`Engine::sweep_parked`] starts in the parked list.
    sweep_from: std::sync::atomic::AtomicUsize,
    /// Integration keys a system wrote in another case than the record they name
    /// (`USMF/us-001` for the customer `USMF/US-001`: F&O and Dataverse compare keys without
    /// case, the links do not), learned when the referenced record was read: a lookup by the
    /// first is answered by the link of the second. Per process; emptied when it gets large.
    key_aliases: std::sync::Mutex<HashMap<(String, IntegrationKey), IntegrationKey>>,
}

/// Most [`Engine::key_aliases`] kept before they are forgotten.
const MAX_KEY_ALIASES: usize = 10_000;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field(
                "maps",
                &self
                    .maps
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What one map's processing produced.
struct MapStep {
    result: MapResult,
    released: Vec<ParkedEvent>,
    parked: bool,
}

/// What the commit logging a permanent failure carries besides the error record.
struct FailureCommit {
    /// Also complete the event (this map's commit completes it).
    complete: bool,
    /// Link writes to make in the same commit, on their revision conditions; dropped when a
    /// condition fails (the link moved on meanwhile) so the error is still logged.
    cleanup: Vec<StoreOp>,
}

impl FailureCommit {
    /// The error record (and the completion, when `complete`) only.
    fn new(complete: bool) -> Self {
        FailureCommit {
            complete,
            cleanup: Vec::new(),
        }
    }
}

/// A connector failure, classified.
enum Failure {
    /// Read again, decide again.
    Redecide,
    /// Logged and completed: this is the map's result.
    Done(MapStep),
}

type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<MapStep, ProcessError>> + Send + 'a>>;

impl Engine {
    /// An engine over `maps` (already validated). `crm` and `erp` are the two systems.
    pub fn new(
        store: Arc<dyn StateStore>,
        crm: Arc<dyn Connector>,
        erp: Arc<dyn Connector>,
        maps: Vec<TableMap>,
        clock: Arc<dyn Clock>,
        config: WorkerConfig,
    ) -> Self {
        let mut by_entity: HashMap<(Side, String), Vec<usize>> = HashMap::new();
        let mut by_name = HashMap::new();
        for (i, map) in maps.iter().enumerate() {
            by_entity
                .entry((Side::Crm, map.crm.entity_set.clone()))
                .or_default()
                .push(i);
            by_entity
                .entry((Side::Erp, map.erp.entity.clone()))
                .or_default()
                .push(i);
            by_name.insert(map.name.clone(), i);
        }
        Engine {
            store,
            crm,
            erp,
            maps,
            by_entity,
            by_name,
            clock,
            config,
            stats: EngineStats::default(),
            sweep_from: std::sync::atomic::AtomicUsize::new(0),
            references: ReferenceLinks::default(),
            key_aliases: std::sync::Mutex::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The maps, as given.
    pub fn maps(&self) -> &[TableMap] {
        &self.maps
    }

    /// The worker settings.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The maps covering records of `entity` on `side`.
    pub fn maps_for(&self, side: Side, entity: &str) -> Vec<&TableMap> {
        self.by_entity
            .get(&(side, entity.to_string()))
            .map(|ix| ix.iter().map(|&i| &self.maps[i]).collect())
            .unwrap_or_default()
    }

    fn map_named(&self, name: &str) -> Option<&TableMap> {
        self.by_name.get(name).map(|&i| &self.maps[i])
    }

    fn connector(&self, side: Side) -> &dyn Connector {
        match side {
            Side::Crm => self.crm.as_ref(),
            Side::Erp => self.erp.as_ref(),
        }
    }

    /// Resolves an open conflict (policy `manual`) the way a person decided: the current
    /// record of `keep` wins and is written to the other side, the link leaves its conflict
    /// state, and the conflict is closed with its winner. Changes parked behind the conflict
    /// are released by the next [`Engine::sweep_parked`] (older ones are then dropped as stale).
    ///
    /// The winner's record goes through the ordinary decision path as a change event with id
    /// `resolve:<conflict id>`, so a repeated resolution writes nothing new. The conflict is
    /// closed before that write: a write that then fails for now (throttled, unreachable) keeps
    /// the person's decision as an error record holding that change
    /// ([`ResolveError::WinnerNotWritten`]), which `dualwrite errors retry resolve:<id>` sends
    /// again; a write refused for good is logged the same way by the decision path (the
    /// outcome's map action is `Failed`).
    ///
    /// # Errors
    /// [`ResolveError`] naming what is missing or what failed: nothing is written when the
    /// conflict, its map, its link or the winner cannot be found.
    pub async fn resolve_conflict(
        &self,
        conflict_id: &str,
        keep: Side,
    ) -> Result<ProcessOutcome, ResolveError> {
        let conflict = self
            .store
            .conflict(conflict_id)
            .await?
            .filter(|c| c.open)
            .ok_or_else(|| ResolveError::NoOpenConflict(conflict_id.to_string()))?;
        let map = self
            .map_named(&conflict.map)
            .ok_or_else(|| ResolveError::UnknownMap(conflict.map.clone()))?;
        let link = self
            .store
            .link(&map.name, &conflict.key)
            .await?
            .ok_or_else(|| ResolveError::NoLink {
                map: map.name.clone(),
                key: conflict.key.to_string(),
            })?;
        let read = |side: Side| {
            let at = match link.id(side) {
                Some(id) => RecordRef::Id(id.to_string()),
                None => RecordRef::Key(record_key(map, side, &conflict.key)),
            };
            async move { self.connector(side).read(&entity_of(map, side), &at).await }
        };
        let winner = read(keep).await?.ok_or_else(|| ResolveError::WinnerGone {
            side: keep,
            key: conflict.key.to_string(),
        })?;
        let loser = read(keep.other()).await?;

        // The loser's current state becomes "last synced", the winner's is forgotten: the
        // winner's record then flows as an ordinary change, with no conflict left to find.
        let mut next = link.clone();
        next.open_conflict = None;
        next.pending = None;
        next.side_mut(keep).hash = None;
        if let Some(l) = &loser {
            *next.side_mut(keep.other()) = SideState {
                hash: Some(side_hash(map, keep.other(), l)),
                version: l.version,
            };
        }
        next.updated_at = self.clock.now();
        let mut closed = conflict.clone();
        closed.open = false;
        closed.winner = Some(keep);
        let result = self
            .store
            .commit(vec![
                StoreOp::PutLink {
                    link: next,
                    expected_revision: link.revision,
                },
                StoreOp::RecordConflict(closed),
            ])
            .await;
        self.forget_references(&[(link.map.clone(), link.key.clone())]);
        result?;
        info!(conflict = %conflict_id, map = %map.name, key = %conflict.key, keep = %keep, "conflict resolved by a person");
        let event = ChangeEvent {
            event_id: format!("resolve:{conflict_id}"),
            source: keep,
            operation: Operation::Upsert,
            record: winner,
            partial: false,
            received_at: self.clock.now(),
            correlation_id: Some(conflict_id.to_string()),
            depth: None,
        };
        match self.process(&event).await {
            Ok(outcome) => Ok(outcome),
            Err(error) => {
                let message = format!(
                    "conflict {conflict_id} was closed with the {keep} record kept, but writing \
                     it to {} failed: {error}",
                    keep.other()
                );
                let record = ErrorRecord {
                    at: self.clock.now(),
                    map: Some(map.name.clone()),
                    key: Some(conflict.key.to_string()),
                    event_id: Some(event.event_id.clone()),
                    class: ErrorClass::Retryable,
                    message: message.clone(),
                    event: Some(event.clone()),
                };
                self.store
                    .commit(vec![StoreOp::RecordError(record)])
                    .await?;
                self.stats.inc(Counter::Errors);
                warn!(conflict = %conflict_id, error = %message, "the resolution's write failed; kept in the error log");
                Err(ResolveError::WinnerNotWritten {
                    event_id: event.event_id,
                    message,
                })
            }
        }
    }

    /// Recognises, before it is queued, a change whose effect the store already records: the
    /// echo of dualwrite's own write (its mapped fields hash to what the link holds, or to the
    /// write in flight), a duplicate of a change already applied, or a change older than the
    /// version applied (stale). Such a change needs no processing, so a receiver may answer it
    /// without queueing it: nothing is lost, as processing it would only skip it.
    ///
    /// The same steps and the same [`decide`] as the worker's decision from the link alone,
    /// with reads of the store only (no connector call, no write): `None` whenever that is not
    /// enough to be sure — a partial event or a delete, no link, a company or key lookup known
    /// by id only and not linked, a version tying with the link's with other values, any
    /// decision but such a skip with nothing to commit (an echo that would advance the link's
    /// version is queued), a store error. Every map covering the record must agree.
    ///
    /// [`decide`]: dualwrite_core::decision::decide
    pub async fn settled(&self, event: &ChangeEvent) -> Option<SkipReason> {
        if event.partial || event.operation != Operation::Upsert {
            return None;
        }
        let maps = self.maps_for(event.source, &event.record.entity);
        let mut found = None;
        for map in maps {
            let reason = MapRun::new(self, map, event, false, 0, 1).settled().await?;
            // Reported as the weakest reason any map found: an echo under one map and stale
            // under another is reported stale.
            found = Some(match (found, reason) {
                (Some(SkipReason::Stale), _) | (_, SkipReason::Stale) => SkipReason::Stale,
                (Some(SkipReason::Echo), _) | (_, SkipReason::Echo) => SkipReason::Echo,
                _ => reason,
            });
        }
        let reason = found?;
        self.stats.inc(Counter::Screened);
        self.stats.inc(match reason {
            SkipReason::Stale => Counter::StaleDropped,
            _ => Counter::EchoesSuppressed,
        });
        debug!(event_id = %event.event_id, reason = reason.as_str(), "change settled on arrival");
        Some(reason)
    }

    /// Processes one event, first delivery. See [`Engine::process_attempt`].
    ///
    /// # Errors
    /// A [`ProcessError`] when the event must be retried later.
    pub async fn process(&self, event: &ChangeEvent) -> Result<ProcessOutcome, ProcessError> {
        self.process_attempt(event, 1).await
    }

    /// Processes one event on its `attempt`-th delivery (the error policy gives up on
    /// transient failures after `backoff.max_attempts`, logging them as errors).
    ///
    /// # Errors
    /// A [`ProcessError`] when the event must be retried later; its claim is released.
    pub async fn process_attempt(
        &self,
        event: &ChangeEvent,
        attempt: u32,
    ) -> Result<ProcessOutcome, ProcessError> {
        self.stats.inc(Counter::Events);
        let now = self.clock.now();
        let claim = self
            .store
            .claim_event(&event.event_id, now, self.config.lease)
            .await
            .map_err(|e| self.store_error(event, e))?;
        match claim {
            EventClaim::AlreadyDone => {
                self.stats.inc(Counter::Duplicates);
                debug!(event_id = %event.event_id, "duplicate event ignored");
                return Ok(ProcessOutcome {
                    event_id: event.event_id.clone(),
                    status: EventStatus::Duplicate,
                    maps: Vec::new(),
                    released: Vec::new(),
                });
            }
            EventClaim::InProgress => {
                return Err(ProcessError::InProgress {
                    event_id: event.event_id.clone(),
                    retry_after: self.config.lease,
                });
            }
            EventClaim::Claimed => {}
        }
        match self.process_claimed(event, attempt).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                // Give the claim back so the retry is not refused as in progress.
                if let Err(release) = self.store.release_event(&event.event_id).await {
                    warn!(event_id = %event.event_id, error = %release, "could not release the event's claim");
                }
                Err(e)
            }
        }
    }

    async fn process_claimed(
        &self,
        event: &ChangeEvent,
        attempt: u32,
    ) -> Result<ProcessOutcome, ProcessError> {
        let maps = self.maps_for(event.source, &event.record.entity);
        if maps.is_empty() {
            self.commit(
                event,
                vec![StoreOp::CompleteEvent {
                    event_id: event.event_id.clone(),
                }],
            )
            .await?;
            return Ok(ProcessOutcome {
                event_id: event.event_id.clone(),
                status: EventStatus::NoMap,
                maps: Vec::new(),
                released: Vec::new(),
            });
        }
        let mut results = Vec::new();
        let mut released = Vec::new();
        let mut parked_any = false;
        let last = maps.len() - 1;
        for (i, map) in maps.into_iter().enumerate() {
            // The event is completed in the commit of its last map, unless a map parked it
            // (a parked event comes back under the same id and must then be claimable).
            let step = self
                .handle_map(map, event, i == last && !parked_any, 0, attempt)
                .await?;
            parked_any |= step.parked;
            results.push(step.result);
            released.extend(step.released);
        }
        if parked_any && let Err(e) = self.store.release_event(&event.event_id).await {
            warn!(event_id = %event.event_id, error = %e, "could not release the claim of a parked event");
        }
        Ok(ProcessOutcome {
            event_id: event.event_id.clone(),
            status: EventStatus::Processed,
            maps: results,
            released,
        })
    }

    fn store_error(&self, event: &ChangeEvent, source: StoreError) -> ProcessError {
        ProcessError::Store {
            event_id: event.event_id.clone(),
            retry_after: self.config.backoff.base,
            source,
        }
    }

    /// Commits `ops`; `Ok(false)` when a revision condition failed (decide again).
    async fn commit(&self, event: &ChangeEvent, ops: Vec<StoreOp>) -> Result<bool, ProcessError> {
        if ops.is_empty() {
            return Ok(true);
        }
        let touched = links_touched(&ops);
        let result = self.store.commit(ops).await;
        self.forget_references(&touched);
        match result {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(self.store_error(event, e)),
        }
    }

    /// Processes `event` under one map, as the steps of [`MapRun`]. Boxed: syncing a dependency
    /// recurses.
    fn handle_map<'a>(
        &'a self,
        map: &'a TableMap,
        event: &'a ChangeEvent,
        complete: bool,
        depth: u32,
        attempt: u32,
    ) -> StepFuture<'a> {
        Box::pin(MapRun::new(self, map, event, complete, depth, attempt).run())
    }

    /// Logs an unmappable record for a person and completes the event.
    async fn invalid(
        &self,
        map: &TableMap,
        event: &ChangeEvent,
        key: Option<IntegrationKey>,
        complete: bool,
        message: String,
    ) -> Result<MapStep, ProcessError> {
        self.fail(
            map,
            event,
            key,
            FailureCommit::new(complete),
            ErrorClass::NeedsAttention,
            message,
        )
        .await
    }

    /// Logs a permanent failure, with what `closing` asks for in the same commit.
    async fn fail(
        &self,
        map: &TableMap,
        event: &ChangeEvent,
        key: Option<IntegrationKey>,
        closing: FailureCommit,
        class: ErrorClass,
        message: String,
    ) -> Result<MapStep, ProcessError> {
        let record = ErrorRecord {
            at: self.clock.now(),
            map: Some(map.name.clone()),
            key: key.as_ref().map(ToString::to_string),
            event_id: Some(event.event_id.clone()),
            class,
            message: message.clone(),
            event: Some(event.clone()),
        };
        let mut ops = vec![StoreOp::RecordError(record)];
        if closing.complete {
            ops.push(StoreOp::CompleteEvent {
                event_id: event.event_id.clone(),
            });
        }
        // The cleanup's revision condition failing means the link moved on: log without it.
        let with_cleanup = !closing.cleanup.is_empty();
        let mut all = ops.clone();
        all.extend(closing.cleanup);
        if !self.commit(event, all).await? && with_cleanup {
            self.commit(event, ops).await?;
        }
        self.stats.inc(Counter::Errors);
        warn!(event_id = %event.event_id, map = %map.name, error = %message, "change failed permanently");
        Ok(MapStep {
            result: MapResult {
                map: map.name.clone(),
                key,
                action: MapAction::Failed { message },
            },
            released: Vec::new(),
            parked: false,
        })
    }

    /// Classifies a connector failure by the error policy; a permanent one is logged with what
    /// `closing` asks for (see [`Engine::fail`]).
    async fn connector_failure(
        &self,
        map: &TableMap,
        key: Option<&IntegrationKey>,
        event: &ChangeEvent,
        closing: FailureCommit,
        attempt: u32,
        error: ConnectorError,
    ) -> Result<Failure, ProcessError> {
        match disposition(
            &error,
            attempt,
            &self.config.backoff,
            jitter(&event.event_id),
        ) {
            Disposition::RereadAndRedecide => Ok(Failure::Redecide),
            Disposition::RetryAfter(retry_after) => Err(ProcessError::Retry {
                event_id: event.event_id.clone(),
                map: map.name.clone(),
                retry_after,
                source: error,
            }),
            // The connector refreshes its token itself; a 401 reaching here is retried once.
            Disposition::RefreshTokenOnce => Err(ProcessError::Retry {
                event_id: event.event_id.clone(),
                map: map.name.clone(),
                retry_after: self.config.backoff.base,
                source: error,
            }),
            Disposition::Permanent => {
                let class = error_class(&error);
                let message = format!(
                    "{error} (status {:?}); fix the cause, then send the change again (`dualwrite errors retry {}`) or change the record again: its next change syncs every mapped field",
                    error.status, event.event_id,
                );
                self.fail(map, event, key.cloned(), closing, class, message)
                    .await
                    .map(Failure::Done)
            }
        }
    }

    /// Resolves the lookups of `record` (of `side`) through the store's links.
    async fn resolve_lookups(
        &self,
        event: &ChangeEvent,
        map: &TableMap,
        side: Side,
        record: &Record,
        located: Option<&SideFieldsAt>,
    ) -> Result<ResolvedLookups, ProcessError> {
        let mut out = ResolvedLookups::new();
        for request in lookup_requests_at(map, side, record, located, |n| self.map_named(n)) {
            let resolution = match &request.target {
                LookupTarget::Keys(keys) => self.resolve_by_key(event, &request.maps, keys).await?,
                LookupTarget::CrmId(id) => self.resolve_by_crm_id(event, &request.maps, id).await?,
            };
            out.insert(request.field_index, resolution);
        }
        Ok(out)
    }

    async fn resolve_by_key(
        &self,
        event: &ChangeEvent,
        maps: &[String],
        keys: &[IntegrationKey],
    ) -> Result<LookupResolution, ProcessError> {
        for (name, key) in maps.iter().zip(keys) {
            let Some(referenced) = self.map_named(name) else {
                continue;
            };
            if let Some(link) = self
                .reference_by_key(name, key)
                .await
                .map_err(|e| self.store_error(event, e))?
            {
                return Ok(LookupResolution::Resolved(Value::Lookup(Arc::new(
                    LookupRef {
                        entity_set: referenced.crm.entity_set.clone(),
                        id: link.crm_id.clone().map(Into::into),
                        key: Some(record_key(referenced, Side::Crm, &link.key)),
                    },
                ))));
            }
        }
        Ok(LookupResolution::Missing {
            map: maps.first().cloned().unwrap_or_default(),
            key: keys
                .first()
                .cloned()
                .unwrap_or_else(|| IntegrationKey(SmolStr::default())),
        })
    }

    async fn resolve_by_crm_id(
        &self,
        event: &ChangeEvent,
        maps: &[String],
        id: &str,
    ) -> Result<LookupResolution, ProcessError> {
        for name in maps {
            let Some(referenced) = self.map_named(name) else {
                continue;
            };
            if let Some(link) = self
                .reference_by_crm_id(name, id)
                .await
                .map_err(|e| self.store_error(event, e))?
            {
                let natural = erp_natural_key(referenced, &link);
                return Ok(LookupResolution::Resolved(Value::Text(natural.into())));
            }
        }
        // Not linked: find the referenced row to know which key to wait for.
        for name in maps {
            let Some(referenced) = self.map_named(name) else {
                continue;
            };
            let read = self
                .crm
                .read(&referenced.crm.entity_set, &RecordRef::Id(id.to_string()))
                .await;
            if let Ok(Some(row)) = read
                && let Ok(key) = integration_key(referenced, Side::Crm, &row)
            {
                return Ok(LookupResolution::Missing {
                    map: name.clone(),
                    key,
                });
            }
        }
        Ok(LookupResolution::Missing {
            map: maps.first().cloned().unwrap_or_default(),
            key: IntegrationKey(id.into()),
        })
    }

    /// Syncs the referenced record `dep_map`/`dep_key` now, if either system has it. `None`
    /// when it exists on neither side (the change must then wait).
    async fn sync_dependency(
        &self,
        event: &ChangeEvent,
        dep_map: &str,
        dep_key: &IntegrationKey,
        depth: u32,
        attempt: u32,
    ) -> Result<Option<MapStep>, ProcessError> {
        let Some(referenced) = self.map_named(dep_map) else {
            return Ok(None);
        };
        for side in [event.source, event.source.other()] {
            if !referenced.direction.flows_from(side) {
                continue;
            }
            let at = RecordRef::Key(record_key(referenced, side, dep_key));
            let Ok(Some(record)) = self
                .connector(side)
                .read(&entity_of(referenced, side), &at)
                .await
            else {
                continue;
            };
            // The key as the record itself spells it: both systems find a record by its key
            // without case, so the reference may spell it otherwise.
            let own_key = integration_key(referenced, side, &record).ok().filter(|k| {
                k != dep_key && k.as_str().to_lowercase() == dep_key.as_str().to_lowercase()
            });
            if let Some(own) = &own_key {
                // Known from now on, whether the record links now or later (its own sync may
                // wait for one of its dependencies): events parked on this spelling are
                // released by the record's link (the sweep asks the aliases).
                self.learn_key_alias(dep_map, dep_key, own);
            }
            let dependency = ChangeEvent {
                event_id: format!("dependency:{dep_map}:{dep_key}:{}", event.event_id),
                source: side,
                operation: Operation::Upsert,
                record,
                partial: false,
                received_at: self.clock.now(),
                correlation_id: event.correlation_id.clone(),
                depth: event.depth,
            };
            let step = self
                .handle_map(referenced, &dependency, false, depth + 1, attempt)
                .await?;
            let linked = self
                .store
                .link(dep_map, dep_key)
                .await
                .map_err(|e| self.store_error(event, e))?
                .and_then(Link::linked)
                .is_some();
            if linked {
                info!(event_id = %event.event_id, dependency_map = %dep_map, dependency_key = %dep_key, "dependency synced first");
                return Ok(Some(step));
            }
            if let Some(own) = own_key
                && self
                    .store
                    .link(dep_map, &own)
                    .await
                    .map_err(|e| self.store_error(event, e))?
                    .and_then(Link::linked)
                    .is_some()
            {
                info!(event_id = %event.event_id, dependency_map = %dep_map, dependency_key = %dep_key, linked_as = %own, "reference spelled in another case than its record; answered by the record's link");
                return Ok(Some(step));
            }
        }
        Ok(None)
    }

    /// The version a write produced. When the target does not return it (F&O answers a PATCH
    /// with a bare 204; bulk calls return ids only), the record is read back: without it, the
    /// late echo of an earlier write could not be told from a person's change and would undo a
    /// later write. A person editing between the write and the read only makes the link hold
    /// that newer version: their change event then still differs in hash and is synced.
    async fn written_version(
        &self,
        entity: &str,
        at: &RecordRef,
        side: Side,
        out: &dualwrite_core::ports::WriteOutcome,
    ) -> Option<dualwrite_core::SourceVersion> {
        if out.version.is_some() {
            return out.version;
        }
        let at = out.id.clone().map_or_else(|| at.clone(), RecordRef::Id);
        match self.connector(side).read(entity, &at).await {
            Ok(record) => record.and_then(|r| r.version),
            Err(e) => {
                warn!(side = %side, entity, error = %e, "could not read back the version of a write");
                None
            }
        }
    }

    /// Holds back a write to Dataverse of a company-specific row whose company is not linked
    /// yet (the row's `msdyn_company` would bind to a `cdm_companies` row that does not exist):
    /// the decision becomes a park on the company's link, which syncs the company first when
    /// F&O has it. Without an enabled map to `cdm_companies` the write goes ahead as decided.
    async fn company_gate(
        &self,
        map: &TableMap,
        event: &ChangeEvent,
        decision: dualwrite_core::decision::Decision,
    ) -> Result<dualwrite_core::decision::Decision, ProcessError> {
        use dualwrite_core::decision::Decision;
        if map.crm.company_field.is_none() {
            return Ok(decision);
        }
        let company = match &decision {
            Decision::Write(plan) => plan
                .writes
                .iter()
                .find(|w| w.side == Side::Crm)
                .and_then(|w| w.record.company.clone()),
            _ => None,
        };
        let Some(company) = company else {
            return Ok(decision);
        };
        let Some(companies) = self
            .maps
            .iter()
            .find(|m| m.crm.entity_set == CRM_COMPANY_ENTITY_SET)
        else {
            return Ok(decision);
        };
        let key = IntegrationKey::from_parts(None, [company.to_uppercase().as_str()]);
        match self.reference_by_key(&companies.name, &key).await {
            Ok(Some(_)) => Ok(decision),
            Ok(None) => Ok(Decision::Park {
                waiting_map: companies.name.clone(),
                waiting_key: key,
                reason: format!(
                    "map {}: company {company} is not in Dataverse yet (no link in map {})",
                    map.name, companies.name
                ),
                cause: ParkCause::MissingCompany {
                    company: company.into(),
                },
            }),
            Err(e) => Err(self.store_error(event, e)),
        }
    }

    /// Gives the key lookups of a Dataverse row that carry only the referenced row's id (a
    /// webhook's `EntityReference`) the referenced row's alternate key, which the pair's
    /// integration key is built from: from the referenced row's link when it is linked, else by
    /// reading that row. A lookup no candidate map can complete is left as it is (the key then
    /// reports what is missing).
    ///
    /// # Errors
    /// The Dataverse read's error.
    pub async fn complete_key_lookups(
        &self,
        map: &TableMap,
        record: &mut Record,
    ) -> Result<(), ConnectorError> {
        self.complete_key_lookups_with(map, record, true).await
    }

    /// [`Engine::complete_key_lookups`]; with `read_unlinked` false a lookup whose referenced
    /// row is not linked is left as it is instead of reading that row (no connector call).
    async fn complete_key_lookups_with(
        &self,
        map: &TableMap,
        record: &mut Record,
        read_unlinked: bool,
    ) -> Result<(), ConnectorError> {
        for fm in map.fields.iter().filter(|f| f.lookup.is_some()) {
            let Some(field) = &fm.crm else { continue };
            if !map.crm.key.contains(&field.name) {
                continue;
            }
            let Some(Value::Lookup(reference)) = record.fields.get(field.name.as_str()) else {
                continue;
            };
            let (Some(id), None) = (reference.id.clone(), &reference.key) else {
                continue;
            };
            let entity_set = reference.entity_set.clone();
            let candidates = fm
                .lookup
                .iter()
                .flat_map(|l| l.maps.iter())
                .filter_map(|name| self.map_named(name))
                .filter(|m| m.crm.entity_set == entity_set);
            for target in candidates {
                let linked = self.reference_by_crm_id(&target.name, &id).await;
                let key = match linked {
                    Ok(Some(link)) => Some(link.key),
                    Ok(None) | Err(_) if !read_unlinked => None,
                    Ok(None) | Err(_) => self
                        .crm
                        .read(&target.crm.entity_set, &RecordRef::Id(id.clone()))
                        .await?
                        .and_then(|row| integration_key(target, Side::Crm, &row).ok()),
                };
                if let Some(key) = key {
                    if let Some(Value::Lookup(r)) = record.fields.get_mut(field.name.as_str()) {
                        Arc::make_mut(r).key = Some(record_key(target, Side::Crm, &key));
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Dataverse webhooks name a row's owning company by id only (`msdyn_company` is an
    /// EntityReference without the company code): gives `record` its company code through
    /// the link of the company row (`cdm_companies`) by its Dataverse id. Returns `false` when
    /// the company stays unknown (not linked yet, or the store could not say): the caller then
    /// reads the row, whose read resolves the company. `true` when resolved or nothing to do.
    pub async fn resolve_company_reference(&self, map: &TableMap, record: &mut Record) -> bool {
        let Some(field) = &map.crm.company_field else {
            return true;
        };
        if record.company.is_some() {
            return true;
        }
        let reference = match record.fields.get(field.as_str()) {
            Some(Value::Lookup(r)) => r.clone(),
            // No column (a partial event reads the row anyway) or a null company: nothing to do.
            _ => return true,
        };
        let Some(id) = &reference.id else {
            return false;
        };
        for companies in self
            .maps
            .iter()
            .filter(|m| m.crm.entity_set == reference.entity_set)
        {
            let linked = self.reference_by_crm_id(&companies.name, id).await;
            if let Ok(Some(link)) = linked {
                let key = record_key(companies, Side::Crm, &link.key);
                if let Some(code) = companies.crm.key.first().and_then(|f| key.get(f)) {
                    record.company = Some(code.into());
                    return true;
                }
            }
        }
        false
    }

    /// The link of the referenced record `map`/`key` when it is linked: from
    /// [`ReferenceLinks`] when read a moment ago, else from the store.
    async fn reference_by_key(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Option<Link>, StoreError> {
        let now = self.clock.now();
        if let Some(link) = self.references.by_key(map, key, now) {
            return Ok(Some(link));
        }
        let mut link = self.store.link(map, key).await?.and_then(Link::linked);
        if link.is_none()
            && let Some(canonical) = self.key_alias(map, key)
        {
            link = self
                .store
                .link(map, &canonical)
                .await?
                .and_then(Link::linked);
        }
        if let Some(l) = &link {
            self.references.keep(l, now);
        }
        Ok(link)
    }

    fn key_alias(&self, map: &str, key: &IntegrationKey) -> Option<IntegrationKey> {
        self.key_aliases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(map.to_string(), key.clone()))
            .cloned()
    }

    fn learn_key_alias(&self, map: &str, key: &IntegrationKey, canonical: &IntegrationKey) {
        let mut aliases = self
            .key_aliases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if aliases.len() >= MAX_KEY_ALIASES {
            aliases.clear();
        }
        aliases.insert((map.to_string(), key.clone()), canonical.clone());
    }

    /// [`Engine::reference_by_key`], by the referenced row's Dataverse id.
    async fn reference_by_crm_id(&self, map: &str, id: &str) -> Result<Option<Link>, StoreError> {
        let now = self.clock.now();
        if let Some(link) = self.references.by_crm_id(map, id, now) {
            return Ok(Some(link));
        }
        let link = self
            .store
            .link_by_id(map, Side::Crm, id)
            .await?
            .and_then(Link::linked);
        if let Some(l) = &link {
            self.references.keep(l, now);
        }
        Ok(link)
    }

    /// Forgets the kept references to `links` (after a commit that wrote or deleted them,
    /// whether or not it went through: a failed revision condition means someone else changed
    /// the link).
    fn forget_references(&self, links: &[(SmolStr, IntegrationKey)]) {
        for (map, key) in links {
            self.references.forget(map, key);
        }
    }

    /// True when the link of `map`/`key` is no longer at `revision` (0: absent).
    async fn link_moved(
        &self,
        event: &ChangeEvent,
        map: &TableMap,
        key: &IntegrationKey,
        revision: u64,
    ) -> Result<bool, ProcessError> {
        let now = self
            .store
            .link(&map.name, key)
            .await
            .map_err(|e| self.store_error(event, e))?;
        Ok(now.map_or(0, |l| l.revision) != revision)
    }

    /// True when the conflict log already holds conflict `id` (its id names the pair and both
    /// versions, so another worker deciding the same two changes logs the same conflict).
    async fn conflict_logged(&self, event: &ChangeEvent, id: &str) -> Result<bool, ProcessError> {
        Ok(self
            .store
            .conflict(id)
            .await
            .map_err(|e| self.store_error(event, e))?
            .is_some())
    }

    /// The events parked on `map`/`key` (released once that link exists).
    async fn parked_on(
        &self,
        event: &ChangeEvent,
        map: &TableMap,
        key: &IntegrationKey,
    ) -> Result<Vec<ParkedEvent>, ProcessError> {
        self.store
            .parked_for(&map.name, key)
            .await
            .map_err(|e| self.store_error(event, e))
    }

    /// Sends released parked events to the work queue, then removes them from the parked list.
    /// In that order: a crash in between leaves them parked and queued (processed twice,
    /// harmlessly: idempotency and versions), never lost.
    ///
    /// # Errors
    /// The queue's or the store's error; what was not removed is released again by
    /// [`Engine::sweep_parked`].
    pub async fn release(
        &self,
        queue: &dyn WorkQueue,
        released: Vec<ParkedEvent>,
    ) -> Result<usize, ReleaseError> {
        if released.is_empty() {
            return Ok(0);
        }
        let n = released.len();
        queue
            .send(
                released
                    .iter()
                    .map(|p| QueueMessage::for_event(p.event.clone()))
                    .collect(),
            )
            .await?;
        let unparks: Vec<StoreOp> = released
            .into_iter()
            .map(|p| StoreOp::Unpark {
                waiting_map: p.waiting_map,
                waiting_key: p.waiting_key,
                event_id: p.event.event_id,
            })
            .collect();
        for chunk in unparks.chunks(MAX_COMMIT_OPS) {
            self.store.commit(chunk.to_vec()).await?;
        }
        self.stats.add(Counter::Unparked, n as u64);
        Ok(n)
    }

    /// Releases every parked event whose awaited link exists (and has no open conflict): the
    /// safety net for a release interrupted by a crash, and how events parked behind a resolved
    /// conflict move on. Run by the worker loop at start and when idle.
    ///
    /// # Errors
    /// The queue's or the store's error.
    pub async fn sweep_parked(&self, queue: &dyn WorkQueue) -> Result<usize, ReleaseError> {
        use std::sync::atomic::Ordering;
        // One page of the parked list per sweep, the next page at the next sweep, around and
        // around: events parked for good (a lookup that will never resolve) at the head of the
        // list cannot hide the ones behind them.
        let from = self.sweep_from.load(Ordering::Relaxed);
        let page = self.store.parked(from, SWEEP_LIMIT).await?;
        let next = if page.len() < SWEEP_LIMIT {
            0
        } else {
            from + page.len()
        };
        let mut ready = Vec::new();
        for p in page {
            let mut link = self
                .store
                .link(&p.waiting_map, &p.waiting_key)
                .await?
                .and_then(Link::linked);
            if link.is_none()
                && let Some(canonical) = self.key_alias(&p.waiting_map, &p.waiting_key)
            {
                // Waiting on a key spelled in another case than its record's (learned since).
                link = self
                    .store
                    .link(&p.waiting_map, &canonical)
                    .await?
                    .and_then(Link::linked);
            }
            if link.is_some_and(|l| l.open_conflict.is_none()) {
                ready.push(p);
            }
        }
        // Released events leave the list: the next page starts that much earlier.
        let released = ready.len();
        let count = self.release(queue, ready).await?;
        self.sweep_from
            .store(next.saturating_sub(released), Ordering::Relaxed);
        Ok(count)
    }
}

/// Why a conflict could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("there is no open conflict with id {0} (see `dualwrite status` for recent conflicts)")]
    NoOpenConflict(String),
    #[error("the conflict belongs to map {0}, which is not enabled")]
    UnknownMap(String),
    #[error("map {map} has no link for key {key} any more")]
    NoLink { map: String, key: String },
    #[error("the {side} record {key} chosen to win no longer exists")]
    WinnerGone { side: Side, key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The conflict is closed, but the winner's write failed for now; the change is kept in
    /// the error log under `event_id`.
    #[error("{message}; the decision is kept: run `dualwrite errors retry {event_id}` to write it")]
    WinnerNotWritten {
        /// The kept change's id (`resolve:<conflict id>`).
        event_id: String,
        /// What failed.
        message: String,
    },
}

/// True for the decisions that depend only on the change and the link, which the engine makes
/// before reading the other side.
fn decided_by_link_alone(d: &dualwrite_core::decision::Decision) -> bool {
    matches!(
        d,
        dualwrite_core::decision::Decision::Skip {
            reason: SkipReason::Stale
                | SkipReason::Duplicate
                | SkipReason::Echo
                | SkipReason::FilteredOut
                | SkipReason::DirectionNotSynced,
            ..
        }
    )
}

/// The links `ops` write or delete, as (map, key).
fn links_touched(ops: &[StoreOp]) -> Vec<(SmolStr, IntegrationKey)> {
    ops.iter()
        .filter_map(|op| match op {
            StoreOp::PutLink { link, .. } => Some((link.map.clone(), link.key.clone())),
            StoreOp::DeleteLink { map, key, .. } => Some((SmolStr::new(map), key.clone())),
            _ => None,
        })
        .collect()
}

/// How many parked events one sweep looks at.
pub const SWEEP_LIMIT: usize = 1_000;

/// A release of parked events failed; they stay parked and are released by a later sweep.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Notes a successful write in the link: the side's id and the version the write produced.
fn record_write(
    link: &mut Link,
    side: Side,
    id: Option<String>,
    version: Option<dualwrite_core::SourceVersion>,
) {
    if let Some(id) = id {
        match side {
            Side::Crm => link.crm_id = Some(id.into()),
            Side::Erp => link.erp_id = Some(id.into()),
        }
    }
    if version.is_some() {
        link.side_mut(side).version = version;
    }
}

/// The F&O natural key (first key field, without the company) of a linked record.
fn erp_natural_key(map: &TableMap, link: &Link) -> String {
    let key = record_key(map, Side::Erp, &link.key);
    map.erp
        .key
        .first()
        .and_then(|f| key.get(f))
        .map_or_else(|| link.key.to_string(), str::to_string)
}

/// A number in [0, 1) derived from the event id: jitter that is stable for one event.
fn jitter(event_id: &str) -> f64 {
    let h = event_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % 10_000) as f64 / 10_000.0
}
