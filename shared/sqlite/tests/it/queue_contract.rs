//! The work queue port's contract, run against the SQLite queue (on a file, as `serve` uses
//! it before the log queue, and beside the store).

use std::path::Path;
use std::sync::Arc;

use dualwrite_sqlite::{ManualClock, QueueConfig, SqliteQueue};

dualwrite_engine::queue_contract_tests!(
    |dir: &Path, max_attempts: u32, clock: Arc<ManualClock>| {
        SqliteQueue::open(
            dir.join("queue.db"),
            QueueConfig {
                max_attempts,
                clock,
            },
        )
        .unwrap()
    }
);
