//! Ports: the services the engine needs from the outside world, as traits.
//!
//! Every adapter (SQLite and in-memory for local runs, DynamoDB and SQS on AWS, HTTP connectors
//! for Dataverse and F&O, simulators) implements these and nothing else; the engine is written
//! against them only. Each trait states the guarantees an implementation must give.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::event::ChangeEvent;
use crate::map::filter::Filter;
use crate::record::{IntegrationKey, Record, RecordKey, Side, SourceVersion};

// ---------------------------------------------------------------------------------------------
// State store
// ---------------------------------------------------------------------------------------------

/// A 128-bit hash of the mapped fields of one side of a record (see [`crate::hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FieldsHash(#[serde(with = "hex_u128")] pub u128);

impl FieldsHash {
    /// What a [`PendingWrite`] announcing a *delete* of its side holds in place of a hash of
    /// fields (the side will hold no fields). A hash of real fields equal to it has a chance
    /// of 2⁻¹²⁸.
    pub const DELETED: FieldsHash = FieldsHash(u128::MAX);
}

mod hex_u128 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// What dualwrite last knew of one side of a linked pair.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SideState {
    /// Hash of that side's mapped fields as dualwrite last wrote or accepted them. A change
    /// whose hash equals it is an echo of dualwrite's own write (or a no-op) and is not synced.
    pub hash: Option<FieldsHash>,
    /// The newest source version applied or written for that side. Older changes are stale.
    pub version: Option<SourceVersion>,
}

/// A write dualwrite has announced but not yet confirmed: the hash the target side's mapped
/// fields will have once the write lands. See [`Link::pending`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWrite {
    /// The side being written to.
    pub side: Side,
    /// Hash of that side's mapped fields as they stand after the write.
    pub hash: FieldsHash,
}

/// The link between a Dataverse row and an F&O record of one map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// The map the link belongs to.
    pub map: SmolStr,
    /// The pair's integration key (same from either side).
    pub key: IntegrationKey,
    /// Dataverse primary id of the row, once known.
    pub crm_id: Option<SmolStr>,
    /// The F&O record's rendered OData key, once known.
    pub erp_id: Option<SmolStr>,
    /// Last known state of the Dataverse side.
    pub crm: SideState,
    /// Last known state of the F&O side.
    pub erp: SideState,
    /// Optimistic-concurrency counter: 0 before the first write, +1 at each committed write.
    pub revision: u64,
    /// Id of an open conflict (policy `manual`): while set, changes of this pair are parked.
    pub open_conflict: Option<String>,
    /// A write in flight to one side of a linked pair, committed (revision-conditioned) BEFORE
    /// the write is executed and cleared by the commit that records it (or by the commit that
    /// logs it as failed for good). While set, a change from `pending.side` whose hash equals
    /// `pending.hash` is the echo of that write, even when it overtakes the write's commit,
    /// and that side currently holding `pending.hash` does not count as a change of its own
    /// when conflicts are looked for. It never moves the source side's hash or version and
    /// never completes the event: after a crash before the write the event is redelivered and
    /// processed normally. A stale value is harmless: a real change with other values has
    /// another hash. Links stored before this field existed load with `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingWrite>,
    /// A pair being created: committed before the first write of a new pair, holding only the
    /// source record's id and [`Link::pending`] (no hash or version of either side, so a
    /// redelivery after a crash writes again). It lets the target's echo be recognised when
    /// it overtakes the final commit, as for a linked pair. The pair is not linked yet: lookups,
    /// parked events and the company gate treat a provisional link as absent. The final
    /// commit (or the one logging the write as failed for good, which deletes it) ends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub provisional: bool,
    /// When the link last changed.
    pub updated_at: DateTime<Utc>,
}

impl Link {
    /// The link, unless it is [provisional](Link::provisional): what a lookup, a parked event
    /// or the company gate may rely on.
    pub fn linked(self) -> Option<Link> {
        (!self.provisional).then_some(self)
    }

    /// The state of `side`.
    pub fn side(&self, side: Side) -> &SideState {
        match side {
            Side::Crm => &self.crm,
            Side::Erp => &self.erp,
        }
    }

    /// The state of `side`, mutable.
    pub fn side_mut(&mut self, side: Side) -> &mut SideState {
        match side {
            Side::Crm => &mut self.crm,
            Side::Erp => &mut self.erp,
        }
    }

    /// The source id of `side` (CRM GUID or rendered F&O key).
    pub fn id(&self, side: Side) -> Option<&str> {
        match side {
            Side::Crm => self.crm_id.as_deref(),
            Side::Erp => self.erp_id.as_deref(),
        }
    }
}

/// The outcome of trying to claim an event for processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventClaim {
    /// This worker may process the event now; it holds the claim until the lease runs out.
    Claimed,
    /// The event was processed to completion before: do nothing (idempotency).
    AlreadyDone,
    /// Another worker holds an unexpired claim: try again after the lease.
    InProgress,
}

/// Whether a map is syncing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapStatus {
    Running,
    Paused,
}

/// The persisted state of one map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapState {
    pub map: String,
    pub status: MapStatus,
    /// Newest source modification time read by a batch job, per side (incremental reads).
    pub crm_watermark: Option<DateTime<Utc>>,
    pub erp_watermark: Option<DateTime<Utc>>,
    /// Where each side's change tracking continues, for deletes ([`Connector::deletions`]):
    /// a Dataverse deltaLink. `None` before the first read, or where there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_deletions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erp_deletions: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// A conflict: both sides changed since the last sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// Unique id (deterministic from map, key and the two versions).
    pub id: String,
    pub map: String,
    pub key: IntegrationKey,
    pub detected_at: DateTime<Utc>,
    /// The policy applied, as written in the map (`last_writer_wins`, `manual`, …).
    pub policy: String,
    /// Both versions as they stood when the conflict was found.
    pub crm: Record,
    pub erp: Record,
    /// The side whose values won, `None` for a field-level merge or a parked (manual) conflict.
    pub winner: Option<Side>,
    /// True while a person still has to decide (policy `manual`).
    pub open: bool,
}

/// How an error is to be handled, decided in one place ([`crate::error_policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Will likely succeed later: retried with backoff.
    Retryable,
    /// Will not succeed as it is: kept in the error log, event dead-lettered.
    Permanent,
    /// Needs a person (bad data, missing configuration): kept in the error log.
    NeedsAttention,
}

/// One entry of the error log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub at: DateTime<Utc>,
    pub map: Option<String>,
    pub key: Option<String>,
    pub event_id: Option<String>,
    pub class: ErrorClass,
    pub message: String,
    /// The change that failed, kept so that it can be sent again once the cause is fixed
    /// (`dualwrite errors retry`). Records written before it was kept load with `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<ChangeEvent>,
}

/// An event waiting for a dependency: a lookup to a record not linked yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// The map and integration key whose link the event waits for.
    pub waiting_map: String,
    pub waiting_key: IntegrationKey,
    /// Why, in words (`lookup SalesCurrencyCode = 'EUR' in map currencies`).
    pub reason: String,
    pub event: ChangeEvent,
    pub parked_at: DateTime<Utc>,
}

/// One write in a [`LinkStore::commit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StoreOp {
    /// Insert or replace a link. `expected_revision` is the revision the writer read (0 when it
    /// read none); the commit fails with [`StoreError::Conflict`] if the stored one differs.
    /// The stored link gets revision `expected_revision + 1`.
    PutLink { link: Link, expected_revision: u64 },
    /// Remove a link, on the same revision condition.
    DeleteLink {
        map: String,
        key: IntegrationKey,
        expected_revision: u64,
    },
    /// Mark an event processed (idempotency): later claims answer [`EventClaim::AlreadyDone`].
    CompleteEvent { event_id: String },
    /// Append to the conflict log (or replace the entry with the same id).
    RecordConflict(ConflictRecord),
    /// Append to the error log.
    RecordError(ErrorRecord),
    /// Park an event until a link appears.
    Park(ParkedEvent),
    /// Remove a parked event (it was re-enqueued).
    Unpark {
        waiting_map: String,
        waiting_key: IntegrationKey,
        event_id: String,
    },
    /// Create or replace a map's state.
    PutMapState(MapState),
    /// Remember that the pair `map`/`key` was deleted at `at` (its link removed by a delete
    /// applied per the map's delete policy), until the idempotency window forgets it: a late
    /// change of the pair (the echo of an earlier write, delayed) is then read again from its
    /// source, which no longer has it, instead of creating the pair anew.
    RememberDeleted {
        map: String,
        key: IntegrationKey,
        at: DateTime<Utc>,
    },
}

/// Failures of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A revision condition failed: someone else wrote the link first. Re-read and re-decide.
    #[error("link {map}/{key} was changed concurrently (expected revision {expected})")]
    Conflict {
        map: String,
        key: String,
        expected: u64,
    },
    /// The commit holds more operations than one transaction can take (100).
    #[error("a commit may hold at most {max} operations, this one holds {got}")]
    TooLarge { max: usize, got: usize },
    /// The store could not be reached or failed; retry later.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back (corruption or a newer format).
    #[error("state store data is unreadable: {0}")]
    Corrupt(String),
}

/// The most operations one [`LinkStore::commit`] may hold (DynamoDB's transaction limit).
pub const MAX_COMMIT_OPS: usize = 100;

/// Links and every other write of the engine.
///
/// Guarantees an implementation must give:
/// - `commit` is atomic: all operations apply or none do; a failed revision condition fails
///   the whole commit with [`StoreError::Conflict`]. At most [`MAX_COMMIT_OPS`] operations.
/// - Reads after a successful commit see it (read-your-writes within one store).
/// - Safe for concurrent use by several workers; conflicting link writes are serialised by the
///   revision condition, never by losing one of them silently.
#[async_trait]
pub trait LinkStore: Send + Sync {
    /// The link of `map` with integration key `key`.
    async fn link(&self, map: &str, key: &IntegrationKey) -> Result<Option<Link>, StoreError>;
    /// The link of `map` whose `side` id (CRM GUID / rendered F&O key) is `id`.
    async fn link_by_id(&self, map: &str, side: Side, id: &str)
    -> Result<Option<Link>, StoreError>;
    /// When the pair `map`/`key` was deleted, if a [`StoreOp::RememberDeleted`] still
    /// remembers it.
    async fn deleted_at(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Applies `ops` atomically.
    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError>;
}

/// Idempotency records: the same event delivered N times has one effect.
///
/// `claim_event` is atomic: of two concurrent claims of one event, at most one gets
/// [`EventClaim::Claimed`]. A claim whose lease ran out may be claimed again (the worker that
/// held it died). Completion is a [`StoreOp::CompleteEvent`] in the same commit as the effect.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `event_id` until `now + lease`.
    async fn claim_event(
        &self,
        event_id: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<EventClaim, StoreError>;
    /// Gives up a claim without completing (processing failed and will be retried).
    async fn release_event(&self, event_id: &str) -> Result<(), StoreError>;
}

/// Map states, the conflict and error logs and parked events: what operators look at.
#[async_trait]
pub trait JournalStore: Send + Sync {
    async fn map_state(&self, map: &str) -> Result<Option<MapState>, StoreError>;
    async fn map_states(&self) -> Result<Vec<MapState>, StoreError>;
    /// The conflict with `id`, open or not.
    async fn conflict(&self, id: &str) -> Result<Option<ConflictRecord>, StoreError>;
    /// Conflicts, newest first; only open ones when `open_only`.
    async fn conflicts(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError>;
    /// Errors, newest first.
    async fn errors(&self, limit: usize) -> Result<Vec<ErrorRecord>, StoreError>;
    /// Events parked until the link `map`/`key` exists.
    async fn parked_for(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Vec<ParkedEvent>, StoreError>;
    /// Parked events of every map and key, oldest first, skipping the first `offset`, at most
    /// `limit` (for the sweep that re-releases events whose dependency arrived while a release
    /// was interrupted, or whose conflict was resolved).
    async fn parked(&self, offset: usize, limit: usize) -> Result<Vec<ParkedEvent>, StoreError>;
    /// How many events are parked in all.
    async fn parked_count(&self) -> Result<u64, StoreError>;
}

/// Everything the engine keeps: one adapter usually implements all three.
pub trait StateStore: LinkStore + IdempotencyStore + JournalStore {}
impl<T: LinkStore + IdempotencyStore + JournalStore> StateStore for T {}

// ---------------------------------------------------------------------------------------------
// Work queue
// ---------------------------------------------------------------------------------------------

/// A change waiting to be applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueMessage {
    /// Ordering group: messages of one group are delivered one at a time, in send order
    /// (SQS FIFO `MessageGroupId`). One group per source record.
    pub group_id: String,
    /// Deduplication id (SQS FIFO `MessageDeduplicationId`); the engine does not rely on it.
    pub dedup_id: String,
    pub event: ChangeEvent,
}

impl QueueMessage {
    /// The message for a change event: grouped by source record, deduplicated by event id.
    pub fn for_event(event: ChangeEvent) -> Self {
        QueueMessage {
            group_id: event.group_id(),
            dedup_id: event.event_id.clone(),
            event,
        }
    }
}

/// A received message.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Handle for `ack`/`retry` (SQS receipt handle).
    pub receipt: String,
    pub message: QueueMessage,
    /// 1 on first delivery, +1 on each redelivery.
    pub attempt: u32,
}

/// What `retry` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Visible again after the delay.
    Requeued,
    /// Attempts exhausted: moved to the dead-letter queue.
    DeadLettered,
}

/// A message that exhausted its attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub message: QueueMessage,
    pub attempts: u32,
    pub last_error: String,
}

/// Queue counts, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub dead: u64,
}

/// Failures of a queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("work queue unavailable: {0}")]
    Unavailable(String),
    #[error("unknown or expired receipt {0}")]
    UnknownReceipt(String),
    #[error("work queue data is unreadable: {0}")]
    Corrupt(String),
}

/// The work queue between receivers and workers.
///
/// Guarantees an implementation must give:
/// - `send` returns only once the messages are durable: an accepted message is never lost.
/// - At-least-once: a message is delivered until acked; a delivery not acked within its
///   visibility timeout is delivered again.
/// - Per-group order: while a message of a group is in flight (or delayed by `retry`), no later
///   message of that group is delivered. Different groups are independent.
/// - `retry` makes the message visible again after `delay`; after the queue's maximum number of
///   attempts it moves to the dead-letter queue instead, and the group moves on.
/// - A dead letter keeps its message until `redrive` sends it back to the queue: durably, and
///   at least once (see [`WorkQueue::redrive`]).
#[async_trait]
pub trait WorkQueue: Send + Sync {
    async fn send(&self, messages: Vec<QueueMessage>) -> Result<(), QueueError>;
    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, QueueError>;
    async fn ack(&self, receipt: &str) -> Result<(), QueueError>;
    async fn retry(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError>;
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError>;
    async fn depth(&self) -> Result<QueueDepth, QueueError>;
    /// Moves up to `limit` dead letters, oldest death first (the order `dead_letters` lists
    /// them), back to the queue and returns how many it moved. Each becomes a new message at
    /// the end of its group, behind the messages already queued for it: group id, dedup id
    /// and event as they were, its attempt count starting again at 0.
    ///
    /// Durable like `send`: returns only once the moved messages are durable. Crash-safe: a
    /// crash during a redrive may leave a message both sent again and still listed as dead.
    /// A second redrive then sends it once more, which is harmless: the engine's idempotency
    /// records answer the second delivery `AlreadyDone` (once they are forgotten, the link's
    /// version shows the change is not newer than what it holds). Never neither: a dead
    /// letter is removed only together with, or after, its new message is durable.
    async fn redrive(&self, limit: usize) -> Result<u64, QueueError>;
}

// ---------------------------------------------------------------------------------------------
// Connector
// ---------------------------------------------------------------------------------------------

/// How to address one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordRef {
    /// Dataverse primary id (GUID).
    Id(String),
    /// Alternate key (Dataverse) or natural key with `dataAreaId` (F&O).
    Key(RecordKey),
}

/// A condition on a write (HTTP `If-Match` / `If-None-Match`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WriteCondition {
    /// Upsert: create or update.
    #[default]
    None,
    /// Only if the record still has this ETag (412 otherwise).
    IfMatch(String),
    /// Only if the record exists (`If-Match: *`).
    MustExist,
    /// Only if it does not exist (`If-None-Match: *`).
    MustNotExist,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteOutcome {
    /// The record's id after the write (Dataverse GUID / rendered F&O key).
    pub id: Option<String>,
    pub etag: Option<String>,
    /// The record's version after the write, when the target returns it.
    pub version: Option<SourceVersion>,
    /// True when the write created the record.
    pub created: bool,
}

/// A query for a page of records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Query {
    /// Only records matching this filter (sent to the server as `$filter`).
    pub filter: Option<Filter>,
    /// Only records modified at or after this instant (incremental reads).
    pub modified_since: Option<DateTime<Utc>>,
    /// Page size wanted (`Prefer: odata.maxpagesize`).
    pub page_size: Option<usize>,
    /// The continuation returned with the previous page (followed verbatim).
    pub page_token: Option<String>,
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub records: Vec<Record>,
    /// The continuation for the next page, `None` on the last page.
    pub next: Option<String>,
    /// Rows of the page that could not be read as records of the entity (a value that does
    /// not fit its declared type…): one bad row does not hide the others.
    pub unfit: Vec<UnfitRow>,
}

/// A row of a [`Page`] that could not be read as a record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnfitRow {
    /// The row's id (Dataverse primary id, rendered F&O key), when the row holds it.
    pub id: Option<String>,
    /// The row's ETag, when it has one.
    pub etag: Option<String>,
    /// What is wrong, naming the field.
    pub problem: String,
}

/// One page of the rows of an entity deleted since a point in the system's change tracking
/// ([`Connector::deletions`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeletionsPage {
    /// Ids (the system's own row ids) of rows deleted since the cursor.
    pub deleted: Vec<String>,
    /// The continuation of this read, when there are more pages.
    pub next: Option<String>,
    /// On the last page: the cursor a later read starts from (a Dataverse deltaLink).
    pub cursor: Option<String>,
}

/// What went wrong talking to a system, as the error policy needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectorErrorKind {
    /// 401: the token was refused.
    Unauthorized,
    /// 403: the identity lacks a privilege.
    Forbidden,
    /// 404.
    NotFound,
    /// 400 and other refusals of the request as sent.
    BadRequest,
    /// 412: the ETag no longer matches, or the record exists already.
    PreconditionFailed,
    /// 429 or 503 with `Retry-After`.
    Throttled { retry_after_ms: u64 },
    /// 5xx, timeouts, dropped connections.
    Transient,
}

/// A failure of a connector call, with the server's own message kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{side} {entity}: {message}")]
pub struct ConnectorError {
    pub side: Side,
    pub entity: String,
    pub kind: ConnectorErrorKind,
    /// HTTP status, when there was one.
    pub status: Option<u16>,
    /// The server's message (or a description of the transport failure).
    pub message: String,
}

/// One independent call of [`Connector::call_many`]: what [`Connector::read`] or
/// [`Connector::upsert`] would be called with, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectorCall {
    /// Read one record ([`Connector::read`]).
    Read {
        /// Entity set / data entity.
        entity: String,
        /// The record.
        at: RecordRef,
    },
    /// Create or update one record ([`Connector::upsert`]).
    Upsert {
        /// Entity set / data entity.
        entity: String,
        /// The record.
        at: RecordRef,
        /// The values to write.
        record: Record,
        /// The condition the write is made on.
        condition: WriteCondition,
    },
}

impl ConnectorCall {
    /// The entity the call is about.
    pub fn entity(&self) -> &str {
        match self {
            ConnectorCall::Read { entity, .. } | ConnectorCall::Upsert { entity, .. } => entity,
        }
    }

    /// The result of the right kind for this call carrying `error` (a failure of the whole
    /// request that carried it).
    pub fn failed(&self, error: ConnectorError) -> CallResult {
        match self {
            ConnectorCall::Read { .. } => CallResult::Read(Err(error)),
            ConnectorCall::Upsert { .. } => CallResult::Upsert(Err(error)),
        }
    }
}

/// The result of one [`ConnectorCall`]: exactly what the single call returns.
#[derive(Debug, Clone, PartialEq)]
pub enum CallResult {
    /// The result of a [`ConnectorCall::Read`].
    Read(Result<Option<Record>, ConnectorError>),
    /// The result of a [`ConnectorCall::Upsert`].
    Upsert(Result<WriteOutcome, ConnectorError>),
}

/// One system (Dataverse, F&O, Business Central, or a simulator or fake of one).
///
/// Guarantees an implementation must give:
/// - `upsert` by key is idempotent: the same write twice leaves the same record.
/// - Records returned carry `version` and `etag` when the system has them, and `company`.
/// - Errors are classified by [`ConnectorErrorKind`]; the connector retries nothing by itself
///   except a token refresh on 401 — the error policy decides (see [`crate::error_policy`]).
/// - Safe for concurrent use.
/// - `call_many` gives each call exactly what the single call would have given (see there).
#[async_trait]
pub trait Connector: Send + Sync {
    /// Which side this connector talks to.
    fn side(&self) -> Side;
    /// Reads one record, `None` when it does not exist.
    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError>;
    /// Reads one page of records. A row that cannot be read as a record is returned in
    /// [`Page::unfit`] with its id, not as an error of the whole page.
    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError>;
    /// Reads which rows of `entity` were deleted since `from` (a cursor from an earlier
    /// read's last page, or a page continuation), through the system's change tracking.
    /// Without `from`, the read establishes the starting point: it reports nothing deleted and
    /// ends with the cursor for the next read. `Ok(None)` when the system or entity has no
    /// change tracking (the default): deletes cannot be caught up by polling there.
    async fn deletions(
        &self,
        entity: &str,
        from: Option<&str>,
    ) -> Result<Option<DeletionsPage>, ConnectorError> {
        let _ = (entity, from);
        Ok(None)
    }
    /// Creates or updates one record with `record.fields`.
    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError>;
    /// Deletes one record; deleting a missing record is not an error.
    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError>;
    /// Upserts many records of one entity in as few calls as the system allows; one result per
    /// item, in order.
    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError>;

    /// Runs several independent reads and upserts, in as few requests as the system allows
    /// (HTTP connectors: OData `$batch`). Guarantees:
    /// - exactly one result per call, in the order of `calls`, of the call's kind
    ///   ([`CallResult::Read`] for a read, [`CallResult::Upsert`] for an upsert);
    /// - each result is what [`Connector::read`] / [`Connector::upsert`] would have returned
    ///   for that call alone (same `None` for a missing record, same error kinds, ETags,
    ///   versions and ids); a failure of the request carrying several calls (throttling,
    ///   refused token, transport) is that error for each of them;
    /// - calls are independent: one failing does not fail, stop or undo another, and they
    ///   are *not* atomic together — each write is atomic on its own only;
    /// - calls may run in any order or at the same time: give no two calls that depend on each
    ///   other (a read meant to see a write of the same batch).
    ///
    /// The default runs them one after the other with `read` and `upsert`.
    async fn call_many(&self, calls: Vec<ConnectorCall>) -> Vec<CallResult> {
        let mut results = Vec::with_capacity(calls.len());
        for call in calls {
            results.push(match call {
                ConnectorCall::Read { entity, at } => {
                    CallResult::Read(self.read(&entity, &at).await)
                }
                ConnectorCall::Upsert {
                    entity,
                    at,
                    record,
                    condition,
                } => CallResult::Upsert(self.upsert(&entity, &at, &record, condition).await),
            });
        }
        results
    }
}

/// A shared connector is a connector: wrappers (retrying, coalescing) can take an
/// `Arc<dyn Connector>` the runtime already shares.
#[async_trait]
impl<C: Connector + ?Sized> Connector for std::sync::Arc<C> {
    fn side(&self) -> Side {
        (**self).side()
    }
    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        (**self).read(entity, at).await
    }
    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        (**self).query(entity, query).await
    }
    async fn deletions(
        &self,
        entity: &str,
        from: Option<&str>,
    ) -> Result<Option<DeletionsPage>, ConnectorError> {
        (**self).deletions(entity, from).await
    }
    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        (**self).upsert(entity, at, record, condition).await
    }
    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        (**self).delete(entity, at).await
    }
    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        (**self).upsert_batch(entity, items).await
    }
    async fn call_many(&self, calls: Vec<ConnectorCall>) -> Vec<CallResult> {
        (**self).call_many(calls).await
    }
}

// ---------------------------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------------------------

/// The time, injected so tests control it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}
