//! Embedded SQLite state store and durable work queue: the local default of dualwrite.
//!
//! - [`SqliteStore`] implements [`LinkStore`](dualwrite_core::ports::LinkStore),
//!   [`IdempotencyStore`](dualwrite_core::ports::IdempotencyStore) and
//!   [`JournalStore`](dualwrite_core::ports::JournalStore).
//! - [`SqliteQueue`] implements [`WorkQueue`](dualwrite_core::ports::WorkQueue).
//!
//! Both may live in one database file (the schema holds every table) or in two. One file is
//! the default of `dualwrite serve`: one thing to back up, and the queue is opened with
//! [`SqliteQueue::open_beside`] the store so both share one writer thread (two writers on one
//! file would take turns at SQLite's write lock, each waiting in the busy handler).
//! A store commit and a queue ack are separate transactions either way; the engine does not need
//! them to be atomic together, because the effect and the event's completion are committed
//! together in the store and a redelivered event is answered `AlreadyDone`.
//!
//! Durability: every connection runs in WAL mode with `synchronous=FULL`, so a transaction that
//! returned is on disk, even across power loss (see [`schema`] for the measurement behind that
//! choice).
//!
//! Concurrency and throughput: a writer thread owns the write connection of a file and applies
//! concurrent callers' writes in one transaction per batch — one fsync for the whole batch —
//! each write in its own savepoint, answering every caller only after the COMMIT returned
//! ([`group_commit`] explains the guarantees). The writer never checkpoints the WAL itself: a
//! checkpointer thread does (`PASSIVE`, every 100 ms after new commits), so no batch waits for
//! pages to be copied into the database file. Async writers await that answer without
//! blocking the executor. Reads use a second connection (WAL lets it read while the writer
//! commits) behind a `std::sync::Mutex`, held for one short query. Several processes may still
//! share a file: SQLite serialises their writes (`BEGIN IMMEDIATE` + busy timeout).

pub mod error;
pub mod group_commit;
pub mod queue;
pub mod schema;
pub mod store;

/// The clocks live in the engine; re-exported so `dualwrite_sqlite::{SystemClock, ManualClock}`
/// and `dualwrite_sqlite::clock::*` keep working.
pub use dualwrite_engine::clock;
pub use dualwrite_engine::clock::{ManualClock, SystemClock};
pub use error::OpenError;
pub use group_commit::{BatchError, WriterStats};
pub use queue::{QueueConfig, SqliteQueue};
pub use store::{SqliteStore, StoreCounts};
