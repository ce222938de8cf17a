//! LogQueue: at-least-once, per-group order, visibility timeouts, retry and dead letters — the
//! scenarios of `SqliteQueue`'s tests, run against the log queue.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::ports::{QueueDepth, QueueError, RetryOutcome, WorkQueue};
use dualwrite_logqueue::{LogQueue, ManualClock};
use tempfile::TempDir;

use crate::fixtures::{config, ids, message, message_ids, queue_in, t0};

const VISIBILITY: Duration = Duration::from_secs(30);

fn queue_with(max_attempts: u32) -> (TempDir, LogQueue, Arc<ManualClock>) {
    let dir = tempfile::tempdir().unwrap();
    let (queue, clock) = queue_in(dir.path(), max_attempts);
    (dir, queue, clock)
}

#[tokio::test]
async fn one_message_per_group_at_a_time_in_send_order() {
    let (_dir, queue, _clock) = queue_with(5);
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
    let (_dir, queue, _clock) = queue_with(5);
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
    let (_dir, queue, clock) = queue_with(5);
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
    let stale = queue
        .retry(&first[0].receipt, Duration::ZERO, "x")
        .await
        .unwrap_err();
    assert!(matches!(stale, QueueError::UnknownReceipt(_)));
    queue.ack(&again[0].receipt).await.unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
}

#[tokio::test]
async fn a_late_ack_before_redelivery_is_accepted() {
    let (_dir, queue, clock) = queue_with(5);
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
    assert!(matches!(
        queue.ack("1.x").await,
        Err(QueueError::UnknownReceipt(_))
    ));
}

#[tokio::test]
async fn a_late_receipt_stays_valid_after_a_receive_made_its_message_ready_again() {
    let (_dir, queue, clock) = queue_with(5);
    queue
        .send(vec![
            message("x1", "X"),
            message("a1", "A"),
            message("b1", "B"),
        ])
        .await
        .unwrap();
    let d = queue.receive(3, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["x1", "a1", "b1"]);
    queue
        .retry(&d[0].receipt, Duration::from_secs(10), "later")
        .await
        .unwrap();
    clock.advance(VISIBILITY);
    // a1's and b1's deliveries expired and x1's delay is over: this receive makes all three
    // ready and hands out x1 alone (lowest seq). a1 and b1 are not delivered again yet.
    assert_eq!(ids(&queue.receive(1, VISIBILITY).await.unwrap()), ["x1"]);
    queue.ack(&d[1].receipt).await.unwrap();
    assert_eq!(
        queue
            .retry(&d[2].receipt, Duration::from_secs(5), "late, not too late")
            .await
            .unwrap(),
        RetryOutcome::Requeued
    );
    assert!(
        queue.receive(10, VISIBILITY).await.unwrap().is_empty(),
        "a1 acked, b1 delayed, x1 in flight"
    );
    clock.advance(Duration::from_secs(5));
    let again = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["b1"]);
    assert_eq!(again[0].attempt, 2);
}

#[tokio::test]
async fn retry_delays_the_message_and_holds_its_group() {
    let (_dir, queue, clock) = queue_with(5);
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
    let (_dir, queue, _clock) = queue_with(3);
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
    let (_dir, queue, clock) = queue_with(2);
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
async fn a_timed_out_last_attempt_keeps_the_error_of_the_retry_before() {
    let (_dir, queue, clock) = queue_with(2);
    queue.send(vec![message("a1", "A")]).await.unwrap();
    let d = queue.receive(1, VISIBILITY).await.unwrap();
    queue
        .retry(&d[0].receipt, Duration::ZERO, "F&O said 503")
        .await
        .unwrap();
    assert_eq!(queue.receive(1, VISIBILITY).await.unwrap()[0].attempt, 2);
    clock.advance(VISIBILITY);
    assert!(queue.receive(1, VISIBILITY).await.unwrap().is_empty());
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(
        dead[0].last_error,
        "F&O said 503; visibility timeout expired without ack"
    );
}

#[tokio::test]
async fn depth_counts_each_state() {
    let (_dir, queue, clock) = queue_with(5);
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
async fn reopening_the_directory_keeps_messages_and_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    {
        let queue = LogQueue::open(&path, config(&clock, 2)).unwrap();
        queue
            .send(vec![
                message("a1", "A"),
                message("a2", "A"),
                message("b1", "B"),
                message("c1", "C"),
                message("d1", "D"),
            ])
            .await
            .unwrap();
        let d = queue.receive(10, VISIBILITY).await.unwrap();
        assert_eq!(ids(&d), ["a1", "b1", "c1", "d1"]);
        queue
            .retry(&d[1].receipt, Duration::from_secs(60), "throttled")
            .await
            .unwrap();
        queue
            .retry(&d[2].receipt, Duration::ZERO, "bad data")
            .await
            .unwrap();
        let c = queue.receive(10, VISIBILITY).await.unwrap();
        assert_eq!(ids(&c), ["c1"]);
        let outcome = queue
            .retry(&c[0].receipt, Duration::ZERO, "bad data")
            .await
            .unwrap();
        assert_eq!(outcome, RetryOutcome::DeadLettered);
        queue.ack(&d[3].receipt).await.unwrap();
    }
    let queue = LogQueue::open(&path, config(&clock, 2)).unwrap();
    // a1 was in flight when the queue closed: its worker is gone with the process, so it is
    // ready at once (a delivery whose visibility expired). b1 keeps its delay; c1 is dead; d1
    // was acked.
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth {
            ready: 2,
            in_flight: 0,
            delayed: 1,
            dead: 1
        }
    );
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["a1", "a2", "b1"]);
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message, message("c1", "C"));
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_str()),
        (2, "bad data")
    );

    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1"], "redelivered at once, b1 still delayed");
    assert_eq!(d[0].attempt, 2, "the delivery before the restart counted");
    queue.ack(&d[0].receipt).await.unwrap();
    clock.advance(Duration::from_secs(60));
    let b = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&b), ["a2", "b1"]);
    assert_eq!((b[0].attempt, b[1].attempt), (1, 2));
}

#[tokio::test]
async fn a_receipt_of_the_previous_run_is_unknown_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let old = {
        let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
        queue.send(vec![message("a1", "A")]).await.unwrap();
        queue.receive(1, VISIBILITY).await.unwrap().remove(0)
    };
    let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
    assert!(matches!(
        queue.ack(&old.receipt).await,
        Err(QueueError::UnknownReceipt(_))
    ));
    let new = queue.receive(1, VISIBILITY).await.unwrap().remove(0);
    assert_ne!(new.receipt, old.receipt, "receipts are unique per delivery");
    queue.ack(&new.receipt).await.unwrap();
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
}
