//! [`SqliteStore`]: links, idempotency records, journals and map states in one SQLite file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dualwrite_core::ports::{
    ConflictRecord, ErrorRecord, EventClaim, IdempotencyStore, JournalStore, Link, LinkStore,
    MAX_COMMIT_OPS, MapState, ParkedEvent, StoreError, StoreOp,
};
use dualwrite_core::{IntegrationKey, Side};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::OpenError;
use crate::group_commit::{BatchError, Connections, WriterStats};
use crate::schema;

/// The state store on SQLite. Implements [`LinkStore`], [`IdempotencyStore`] and
/// [`JournalStore`] (hence [`dualwrite_core::ports::StateStore`]).
///
/// Links, conflicts, errors, parked events and map states are kept as JSON in a `body` column,
/// with the columns queries need (map, key, ids, revision, timestamps) beside it. The `revision`
/// column is authoritative: a link read back carries it whatever the JSON says.
///
/// Writes (`commit`) go through the group committer: the writes of concurrent callers share one
/// transaction and one fsync, each in its own savepoint, and each caller is answered after the
/// COMMIT returned (see [`crate::group_commit`]). Reads use a separate connection and see every
/// write that returned. Batches use `BEGIN IMMEDIATE`, so two stores (or processes) on one file
/// serialise instead of failing on a lock upgrade.
///
/// Claims ([`IdempotencyStore::claim_event`]) are held in memory, shared by every store of this
/// process on the same file; only completions are written (with the effect, by
/// [`StoreOp::CompleteEvent`]). A claim protects an event from being processed twice at once
/// within the process; across processes the queue does (a message, and every later message of
/// its record, is delivered to one consumer at a time). A process that dies takes its claims
/// with it, which is what the lease's expiry would have done, only sooner: the redelivered
/// event is claimable at once after a restart. So a claim costs a read, not a durable write.
#[derive(Debug)]
pub struct SqliteStore {
    connections: Connections,
    file: Arc<StoreFile>,
    claims: Arc<Claims>,
}

/// The claims held by this process on one database file: event id → lease end (ms since the
/// epoch).
#[derive(Debug, Default)]
struct Claims {
    held: Mutex<HashMap<String, i64>>,
}

/// Above this many claims, expired ones are dropped when a new one is taken.
const CLAIMS_PRUNE_AT: usize = 4_096;

impl Claims {
    /// The claims of the file at `path`, shared by every store of this process on it.
    fn of_file(path: &Path) -> Arc<Claims> {
        static BY_FILE: OnceLock<Mutex<HashMap<PathBuf, Weak<Claims>>>> = OnceLock::new();
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut files = lock(BY_FILE.get_or_init(Mutex::default));
        if let Some(claims) = files.get(&key).and_then(Weak::upgrade) {
            return claims;
        }
        files.retain(|_, c| c.strong_count() > 0);
        let claims = Arc::new(Claims::default());
        files.insert(key, Arc::downgrade(&claims));
        claims
    }

    /// Takes the claim of `event_id` until `until_ms` unless an unexpired one is held: `false`
    /// then.
    fn take(&self, event_id: &str, now_ms: i64, until_ms: i64) -> bool {
        let mut held = lock(&self.held);
        if held.get(event_id).is_some_and(|&until| until > now_ms) {
            return false;
        }
        if held.len() >= CLAIMS_PRUNE_AT {
            held.retain(|_, until| *until > now_ms);
        }
        held.insert(event_id.to_owned(), until_ms);
        true
    }

    fn drop_claim(&self, event_id: &str) {
        lock(&self.held).remove(event_id);
    }

    fn count(&self) -> usize {
        lock(&self.held).len()
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain maps).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the store's code on either side of the writer thread needs: the file's name for error
/// messages, and the encoding of rows.
#[derive(Debug)]
struct StoreFile {
    /// The file (`:memory:` for an in-memory store).
    location: String,
}

/// How many of each thing the store holds, for `dualwrite status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCounts {
    /// Links, all maps.
    pub links: u64,
    /// Conflicts still waiting for a person.
    pub open_conflicts: u64,
    /// Conflicts in the log, open or not.
    pub conflicts: u64,
    /// Entries in the error log.
    pub errors: u64,
    /// Parked events.
    pub parked: u64,
    /// Events processed to completion (idempotency records).
    pub completed_events: u64,
    /// Events claimed by this process and not yet completed or released (claims are held in
    /// memory: another process's are not counted).
    pub claimed_events: u64,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the store in the database file at `path`. The
    /// file may be shared with a [`crate::SqliteQueue`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let connections = Connections::open(Some(path))?;
        Ok(SqliteStore {
            connections,
            file: Arc::new(StoreFile {
                location: path.display().to_string(),
            }),
            claims: Claims::of_file(path),
        })
    }

    /// A store that lives in memory only (tests, dry runs).
    pub fn open_in_memory() -> Result<Self, OpenError> {
        Ok(SqliteStore {
            connections: Connections::open(None)?,
            file: Arc::new(StoreFile {
                location: ":memory:".to_owned(),
            }),
            claims: Arc::default(),
        })
    }

    /// The connections, for a queue opened beside the store.
    pub(crate) fn connections(&self) -> &Connections {
        &self.connections
    }

    /// The file (or `:memory:`), as messages name it.
    pub(crate) fn location(&self) -> &str {
        &self.file.location
    }

    /// How many batches (transactions) and writes the store's writer has committed.
    pub fn writer_stats(&self) -> WriterStats {
        self.connections.writer.stats()
    }

    /// All links, of one map or of all, ordered by map then integration key.
    pub fn links(&self, map: Option<&str>) -> Result<Vec<Link>, StoreError> {
        let conn = self.connections.read();
        let mut stmt = conn
            .prepare_cached(
                "SELECT map, key, revision, body FROM links \
                 WHERE ?1 IS NULL OR map = ?1 ORDER BY map, key",
            )
            .map_err(|e| self.file.unavailable("listing links", e))?;
        let rows = stmt
            .query_map([map], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(|e| self.file.unavailable("listing links", e))?;
        let mut links = Vec::new();
        for row in rows {
            let (map, key, revision, body): (String, String, i64, String) =
                row.map_err(|e| self.file.unavailable("listing links", e))?;
            links.push(self.file.decode_link(&map, &key, revision, &body)?);
        }
        Ok(links)
    }

    /// Counts of links, conflicts, errors, parked and completed events.
    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let conn = self.connections.read();
        let count = |sql: &str| -> Result<u64, StoreError> {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(|e| self.file.unavailable("counting", e))
        };
        Ok(StoreCounts {
            links: count("SELECT count(*) FROM links")?,
            open_conflicts: count("SELECT count(*) FROM conflicts WHERE open = 1")?,
            conflicts: count("SELECT count(*) FROM conflicts")?,
            errors: count("SELECT count(*) FROM errors")?,
            parked: count("SELECT count(*) FROM parked")?,
            completed_events: count("SELECT count(*) FROM events WHERE done = 1")?,
            claimed_events: self.claims.count() as u64,
        })
    }

    /// True when the file's queue table holds messages (a [`crate::SqliteQueue`] on this file,
    /// or an earlier version's queue): a read, for moving them elsewhere at start-up.
    pub fn has_queued_messages(&self) -> Result<bool, StoreError> {
        let conn = self.connections.read();
        conn.query_row("SELECT EXISTS (SELECT 1 FROM queue)", [], |r| r.get(0))
            .map_err(|e| self.file.unavailable("looking for queued messages", e))
    }

    /// True when `event_id` was processed to completion ([`StoreOp::CompleteEvent`]).
    pub fn event_done(&self, event_id: &str) -> Result<bool, StoreError> {
        let conn = self.connections.read();
        // Cached: every event's claim asks (compiling the statement each time cost as much as
        // the lookup).
        conn.prepare_cached("SELECT done FROM events WHERE event_id = ?1")
            .and_then(|mut stmt| stmt.query_row([event_id], |r| r.get::<_, i64>(0)))
            .optional()
            .map(|done| done == Some(1))
            .map_err(|e| self.file.unavailable("reading an idempotency record", e))
    }

    /// Forgets up to `limit` completion records written before `done_before` (the oldest
    /// first), in one transaction; returns how many. A redelivery of a forgotten event is no
    /// longer recognised by its id, but by the link: its version is not newer than the one
    /// the link holds, so it is skipped as a duplicate or stale change and nothing is written
    /// twice. Without this the records of every event ever processed would pile up.
    /// Deleted pairs remembered before `done_before` ([`StoreOp::RememberDeleted`]) are
    /// forgotten in the same transaction, up to `limit` of them too (not counted).
    pub async fn forget_completed_events(
        &self,
        done_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let (before, limit) = (done_before.timestamp_millis(), limit_to_sql(limit));
        let file = self.file.clone();
        self.write(
            "forgetting completed events".to_owned(),
            64,
            move |conn: &Connection| {
                let forgotten = conn
                    .prepare_cached(
                        "DELETE FROM events WHERE event_id IN \
                         (SELECT event_id FROM events WHERE done = 1 AND done_at_ms < ?1 \
                          ORDER BY done_at_ms LIMIT ?2)",
                    )
                    .and_then(|mut s| s.execute(params![before, limit]))
                    .map_err(|e| file.unavailable("forgetting completed events", e))?;
                // Deleted pairs are remembered as long as the events that could follow them.
                conn.prepare_cached(
                    "DELETE FROM deleted_pairs WHERE (map, key) IN \
                     (SELECT map, key FROM deleted_pairs WHERE at_ms < ?1 \
                      ORDER BY at_ms LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![before, limit]))
                .map_err(|e| file.unavailable("forgetting deleted pairs", e))?;
                Ok(forgotten)
            },
        )
        .await
    }

    /// Runs SQLite's `PRAGMA integrity_check`; [`StoreError::Corrupt`] lists what it found.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let conn = self.connections.read();
        let problems = schema::integrity_problems(&conn)
            .map_err(|e| self.file.unavailable("checking integrity", e))?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!(
                "{}: integrity check failed: {}; restore the file from a backup",
                self.file.location,
                problems.join("; ")
            )))
        }
    }

    fn list<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.connections.read();
        let bodies: Vec<String> = conn
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_map(params, |r| r.get(0))?.collect())
            .map_err(|e| self.file.unavailable(&format!("listing {what}"), e))?;
        bodies.iter().map(|b| self.file.decode(what, b)).collect()
    }

    /// Runs `op` through the group committer; a failed batch becomes
    /// [`StoreError::Unavailable`] naming the file and what was being done.
    async fn write<T, F>(&self, doing: String, bytes: usize, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.connections
            .writer
            .write(bytes, op)
            .await
            .map_err(|e: BatchError| {
                StoreError::Unavailable(format!("{}: {doing}: {e}", self.file.location))
            })?
    }
}

impl StoreFile {
    fn unavailable(&self, doing: &str, e: rusqlite::Error) -> StoreError {
        StoreError::Unavailable(format!("{}: {doing}: {e}", self.location))
    }

    fn corrupt(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(format!(
            "{}: {what} cannot be read back: {e}; it was written by another version or damaged",
            self.location
        ))
    }

    fn decode<T: DeserializeOwned>(&self, what: &str, body: &str) -> Result<T, StoreError> {
        serde_json::from_str(body).map_err(|e| self.corrupt(what, e))
    }

    fn decode_link(
        &self,
        map: &str,
        key: &str,
        revision: i64,
        body: &str,
    ) -> Result<Link, StoreError> {
        let mut link: Link = self.decode(&format!("link {map}/{key}"), body)?;
        link.revision = u64::try_from(revision)
            .map_err(|_| self.corrupt(&format!("link {map}/{key}"), "negative revision"))?;
        Ok(link)
    }

    fn encode<T: Serialize>(&self, what: &str, value: &T) -> Result<String, StoreError> {
        // Serialising these plain data types cannot fail; map it anyway rather than panic.
        serde_json::to_string(value).map_err(|e| {
            StoreError::Unavailable(format!("{}: encoding {what}: {e}", self.location))
        })
    }

    fn read_link(
        &self,
        conn: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<Link>, StoreError> {
        let row: Option<(String, String, i64, String)> = conn
            .prepare_cached(sql)
            .and_then(|mut stmt| {
                stmt.query_row(params, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .optional()
            })
            .map_err(|e| self.unavailable("reading a link", e))?;
        row.map(|(map, key, rev, body)| self.decode_link(&map, &key, rev, &body))
            .transpose()
    }

    /// Encodes the row body of `op` (empty for operations without one), and sets a put link's
    /// new revision. Runs on the caller's thread, so the writer thread only executes SQL.
    fn prepare(&self, op: StoreOp) -> Result<(StoreOp, String), StoreError> {
        match op {
            StoreOp::PutLink {
                mut link,
                expected_revision,
            } => {
                // Saturating: a wild expected revision must fail its condition, not overflow here.
                link.revision = expected_revision.saturating_add(1);
                let body = self.encode("a link", &link)?;
                let op = StoreOp::PutLink {
                    link,
                    expected_revision,
                };
                Ok((op, body))
            }
            other => {
                let body = match &other {
                    StoreOp::RecordConflict(conflict) => self.encode("a conflict", conflict)?,
                    StoreOp::RecordError(error) => self.encode("an error record", error)?,
                    StoreOp::Park(parked) => self.encode("a parked event", parked)?,
                    StoreOp::PutMapState(state) => self.encode("a map state", state)?,
                    StoreOp::PutLink { .. }
                    | StoreOp::DeleteLink { .. }
                    | StoreOp::CompleteEvent { .. }
                    | StoreOp::Unpark { .. }
                    | StoreOp::RememberDeleted { .. } => String::new(),
                };
                Ok((other, body))
            }
        }
    }

    /// Applies one operation of a commit; `body` is its row encoded by [`StoreFile::prepare`].
    fn apply(&self, tx: &Connection, op: StoreOp, body: String) -> Result<(), StoreError> {
        let fail = |e| self.unavailable("committing", e);
        match op {
            StoreOp::PutLink {
                link,
                expected_revision,
            } => {
                self.check_revision(tx, &link.map, &link.key, expected_revision)?;
                tx.prepare_cached(
                    "INSERT INTO links (map, key, crm_id, erp_id, revision, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (map, key) DO UPDATE SET crm_id = ?3, erp_id = ?4, \
                     revision = ?5, body = ?6",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        link.map.as_str(),
                        link.key.as_str(),
                        link.crm_id.as_deref(),
                        link.erp_id.as_deref(),
                        revision_to_sql(link.revision),
                        body
                    ])
                })
                .map_err(fail)?;
            }
            StoreOp::DeleteLink {
                map,
                key,
                expected_revision,
            } => {
                self.check_revision(tx, &map, &key, expected_revision)?;
                tx.execute(
                    "DELETE FROM links WHERE map = ?1 AND key = ?2",
                    params![map, key.as_str()],
                )
                .map_err(fail)?;
            }
            StoreOp::RememberDeleted { map, key, at } => {
                tx.prepare_cached(
                    "INSERT INTO deleted_pairs (map, key, at_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (map, key) DO UPDATE SET at_ms = ?3",
                )
                .and_then(|mut s| s.execute(params![map, key.as_str(), at.timestamp_millis()]))
                .map_err(fail)?;
            }
            StoreOp::CompleteEvent { event_id } => {
                tx.prepare_cached(
                    "INSERT INTO events (event_id, done, lease_until_ms, done_at_ms) \
                     VALUES (?1, 1, NULL, ?2) ON CONFLICT (event_id) DO UPDATE \
                     SET done = 1, lease_until_ms = NULL, done_at_ms = ?2",
                )
                .and_then(|mut s| s.execute(params![event_id, Utc::now().timestamp_millis()]))
                .map_err(fail)?;
            }
            StoreOp::RecordConflict(conflict) => {
                tx.execute(
                    "INSERT INTO conflicts (id, detected_at_ms, open, body) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (id) DO UPDATE SET detected_at_ms = ?2, open = ?3, body = ?4",
                    params![conflict.id, conflict.detected_at.timestamp_millis(), conflict.open, body],
                )
                .map_err(fail)?;
            }
            StoreOp::RecordError(error) => {
                tx.execute(
                    "INSERT INTO errors (at_ms, body) VALUES (?1, ?2)",
                    params![error.at.timestamp_millis(), body],
                )
                .map_err(fail)?;
            }
            StoreOp::Park(parked) => {
                tx.execute(
                    "INSERT OR REPLACE INTO parked \
                     (waiting_map, waiting_key, event_id, parked_at_ms, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        parked.waiting_map,
                        parked.waiting_key.as_str(),
                        parked.event.event_id,
                        parked.parked_at.timestamp_millis(),
                        body
                    ],
                )
                .map_err(fail)?;
            }
            StoreOp::Unpark {
                waiting_map,
                waiting_key,
                event_id,
            } => {
                tx.execute(
                    "DELETE FROM parked WHERE waiting_map = ?1 AND waiting_key = ?2 AND event_id = ?3",
                    params![waiting_map, waiting_key.as_str(), event_id],
                )
                .map_err(fail)?;
            }
            StoreOp::PutMapState(state) => {
                tx.execute(
                    "INSERT OR REPLACE INTO map_states (map, body) VALUES (?1, ?2)",
                    params![state.map, body],
                )
                .map_err(fail)?;
            }
        }
        Ok(())
    }

    /// Fails with [`StoreError::Conflict`] unless the stored revision of `map`/`key` (0 when
    /// there is no link) is `expected`.
    fn check_revision(
        &self,
        tx: &Connection,
        map: &str,
        key: &IntegrationKey,
        expected: u64,
    ) -> Result<(), StoreError> {
        let stored: Option<i64> = tx
            .prepare_cached("SELECT revision FROM links WHERE map = ?1 AND key = ?2")
            .and_then(|mut s| {
                s.query_row(params![map, key.as_str()], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.unavailable("reading a link revision", e))?;
        let stored = stored.map_or(0, |r| r.max(0) as u64);
        if stored == expected {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                map: map.to_owned(),
                key: key.to_string(),
                expected,
            })
        }
    }
}

fn revision_to_sql(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn limit_to_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl LinkStore for SqliteStore {
    async fn link(&self, map: &str, key: &IntegrationKey) -> Result<Option<Link>, StoreError> {
        let conn = self.connections.read();
        self.file.read_link(
            &conn,
            "SELECT map, key, revision, body FROM links WHERE map = ?1 AND key = ?2",
            params![map, key.as_str()],
        )
    }

    async fn deleted_at(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let conn = self.connections.read();
        let at: Option<i64> = conn
            .prepare_cached("SELECT at_ms FROM deleted_pairs WHERE map = ?1 AND key = ?2")
            .and_then(|mut s| {
                s.query_row(params![map, key.as_str()], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.file.unavailable("reading a deleted pair", e))?;
        Ok(at.and_then(DateTime::from_timestamp_millis))
    }

    async fn link_by_id(
        &self,
        map: &str,
        side: Side,
        id: &str,
    ) -> Result<Option<Link>, StoreError> {
        let sql = match side {
            Side::Crm => {
                "SELECT map, key, revision, body FROM links WHERE map = ?1 AND crm_id = ?2 \
                 ORDER BY key LIMIT 1"
            }
            Side::Erp => {
                "SELECT map, key, revision, body FROM links WHERE map = ?1 AND erp_id = ?2 \
                 ORDER BY key LIMIT 1"
            }
        };
        let conn = self.connections.read();
        self.file.read_link(&conn, sql, params![map, id])
    }

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        if ops.len() > MAX_COMMIT_OPS {
            return Err(StoreError::TooLarge {
                max: MAX_COMMIT_OPS,
                got: ops.len(),
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        let prepared = ops
            .into_iter()
            .map(|op| self.file.prepare(op))
            .collect::<Result<Vec<_>, _>>()?;
        // Rows plus a little for keys and ids: what the batch byte cap weighs.
        let bytes = prepared.iter().map(|(_, body)| body.len() + 64).sum();
        let completed: Vec<String> = prepared
            .iter()
            .filter_map(|(op, _)| match op {
                StoreOp::CompleteEvent { event_id } => Some(event_id.clone()),
                _ => None,
            })
            .collect();
        let file = self.file.clone();
        self.write("committing".to_owned(), bytes, move |conn| {
            // The group committer runs this in a savepoint: an error rolls back every operation
            // applied so far, and only them.
            for (op, body) in prepared {
                file.apply(conn, op, body)?;
            }
            Ok(())
        })
        .await?;
        // Only now, with the completion committed: a claim taken from here on reads it done.
        for event_id in completed {
            self.claims.drop_claim(&event_id);
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    /// Takes the in-memory claim first, then reads whether the event was completed: a claim
    /// racing with the holder's completion either sees the claim (in progress) or, the claim
    /// being dropped only after the completion committed, the completion.
    async fn claim_event(
        &self,
        event_id: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<EventClaim, StoreError> {
        let now_ms = now.timestamp_millis();
        if !self
            .claims
            .take(event_id, now_ms, now_ms.saturating_add(millis(lease)))
        {
            return Ok(EventClaim::InProgress);
        }
        match self.event_done(event_id) {
            Ok(false) => Ok(EventClaim::Claimed),
            Ok(true) => {
                self.claims.drop_claim(event_id);
                Ok(EventClaim::AlreadyDone)
            }
            Err(e) => {
                self.claims.drop_claim(event_id);
                Err(e)
            }
        }
    }

    async fn release_event(&self, event_id: &str) -> Result<(), StoreError> {
        self.claims.drop_claim(event_id);
        Ok(())
    }
}

#[async_trait]
impl JournalStore for SqliteStore {
    async fn map_state(&self, map: &str) -> Result<Option<MapState>, StoreError> {
        let states: Vec<MapState> = self.list(
            "map states",
            "SELECT body FROM map_states WHERE map = ?1",
            [map],
        )?;
        Ok(states.into_iter().next())
    }

    async fn map_states(&self) -> Result<Vec<MapState>, StoreError> {
        self.list("map states", "SELECT body FROM map_states ORDER BY map", [])
    }

    async fn conflict(&self, id: &str) -> Result<Option<ConflictRecord>, StoreError> {
        Ok(self
            .list(
                "a conflict",
                "SELECT body FROM conflicts WHERE id = ?1",
                [id],
            )?
            .pop())
    }

    async fn conflicts(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        self.list(
            "conflicts",
            "SELECT body FROM conflicts WHERE open = 1 OR NOT ?1 \
             ORDER BY detected_at_ms DESC, rowid DESC LIMIT ?2",
            params![open_only, limit_to_sql(limit)],
        )
    }

    async fn errors(&self, limit: usize) -> Result<Vec<ErrorRecord>, StoreError> {
        self.list(
            "error records",
            "SELECT body FROM errors ORDER BY at_ms DESC, rowid DESC LIMIT ?1",
            [limit_to_sql(limit)],
        )
    }

    async fn parked_for(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Vec<ParkedEvent>, StoreError> {
        self.list(
            "parked events",
            "SELECT body FROM parked WHERE waiting_map = ?1 AND waiting_key = ?2 \
             ORDER BY parked_at_ms, rowid",
            params![map, key.as_str()],
        )
    }

    async fn parked(&self, offset: usize, limit: usize) -> Result<Vec<ParkedEvent>, StoreError> {
        self.list(
            "parked events",
            "SELECT body FROM parked ORDER BY parked_at_ms, rowid LIMIT ?1 OFFSET ?2",
            params![
                i64::try_from(limit).unwrap_or(i64::MAX),
                i64::try_from(offset).unwrap_or(i64::MAX)
            ],
        )
    }

    async fn parked_count(&self) -> Result<u64, StoreError> {
        let conn = self.connections.read();
        conn.query_row("SELECT count(*) FROM parked", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.file.unavailable("counting parked events", e))
    }
}
