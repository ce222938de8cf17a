//! The work queue port's contract, run against the log queue.

use std::path::Path;
use std::sync::Arc;

use dualwrite_logqueue::{LogQueue, ManualClock, QueueConfig};

dualwrite_engine::queue_contract_tests!(
    |dir: &Path, max_attempts: u32, clock: Arc<ManualClock>| {
        let config = QueueConfig {
            max_attempts,
            clock,
            ..QueueConfig::default()
        };
        LogQueue::open(dir.join("work.queue"), config).unwrap()
    }
);
