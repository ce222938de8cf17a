//! SqliteQueue across a restart (messages, their state, redriven dead letters) and beside the
//! store in one file. (The port's guarantees within one run: `queue_contract`.)

use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::ports::{Delivery, QueueDepth, RetryOutcome, WorkQueue};
use dualwrite_sqlite::{ManualClock, QueueConfig, SqliteQueue};

use crate::fixtures::{message, t0};

const VISIBILITY: Duration = Duration::from_secs(30);

fn ids(deliveries: &[Delivery]) -> Vec<&str> {
    deliveries
        .iter()
        .map(|d| d.message.event.event_id.as_str())
        .collect()
}

#[tokio::test]
async fn reopening_the_file_keeps_messages_and_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let clock = Arc::new(ManualClock::new(t0()));
    let config = || QueueConfig {
        max_attempts: 1,
        clock: clock.clone(),
    };
    {
        let queue = SqliteQueue::open(&path, config()).unwrap();
        queue
            .send(vec![
                message("a1", "A"),
                message("a2", "A"),
                message("b1", "B"),
            ])
            .await
            .unwrap();
        let d = queue.receive(10, VISIBILITY).await.unwrap();
        assert_eq!(ids(&d), ["a1", "b1"]);
        queue
            .retry(&d[1].receipt, Duration::ZERO, "bad data")
            .await
            .unwrap();
    }
    let queue = SqliteQueue::open(&path, config()).unwrap();
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 1,
            in_flight: 1,
            delayed: 0,
            dead: 1
        }
    );
    let pending: Vec<String> = queue
        .pending(10)
        .unwrap()
        .into_iter()
        .map(|m| m.event.event_id)
        .collect();
    assert_eq!(pending, ["a1", "a2"]);
    assert_eq!(
        queue.dead_letters(10).await.unwrap()[0].last_error,
        "bad data"
    );
    assert!(
        queue.receive(10, VISIBILITY).await.unwrap().is_empty(),
        "a1 still in flight"
    );
}

async fn dead_ids(queue: &SqliteQueue) -> Vec<String> {
    queue
        .dead_letters(10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.message.event.event_id)
        .collect()
}

#[tokio::test]
async fn a_redrive_is_durable_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let clock = Arc::new(ManualClock::new(t0()));
    let config = || QueueConfig {
        max_attempts: 1,
        clock: clock.clone(),
    };
    let queue = SqliteQueue::open(&path, config()).unwrap();
    queue
        .send(vec![message("a1", "A"), message("b1", "B")])
        .await
        .unwrap();
    for delivery in queue.receive(10, VISIBILITY).await.unwrap() {
        let outcome = queue
            .retry(&delivery.receipt, Duration::ZERO, "F&O unavailable")
            .await
            .unwrap();
        assert_eq!(outcome, RetryOutcome::DeadLettered);
    }
    queue.send(vec![message("a2", "A")]).await.unwrap();
    assert_eq!(queue.redrive(10).await.unwrap(), 2);
    drop(queue);

    // Reopened: nothing dead, the redriven messages queued behind their groups, first attempts.
    let queue = SqliteQueue::open(&path, config()).unwrap();
    assert!(dead_ids(&queue).await.is_empty());
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a2", "b1"], "a1 waits behind a2");
    assert!(d.iter().all(|d| d.attempt == 1));
    queue.ack(&d[0].receipt).await.unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1"]);
    assert_eq!(d[0].message, message("a1", "A"));
}

#[tokio::test]
async fn store_and_queue_can_share_one_file() {
    use dualwrite_core::ports::{LinkStore, StoreOp};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dualwrite.db");
    let queue = SqliteQueue::open(&path, QueueConfig::default()).unwrap();
    let store = dualwrite_sqlite::SqliteStore::open(&path).unwrap();
    queue.send(vec![message("a1", "A")]).await.unwrap();
    store
        .commit(vec![StoreOp::CompleteEvent {
            event_id: "a1".into(),
        }])
        .await
        .unwrap();
    let d = queue.receive(1, VISIBILITY).await.unwrap();
    queue.ack(&d[0].receipt).await.unwrap();
    assert!(store.event_done("a1").unwrap());
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
    store.integrity_check().unwrap();
}
