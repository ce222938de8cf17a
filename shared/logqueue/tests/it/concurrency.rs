//! Group commit under concurrency: many senders share syncs, yet every accepted message is
//! durable and each group stays in send order, also while consumers work at the same time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dualwrite_core::ports::WorkQueue;
use dualwrite_logqueue::{LogQueue, QueueConfig};
use tokio::sync::Barrier;

use crate::fixtures::{big_message, message, segment_files};

const SENDERS: usize = 64;
const SENDS_EACH: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_senders_are_all_durable_and_in_group_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let queue = Arc::new(LogQueue::open(&path, QueueConfig::default()).unwrap());
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
    let stats = queue.stats();
    assert_eq!(stats.synced_callers as usize, SENDERS * SENDS_EACH);
    assert!(
        stats.syncs * 2 < stats.synced_callers,
        "64 concurrent senders should have shared syncs: {stats:?}"
    );
    drop(queue);

    // Reopened from the files: every accepted message is there, each group in send order.
    let queue = LogQueue::open(&path, QueueConfig::default()).unwrap();
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
async fn consumers_working_beside_senders_see_each_group_in_send_order_exactly_once() {
    const CONSUMERS: usize = 8;
    const EACH: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let config = QueueConfig {
        segment_bytes: 256 << 10,
        ..QueueConfig::default()
    };
    let queue = Arc::new(LogQueue::open(&path, config).unwrap());
    let processed: Arc<Mutex<BTreeMap<String, Vec<usize>>>> = Arc::default();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let m = big_message(&format!("{s}:{i}"), &format!("g{}", (s + i) % 16));
                queue.send(vec![m]).await.unwrap();
            }
        }));
    }
    for _ in 0..CONSUMERS {
        let (queue, processed) = (queue.clone(), processed.clone());
        tasks.push(tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let handled: usize = processed.lock().unwrap().values().map(Vec::len).sum();
                if handled == SENDERS * EACH {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{handled} handled");
                let deliveries = queue.receive(8, Duration::from_secs(600)).await.unwrap();
                if deliveries.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                for d in deliveries {
                    assert_eq!(d.attempt, 1);
                    let (s, i) = d.message.event.event_id.split_once(':').unwrap();
                    let key = format!("{}/{s}", d.message.group_id);
                    processed
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_default()
                        .push(i.parse().unwrap());
                    queue.ack(&d.receipt).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Within a group, one sender's messages were handled in the order it sent them, each
    // once (a group mixes senders, whose relative order is whatever the sends' order was).
    let processed = std::mem::take(&mut *processed.lock().unwrap());
    let handled: usize = processed.values().map(Vec::len).sum();
    assert_eq!(handled, SENDERS * EACH);
    for (key, order) in &processed {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
    }
    assert_eq!(queue.stats().messages, 0);
    queue.sync().await.unwrap();
    let files = segment_files(&path);
    assert!(files.len() <= 2, "acked segments are deleted: {files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_arriving_while_a_sync_is_paced_share_the_next_one() {
    // Eight senders, each waiting for its send before the next: without pacing, a fast disk
    // (or tmpfs) syncs as soon as one of them sends; with it, syncs start at most once per
    // `MIN_SYNC_INTERVAL` and each carries the sends of (nearly) all eight.
    const EACH: usize = 100;
    const SENDERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(LogQueue::open(dir.path().join("q"), QueueConfig::default()).unwrap());
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                queue
                    .send(vec![message(&format!("{s}:{i}"), &format!("g{s}"))])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = queue.stats();
    assert_eq!(stats.synced_callers as usize, SENDERS * EACH);
    assert!(
        // Twice as many callers as syncs at least: without the pacing every sender got a sync
        // of its own (1:1); after a slow fdatasync the next batch may start with few waiting.
        stats.syncs * 2 <= stats.synced_callers,
        "paced syncs should each answer several of the eight senders: {stats:?}"
    );
}
