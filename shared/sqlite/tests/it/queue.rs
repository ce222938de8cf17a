//! SqliteQueue: durability, at-least-once, per-group order, retry and dead letters.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::ports::{Delivery, QueueDepth, QueueError, RetryOutcome, WorkQueue};
use dualwrite_sqlite::{ManualClock, QueueConfig, SqliteQueue};

use crate::fixtures::{message, t0};

const VISIBILITY: Duration = Duration::from_secs(30);

fn queue_with(max_attempts: u32) -> (SqliteQueue, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = SqliteQueue::open_in_memory(QueueConfig {
        max_attempts,
        clock: clock.clone(),
    })
    .unwrap();
    (queue, clock)
}

fn ids(deliveries: &[Delivery]) -> Vec<&str> {
    deliveries
        .iter()
        .map(|d| d.message.event.event_id.as_str())
        .collect()
}

#[tokio::test]
async fn one_message_per_group_at_a_time_in_send_order() {
    let (queue, _clock) = queue_with(5);
    queue
        .send(vec![
            message("a1", "A"),
            message("b1", "B"),
            message("a2", "A"),
            message("c1", "C"),
        ])
        .await
        .unwrap();
    queue.send(vec![message("b2", "B")]).await.unwrap();

    let first = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(
        ids(&first),
        ["a1", "b1", "c1"],
        "heads of each group, lowest sequence first"
    );
    assert!(first.iter().all(|d| d.attempt == 1));
    // Nothing more while the heads are in flight.
    assert!(queue.receive(10, VISIBILITY).await.unwrap().is_empty());

    queue.ack(&first[0].receipt).await.unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
    queue.ack(&first[1].receipt).await.unwrap();
    let next = queue.receive(1, VISIBILITY).await.unwrap();
    assert_eq!(ids(&next), ["b2"]);
    assert_eq!(
        next[0].message,
        message("b2", "B"),
        "the message comes back as sent"
    );
}

#[tokio::test]
async fn receive_respects_max() {
    let (queue, _clock) = queue_with(5);
    queue
        .send(
            (0..5)
                .map(|i| message(&format!("e{i}"), &format!("G{i}")))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        ids(&queue.receive(2, VISIBILITY).await.unwrap()),
        ["e0", "e1"]
    );
    assert_eq!(
        ids(&queue.receive(2, VISIBILITY).await.unwrap()),
        ["e2", "e3"]
    );
    assert!(queue.receive(0, VISIBILITY).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unacked_delivery_comes_back_after_its_visibility_timeout() {
    let (queue, clock) = queue_with(5);
    queue
        .send(vec![message("a1", "A"), message("a2", "A")])
        .await
        .unwrap();
    let first = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&first), ["a1"]);

    clock.advance(VISIBILITY - Duration::from_millis(1));
    assert!(
        queue.receive(10, VISIBILITY).await.unwrap().is_empty(),
        "still in flight"
    );
    clock.advance(Duration::from_millis(1));
    let again = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["a1"], "redelivered, still ahead of a2");
    assert_eq!(again[0].attempt, 2);

    // The first delivery's receipt is dead once the message was delivered again.
    let stale = queue.ack(&first[0].receipt).await.unwrap_err();
    assert!(matches!(stale, QueueError::UnknownReceipt(ref r) if *r == first[0].receipt));
    queue.ack(&again[0].receipt).await.unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
}

#[tokio::test]
async fn a_late_ack_before_redelivery_is_accepted() {
    let (queue, clock) = queue_with(5);
    queue.send(vec![message("a1", "A")]).await.unwrap();
    let d = queue.receive(1, VISIBILITY).await.unwrap();
    clock.advance(VISIBILITY * 2);
    queue.ack(&d[0].receipt).await.unwrap();
    assert!(queue.receive(10, VISIBILITY).await.unwrap().is_empty());
    assert!(matches!(
        queue.ack(&d[0].receipt).await,
        Err(QueueError::UnknownReceipt(_))
    ));
    assert!(matches!(
        queue.ack("garbage").await,
        Err(QueueError::UnknownReceipt(_))
    ));
}

#[tokio::test]
async fn retry_delays_the_message_and_holds_its_group() {
    let (queue, clock) = queue_with(5);
    queue
        .send(vec![
            message("a1", "A"),
            message("a2", "A"),
            message("b1", "B"),
        ])
        .await
        .unwrap();
    let d = queue.receive(1, VISIBILITY).await.unwrap();
    let outcome = queue
        .retry(&d[0].receipt, Duration::from_secs(10), "F&O throttled")
        .await
        .unwrap();
    assert_eq!(outcome, RetryOutcome::Requeued);
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 2,
            in_flight: 0,
            delayed: 1,
            dead: 0
        }
    );

    // a2 waits behind the delayed a1; b1 is independent.
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["b1"]);
    clock.advance(Duration::from_secs(10));
    let again = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["a1"]);
    assert_eq!(again[0].attempt, 2);
    // The old receipt cannot retry or ack any more.
    assert!(matches!(
        queue.retry(&d[0].receipt, Duration::ZERO, "x").await,
        Err(QueueError::UnknownReceipt(_))
    ));
}

#[tokio::test]
async fn after_max_attempts_retry_dead_letters_and_the_group_moves_on() {
    let (queue, _clock) = queue_with(3);
    queue
        .send(vec![message("a1", "A"), message("a2", "A")])
        .await
        .unwrap();
    for attempt in 1..=3u32 {
        let d = queue.receive(10, VISIBILITY).await.unwrap();
        assert_eq!(ids(&d), ["a1"]);
        assert_eq!(d[0].attempt, attempt);
        let outcome = queue
            .retry(&d[0].receipt, Duration::ZERO, &format!("failure {attempt}"))
            .await
            .unwrap();
        let expected = if attempt < 3 {
            RetryOutcome::Requeued
        } else {
            RetryOutcome::DeadLettered
        };
        assert_eq!(outcome, expected, "attempt {attempt}");
    }
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message, message("a1", "A"));
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error, "failure 3");
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 0,
            in_flight: 1,
            delayed: 0,
            dead: 1
        }
    );
}

#[tokio::test]
async fn a_message_that_keeps_timing_out_is_dead_lettered_too() {
    let (queue, clock) = queue_with(2);
    queue
        .send(vec![message("a1", "A"), message("a2", "A")])
        .await
        .unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a1"]);
    clock.advance(VISIBILITY);
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a1"]);
    clock.advance(VISIBILITY);
    // Two deliveries timed out: a1 goes to the dead letters, a2 is delivered.
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 2);
    assert!(
        dead[0].last_error.contains("visibility timeout"),
        "{}",
        dead[0].last_error
    );
}

#[tokio::test]
async fn depth_counts_each_state() {
    let (queue, clock) = queue_with(5);
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
    queue
        .send(vec![
            message("a1", "A"),
            message("a2", "A"),
            message("b1", "B"),
            message("c1", "C"),
        ])
        .await
        .unwrap();
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 4,
            in_flight: 0,
            delayed: 0,
            dead: 0
        }
    );
    let d = queue.receive(2, VISIBILITY).await.unwrap();
    queue
        .retry(&d[1].receipt, Duration::from_secs(5), "later")
        .await
        .unwrap();
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 2,
            in_flight: 1,
            delayed: 1,
            dead: 0
        }
    );
    clock.advance(VISIBILITY);
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 4,
            in_flight: 0,
            delayed: 0,
            dead: 0
        }
    );
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
async fn redrive_sends_dead_letters_back_oldest_first_behind_their_groups() {
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
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1", "b1"]);
    // b1 dies first, then a1.
    for delivery in [&d[1], &d[0]] {
        let outcome = queue
            .retry(&delivery.receipt, Duration::ZERO, "F&O unavailable")
            .await
            .unwrap();
        assert_eq!(outcome, RetryOutcome::DeadLettered);
        clock.advance(Duration::from_secs(1));
    }
    queue.send(vec![message("a2", "A")]).await.unwrap();
    assert_eq!(dead_ids(&queue).await, ["b1", "a1"]);

    assert_eq!(queue.redrive(0).await.unwrap(), 0);
    assert_eq!(queue.redrive(1).await.unwrap(), 1, "the oldest death: b1");
    assert_eq!(dead_ids(&queue).await, ["a1"]);
    assert_eq!(queue.redrive(10).await.unwrap(), 1);
    assert_eq!(queue.redrive(10).await.unwrap(), 0);
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 3,
            in_flight: 0,
            delayed: 0,
            dead: 0
        }
    );
    drop(queue);

    // Durable, and delivered again in group order as first attempts, as they were sent.
    let queue = SqliteQueue::open(&path, config()).unwrap();
    assert!(dead_ids(&queue).await.is_empty());
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(
        ids(&d),
        ["a2", "b1"],
        "a1 waits behind a2, queued before it"
    );
    assert!(d.iter().all(|d| d.attempt == 1));
    assert_eq!(d[1].message, message("b1", "B"));
    queue.ack(&d[0].receipt).await.unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1"]);
    assert_eq!(d[0].attempt, 1);
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
