//! [`SqliteQueue`]: the durable FIFO work queue with per-group ordering and a dead-letter table.
//!
//! Every message is a row of `queue`, numbered by an ever-growing `seq` (send order). A
//! message's state follows from two columns and the clock:
//! - `receipt` set and `visible_at` in the future: **in flight** (delivered, not yet acked);
//! - `receipt` empty and `visible_at` in the future: **delayed** by `retry`;
//! - `visible_at` now or past: **ready** (never delivered, delay over, or visibility expired).
//!
//! Only the lowest `seq` of a group (its *head*) is ever delivered, so while the head is in
//! flight or delayed the rest of its group waits, and groups are delivered in send order.
//! `ack` deletes the head; dead-lettering moves it to `dead_letters`; either lets the group move
//! on. `redrive` moves dead letters back: a new row of `queue` each (attempt 0, at the end of
//! its group), the dead letter deleted in the same transaction.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dualwrite_core::ports::{
    Clock, DeadLetter, Delivery, QueueDepth, QueueError, QueueMessage, RetryOutcome, WorkQueue,
};
use dualwrite_engine::clock::SystemClock;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::OpenError;
use crate::group_commit::{BatchError, Connections, WriterStats};

/// How a [`SqliteQueue`] behaves.
#[derive(Clone)]
pub struct QueueConfig {
    /// Deliveries after which a message is dead-lettered instead of retried (SQS
    /// `maxReceiveCount`). A delivery whose visibility timeout ran out counts as one too, so a
    /// message that keeps crashing its worker does not block its group for ever.
    pub max_attempts: u32,
    /// Where "now" comes from: [`SystemClock`] normally, a
    /// [`ManualClock`](crate::ManualClock) in tests.
    pub clock: Arc<dyn Clock>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_attempts: 5,
            clock: Arc::new(SystemClock),
        }
    }
}

impl fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConfig")
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// The work queue on SQLite. Implements [`WorkQueue`].
///
/// `send` returns only after the transaction holding its messages committed with
/// `synchronous=FULL`, so an accepted message survives a crash or power loss. The writes of
/// concurrent callers (`send`, `receive`, `ack`, `retry`) share one transaction and one fsync,
/// each in its own savepoint (see [`crate::group_commit`]); reads (`pending`, `dead_letters`,
/// `depth`) use a separate connection. Messages are not deduplicated by `dedup_id` (the engine
/// does not rely on it; the store's idempotency records make duplicates harmless).
#[derive(Debug)]
pub struct SqliteQueue {
    connections: Connections,
    config: QueueConfig,
    file: Arc<QueueFile>,
}

/// What the queue's code on either side of the writer thread needs.
#[derive(Debug)]
struct QueueFile {
    /// The file, for error messages (`:memory:` for an in-memory queue).
    location: String,
    /// [`QueueConfig::max_attempts`].
    max_attempts: u32,
    /// When expired deliveries were last moved to the dead letters (ms since the epoch).
    last_expiry_sweep_ms: AtomicI64,
}

/// How often `receive` looks for deliveries that timed out on their last attempt.
const EXPIRY_SWEEP_MS: i64 = 500;

/// One message row as read for delivery.
struct Row {
    seq: i64,
    body: String,
    attempt: i64,
}

impl SqliteQueue {
    /// Opens (creating and migrating if needed) the queue in the database file at `path`. The
    /// file may be shared with a [`crate::SqliteStore`].
    pub fn open(path: impl AsRef<Path>, config: QueueConfig) -> Result<Self, OpenError> {
        let path = path.as_ref();
        Ok(SqliteQueue {
            connections: Connections::open(Some(path))?,
            file: Arc::new(QueueFile {
                last_expiry_sweep_ms: AtomicI64::new(i64::MIN),
                location: path.display().to_string(),
                max_attempts: config.max_attempts,
            }),
            config,
        })
    }

    /// Opens the queue in the database of `store`, sharing its writer thread: the store's and
    /// the queue's writes then go into the same group-committed transactions (one fsync for
    /// both) instead of two writers taking turns at the file's write lock. This is how
    /// `dualwrite serve` opens its database.
    pub fn open_beside(store: &crate::SqliteStore, config: QueueConfig) -> Result<Self, OpenError> {
        Ok(SqliteQueue {
            connections: store.connections().beside()?,
            file: Arc::new(QueueFile {
                last_expiry_sweep_ms: AtomicI64::new(i64::MIN),
                location: store.location().to_owned(),
                max_attempts: config.max_attempts,
            }),
            config,
        })
    }

    /// A queue that lives in memory only (tests).
    pub fn open_in_memory(config: QueueConfig) -> Result<Self, OpenError> {
        Ok(SqliteQueue {
            connections: Connections::open(None)?,
            file: Arc::new(QueueFile {
                last_expiry_sweep_ms: AtomicI64::new(i64::MIN),
                location: ":memory:".to_owned(),
                max_attempts: config.max_attempts,
            }),
            config,
        })
    }

    /// How many batches (transactions) and writes the queue's writer has committed.
    pub fn writer_stats(&self) -> WriterStats {
        self.connections.writer.stats()
    }

    /// Makes every message of the queue deliverable now: deliveries still in flight (their
    /// process is gone) and delays are forgotten. For moving the table's messages elsewhere:
    /// a move interrupted by a crash otherwise leaves its messages in flight, unseen by the
    /// next move until their visibility timeout, and blocking their groups meanwhile.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] when the database cannot be written.
    pub async fn release_all(&self) -> Result<(), QueueError> {
        let file = self.file.clone();
        self.write("releasing every delivery", 0, move |conn| {
            conn.execute(
                "UPDATE queue SET receipt = NULL, visible_at_ms = 0 \
                 WHERE receipt IS NOT NULL OR visible_at_ms > 0",
                [],
            )
            .map(drop)
            .map_err(|e| file.unavailable("releasing every delivery", e))
        })
        .await
    }

    /// Every message still in the queue (ready, in flight or delayed), in send order, up to
    /// `limit`. Dead letters are not included. For status pages and checks.
    pub fn pending(&self, limit: usize) -> Result<Vec<QueueMessage>, QueueError> {
        let conn = self.connections.read();
        let bodies: Vec<String> = conn
            .prepare_cached("SELECT body FROM queue ORDER BY seq LIMIT ?1")
            .and_then(|mut s| s.query_map([limit_to_sql(limit)], |r| r.get(0))?.collect())
            .map_err(|e| self.unavailable("listing messages", e))?;
        bodies.iter().map(|b| self.decode(b)).collect()
    }

    fn now_ms(&self) -> i64 {
        self.config.clock.now().timestamp_millis()
    }

    fn unavailable(&self, doing: &str, e: rusqlite::Error) -> QueueError {
        self.file.unavailable(doing, e)
    }

    fn decode(&self, body: &str) -> Result<QueueMessage, QueueError> {
        self.file.decode(body)
    }

    /// Runs `op` through the group committer; a failed batch becomes
    /// [`QueueError::Unavailable`] naming the file and what was being done.
    async fn write<T, F>(&self, doing: &str, bytes: usize, op: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    {
        self.connections
            .writer
            .write(bytes, op)
            .await
            .map_err(|e: BatchError| {
                QueueError::Unavailable(format!("{}: {doing}: {e}", self.file.location))
            })?
    }
}

impl QueueFile {
    fn unavailable(&self, doing: &str, e: rusqlite::Error) -> QueueError {
        QueueError::Unavailable(format!("{}: {doing}: {e}", self.location))
    }

    fn decode(&self, body: &str) -> Result<QueueMessage, QueueError> {
        serde_json::from_str::<QueueMessage>(body).map_err(|e| {
            QueueError::Corrupt(format!(
                "{}: a queued message cannot be read back: {e}; it was written by another \
                 version or damaged",
                self.location
            ))
        })
    }

    /// The body of [`WorkQueue::receive`], run by the writer thread: dead-letters expired last
    /// attempts, then marks up to `max` group heads in flight until `visible_at`.
    fn receive(
        &self,
        conn: &Connection,
        now: i64,
        visible_at: i64,
        max: usize,
    ) -> Result<Vec<Delivery>, QueueError> {
        let fail = |e| self.unavailable("receiving", e);
        let max_attempts = i64::from(self.max_attempts);
        // Deliveries that timed out on their last allowed attempt go to the dead letters. The
        // check reads in-flight rows only (index `queue_in_flight`) and runs at most every
        // `EXPIRY_SWEEP_MS`; until it has run, the select below never delivers such a row again
        // (it stays at its group's head, holding the group back, for at most that long).
        let last = self.last_expiry_sweep_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= EXPIRY_SWEEP_MS || now < last {
            self.last_expiry_sweep_ms.store(now, Ordering::Relaxed);
            self.move_expired_to_dead_letters(conn, now, max_attempts)?;
        }
        let rows: Vec<Row> = conn
            .prepare_cached(
                // Walks the queue in send order and stops after `max` visible group heads; each
                // head test is one probe of `queue_by_group`. (Grouping the whole table to find
                // the heads first cost a full index scan per receive: O(queue length).)
                "SELECT q.seq, q.body, q.attempt FROM queue q \
                 WHERE q.visible_at_ms <= ?1 AND (q.receipt IS NULL OR q.attempt < ?3) \
                 AND NOT EXISTS \
                   (SELECT 1 FROM queue p WHERE p.group_id = q.group_id AND p.seq < q.seq) \
                 ORDER BY q.seq LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![now, limit_to_sql(max), max_attempts], |r| {
                    Ok(Row {
                        seq: r.get(0)?,
                        body: r.get(1)?,
                        attempt: r.get(2)?,
                    })
                })?
                .collect()
            })
            .map_err(fail)?;
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut mark = conn
            .prepare_cached(
                "UPDATE queue SET attempt = ?2, receipt = ?3, visible_at_ms = ?4 WHERE seq = ?1",
            )
            .map_err(fail)?;
        for row in rows {
            let attempt = row.attempt + 1;
            // Unique per delivery: a receipt from an earlier delivery no longer matches.
            let receipt = format!("{}.{attempt}", row.seq);
            mark.execute(params![row.seq, attempt, receipt, visible_at])
                .map_err(fail)?;
            deliveries.push(Delivery {
                receipt,
                message: self.decode(&row.body)?,
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
            });
        }
        Ok(deliveries)
    }

    /// Moves deliveries whose visibility timed out on their last allowed attempt to the dead
    /// letters.
    fn move_expired_to_dead_letters(
        &self,
        conn: &Connection,
        now: i64,
        max_attempts: i64,
    ) -> Result<(), QueueError> {
        let fail = |e| self.unavailable("receiving", e);
        conn.prepare_cached(
            "INSERT INTO dead_letters (seq, group_id, dedup_id, body, attempts, last_error, dead_at_ms) \
             SELECT seq, group_id, dedup_id, body, attempt, \
                    coalesce(last_error || '; ', '') || 'visibility timeout expired without ack', ?1 \
             FROM queue WHERE receipt IS NOT NULL AND visible_at_ms <= ?1 AND attempt >= ?2",
        )
        .and_then(|mut s| s.execute(params![now, max_attempts]))
        .map_err(fail)?;
        conn.prepare_cached(
            "DELETE FROM queue WHERE receipt IS NOT NULL AND visible_at_ms <= ?1 AND attempt >= ?2",
        )
        .and_then(|mut s| s.execute(params![now, max_attempts]))
        .map_err(fail)?;
        Ok(())
    }

    /// The body of [`WorkQueue::retry`], run by the writer thread.
    fn retry(
        &self,
        conn: &Connection,
        seq: i64,
        receipt: &str,
        now: i64,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        let fail = |e| self.unavailable("retrying", e);
        let attempt: Option<i64> = conn
            .prepare_cached("SELECT attempt FROM queue WHERE seq = ?1 AND receipt = ?2")
            .and_then(|mut s| s.query_row(params![seq, receipt], |r| r.get(0)).optional())
            .map_err(fail)?;
        let Some(attempt) = attempt else {
            return Err(QueueError::UnknownReceipt(receipt.to_owned()));
        };
        if attempt >= i64::from(self.max_attempts) {
            conn.execute(
                "INSERT INTO dead_letters (seq, group_id, dedup_id, body, attempts, last_error, dead_at_ms) \
                 SELECT seq, group_id, dedup_id, body, attempt, ?2, ?3 FROM queue WHERE seq = ?1",
                params![seq, error, now],
            )
            .map_err(fail)?;
            conn.execute("DELETE FROM queue WHERE seq = ?1", [seq])
                .map_err(fail)?;
            Ok(RetryOutcome::DeadLettered)
        } else {
            conn.prepare_cached(
                "UPDATE queue SET receipt = NULL, visible_at_ms = ?2, last_error = ?3 WHERE seq = ?1",
            )
            .and_then(|mut s| s.execute(params![seq, now.saturating_add(millis(delay)), error]))
            .map_err(fail)?;
            Ok(RetryOutcome::Requeued)
        }
    }
}

/// The message sequence a receipt (`<seq>.<attempt>`) names; whether the receipt is still the
/// current one is checked against the row.
fn parse_receipt(receipt: &str) -> Option<i64> {
    receipt
        .split_once('.')
        .and_then(|(seq, _)| seq.parse().ok())
}

fn limit_to_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl WorkQueue for SqliteQueue {
    async fn send(&self, messages: Vec<QueueMessage>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        // Encoded here, on the caller's thread; the writer thread only executes SQL.
        let rows = messages
            .into_iter()
            .map(|m| {
                let body = serde_json::to_string(&m).map_err(|e| {
                    QueueError::Unavailable(format!(
                        "{}: encoding a message: {e}",
                        self.file.location
                    ))
                })?;
                Ok((m.group_id, m.dedup_id, body))
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        let bytes = rows
            .iter()
            .map(|(g, d, b)| g.len() + d.len() + b.len())
            .sum();
        let file = self.file.clone();
        // Answered only after the batch holding these rows committed with synchronous=FULL (the
        // WAL was fsynced): once this returns Ok, the send is durable.
        self.write("sending", bytes, move |conn| {
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO queue (group_id, dedup_id, body, sent_at_ms) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| file.unavailable("sending", e))?;
            for (group_id, dedup_id, body) in rows {
                insert
                    .execute(params![group_id, dedup_id, body, now])
                    .map_err(|e| file.unavailable("sending", e))?;
            }
            Ok(())
        })
        .await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let now = self.now_ms();
        let visible_at = now.saturating_add(millis(visibility));
        let file = self.file.clone();
        self.write("receiving", 64, move |conn| {
            file.receive(conn, now, visible_at, max)
        })
        .await
    }

    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        let seq =
            parse_receipt(receipt).ok_or_else(|| QueueError::UnknownReceipt(receipt.to_owned()))?;
        let file = self.file.clone();
        let receipt = receipt.to_owned();
        self.write("acking", receipt.len(), move |conn| {
            // A receipt stays valid until the message is delivered again, even past its
            // visibility timeout (as on SQS): acking then is still correct, the work was done.
            let deleted = conn
                .prepare_cached("DELETE FROM queue WHERE seq = ?1 AND receipt = ?2")
                .and_then(|mut s| s.execute(params![seq, receipt]))
                .map_err(|e| file.unavailable("acking", e))?;
            if deleted == 1 {
                Ok(())
            } else {
                Err(QueueError::UnknownReceipt(receipt))
            }
        })
        .await
    }

    async fn retry(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        let seq =
            parse_receipt(receipt).ok_or_else(|| QueueError::UnknownReceipt(receipt.to_owned()))?;
        let now = self.now_ms();
        let file = self.file.clone();
        let (receipt, error) = (receipt.to_owned(), error.to_owned());
        let bytes = receipt.len() + error.len();
        self.write("retrying", bytes, move |conn| {
            file.retry(conn, seq, &receipt, now, delay, &error)
        })
        .await
    }

    /// Dead letters, oldest first (the order they died in).
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let conn = self.connections.read();
        let rows: Vec<(String, i64, String)> = conn
            .prepare_cached(
                "SELECT body, attempts, last_error FROM dead_letters \
                 ORDER BY dead_at_ms, rowid LIMIT ?1",
            )
            .and_then(|mut s| {
                s.query_map([limit_to_sql(limit)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(|e| self.unavailable("listing dead letters", e))?;
        rows.into_iter()
            .map(|(body, attempts, last_error)| {
                Ok(DeadLetter {
                    message: self.decode(&body)?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    last_error,
                })
            })
            .collect()
    }

    /// Counts by state. `ready` counts every message that is neither in flight nor delayed,
    /// including those waiting behind an earlier message of their group.
    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = self.now_ms();
        let conn = self.connections.read();
        let fail = |e| self.unavailable("counting", e);
        let (ready, in_flight, delayed): (i64, i64, i64) = conn
            .query_row(
                "SELECT \
                   coalesce(sum(visible_at_ms <= ?1), 0), \
                   coalesce(sum(visible_at_ms > ?1 AND receipt IS NOT NULL), 0), \
                   coalesce(sum(visible_at_ms > ?1 AND receipt IS NULL), 0) \
                 FROM queue",
                [now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(fail)?;
        let dead: i64 = conn
            .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))
            .map_err(fail)?;
        Ok(QueueDepth {
            ready: ready as u64,
            in_flight: in_flight as u64,
            delayed: delayed as u64,
            dead: dead as u64,
        })
    }

    /// One write of the group committer (a savepoint of its transaction, committed with
    /// `synchronous=FULL` before this returns): the dead letters are inserted into `queue` as
    /// new rows and deleted from `dead_letters` together, so a crash leaves either both or
    /// neither — stronger than the port asks.
    async fn redrive(&self, limit: usize) -> Result<u64, QueueError> {
        if limit == 0 {
            return Ok(0);
        }
        let now = self.now_ms();
        let file = self.file.clone();
        self.write("redriving dead letters", 64, move |conn| {
            let fail = |e| file.unavailable("redriving dead letters", e);
            let seqs: Vec<i64> = conn
                .prepare_cached("SELECT seq FROM dead_letters ORDER BY dead_at_ms, rowid LIMIT ?1")
                .and_then(|mut s| s.query_map([limit_to_sql(limit)], |r| r.get(0))?.collect())
                .map_err(fail)?;
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO queue (group_id, dedup_id, body, sent_at_ms) \
                     SELECT group_id, dedup_id, body, ?2 FROM dead_letters WHERE seq = ?1",
                )
                .map_err(fail)?;
            let mut delete = conn
                .prepare_cached("DELETE FROM dead_letters WHERE seq = ?1")
                .map_err(fail)?;
            for &seq in &seqs {
                insert.execute(params![seq, now]).map_err(fail)?;
                delete.execute([seq]).map_err(fail)?;
            }
            Ok(seqs.len() as u64)
        })
        .await
    }
}
