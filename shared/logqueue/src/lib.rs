//! The durable work queue as a log: append-only segment files and an in-memory index.
//!
//! [`LogQueue`] implements [`WorkQueue`](dualwrite_core::ports::WorkQueue) with the guarantees
//! that trait documents — durable `send`, at-least-once delivery with visibility timeouts,
//! per-group order, `retry` with delay, dead letters after [`QueueConfig::max_attempts`] and
//! `redrive` of dead letters back to the queue — for
//! a few microseconds of CPU per message: a message is written once when sent and a few bytes
//! when delivered and acked, and nothing is ever rewritten in place (`SqliteQueue` inserts,
//! updates and deletes a B-tree row per message, rewriting whole pages each time).
//!
//! # Files
//!
//! A queue is a directory (`<name>.queue/`) of segment files, `LOCK` and nothing else (see
//! [`segment`] for names and headers). Each segment is a header followed by framed records:
//! a `u32` length, a CRC-32C and the payload (see [`record`] for every field):
//!
//! | record | written when | waits for a sync |
//! |---|---|---|
//! | `Sent` (seq, group, dedup id, event JSON) | `send` | yes |
//! | `Delivered` (seq, attempt) | `receive` hands it out | no |
//! | `Acked` (seq) | `ack` | for the last attempt only |
//! | `Retried` (seq, attempt, visible-at, error) | `retry` | yes |
//! | `DeadLettered` (seq, order, attempts, error, body) | `retry` on the last attempt, or a last delivery expiring | yes from `retry`; else with the next batch |
//! | `Carried` (seq, attempt, state, last error, body) | compaction | before the old segment is deleted |
//! | `Redriven` (seq, death) | `redrive`, right after the dead letter's new `Sent` | yes |
//!
//! # What is synced when
//!
//! One writer thread appends the records of all callers and syncs (`fdatasync`) once per
//! batch; every caller of `send`, `retry`, `redrive` and of the `ack` of a last attempt is
//! answered after the sync that covers its records (group commit, no artificial delay: see
//! [`writer`]). Records nobody waits for (`Delivered`, other `Acked`s, a `DeadLettered` of an
//! expired delivery) go out with the next batch, or within [`writer::FLUSH_INTERVAL`]. A
//! message is *delivered* only once its `Sent` record is synced, so nothing a crash could
//! un-send is ever handed to a worker. The
//! head segment is also synced before it is sealed, and before any segment is deleted. The
//! writer fills the head with zeros ahead of its records ([`writer::PREALLOCATE_BYTES`] at a
//! time), so that a batch's sync writes data into blocks the file already has, without a
//! journal commit for a new file size.
//!
//! What a crash can cost:
//! - killing the process loses nothing that was written: the OS has it. Only what was still in
//!   the in-memory buffer is lost: unanswered sends (their senders got no 2xx and send
//!   again), and the last deliveries and acks;
//! - a power loss can also lose written but unsynced records. A lost `Delivered` makes the
//!   attempt count approximate (short by the lost deliveries, like SQS's
//!   `ApproximateReceiveCount`); a lost `Acked` makes the message be delivered again, which
//!   the engine's idempotency records make harmless (the event is answered `AlreadyDone`); a
//!   lost `DeadLettered` of an expired last delivery leaves the message in flight, so it is
//!   dead-lettered again by the first `receive` after the restart;
//! - the `Acked` of a message's *last* attempt is synced before `ack` returns: lost, it would
//!   make the restart take that delivery for one that never reported back (which counts as an
//!   attempt, so that a message killing its worker each time cannot hold its group for ever)
//!   and dead-letter a message whose work was done.
//!
//! Opening syncs the newest segment before handing anything out (a process killed before a
//! batch's sync leaves records in the page cache that a later power loss would take away)
//! and the queue directory's entry in its parent.
//!
//! A redrive torn by a crash keeps a prefix of its batch: a dead letter whose new `Sent`
//! survived but whose `Redriven` did not is then both queued and still dead (a second
//! redrive sends it once more, which idempotency makes harmless), never neither.
//!
//! Every answered `send`, `retry` and `redrive` survives both.
//!
//! # Recovery
//!
//! Opening takes the directory's lock, reads the segments oldest first and replays their
//! records into the index ([`index`]). Segments of the previous format (version 1, before
//! `Redriven`) are read as they are; when the newest one is of that format it is sealed and a
//! new segment started, so that a record an older build cannot read never lands in a segment
//! that build would open (see [`segment`]). The newest segment ends at its first bad frame: zeros
//! from there on are the writer's zeros written ahead and stay; anything else is a torn batch
//! (incomplete, bad length or bad checksum) and is cut off the file, keeping every record
//! before it. A bad frame in an older segment is damage, not a crash, and opening fails
//! naming the file.
//! Messages that were in flight when the previous run ended count as deliveries whose
//! visibility expired: deliverable at once (their workers died with that run), or
//! dead-lettered if that was their last attempt. Delays set by `retry` are kept. Receipts of
//! the previous run are no longer valid.
//!
//! # Reclaiming space
//!
//! The head rotates at [`QueueConfig::segment_bytes`] (64 MiB by default). Every live message
//! and dead letter is *homed* in the segment holding its latest body record; a segment homing
//! nothing is deleted, oldest first. A long-lived message (a long retry delay, a slow group, a
//! dead letter) would pin its segment and every newer one, so when the log holds more garbage
//! than both its live bytes and two segments, the writer copies the oldest segment's live
//! items to the head as `Carried` / `DeadLettered` records (a snapshot of their state; the
//! message keeps its seq, attempt count, delay and place in its group), syncs, and deletes
//! the segment. Copying happens [`writer::COMPACT_BUDGET`] bytes per batch, bodies encoded
//! outside the lock. Disk use stays within about twice the live data plus a few segments.
//!
//! Deleting a segment is a rename out of the queue (`<n>.seg.retired`), durable with the
//! directory's sync before the next one; a thread of its own then removes the file. Removing a
//! 64 MiB file frees its blocks (15–20 ms on the development VM), which in the writer held up
//! every send of that moment (`bench live` saw it as a latency spike); a retired file left by a
//! crash is removed on open.
//!
//! # Cost
//!
//! `examples/queue_throughput.rs` (64 concurrent senders, 8 consumers, events of 3 KB of JSON,
//! both queues synced as in production) measured on the 2-core development VM, CPU per message of
//! the whole process: `send` about 11 µs, of which encoding the event's JSON is 5.5 µs and the
//! writer thread 3–4 µs (mostly the kernel's share of `pwrite` and `fdatasync`, one per batch
//! of about 30); `receive` + `ack` about 5 µs (2 µs of it copying the event out). `SqliteQueue`
//! on the same run: about 30 µs per send and 73 µs per receive + ack, mostly in its writer.
//!
//! # Memory
//!
//! The index keeps every live message decoded (so `receive` decodes nothing) and every dead
//! letter: about the size of the change events themselves, per message queued.

pub mod error;
pub mod index;
pub mod queue;
pub mod record;
pub mod segment;
pub mod writer;

pub use error::OpenError;
pub use queue::{DEFAULT_SEGMENT_BYTES, LogQueue, QueueConfig, QueueStats};

/// The clocks live in the engine; re-exported so `dualwrite_logqueue::{SystemClock,
/// ManualClock}` work as in `dualwrite_sqlite`.
pub use dualwrite_engine::clock::{ManualClock, SystemClock};
