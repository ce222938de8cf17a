//! Group commit under concurrency: many callers share transactions, yet every write stays
//! durable, ordered and atomic on its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use dualwrite_core::IntegrationKey;
use dualwrite_core::ports::{IdempotencyStore as _, LinkStore, StoreError, StoreOp, WorkQueue};
use dualwrite_sqlite::{QueueConfig, SqliteQueue, SqliteStore};
use tokio::sync::Barrier;

use crate::fixtures::{link, message};

const SENDERS: usize = 64;
const SENDS_EACH: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_senders_are_all_durable_and_in_group_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let queue = Arc::new(SqliteQueue::open(&path, QueueConfig::default()).unwrap());
    let start = Arc::new(Barrier::new(SENDERS));
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (queue, start) = (queue.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for i in 0..SENDS_EACH {
                // Two groups per sender, so a group's order is the order its sender sent in.
                let group = format!("g{s}-{}", i % 2);
                queue
                    .send(vec![message(&format!("{s}:{i}"), &group)])
                    .await
                    .unwrap();
                // Read-your-writes: an accepted message is visible to reads at once.
                if i == SENDS_EACH / 2 {
                    let pending = queue.pending(usize::MAX).unwrap();
                    let id = format!("{s}:{i}");
                    assert!(pending.iter().any(|m| m.event.event_id == id), "{id}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = queue.writer_stats();
    assert_eq!(stats.writes as usize, SENDERS * SENDS_EACH);
    assert!(
        stats.batches < stats.writes,
        "64 concurrent senders should have shared transactions: {stats:?}"
    );
    drop(queue);

    // Reopened from the file: every accepted message is there, each group in send order.
    let queue = SqliteQueue::open(&path, QueueConfig::default()).unwrap();
    let pending = queue.pending(usize::MAX).unwrap();
    assert_eq!(pending.len(), SENDERS * SENDS_EACH);
    let mut per_group: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for m in &pending {
        let (_, i) = m.event.event_id.split_once(':').unwrap();
        per_group
            .entry(m.group_id.clone())
            .or_default()
            .push(i.parse().unwrap());
    }
    assert_eq!(per_group.len(), SENDERS * 2);
    for (group, sent) in per_group {
        let parity = if group.ends_with("-0") { 0 } else { 1 };
        let expected: Vec<usize> = (0..SENDS_EACH).filter(|i| i % 2 == parity).collect();
        assert_eq!(sent, expected, "group {group} out of order or incomplete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_fail_only_where_the_revision_condition_fails() {
    const KEYS: usize = 32;
    const ROUNDS: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    for round in 0..ROUNDS {
        let start = Arc::new(Barrier::new(KEYS));
        let mut tasks = Vec::new();
        for k in 0..KEYS {
            let (store, start) = (store.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                let key = format!("k{k}");
                // Every key stands at revision `round`. Odd keys commit with a wrong revision:
                // they must fail, and alone.
                let expected_revision = if k % 2 == 0 {
                    round
                } else {
                    round.wrapping_sub(1)
                };
                let event_id = format!("e{round}-{k}");
                let ops = vec![
                    StoreOp::PutLink {
                        link: link("m", &key, Some(&key), None),
                        expected_revision,
                    },
                    StoreOp::CompleteEvent {
                        event_id: event_id.clone(),
                    },
                ];
                start.wait().await;
                let result = store.commit(ops).await;
                // Read-your-writes right after the commit returned.
                let seen = store
                    .link("m", &IntegrationKey(key.clone().into()))
                    .await
                    .unwrap()
                    .map(|l| l.revision);
                (k, result, seen, store.event_done(&event_id).unwrap())
            }));
        }
        for t in tasks {
            let (k, result, seen, done) = t.await.unwrap();
            if k % 2 == 0 {
                assert!(result.is_ok(), "round {round} key {k}: {result:?}");
                assert_eq!(seen, Some(round + 1), "round {round} key {k}");
                assert!(done, "round {round} key {k}: completion missing");
            } else {
                assert!(
                    matches!(result, Err(StoreError::Conflict { .. })),
                    "round {round} key {k}: {result:?}"
                );
                assert!(
                    !done,
                    "round {round} key {k}: completion of a failed commit"
                );
            }
        }
        // The odd keys' commits failed: bring them level with the even ones, so that the next
        // round tests the same thing again.
        for k in (1..KEYS).step_by(2) {
            let key = format!("k{k}");
            store
                .commit(vec![StoreOp::PutLink {
                    link: link("m", &key, Some(&key), None),
                    expected_revision: round,
                }])
                .await
                .unwrap();
        }
    }
    for k in 0..KEYS {
        let l = store
            .link("m", &IntegrationKey(format!("k{k}").into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.revision, ROUNDS, "key k{k}");
    }
    // The claims of failed commits were never completed: they can still be claimed.
    let claim = store
        .claim_event(
            "e0-1",
            chrono::Utc::now(),
            std::time::Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!(claim, dualwrite_core::ports::EventClaim::Claimed);
}

/// A store and a queue opened together share one writer: their writes go into the same
/// transactions (one writer's statistics count both), and both see their own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_opened_beside_the_store_shares_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.db");
    let store = SqliteStore::open(&path).unwrap();
    let queue = SqliteQueue::open_beside(&store, QueueConfig::default()).unwrap();
    queue.send(vec![message("e1", "g1")]).await.unwrap();
    store
        .commit(vec![StoreOp::PutLink {
            link: link("accounts", "A1", Some("c1"), None),
            expected_revision: 0,
        }])
        .await
        .unwrap();
    assert_eq!(store.writer_stats(), queue.writer_stats());
    assert_eq!(store.writer_stats().writes, 2);
    assert_eq!(queue.pending(10).unwrap().len(), 1);
    assert!(
        store
            .link("accounts", &IntegrationKey("A1".into()))
            .await
            .unwrap()
            .is_some()
    );
    drop((store, queue));
    let queue = SqliteQueue::open(&path, QueueConfig::default()).unwrap();
    assert_eq!(queue.pending(10).unwrap().len(), 1, "durable across reopen");
}

/// The writer does not checkpoint the WAL itself; the background checkpointer copies committed
/// pages into the database file while the writer goes on (without it, the file would not grow
/// until the last connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_pages_reach_the_database_file_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let queue = SqliteQueue::open(&path, QueueConfig::default()).unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    for i in 0..300 {
        queue
            .send(vec![message(&format!("e{i}"), &format!("g{i}"))])
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = std::fs::metadata(&path).unwrap().len();
        if now > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {now} bytes: nothing was checkpointed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(queue.pending(1000).unwrap().len(), 300);
}

/// Bytes of WAL a continuous stream of sends may leave behind: the restart threshold
/// (`WAL_RESTART_FRAMES` pages of 4 KiB, 16 MiB) plus what is written between two reports of
/// the background checkpointer, with room to spare on a slow machine.
const WAL_BOUND: u64 = 40 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wal_starts_over_instead_of_growing_under_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let queue = Arc::new(SqliteQueue::open(&path, QueueConfig::default()).unwrap());
    // 16 senders without pause, 8 KiB messages, 96 MiB in all: without the writer finishing
    // the checkpoint between batches, the passive checkpointer never catches up with a writer
    // that keeps appending and the WAL holds every page written.
    let body = "x".repeat(8 << 10);
    let mut tasks = Vec::new();
    for s in 0..16 {
        let (queue, body) = (queue.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..768 {
                let mut m = message(&format!("{s}:{i}"), &format!("g{s}"));
                m.event.record.fields.insert(
                    "description",
                    dualwrite_core::Value::Text(body.as_str().into()),
                );
                queue.send(vec![m]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("queue.db-wal"))
        .unwrap()
        .len();
    assert!(
        wal < WAL_BOUND,
        "the WAL grew to {wal} bytes for 96 MiB of messages (bound {WAL_BOUND})"
    );
    assert_eq!(queue.pending(usize::MAX).unwrap().len(), 16 * 768);
}
