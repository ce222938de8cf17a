//! LogQueue across a restart: what was queued, delayed, in flight and dead when the directory
//! closed. (The port's guarantees within one run: `queue_contract`.)

use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::ports::{QueueDepth, QueueError, RetryOutcome, WorkQueue};
use dualwrite_logqueue::{LogQueue, ManualClock};

use crate::fixtures::{config, ids, message, message_ids, t0};

const VISIBILITY: Duration = Duration::from_secs(30);

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
