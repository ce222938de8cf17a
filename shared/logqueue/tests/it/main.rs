//! Integration tests of dualwrite-logqueue: every guarantee of the work queue port, recovery
//! from torn tails and reopening after each kind of record, reclaiming and compacting
//! segments, redriving dead letters (and reading the previous segment format), the directory
//! lock, group commit under 64 concurrent senders, and the crash test (kill the process at any
//! instant: no accepted message lost).

mod concurrency;
mod crash;
mod fixtures;
mod lock;
mod queue;
mod queue_contract;
mod recovery;
mod redrive;
