//! [`LogQueue`]: the work queue on append-only segment files, implementing [`WorkQueue`].

use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use dualwrite_core::ports::{
    Clock, DeadLetter, Delivery, QueueDepth, QueueError, QueueMessage, RetryOutcome, WorkQueue,
};
use dualwrite_engine::clock::SystemClock;

use crate::error::OpenError;
use crate::index::{self, Index};
use crate::record::{self, MAX_PAYLOAD};
use crate::segment::{self, LOCK_FILE};
use crate::writer::{self, Head, Shared};

/// The default [`QueueConfig::segment_bytes`]: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// How a [`LogQueue`] behaves.
#[derive(Clone)]
pub struct QueueConfig {
    /// Deliveries after which a message is dead-lettered instead of retried (SQS
    /// `maxReceiveCount`). A delivery whose visibility timeout ran out counts as one too, so a
    /// message that keeps crashing its worker does not block its group for ever.
    pub max_attempts: u32,
    /// Where "now" comes from: [`SystemClock`] normally, a
    /// [`ManualClock`](dualwrite_engine::clock::ManualClock) in tests.
    pub clock: Arc<dyn Clock>,
    /// The head segment is sealed and a new one started once it holds this many bytes
    /// (a batch is never split, so a segment may end a little past it). Smaller segments are
    /// reclaimed sooner; tests use a few KiB to exercise rotation and compaction.
    pub segment_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_attempts: 5,
            clock: Arc::new(SystemClock),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

impl fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConfig")
            .field("max_attempts", &self.max_attempts)
            .field("segment_bytes", &self.segment_bytes)
            .finish_non_exhaustive()
    }
}

/// What the queue holds and what its writer has done, for status pages, tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Batches written (one `write` each).
    pub batches: u64,
    /// Syncs (`fdatasync`) of the head segment: one per batch that a caller waited for.
    pub syncs: u64,
    /// Callers (`send`, `retry`, `sync`) answered after a sync. `synced_callers / syncs` is the
    /// average group-commit size.
    pub synced_callers: u64,
    /// Bytes written to segments.
    pub bytes_written: u64,
    /// Live items compaction copied out of old segments.
    pub carried: u64,
    /// Segments deleted since the queue was opened.
    pub deleted_segments: u64,
    /// Segment files now.
    pub segments: u64,
    /// Bytes of all segments (including what is appended but not written yet).
    pub log_bytes: u64,
    /// Bytes of the records that live messages and dead letters still need.
    pub live_bytes: u64,
    /// Messages not acked or dead-lettered.
    pub messages: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

/// The durable work queue on segment files. Implements [`WorkQueue`].
///
/// `send`, `retry` and `redrive` return once their records are synced to disk (group commit:
/// one `fdatasync` for every caller that arrived meanwhile); a message is delivered only once
/// its send is synced. `receive` and `ack` change memory at once and append records that are
/// written with the next batch without waiting for it (see the crate docs for what a crash
/// can cost). One process at a time: opening takes an exclusive lock on `<dir>/LOCK`.
///
/// Messages are not deduplicated by `dedup_id` (the engine does not rely on it; the store's
/// idempotency records make duplicates harmless). Receipts are `<seq>.<attempt>`.
pub struct LogQueue {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    writer: Option<JoinHandle<()>>,
    /// Holds the directory's lock until the queue is dropped (after the writer has stopped).
    _lock: File,
}

impl fmt::Debug for LogQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogQueue")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl LogQueue {
    /// Opens the queue in directory `dir`, creating it if needed: takes its lock, replays its
    /// segments (cutting a torn tail of the newest one) and starts the writer thread.
    /// Messages that were in flight when the previous run ended are deliverable at once.
    pub fn open(dir: impl AsRef<Path>, config: QueueConfig) -> Result<Self, OpenError> {
        let dir = dir.as_ref().to_path_buf();
        create_dir(&dir)?;
        let lock = take_lock(&dir)?;
        let mut index = Index::new(config.max_attempts.max(1), config.segment_bytes.max(1));
        let head = replay(&dir, &mut index)?;
        let head_path = segment::path(&dir, head.number);
        let file = OpenOptions::new()
            .write(true)
            .open(&head_path)
            .map_err(|source| OpenError::Io {
                path: head_path.clone(),
                doing: "opening the newest segment",
                source,
            })?;
        // What replay read of the newest segment may be in the page cache only (a process
        // killed before its batch's fdatasync): made durable before any of it is handed out,
        // or a power loss after a delivery and its processing could un-send the message.
        // Older segments were synced when they were sealed.
        file.sync_data().map_err(|source| OpenError::Io {
            path: head_path,
            doing: "syncing the newest segment",
            source,
        })?;
        let counts = index.counts();
        tracing::info!(
            dir = %dir.display(),
            segments = counts.segments,
            messages = counts.messages,
            dead_letters = counts.dead,
            "work queue opened"
        );
        let shared = Arc::new(Shared::new(index, dir.clone()));
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new()
            // Cut to 15 bytes by the kernel: short, for `top -H` and `bench live`'s CPU figures.
            .name("logq-writer".to_owned())
            .spawn(move || {
                writer::run(
                    &thread_shared,
                    Head {
                        file,
                        number: head.number,
                        end: head.end,
                        len: head.len,
                        step: config
                            .segment_bytes
                            .clamp(4 << 10, writer::PREALLOCATE_BYTES),
                    },
                );
            })
            .map_err(|source| OpenError::WriterThread {
                dir: dir.clone(),
                source,
            })?;
        Ok(LogQueue {
            shared,
            clock: config.clock,
            writer: Some(writer),
            _lock: lock,
        })
    }

    /// The queue's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Every message still in the queue (ready, in flight, delayed or waiting), in send order,
    /// up to `limit`. Dead letters are not included. For status pages and checks.
    pub fn pending(&self, limit: usize) -> Result<Vec<QueueMessage>, QueueError> {
        let messages = self.shared.lock()?.index.pending(limit);
        Ok(messages.iter().map(|m| QueueMessage::clone(m)).collect())
    }

    /// Waits until every record appended so far (deliveries and acks included) is synced,
    /// and the segments that were dead by then are deleted.
    pub async fn sync(&self) -> Result<(), QueueError> {
        let answer = {
            let mut st = self.shared.lock()?;
            self.shared.wait_for_sync(&mut st)
        };
        writer::synced(answer, &self.shared.dir).await
    }

    /// Counters of the queue and its writer.
    pub fn stats(&self) -> QueueStats {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let (c, w) = (st.index.counts(), st.counts);
        QueueStats {
            batches: w.batches,
            syncs: w.syncs,
            synced_callers: w.synced_callers,
            bytes_written: w.bytes_written,
            carried: w.carried,
            deleted_segments: w.deleted_segments,
            segments: c.segments as u64,
            log_bytes: c.log_bytes,
            live_bytes: c.live_bytes,
            messages: c.messages as u64,
            dead_letters: c.dead as u64,
        }
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().timestamp_millis()
    }

    fn parse(receipt: &str) -> Result<(u64, u32), QueueError> {
        index::parse_receipt(receipt).ok_or_else(|| QueueError::UnknownReceipt(receipt.to_owned()))
    }
}

impl Drop for LogQueue {
    /// Writes and syncs what is pending (deliveries and acks too), then stops the writer; the
    /// directory's lock is released after.
    fn drop(&mut self) {
        self.shared.close();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Creates the queue directory if needed, and makes its entry in the parent durable: a
/// power loss right after the first accepted send must not lose the directory itself.
fn create_dir(dir: &Path) -> Result<(), OpenError> {
    let io = |path: &Path, doing, source| OpenError::Io {
        path: path.to_path_buf(),
        doing,
        source,
    };
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "creating the queue directory", e))?;
    }
    // The directory's entry in its parent is synced at every open, not only at its creation:
    // a run that died between creating it and syncing its parent left an entry a power loss
    // could still take away, with every message accepted into the directory since.
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    segment::sync_dir(parent).map_err(|e| io(parent, "syncing the directory holding", e))
}

/// Where the newest segment's records end, as replay found it.
struct HeadAt {
    number: u64,
    end: u64,
    len: u64,
}

/// Replays every segment of `dir` into `index`, oldest first (creating the first segment of a
/// new queue); returns the newest segment, where writing goes on. A newest segment of an older
/// format is sealed and a new one started, so that records of kinds its format does not know
/// are never appended to it (see [`segment`]).
fn replay(dir: &Path, index: &mut Index) -> Result<HeadAt, OpenError> {
    let mut numbers = segment::list(dir)?;
    if numbers.is_empty() {
        drop(segment::create(dir, 0, 1).map_err(|source| OpenError::Io {
            path: segment::path(dir, 0),
            doing: "creating the first segment",
            source,
        })?);
        numbers.push(0);
    }
    let mut lengths = Vec::with_capacity(numbers.len());
    let mut header_next_seq = 1;
    let mut head_version = segment::FORMAT_VERSION;
    let mut head = HeadAt {
        number: 0,
        end: segment::HEADER_LEN,
        len: segment::HEADER_LEN,
    };
    for (i, &number) in numbers.iter().enumerate() {
        let last = i + 1 == numbers.len();
        let read = segment::read(dir, number, last)?;
        for &(start, end) in &read.payloads {
            let decoded = record::decode(&read.data[start..end]).and_then(|r| {
                let frame = (end - start + record::FRAME_HEADER) as u64;
                index.replay(r, number, frame)
            });
            if let Err(e) = decoded {
                return Err(segment::damaged(
                    &segment::path(dir, number),
                    (start - record::FRAME_HEADER) as u64,
                    &format!("a record that passed its checksum but cannot be read ({e})"),
                ));
            }
        }
        lengths.push((number, read.end));
        header_next_seq = read.next_seq;
        head_version = read.version;
        head = HeadAt {
            number,
            end: read.end,
            len: read.len,
        };
    }
    if head_version < segment::FORMAT_VERSION {
        let io = |number, doing, source| OpenError::Io {
            path: segment::path(dir, number),
            doing,
            source,
        };
        segment::seal(dir, head.number, head.end).map_err(|e| {
            io(
                head.number,
                "sealing the newest segment (of an older format)",
                e,
            )
        })?;
        let number = head.number + 1;
        let next_seq = index.next_seq().max(header_next_seq);
        drop(
            segment::create(dir, number, next_seq)
                .map_err(|e| io(number, "creating a segment of the current format", e))?,
        );
        tracing::info!(
            dir = %dir.display(),
            sealed = head.number,
            from_version = head_version,
            to_version = segment::FORMAT_VERSION,
            "the newest queue segment has an older format: sealed, new records go to a new segment"
        );
        lengths.push((number, segment::HEADER_LEN));
        header_next_seq = next_seq;
        head = HeadAt {
            number,
            end: segment::HEADER_LEN,
            len: segment::HEADER_LEN,
        };
    }
    index.finish_replay(&lengths, header_next_seq);
    Ok(head)
}

/// How long opening waits for the directory's lock before reporting it held.
///
/// The lock (`flock`) belongs to the lock file's open file description. While this process
/// forks a child (any `Command::spawn`), the child shares that description until it `exec`s
/// and closes it, a few milliseconds: a queue closed and reopened in that instant would find
/// its own old lock still held. A lock held by another dualwrite process is held for longer
/// than this.
const LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// Takes the exclusive lock of `dir`, or says who holds it.
fn take_lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let io = |doing, source| OpenError::Io {
        path: path.clone(),
        doing,
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("opening the lock file", e))?;
    let give_up = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io("locking the lock file", e)),
        }
    }
}

thread_local! {
    /// Where `send` encodes its messages' events before copying them into the log.
    static ENCODED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(ENCODED_KEPT));
}

/// [`ENCODED`] keeps at most this much memory between sends.
const ENCODED_KEPT: usize = 64 << 10;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The largest message (event JSON, group and dedup ids) and `retry` error the queue takes:
/// together, with every record's few fixed fields, they fit in one record ([`MAX_PAYLOAD`]).
const MAX_MESSAGE_BYTES: usize = MAX_PAYLOAD / 2;
const MAX_ERROR_BYTES: usize = MAX_PAYLOAD / 4;

/// A message or error too large for one record.
fn too_large(dir: &Path, bytes: usize) -> QueueError {
    QueueError::Unavailable(format!(
        "{}: {bytes} bytes are more than a queue record may hold ({MAX_PAYLOAD} bytes for a \
         message and its last error); nothing was queued",
        dir.display()
    ))
}

#[async_trait]
impl WorkQueue for LogQueue {
    async fn send(&self, messages: Vec<QueueMessage>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let answer = ENCODED.with_borrow_mut(|buf| {
            // Encoded here, on the caller's thread and outside the lock, into a buffer the
            // thread keeps (a fresh `Vec` per message grew from 128 bytes in six steps).
            buf.clear();
            let mut ends = Vec::with_capacity(messages.len());
            for m in &messages {
                let start = buf.len();
                serde_json::to_writer(&mut *buf, &m.event).map_err(|e| {
                    QueueError::Unavailable(format!("encoding a message's event: {e}"))
                })?;
                let bytes = buf.len() - start + m.group_id.len() + m.dedup_id.len();
                if bytes > MAX_MESSAGE_BYTES {
                    return Err(too_large(&self.shared.dir, bytes));
                }
                ends.push(buf.len());
            }
            let answer = {
                let mut st = self.shared.lock()?;
                let mut start = 0;
                for (message, end) in messages.into_iter().zip(ends) {
                    st.index.send(message, &buf[start..end]);
                    start = end;
                }
                self.shared.wait_for_sync(&mut st)
            };
            if buf.capacity() > ENCODED_KEPT {
                *buf = Vec::with_capacity(ENCODED_KEPT);
            }
            Ok(answer)
        })?;
        // Answered once the batch holding these records was synced: an `Ok` is durable.
        writer::synced(answer, &self.shared.dir).await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let now = self.now_ms();
        let until = now.saturating_add(millis(visibility));
        let handouts = {
            let mut st = self.shared.lock()?;
            let handouts = st.index.receive(now, until, max)?;
            if !handouts.is_empty() {
                self.shared.nudge(&mut st);
            }
            handouts
        };
        // Copied out of the index's `Arc`s after the lock is released.
        Ok(handouts
            .into_iter()
            .map(|h| Delivery {
                receipt: h.receipt,
                message: QueueMessage::clone(&h.message),
                attempt: h.attempt,
            })
            .collect())
    }

    /// Acks a delivery. Its `Acked` record is written with the next batch, without waiting for
    /// a sync: should the machine lose power first, the message is delivered again after the
    /// restart, which the engine's idempotency records make harmless.
    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        let (seq, attempt) = Self::parse(receipt)?;
        let (acked, answer) = {
            let mut st = self.shared.lock()?;
            let acked = st.index.ack(seq, attempt)?;
            // The ack of a last attempt is waited for: lost in a crash, the restart would take
            // the delivery for one that never reported back and dead-letter a message whose
            // work was done. Other acks go out with the next batch (a lost one redelivers).
            let answer = if st.index.is_last_attempt(attempt) {
                Some(self.shared.wait_for_sync(&mut st))
            } else {
                self.shared.nudge(&mut st);
                None
            };
            (acked, answer)
        };
        // The message is freed here, after the lock is released.
        drop(acked);
        if let Some(answer) = answer {
            writer::synced(answer, &self.shared.dir).await?;
        }
        Ok(())
    }

    /// Returns once the `Retried` (or `DeadLettered`) record is synced, so the delay and the
    /// attempt count, or the dead letter, survive a crash.
    async fn retry(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        let (seq, attempt) = Self::parse(receipt)?;
        if error.len() > MAX_ERROR_BYTES {
            return Err(too_large(&self.shared.dir, error.len()));
        }
        let visible_at = self.now_ms().saturating_add(millis(delay));
        let (outcome, answer) = {
            let mut st = self.shared.lock()?;
            let outcome = st.index.retry(seq, attempt, visible_at, error)?;
            (outcome, self.shared.wait_for_sync(&mut st))
        };
        writer::synced(answer, &self.shared.dir).await?;
        Ok(outcome)
    }

    /// Dead letters, oldest first (the order they died in).
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let dead = self.shared.lock()?.index.dead_letters(limit);
        Ok(dead
            .into_iter()
            .map(|d| DeadLetter {
                message: QueueMessage::clone(&d.message),
                attempts: d.attempts,
                last_error: d.last_error,
            })
            .collect())
    }

    /// Counts by state. `ready` counts every message that is neither in flight nor delayed,
    /// including those waiting behind an earlier message of their group.
    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = self.now_ms();
        Ok(self.shared.lock()?.index.depth(now))
    }

    /// Each dead letter moved gets a `Sent` record (a new seq, at the end of its group) and
    /// right after it, in the same batch, a `Redriven` record ending the dead letter. Returns
    /// once that batch is synced. A torn batch keeps a prefix of it: at worst a message whose
    /// `Sent` survived and whose `Redriven` did not, queued and still dead (see the port).
    async fn redrive(&self, limit: usize) -> Result<u64, QueueError> {
        if limit == 0 {
            return Ok(0);
        }
        let candidates = self.shared.lock()?.index.redrive_candidates(limit);
        if candidates.is_empty() {
            return Ok(0);
        }
        // Encoded outside the lock, as `send` does; a dead letter another redrive took
        // meanwhile is skipped by `Index::redrive`.
        let encoded = candidates
            .iter()
            .map(|(death, message)| Ok((*death, index::event_json(message)?)))
            .collect::<Result<Vec<_>, QueueError>>()?;
        let (moved, answer) = {
            let mut st = self.shared.lock()?;
            let moved = encoded
                .iter()
                .filter(|(death, event_json)| st.index.redrive(*death, event_json))
                .count() as u64;
            (moved, self.shared.wait_for_sync(&mut st))
        };
        writer::synced(answer, &self.shared.dir).await?;
        Ok(moved)
    }
}
