//! The writer thread: appends what callers recorded to the head segment, syncs once per batch
//! (group commit), rotates, compacts the oldest segment and deletes dead ones.
//!
//! # One batch
//!
//! Callers never touch a file. Under the queue's lock they change the index and append framed
//! records to its in-memory log; a caller that needs durability (`send`, `retry`) also leaves a
//! one-shot channel and awaits it. The writer then, in a loop:
//!
//! 1. waits (on a condition variable) until a caller waits for a sync, or
//!    [`FLUSH_BYTES`] are pending, or — when only records that need no sync are pending
//!    (`Delivered`, `Acked`) or compaction is due — [`FLUSH_INTERVAL`] has passed;
//! 2. when compaction is due, picks up to [`COMPACT_BUDGET`] bytes of the oldest segment's
//!    live items, encodes their bodies *outside* the lock, and appends `Carried` copies;
//! 3. under the lock, takes the pending bytes and the waiting callers (swapping in an empty
//!    buffer), decides which segments can go and whether the head rotates;
//! 4. outside the lock, writes the bytes with one `pwrite` (into zeros written ahead, see
//!    [`PREALLOCATE_BYTES`]), then `fdatasync`s the head if any taken caller waits, anything
//!    was carried or a segment is to be deleted; when rotating, cuts the zeros, syncs the
//!    sealed segment and creates the next; retires the dead segments (renamed, each
//!    followed by a sync of the directory; their files are removed by another thread);
//! 5. marks the synced messages deliverable and answers the callers.
//!
//! A lone `send` wakes the writer at once and is answered after one write and one sync. Under
//! load, everything appended while one sync runs forms the next batch, and syncs start at
//! most once per [`MIN_SYNC_INTERVAL`]: a fast disk would otherwise sync after every second
//! send, each `fdatasync` costing far more CPU than the bytes it makes durable. While the
//! writer writes or waits, callers keep appending to the fresh buffer.
//!
//! # Failures
//!
//! A failed write, sync, creation or deletion stops the queue for good: every waiting and
//! later caller gets [`QueueError::Unavailable`] naming the file. After a failed `fsync` the
//! kernel may have dropped the unwritten pages, so neither memory nor the file can be trusted;
//! reopening replays what is really on disk (a torn tail is cut), keeping every message whose
//! send was answered.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dualwrite_core::ports::QueueError;
use tokio::sync::oneshot;

use crate::index::{self, Homed, Index, Taken};
use crate::segment;

/// Records that need no sync (`Delivered`, `Acked`) are written at the latest this long after
/// they were appended, when no sync comes along sooner.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Batches that a caller waits for start at most this often (the first after a quiet spell
/// starts at once): the sends arriving meanwhile share the next `fdatasync`.
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_millis(1);

/// The writer does not wait for [`FLUSH_INTERVAL`] once this many bytes are pending.
pub const FLUSH_BYTES: usize = 1 << 20;

/// At most this many bytes of live items are carried out of the oldest segment per batch,
/// so that compaction never holds a batch up for more than a fraction of a millisecond.
pub const COMPACT_BUDGET: u64 = 256 << 10;

/// A caller's answer: `Ok` once everything appended before it asked is synced.
pub(crate) type SyncAnswer = oneshot::Receiver<Result<(), QueueError>>;

/// What the writer has done, for [`crate::QueueStats`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WriterCounts {
    pub(crate) batches: u64,
    pub(crate) syncs: u64,
    pub(crate) synced_callers: u64,
    pub(crate) bytes_written: u64,
    pub(crate) carried: u64,
    pub(crate) deleted_segments: u64,
}

/// Everything under the queue's lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) index: Index,
    /// Callers waiting for the next sync.
    waiters: Vec<oneshot::Sender<Result<(), QueueError>>>,
    /// Why the queue stopped, once it did.
    pub(crate) failed: Option<String>,
    /// The queue is being dropped: write what is pending, sync, stop.
    closing: bool,
    /// The writer sleeps on the condition variable (with a deadline unless `writer_idle`).
    writer_waiting: bool,
    /// The writer sleeps without a deadline: nothing was pending when it went to sleep.
    writer_idle: bool,
    pub(crate) counts: WriterCounts,
}

/// The state, its condition variable and the directory, shared by the queue and the writer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    wake: Condvar,
    pub(crate) dir: PathBuf,
}

impl Shared {
    pub(crate) fn new(index: Index, dir: PathBuf) -> Self {
        Shared {
            state: Mutex::new(State {
                index,
                waiters: Vec::new(),
                failed: None,
                closing: false,
                writer_waiting: false,
                writer_idle: false,
                counts: WriterCounts::default(),
            }),
            wake: Condvar::new(),
            dir,
        }
    }

    /// The state, locked. A panic while it was held (a bug) may have left it half-changed, so
    /// a poisoned lock stops the queue instead of being used.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>, QueueError> {
        let st = self.state.lock().map_err(|_| {
            QueueError::Unavailable(format!(
                "{}: the work queue stopped after an internal error (a panic while its index \
                 was being changed); restart dualwrite to reopen it from its files",
                self.dir.display()
            ))
        })?;
        match &st.failed {
            Some(why) => Err(QueueError::Unavailable(why.clone())),
            None => Ok(st),
        }
    }

    /// After records that need no sync were appended: wakes a writer that sleeps without a
    /// deadline (so it starts its flush timer), or any sleeping writer once enough is pending.
    pub(crate) fn nudge(&self, st: &mut State) {
        if st.writer_waiting && (st.writer_idle || st.index.unwritten() >= FLUSH_BYTES) {
            self.wake_writer(st);
        }
    }

    /// Registers a caller that waits for everything appended so far to be synced, and wakes
    /// the writer.
    pub(crate) fn wait_for_sync(&self, st: &mut State) -> SyncAnswer {
        let (tx, rx) = oneshot::channel();
        st.waiters.push(tx);
        if st.writer_waiting {
            self.wake_writer(st);
        }
        rx
    }

    fn wake_writer(&self, st: &mut State) {
        // Cleared here so that the callers arriving before the writer runs do not each make
        // the wake-up system call again.
        st.writer_waiting = false;
        st.writer_idle = false;
        self.wake.notify_one();
    }

    /// Asks the writer to write what is pending, sync and stop.
    pub(crate) fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.closing = true;
        self.wake.notify_one();
    }
}

/// The answer of a caller waiting for a sync.
pub(crate) async fn synced(answer: SyncAnswer, dir: &Path) -> Result<(), QueueError> {
    answer.await.unwrap_or_else(|_| {
        Err(QueueError::Unavailable(format!(
            "{}: the work queue's writer thread stopped before syncing; restart dualwrite",
            dir.display()
        )))
    })
}

/// The head segment grows by zeros in steps of this many bytes (or of the segment size, if
/// smaller), written ahead of the records: a record is then written into blocks the file
/// already has, and its `fdatasync` writes data only. Appending instead changes the file's size
/// at every batch, which costs a journal commit per sync: measured on the development VM
/// (ext4 on virtio), a sync of one batch took 160–270 µs and 70–150 µs of CPU appending,
/// 100–120 µs and about 50 µs overwriting zeros.
pub const PREALLOCATE_BYTES: u64 = 1 << 20;

/// The zeros written ahead, a piece at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The segment being written to.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) file: File,
    pub(crate) number: u64,
    /// Where the next record goes.
    pub(crate) end: u64,
    /// The file's length: zeros from `end` to here.
    pub(crate) len: u64,
    /// How far ahead zeros are written.
    pub(crate) step: u64,
}

impl Head {
    /// Writes `bytes` at the end of the records, first growing the file by zeros if they do
    /// not fit.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let end = self.end + bytes.len() as u64;
        if end > self.len {
            let len = end.div_ceil(self.step) * self.step;
            let mut at = self.len;
            while at < len {
                let n = (len - at).min(ZEROS.len() as u64);
                self.file.write_all_at(&ZEROS[..n as usize], at)?;
                at += n;
            }
            self.len = len;
        }
        self.file.write_all_at(bytes, self.end)?;
        self.end = end;
        Ok(())
    }

    /// Cuts the zeros written ahead and syncs everything, size included: the segment is
    /// sealed (only the newest segment may end in zeros or a torn batch).
    fn seal(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.end)?;
        self.len = self.end;
        self.file.sync_all()
    }
}

/// Marks the queue failed and answers every waiting caller if the writer thread ends by
/// panicking, so that no caller waits for ever.
struct PanicGuard<'a>(&'a Shared);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            let why = format!(
                "{}: the work queue's writer thread stopped on an internal error; restart \
                 dualwrite to reopen the queue from its files",
                self.0.dir.display()
            );
            stop(&mut st, why);
        }
    }
}

/// What one wait produced.
enum Work {
    /// Write a batch; compact first with these candidates.
    Batch(Vec<index::Candidate>),
    /// Closing and nothing left, or the queue failed: end the thread.
    Stop,
}

/// The writer thread's body; returns when the queue closes or fails.
pub(crate) fn run(shared: &Shared, mut head: Head) {
    let _guard = PanicGuard(shared);
    let mut spare = Vec::new();
    let mut last_batch: Option<Instant> = None;
    loop {
        let candidates = match wait_for_work(shared, last_batch.map(|t| t + MIN_SYNC_INTERVAL)) {
            Work::Batch(candidates) => candidates,
            Work::Stop => return,
        };
        // Bodies are encoded here, outside the lock; an item acked meanwhile is skipped by
        // `carry`.
        let encoded: Vec<(Homed, Vec<u8>)> = candidates
            .iter()
            .filter_map(|c| Some((c.item, index::event_json(&c.message).ok()?)))
            .collect();
        let (taken, waiters, carried, closing) = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let carried = if encoded.is_empty() {
                0
            } else {
                st.index.carry(&encoded)
            };
            let taken = st.index.take(std::mem::take(&mut spare));
            (taken, std::mem::take(&mut st.waiters), carried, st.closing)
        };
        let must_sync = !waiters.is_empty() || carried > 0 || closing;
        last_batch = Some(Instant::now());
        let outcome = write_batch(&shared.dir, &mut head, &taken, must_sync);
        let answer = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match &outcome {
                Ok(synced) => {
                    if *synced {
                        st.index.synced(taken.seq_end);
                        st.counts.syncs += 1;
                        st.counts.synced_callers += waiters.len() as u64;
                    }
                    st.counts.batches += 1;
                    st.counts.bytes_written += taken.bytes.len() as u64;
                    st.counts.carried += carried;
                    st.counts.deleted_segments += taken.delete.len() as u64;
                    Ok(())
                }
                Err(why) => {
                    tracing::error!(dir = %shared.dir.display(), error = %why, "work queue stopped");
                    // Callers that came after the failed batch are answered too.
                    stop(&mut st, why.clone());
                    Err(QueueError::Unavailable(why.clone()))
                }
            }
        };
        for waiter in waiters {
            let reply = match &answer {
                Ok(()) => Ok(()),
                Err(e) => Err(QueueError::Unavailable(e.to_string())),
            };
            // A caller that stopped waiting still had its records written.
            let _ = waiter.send(reply);
        }
        if answer.is_err() {
            return;
        }
        spare = taken.bytes;
    }
}

/// Stops the queue: `why` goes to every waiting caller and every later one.
fn stop(st: &mut State, why: String) {
    for waiter in st.waiters.drain(..) {
        let _ = waiter.send(Err(QueueError::Unavailable(why.clone())));
    }
    st.failed.get_or_insert(why);
}

/// Sleeps until there is a batch to write (see the module docs); a batch that callers wait
/// for does not start before `sync_due` unless the queue is closing or [`FLUSH_BYTES`] are
/// pending.
fn wait_for_work(shared: &Shared, sync_due: Option<Instant>) -> Work {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut deadline: Option<Instant> = None;
    loop {
        if shared.state.is_poisoned() {
            // A caller panicked while changing the index: it may be half-changed, and must
            // not be written out.
            stop(
                &mut st,
                format!(
                    "{}: the work queue stopped after an internal error (a panic while its \
                     index was being changed); restart dualwrite to reopen it from its files",
                    shared.dir.display()
                ),
            );
            return Work::Stop;
        }
        if st.failed.is_some() {
            return Work::Stop;
        }
        if st.closing && st.index.unwritten() == 0 && st.waiters.is_empty() {
            return Work::Stop;
        }
        let pending = st.index.unwritten() > 0 || st.index.compaction_due();
        let full = st.index.unwritten() >= FLUSH_BYTES;
        if full || st.closing {
            break;
        }
        if !st.waiters.is_empty() {
            let now = Instant::now();
            match sync_due {
                // Paced: the callers arriving meanwhile do not wake the writer
                // (`writer_waiting` stays false); closing does.
                Some(due) if now < due => {
                    st = match shared.wake.wait_timeout(st, due - now) {
                        Ok((st, _)) => st,
                        Err(e) => e.into_inner().0,
                    };
                    continue;
                }
                _ => break,
            }
        }
        if pending {
            let due = *deadline.get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
            let now = Instant::now();
            if now >= due {
                break;
            }
            st.writer_waiting = true;
            st.writer_idle = false;
            st = match shared.wake.wait_timeout(st, due - now) {
                Ok((st, _)) => st,
                Err(e) => e.into_inner().0,
            };
        } else {
            st.writer_waiting = true;
            st.writer_idle = true;
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.writer_waiting = false;
        st.writer_idle = false;
    }
    if st.closing {
        // Closing writes what is pending and stops; compaction can wait for the next run.
        return Work::Batch(Vec::new());
    }
    Work::Batch(st.index.compaction_candidates(COMPACT_BUDGET))
}

/// Writes `taken` to the head; syncs when `must_sync` or when a segment is sealed or deleted;
/// rotates; deletes. Returns whether the head was synced, or why the queue must stop.
fn write_batch(
    dir: &Path,
    head: &mut Head,
    taken: &Taken,
    must_sync: bool,
) -> Result<bool, String> {
    let head_path = segment::path(dir, head.number);
    let failed = |doing: &str, file: &Path, e: std::io::Error| {
        format!(
            "{}: {doing} {} failed: {e}; the work queue stopped taking work. Restart dualwrite: \
             reopening the queue keeps every message whose send was answered",
            dir.display(),
            file.display()
        )
    };
    if taken.segment != head.number {
        return Err(format!(
            "{}: internal error: a batch for segment {} while segment {} is open; restart \
             dualwrite",
            dir.display(),
            taken.segment,
            head.number
        ));
    }
    if !taken.bytes.is_empty() {
        head.write(&taken.bytes)
            .map_err(|e| failed("writing to", &head_path, e))?;
    }
    // Deleting a segment forgets its records: the records that made it dead (carried copies,
    // dead letters) must be on disk first. Sealing syncs too, so that only the newest segment
    // can ever have a torn tail.
    let sync = must_sync || taken.rotate_to.is_some() || !taken.delete.is_empty();
    if let Some((number, next_seq)) = taken.rotate_to {
        head.seal().map_err(|e| failed("sealing", &head_path, e))?;
        let file = segment::create(dir, number, next_seq)
            .map_err(|e| failed("creating", &segment::path(dir, number), e))?;
        *head = Head {
            file,
            number,
            end: segment::HEADER_LEN,
            len: segment::HEADER_LEN,
            step: head.step,
        };
    } else if sync {
        head.file
            .sync_data()
            .map_err(|e| failed("syncing", &head_path, e))?;
    }
    for &number in &taken.delete {
        let file = segment::path(dir, number);
        segment::retire(dir, number).map_err(|e| failed("retiring", &file, e))?;
        // Oldest first, each removal durable before the next: a segment must never come back
        // after a newer one holding the acks of its messages is gone.
        segment::sync_dir(dir).map_err(|e| failed("syncing the directory of", &file, e))?;
    }
    Ok(sync)
}
