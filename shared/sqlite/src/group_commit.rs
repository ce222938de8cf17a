//! Group commit: one writer thread applies concurrent callers' writes in one SQLite transaction
//! per batch, so a burst of N writes costs one fsync instead of N.
//!
//! # How a write travels
//!
//! A caller hands its write (a closure over the connection) to [`GroupCommitter::write`], which
//! queues it on a channel and awaits the answer. The writer thread — the only user of the write
//! connection — takes the first queued write, then everything else already queued (up to
//! [`MAX_BATCH_WRITES`] writes or [`MAX_BATCH_BYTES`]), and applies them in order in one
//! `BEGIN IMMEDIATE` … `COMMIT`. There is no artificial delay: at low load a batch holds one
//! write and commits at once; under load the writes that arrive during one commit's fsync form
//! the next batch.
//!
//! # What each caller is promised
//!
//! - **Own atomicity.** Each write runs inside its own `SAVEPOINT`. A write that fails (a
//!   revision condition, an unknown receipt, any SQLite error) is rolled back to its savepoint
//!   and its error goes to its caller alone; the other writes of the batch are unaffected.
//! - **Durable before answered.** Every caller is answered only after the batch's `COMMIT`
//!   returned (`synchronous=FULL`: the WAL is fsynced). An `Ok` is never sent for a write that is
//!   not on disk.
//! - **All or none per batch on failure.** If `BEGIN` or `COMMIT` fails, or SQLite rolls the
//!   whole transaction back on its own (disk full, I/O error), every caller of the batch gets a
//!   [`BatchError`] and none of the batch's writes is applied.
//! - **Order.** Writes are applied in the order they were queued, so a caller that waits for its
//!   write before sending the next one sees them applied in that order.
//!
//! A caller that stops waiting (its future is dropped) does not withdraw its write: once queued,
//! it is applied, only nobody hears the answer. The callers in this crate tolerate that (a send
//! is at-least-once; a receive whose answer is lost is redelivered after its visibility timeout).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::OpenError;
use crate::schema;

/// The most writes one batch (one transaction) holds.
pub const MAX_BATCH_WRITES: usize = 512;

/// A batch closes once the writes in it carry this many bytes of payload (message and record
/// bodies), so one transaction does not grow without bound under a flood of large writes.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Under load, a batch starts at least this long after the previous one started: the writes
/// that arrive meanwhile join it. Fewer, larger transactions write each shared page (index and
/// interior pages, the freelist, a table's last leaf) once per batch instead of once per small
/// batch, and fsync less often. A write arriving after a quiet period is committed at once, so
/// this adds latency only under load, at most this much per write.
pub const MIN_BATCH_INTERVAL: Duration = Duration::from_millis(1);

/// When the WAL holds this many frames (pages), the writer finishes the background
/// checkpoint itself between two batches, so that the next transaction starts the WAL over
/// from its beginning. Without it the WAL never restarts under continuous writes (a passive
/// checkpoint can never catch up with a writer that keeps appending) and grows without bound:
/// every commit then extends the file, which the file system zero-fills, and the WAL index
/// grows with it.
pub const WAL_RESTART_FRAMES: u64 = 4_096;

/// Why a write was not applied although it did nothing wrong itself: its batch failed as a
/// whole. Retrying later is the remedy; none of the batch's writes reached the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// `BEGIN IMMEDIATE` failed (usually: another process held the write lock past the busy
    /// timeout).
    #[error("starting the batch transaction failed: {0}; none of its writes was applied")]
    Begin(String),
    /// `COMMIT` failed (disk full, I/O error, a deferred constraint).
    #[error("committing the batch failed: {0}; none of its writes was applied")]
    Commit(String),
    /// SQLite rolled the whole transaction back by itself after a failed statement (it does so
    /// on disk-full and I/O errors), or a savepoint could not be opened or closed.
    #[error("the batch transaction was rolled back: {0}; none of its writes was applied")]
    RolledBack(String),
    /// The writer thread is gone (it panicked); the store or queue must be reopened.
    #[error("the database writer thread has stopped; restart dualwrite")]
    WriterStopped,
}

/// How much the writer has done, for status pages and to see group commit at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions committed (batches).
    pub batches: u64,
    /// Writes answered from committed batches, successful or not. `writes / batches` is the
    /// average batch size.
    pub writes: u64,
}

/// The counters behind [`WriterStats`], shared with the writer thread.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    writes: AtomicU64,
    /// Frames in the WAL as the checkpointer last saw them (0 when unknown).
    wal_frames: AtomicU64,
}

/// One queued write, with its closure, its result once applied and its reply channel.
trait PendingWrite: Send {
    /// Payload bytes, for the batch size cap.
    fn bytes(&self) -> usize;
    /// Runs the write on `conn` (inside the caller's savepoint) and keeps its result; true when
    /// it succeeded.
    fn apply(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: its own result if the batch committed, else the batch's error.
    fn answer(self: Box<Self>, batch: Result<(), BatchError>);
}

/// What a caller receives: the batch's failure, or its own write's result.
type Answer<T, E> = Result<Result<T, E>, BatchError>;

struct Write<T, E, F> {
    op: Option<F>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Answer<T, E>>,
    bytes: usize,
}

impl<T, E, F> PendingWrite for Write<T, E, F>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
{
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn apply(&mut self, conn: &Connection) -> bool {
        let Some(op) = self.op.take() else {
            return self.result.as_ref().is_some_and(Result::is_ok);
        };
        let result = op(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, batch: Result<(), BatchError>) {
        let answer = match (batch, self.result) {
            (Ok(()), Some(result)) => Ok(result),
            (Ok(()), None) => Err(BatchError::RolledBack(
                "the write was never applied".to_owned(),
            )),
            (Err(e), _) => Err(e),
        };
        // The caller may have stopped waiting; its write stands (see the module docs).
        let _ = self.reply.send(answer);
    }
}

/// The writer thread and the channel feeding it. Dropping it lets the thread finish the writes
/// already queued, then joins it (closing the write connection), then stops the checkpointer.
pub(crate) struct GroupCommitter {
    sender: Option<mpsc::Sender<Box<dyn PendingWrite>>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    checkpointer: Option<Checkpointer>,
}

impl fmt::Debug for GroupCommitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupCommitter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl GroupCommitter {
    /// Starts the writer thread on `conn` (locked per batch; the mutex is shared only when the
    /// readers use the same connection, as an in-memory database must).
    pub(crate) fn start(conn: Arc<Mutex<Connection>>) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Box<dyn PendingWrite>>();
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            // Thread names are cut to 15 bytes by the kernel: short and distinct, for `top -H`
            // and the CPU figures of `dualwrite bench live`.
            .name("sqlite-writer".to_owned())
            .spawn(move || run_writer(&conn, &receiver, &thread_counters))?;
        Ok(GroupCommitter {
            sender: Some(sender),
            thread: Some(thread),
            counters,
            checkpointer: None,
        })
    }

    /// Like [`GroupCommitter::start`], for the database file at `path`: the writer no longer
    /// checkpoints the WAL itself (SQLite's automatic checkpoint runs in the committing
    /// connection, so every few thousand pages one batch waited for the pages to be copied
    /// and the database fsynced); a checkpointer thread with its own connection does it in
    /// the background (`PASSIVE`: it never takes the write lock, so commits go on meanwhile).
    /// Durability is unchanged: every commit is fsynced in the WAL before it is answered.
    pub(crate) fn start_on_file(
        conn: Arc<Mutex<Connection>>,
        path: &Path,
        location: &str,
    ) -> Result<Self, OpenError> {
        let sqlite_err = |source| OpenError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        lock(&conn)
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sqlite_err)?;
        let checkpoint_conn = schema::open_connection(Some(path))?;
        let thread_err = |source| OpenError::WriterThread {
            path: location.into(),
            source,
        };
        let mut committer = Self::start(conn).map_err(thread_err)?;
        committer.checkpointer = Some(
            Checkpointer::start(checkpoint_conn, committer.counters.clone()).map_err(thread_err)?,
        );
        Ok(committer)
    }

    /// Queues `op` and returns the channel its answer arrives on. `bytes` is the payload size
    /// for the batch cap. Queued synchronously, so writes submitted one after another from one
    /// thread are applied in that order.
    fn submit<T, E, F>(&self, bytes: usize, op: F) -> oneshot::Receiver<Answer<T, E>>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let write = Box::new(Write {
            op: Some(op),
            result: None,
            reply,
            bytes,
        });
        if let Some(sender) = &self.sender {
            // A send error means the thread is gone: the write (and its reply sender) is dropped,
            // so the receiver reports a closed channel, which `write` maps to WriterStopped.
            let _ = sender.send(write);
        }
        answer
    }

    /// Applies `op` in the next batch and returns, once that batch committed, `op`'s own result
    /// (`Ok(Ok(_))` or `Ok(Err(_))`), or the batch's failure.
    pub(crate) async fn write<T, E, F>(&self, bytes: usize, op: F) -> Answer<T, E>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        self.submit(bytes, op)
            .await
            .unwrap_or(Err(BatchError::WriterStopped))
    }

    /// Batches and writes so far.
    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop after the writes already queued.
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Then the checkpointer, which checkpoints once more on its way out.
        drop(self.checkpointer.take());
    }
}

/// How often the checkpointer looks for new commits to checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The background checkpointer of one database file (see [`GroupCommitter::start_on_file`]).
struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(conn: Connection, counters: Arc<Counters>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpt".to_owned())
            .spawn(move || {
                let mut checkpointed_at = 0;
                loop {
                    let last = matches!(
                        stopped.recv_timeout(CHECKPOINT_EVERY),
                        Err(mpsc::RecvTimeoutError::Disconnected) | Ok(())
                    );
                    let batches = counters.batches.load(Ordering::Relaxed);
                    if batches != checkpointed_at || last {
                        // A checkpoint that cannot finish (a reader holds an old snapshot) is
                        // simply tried again next time; errors are of the same kind.
                        if let Ok(frames) = passive_checkpoint(&conn) {
                            counters.wal_frames.store(frames, Ordering::Relaxed);
                        }
                        checkpointed_at = batches;
                    }
                    if last {
                        break;
                    }
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs a `PASSIVE` checkpoint on `conn`; returns the frames in the WAL (its `log` column).
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
        .map(|frames| u64::try_from(frames).unwrap_or(0))
}

/// The write side and the read side of one database, as the store and the queue hold them.
#[derive(Debug)]
pub(crate) struct Connections {
    /// The group committer owning the write connection; shared by a store and a queue opened
    /// together on one file ([`Connections::beside`]), so the file has one writer.
    pub(crate) writer: Arc<GroupCommitter>,
    /// The connections reads use. For a file, [`READERS`] connections of their own (WAL lets
    /// them read while the writer commits, and they see every commit that returned), so that
    /// concurrent reads do not queue behind one lock; for an in-memory database the writer's
    /// own connection, as a second one would open another, empty database.
    pub(crate) readers: Vec<Arc<Mutex<Connection>>>,
    /// The file, `None` in memory.
    path: Option<std::path::PathBuf>,
}

impl Connections {
    /// Opens (creating and migrating if needed) the database at `path`, or an in-memory one for
    /// `None`, and starts its writer thread.
    pub(crate) fn open(path: Option<&Path>) -> Result<Self, OpenError> {
        let location = path.map_or_else(|| ":memory:".to_owned(), |p| p.display().to_string());
        let write_conn = Arc::new(Mutex::new(schema::open_connection(path)?));
        let readers = match path {
            Some(p) => read_connections(p)?,
            None => vec![write_conn.clone()],
        };
        let writer = match path {
            Some(p) => GroupCommitter::start_on_file(write_conn, p, &location)?,
            None => {
                GroupCommitter::start(write_conn).map_err(|source| OpenError::WriterThread {
                    path: location.clone().into(),
                    source,
                })?
            }
        };
        Ok(Connections {
            writer: Arc::new(writer),
            readers,
            path: path.map(Path::to_path_buf),
        })
    }

    /// Connections to the same database sharing this one's writer thread: a read connection of
    /// their own (for a file; an in-memory database has only the one connection). Two writer
    /// threads on one file would take turns at SQLite's write lock, each waiting in the busy
    /// handler; one writer batches both adapters' writes into the same transactions.
    pub(crate) fn beside(&self) -> Result<Self, OpenError> {
        let readers = match &self.path {
            Some(p) => read_connections(p)?,
            None => self.readers.clone(),
        };
        Ok(Connections {
            writer: self.writer.clone(),
            readers,
            path: self.path.clone(),
        })
    }

    /// A read connection, locked: the first free one, else (all busy) one picked by the
    /// calling thread.
    pub(crate) fn read(&self) -> MutexGuard<'_, Connection> {
        for reader in &self.readers {
            if let Ok(conn) = reader.try_lock() {
                return conn;
            }
        }
        let pick = thread_number() % self.readers.len();
        lock(&self.readers[pick])
    }
}

/// Read connections per database file.
const READERS: usize = 4;

/// A small number that differs between threads (for spreading waits over the readers).
fn thread_number() -> usize {
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static NUMBER: usize = RandomState::new().hash_one(std::thread::current().id()) as usize;
    }
    NUMBER.with(|n| *n)
}

/// The read connections to the file at `path`.
fn read_connections(path: &Path) -> Result<Vec<Arc<Mutex<Connection>>>, OpenError> {
    (0..READERS)
        .map(|_| {
            let conn = schema::open_connection(Some(path))?;
            // Reads only: a write here would bypass the group committer.
            conn.pragma_update(None, "query_only", true)
                .map_err(|source| OpenError::Sqlite {
                    path: path.to_path_buf(),
                    source,
                })?;
            Ok(Arc::new(Mutex::new(conn)))
        })
        .collect()
}

/// Locks a connection. A panic while holding the lock cannot leave a transaction half-applied
/// (the writer rolls back an unfinished batch; reads do not write), so a poisoned lock is safe to
/// keep using.
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer thread: batch what is queued, apply it, answer, repeat until the channel closes.
fn run_writer(
    conn: &Mutex<Connection>,
    receiver: &mpsc::Receiver<Box<dyn PendingWrite>>,
    counters: &Counters,
) {
    let mut last_start: Option<Instant> = None;
    while let Ok(first) = receiver.recv() {
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        // Under load (the previous batch started less than MIN_BATCH_INTERVAL ago), sleep until
        // the interval has passed, then take every write that arrived meanwhile. Sleeping
        // rather than waiting on the channel spares each sender a wake-up of this thread.
        if let Some(due) = last_start.map(|t| t + MIN_BATCH_INTERVAL) {
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        while batch.len() < MAX_BATCH_WRITES && bytes < MAX_BATCH_BYTES {
            match receiver.try_recv() {
                Ok(write) => {
                    bytes = bytes.saturating_add(write.bytes());
                    batch.push(write);
                }
                Err(_) => break,
            }
        }
        last_start = Some(Instant::now());
        let outcome = {
            let conn = lock(conn);
            apply_batch(&conn, &mut batch)
        };
        if outcome.is_ok() {
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters
                .writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        // Answer only now: the COMMIT has returned, so every Ok is durable.
        for write in batch {
            write.answer(outcome.clone());
        }
        if counters.wal_frames.load(Ordering::Relaxed) >= WAL_RESTART_FRAMES {
            // The background checkpointer copied most frames already; copying the rest here,
            // where no commit can append meanwhile, lets the next transaction restart the WAL.
            let frames = passive_checkpoint(&lock(conn)).unwrap_or(0);
            counters.wal_frames.store(frames.min(1), Ordering::Relaxed);
        }
    }
}

/// Applies `batch` in one transaction, each write in its own savepoint; commits.
fn apply_batch(conn: &Connection, batch: &mut [Box<dyn PendingWrite>]) -> Result<(), BatchError> {
    run(conn, "BEGIN IMMEDIATE").map_err(|e| BatchError::Begin(e.to_string()))?;
    for write in batch.iter_mut() {
        if let Err(e) = apply_one(conn, write.as_mut()) {
            rollback(conn);
            return Err(e);
        }
    }
    run(conn, "COMMIT").map_err(|e| {
        // A failed COMMIT may leave the transaction open (a deferred constraint does): end it,
        // so the next batch starts clean.
        rollback(conn);
        BatchError::Commit(e.to_string())
    })
}

/// Runs one write inside a savepoint, rolling back to it if the write failed.
fn apply_one(conn: &Connection, write: &mut dyn PendingWrite) -> Result<(), BatchError> {
    let broken = |e: rusqlite::Error| BatchError::RolledBack(e.to_string());
    run(conn, "SAVEPOINT caller_write").map_err(broken)?;
    let ok = write.apply(conn);
    if conn.is_autocommit() {
        // SQLite ended the transaction itself (disk full, I/O error): everything applied so
        // far in this batch is gone, so no write of the batch may be answered Ok.
        return Err(BatchError::RolledBack(
            "SQLite aborted the transaction after a failed statement".to_owned(),
        ));
    }
    if !ok {
        run(conn, "ROLLBACK TO caller_write").map_err(broken)?;
    }
    run(conn, "RELEASE caller_write").map_err(broken)
}

fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        // Nothing more can be done if even ROLLBACK fails; the next BEGIN will report it.
        let _ = conn.execute_batch("ROLLBACK");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A committer on a file with a `t` table and a deferred foreign key `child.parent ->
    /// parent.id`, so a COMMIT can be made to fail for real.
    fn committer() -> (tempfile::TempDir, Connections) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gc.db");
        let write_conn = schema::open_connection(Some(&path)).unwrap();
        // Outside any transaction: the pragma is a no-op inside one.
        write_conn
            .execute_batch(
                "PRAGMA foreign_keys = ON;
                 CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
                 CREATE TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE child (parent INTEGER REFERENCES parent (id)
                                     DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
        let writer = GroupCommitter::start(Arc::new(Mutex::new(write_conn))).unwrap();
        let readers = vec![Arc::new(Mutex::new(
            schema::open_connection(Some(&path)).unwrap(),
        ))];
        (
            dir,
            Connections {
                writer: Arc::new(writer),
                readers,
                path: Some(path),
            },
        )
    }

    fn insert(k: &str, v: i64) -> impl FnOnce(&Connection) -> rusqlite::Result<usize> + use<> {
        let k = k.to_owned();
        move |c: &Connection| c.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", (k, v))
    }

    fn count(connections: &Connections, sql: &str) -> i64 {
        connections.read().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Holds the writer inside a write until the returned sender is dropped, so that the writes
    /// submitted meanwhile queue up and form the next batch together.
    fn hold_writer(
        connections: &Connections,
    ) -> (mpsc::Sender<()>, oneshot::Receiver<Answer<(), ()>>) {
        let (release, gate) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let held = connections.writer.submit(0, move |_: &Connection| {
            started_tx.send(()).unwrap();
            // Returns once `release` is dropped.
            let _ = gate.recv();
            Ok::<(), ()>(())
        });
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        (release, held)
    }

    #[test]
    fn a_failing_write_rolls_back_alone_and_the_rest_of_its_batch_commits() {
        let (_dir, connections) = committer();
        let before = connections.writer.stats();
        let (release, held) = hold_writer(&connections);
        let a = connections.writer.submit(1, insert("a", 1));
        // Fails after inserting a row: its savepoint must take the row back with it.
        let b = connections.writer.submit(1, |c: &Connection| {
            c.execute("INSERT INTO t (k, v) VALUES ('b', 2)", [])?;
            c.execute("INSERT INTO t (k, v) VALUES ('a', 3)", [])
        });
        let c = connections.writer.submit(1, insert("c", 4));
        drop(release);
        held.blocking_recv().unwrap().unwrap().unwrap();
        assert_eq!(a.blocking_recv().unwrap().unwrap().unwrap(), 1);
        let b_err = b.blocking_recv().unwrap().unwrap().unwrap_err();
        assert!(b_err.to_string().contains("UNIQUE"), "{b_err}");
        assert_eq!(c.blocking_recv().unwrap().unwrap().unwrap(), 1);

        assert_eq!(count(&connections, "SELECT count(*) FROM t"), 2);
        assert_eq!(
            count(&connections, "SELECT count(*) FROM t WHERE k = 'b'"),
            0
        );
        assert_eq!(count(&connections, "SELECT v FROM t WHERE k = 'a'"), 1);
        let after = connections.writer.stats();
        assert_eq!(
            (after.batches - before.batches, after.writes - before.writes),
            (2, 4),
            "the held write alone, then a, b and c in one batch"
        );
    }

    #[test]
    fn a_failed_commit_answers_every_write_of_its_batch_with_the_error() {
        let (_dir, connections) = committer();
        let (release, held) = hold_writer(&connections);
        let a = connections.writer.submit(1, insert("a", 1));
        // Succeeds as a statement, but violates the deferred foreign key at COMMIT.
        let b = connections.writer.submit(1, |c: &Connection| {
            c.execute("INSERT INTO child (parent) VALUES (42)", [])
        });
        let c = connections.writer.submit(1, insert("c", 3));
        drop(release);
        held.blocking_recv().unwrap().unwrap().unwrap();
        for answer in [a, b, c] {
            match answer.blocking_recv().unwrap() {
                Err(BatchError::Commit(message)) => {
                    assert!(message.contains("FOREIGN KEY"), "{message}");
                }
                other => panic!("expected the commit failure, got {other:?}"),
            }
        }
        assert_eq!(count(&connections, "SELECT count(*) FROM t"), 0);
        assert_eq!(count(&connections, "SELECT count(*) FROM child"), 0);

        // The transaction was ended: the next batch starts clean and commits.
        let d = connections.writer.submit(1, insert("d", 4));
        assert_eq!(d.blocking_recv().unwrap().unwrap().unwrap(), 1);
        assert_eq!(count(&connections, "SELECT count(*) FROM t"), 1);
    }

    #[test]
    fn a_batch_closes_at_the_write_cap() {
        let (_dir, connections) = committer();
        let before = connections.writer.stats();
        let (release, held) = hold_writer(&connections);
        let answers: Vec<_> = (0..MAX_BATCH_WRITES + 3)
            .map(|i| connections.writer.submit(1, insert(&format!("k{i}"), 0)))
            .collect();
        drop(release);
        held.blocking_recv().unwrap().unwrap().unwrap();
        for answer in answers {
            answer.blocking_recv().unwrap().unwrap().unwrap();
        }
        let after = connections.writer.stats();
        assert_eq!(
            after.batches - before.batches,
            3,
            "held, 512 writes, 3 writes"
        );
        assert_eq!(
            count(&connections, "SELECT count(*) FROM t"),
            (MAX_BATCH_WRITES + 3) as i64
        );
    }

    #[test]
    fn dropping_the_committer_applies_the_writes_already_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gc.db");
        let connections = Connections::open(Some(&path)).unwrap();
        let created = connections.writer.submit(0, |c: &Connection| {
            c.execute_batch("CREATE TABLE t (k TEXT)")
        });
        let answers: Vec<_> = (0..50)
            .map(|i| {
                connections.writer.submit(1, move |c: &Connection| {
                    c.execute("INSERT INTO t (k) VALUES (?1)", [i])
                })
            })
            .collect();
        drop(connections);
        created.blocking_recv().unwrap().unwrap().unwrap();
        for answer in answers {
            answer.blocking_recv().unwrap().unwrap().unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 50);
    }
}
