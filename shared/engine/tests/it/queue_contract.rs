//! The work queue port's contract, run against the in-memory queue.

use std::path::Path;
use std::sync::Arc;

use dualwrite_engine::ManualClock;
use dualwrite_engine::memory::MemoryQueue;

dualwrite_engine::queue_contract_tests!(
    |_dir: &Path, max_attempts: u32, clock: Arc<ManualClock>| MemoryQueue::new(clock, max_attempts)
);
