//! What every [`WorkQueue`] must do, as tests each adapter runs against itself.
//!
//! The port's guarantees (at-least-once, one message per group in flight, visibility
//! timeouts, retry delays, dead letters, redrive behind the group) are written once here and
//! run by every implementation: the in-memory queue of this crate, the SQLite queue, the log
//! queue — and any queue added later, which gets the whole suite by one macro call:
//!
//! ```ignore
//! mod contract {
//!     dualwrite_engine::queue_contract_tests!(|dir: &std::path::Path, max_attempts, clock| {
//!         MyQueue::open(dir.join("queue"), max_attempts, clock).unwrap()
//!     });
//! }
//! ```
//!
//! The opener gets a fresh empty directory (the case keeps it until it ends), the queue's
//! maximum number of attempts and the clock the case moves. What a queue keeps across a
//! restart is the adapter's own tests' concern: the adapters differ there (a restarted log
//! queue hands out at once what was in flight; SQLite waits for the visibility timeout).
//!
//! Built with the crate feature `queue-contract`, for tests only.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use dualwrite_core::ports::{
    Delivery, QueueDepth, QueueError, QueueMessage, RetryOutcome, WorkQueue,
};
use dualwrite_core::{
    ChangeEvent, LookupRef, Operation, Record, RecordKey, Side, SourceVersion, Value,
};

use crate::clock::ManualClock;

/// The visibility timeout every case receives with.
pub const VISIBILITY: Duration = Duration::from_secs(30);

/// The instant each case's clock starts at.
pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).expect("a valid instant")
}

/// A CRM upsert of account `record_id` with id `event_id`: its group is the record.
pub fn message(event_id: &str, record_id: &str) -> QueueMessage {
    let mut record = Record::new("accounts");
    record.id = Some(record_id.into());
    record.version = Some(SourceVersion {
        modified_on: t0(),
        sequence: 0,
    });
    QueueMessage::for_event(ChangeEvent {
        event_id: event_id.to_owned(),
        source: Side::Crm,
        operation: Operation::Upsert,
        record,
        partial: false,
        received_at: t0(),
        correlation_id: None,
        depth: None,
    })
}

/// The event ids of `deliveries`, in order.
pub fn ids(deliveries: &[Delivery]) -> Vec<&str> {
    deliveries
        .iter()
        .map(|d| d.message.event.event_id.as_str())
        .collect()
}

fn depth(ready: u64, in_flight: u64, delayed: u64, dead: u64) -> QueueDepth {
    QueueDepth {
        ready,
        in_flight,
        delayed,
        dead,
    }
}

/// A case's queue, with its clock and the directory it lives in.
struct Subject<Q> {
    queue: Q,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

fn subject<Q, F>(open: &F, max_attempts: u32) -> Subject<Q>
where
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = Arc::new(ManualClock::new(t0()));
    Subject {
        queue: open(dir.path(), max_attempts, clock.clone()),
        clock,
        _dir: dir,
    }
}

async fn dead_ids(queue: &impl WorkQueue) -> Vec<String> {
    queue
        .dead_letters(100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.message.event.event_id)
        .collect()
}

/// The heads of the groups are delivered, lowest send order first; nothing more of a group
/// while its head is in flight; the next one once it is acked.
pub async fn one_message_per_group_at_a_time_in_send_order<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let queue = &s.queue;
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
    assert_eq!(ids(&first), ["a1", "b1", "c1"], "the head of each group");
    assert!(first.iter().all(|d| d.attempt == 1));
    assert!(
        queue.receive(10, VISIBILITY).await.unwrap().is_empty(),
        "nothing more while the heads are in flight"
    );

    queue.ack(&first[0].receipt).await.unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
    queue.ack(&first[1].receipt).await.unwrap();
    let next = queue.receive(1, VISIBILITY).await.unwrap();
    assert_eq!(ids(&next), ["b2"]);
    assert_eq!(next[0].message, message("b2", "B"), "as it was sent");
}

/// A message comes back exactly as it was sent, whatever its fields hold.
pub async fn a_message_comes_back_as_it_was_sent<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let mut sent = message("every-type", "R");
    sent.event.partial = true;
    sent.event.correlation_id = Some("b374239d-4233-41a9-8b17-a5e7a2a1a1c0".to_owned());
    sent.event.depth = Some(2);
    sent.event.record.company = Some("usmf".into());
    sent.event.record.etag = Some("W/\"468026\"".to_owned());
    let offset = FixedOffset::east_opt(-7 * 3600).expect("a valid offset");
    let fields = [
        ("null", Value::Null),
        (
            "text",
            Value::Text("Contoso \"Ltd\" — Zürich, 東京\n".into()),
        ),
        ("empty", Value::Text("".into())),
        ("integer", Value::Integer(i64::MIN)),
        (
            "decimal",
            Value::Decimal("-1234567.000000001".parse().unwrap()),
        ),
        ("boolean", Value::Boolean(true)),
        (
            "date",
            Value::Date(NaiveDate::from_ymd_opt(2026, 2, 28).unwrap()),
        ),
        (
            "datetime",
            Value::DateTime(DateTime::parse_from_rfc3339("2017-09-25T23:50:47.123-07:00").unwrap()),
        ),
        ("choice", Value::Choice(806_380_000)),
        ("enum", Value::Enum("Organization".into())),
        (
            "lookup",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "transactioncurrencies".to_owned(),
                id: Some("6d81c5b3-43a2-e711-8122-000d3aa2331c".to_owned()),
                key: Some(RecordKey::new([("isocurrencycode", "US'D")])),
            })),
        ),
    ];
    for (name, value) in fields {
        sent.event.record.fields.insert(name, value);
    }
    assert!(matches!(
        sent.event.record.fields.get("datetime"),
        Some(Value::DateTime(d)) if *d.offset() == offset
    ));
    s.queue.send(vec![sent.clone()]).await.unwrap();
    let got = s.queue.receive(1, VISIBILITY).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message, sent);
}

/// `receive` hands out at most `max` messages, and none for 0.
pub async fn receive_respects_max<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let queue = &s.queue;
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
    assert_eq!(ids(&queue.receive(5, VISIBILITY).await.unwrap()), ["e4"]);
}

/// A delivery not acked within its visibility timeout is delivered again, still ahead of its
/// group; the first delivery's receipt is then dead.
pub async fn an_unacked_delivery_comes_back_after_its_visibility_timeout<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let queue = &s.queue;
    queue
        .send(vec![message("a1", "A"), message("a2", "A")])
        .await
        .unwrap();
    let first = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&first), ["a1"]);

    s.clock.advance(VISIBILITY - Duration::from_millis(1));
    assert!(
        queue.receive(10, VISIBILITY).await.unwrap().is_empty(),
        "still in flight"
    );
    s.clock.advance(Duration::from_millis(1));
    let again = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["a1"], "delivered again, still ahead of a2");
    assert_eq!(again[0].attempt, 2);
    assert_ne!(again[0].receipt, first[0].receipt, "a receipt per delivery");

    let stale = queue.ack(&first[0].receipt).await.unwrap_err();
    assert!(matches!(stale, QueueError::UnknownReceipt(ref r) if *r == first[0].receipt));
    let stale = queue.retry(&first[0].receipt, Duration::ZERO, "x").await;
    assert!(matches!(stale, Err(QueueError::UnknownReceipt(_))));
    queue.ack(&again[0].receipt).await.unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a2"]);
}

/// An ack after the visibility timeout, before anyone received the message again, counts;
/// a second ack, or a receipt the queue never gave, is refused.
pub async fn a_late_ack_before_redelivery_is_accepted<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let queue = &s.queue;
    queue.send(vec![message("a1", "A")]).await.unwrap();
    let d = queue.receive(1, VISIBILITY).await.unwrap();
    s.clock.advance(VISIBILITY * 2);
    queue.ack(&d[0].receipt).await.unwrap();
    assert!(queue.receive(10, VISIBILITY).await.unwrap().is_empty());
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
    for receipt in [d[0].receipt.as_str(), "garbage", "1.x", ""] {
        assert!(
            matches!(queue.ack(receipt).await, Err(QueueError::UnknownReceipt(_))),
            "ack {receipt:?}"
        );
    }
}

/// A delivery whose timeout passed stays settleable until its message is delivered again,
/// even when another receive found it due but handed out something else.
pub async fn a_late_receipt_stays_valid_until_its_message_is_delivered_again<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let queue = &s.queue;
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
    s.clock.advance(VISIBILITY);
    // All three are due; a receive of one hands out x1 alone (first sent).
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
    s.clock.advance(Duration::from_secs(5));
    let again = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["b1"]);
    assert_eq!(again[0].attempt, 2);
}

/// `retry` delays its message and holds the rest of its group behind it; other groups go on.
pub async fn retry_delays_the_message_and_holds_its_group<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 5);
    let queue = &s.queue;
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
    assert_eq!(queue.depth().await.unwrap(), depth(2, 0, 1, 0));

    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["b1"]);
    s.clock
        .advance(Duration::from_secs(10) - Duration::from_millis(1));
    assert!(queue.receive(10, VISIBILITY).await.unwrap().is_empty());
    s.clock.advance(Duration::from_millis(1));
    let again = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["a1"]);
    assert_eq!(again[0].attempt, 2);
    assert!(matches!(
        queue.retry(&d[0].receipt, Duration::ZERO, "x").await,
        Err(QueueError::UnknownReceipt(_))
    ));
}

/// The last allowed attempt's retry moves the message to the dead letters with its error and
/// attempts; the group moves on.
pub async fn after_max_attempts_retry_dead_letters_and_the_group_moves_on<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 3);
    let queue = &s.queue;
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
    assert_eq!(queue.depth().await.unwrap(), depth(0, 1, 0, 1));
}

/// A message whose every delivery times out (a worker that keeps dying on it) is dead-lettered
/// too, saying so.
pub async fn a_message_that_keeps_timing_out_is_dead_lettered_too<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 2);
    let queue = &s.queue;
    queue
        .send(vec![message("a1", "A"), message("a2", "A")])
        .await
        .unwrap();
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a1"]);
    s.clock.advance(VISIBILITY);
    assert_eq!(ids(&queue.receive(10, VISIBILITY).await.unwrap()), ["a1"]);
    s.clock.advance(VISIBILITY);
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

/// A last attempt that timed out after an earlier retry keeps that retry's error too: the
/// person reading the dead letter learns what failed, not only that a worker went quiet.
pub async fn a_timed_out_last_attempt_keeps_the_error_of_the_retry_before<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 2);
    let queue = &s.queue;
    queue.send(vec![message("a1", "A")]).await.unwrap();
    let d = queue.receive(1, VISIBILITY).await.unwrap();
    queue
        .retry(&d[0].receipt, Duration::ZERO, "F&O said 503")
        .await
        .unwrap();
    assert_eq!(queue.receive(1, VISIBILITY).await.unwrap()[0].attempt, 2);
    s.clock.advance(VISIBILITY);
    assert!(queue.receive(1, VISIBILITY).await.unwrap().is_empty());
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].last_error.contains("F&O said 503")
            && dead[0].last_error.contains("visibility timeout"),
        "{}",
        dead[0].last_error
    );
}

/// `depth` counts ready, in-flight, delayed and dead messages; an expired delivery and an
/// elapsed delay count as ready.
pub async fn depth_counts_each_state<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 1);
    let queue = &s.queue;
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
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
    assert_eq!(queue.depth().await.unwrap(), depth(5, 0, 0, 0));
    let d = queue.receive(2, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1", "b1"]);
    let outcome = queue
        .retry(&d[1].receipt, Duration::ZERO, "refused")
        .await
        .unwrap();
    assert_eq!(outcome, RetryOutcome::DeadLettered);
    assert_eq!(queue.depth().await.unwrap(), depth(3, 1, 0, 1));
    s.clock.advance(VISIBILITY);
    assert_eq!(queue.depth().await.unwrap(), depth(4, 0, 0, 1));

    let s = subject(open, 5);
    let queue = &s.queue;
    queue
        .send(vec![message("a1", "A"), message("b1", "B")])
        .await
        .unwrap();
    let d = queue.receive(2, VISIBILITY).await.unwrap();
    queue
        .retry(&d[1].receipt, Duration::from_secs(5), "later")
        .await
        .unwrap();
    assert_eq!(queue.depth().await.unwrap(), depth(0, 1, 1, 0));
    s.clock.advance(Duration::from_secs(5));
    assert_eq!(queue.depth().await.unwrap(), depth(1, 1, 0, 0));
}

/// `redrive` moves dead letters back, oldest death first and at most `limit`, each to the
/// end of its group as a first attempt, exactly as it was sent.
pub async fn redrive_sends_dead_letters_back_oldest_first_behind_their_groups<Q, F>(open: &F)
where
    Q: WorkQueue,
    F: Fn(&Path, u32, Arc<ManualClock>) -> Q,
{
    let s = subject(open, 1);
    let queue = &s.queue;
    queue
        .send(vec![message("a1", "A"), message("b1", "B")])
        .await
        .unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1", "b1"]);
    for delivery in [&d[1], &d[0]] {
        let outcome = queue
            .retry(&delivery.receipt, Duration::ZERO, "F&O unavailable")
            .await
            .unwrap();
        assert_eq!(outcome, RetryOutcome::DeadLettered);
        s.clock.advance(Duration::from_secs(1));
    }
    queue.send(vec![message("a2", "A")]).await.unwrap();
    assert_eq!(
        dead_ids(queue).await,
        ["b1", "a1"],
        "in the order they died"
    );
    assert_eq!(
        queue.dead_letters(1).await.unwrap().len(),
        1,
        "dead_letters respects its limit"
    );

    assert_eq!(queue.redrive(0).await.unwrap(), 0);
    assert_eq!(queue.redrive(1).await.unwrap(), 1, "the oldest death: b1");
    assert_eq!(dead_ids(queue).await, ["a1"]);
    assert_eq!(queue.redrive(10).await.unwrap(), 1);
    assert_eq!(queue.redrive(10).await.unwrap(), 0);
    assert_eq!(queue.depth().await.unwrap(), depth(3, 0, 0, 0));

    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(
        ids(&d),
        ["a2", "b1"],
        "a1 waits behind a2, queued before it"
    );
    assert!(d.iter().all(|d| d.attempt == 1), "attempts start again");
    assert_eq!(d[1].message, message("b1", "B"));
    queue.ack(&d[0].receipt).await.unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1"]);
    assert_eq!(d[0].attempt, 1);
}

/// Generates one `#[tokio::test]` per case of [`crate::queue_contract`], each opening its
/// queues with `$open`: a closure `|dir: &Path, max_attempts: u32, clock: Arc<ManualClock>|`
/// returning the queue. Call it inside a module of its own.
#[macro_export]
macro_rules! queue_contract_tests {
    ($open:expr) => {
        $crate::queue_contract_tests!(@cases $open;
            one_message_per_group_at_a_time_in_send_order,
            a_message_comes_back_as_it_was_sent,
            receive_respects_max,
            an_unacked_delivery_comes_back_after_its_visibility_timeout,
            a_late_ack_before_redelivery_is_accepted,
            a_late_receipt_stays_valid_until_its_message_is_delivered_again,
            retry_delays_the_message_and_holds_its_group,
            after_max_attempts_retry_dead_letters_and_the_group_moves_on,
            a_message_that_keeps_timing_out_is_dead_lettered_too,
            a_timed_out_last_attempt_keeps_the_error_of_the_retry_before,
            depth_counts_each_state,
            redrive_sends_dead_letters_back_oldest_first_behind_their_groups
        );
    };
    (@cases $open:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::queue_contract::$case(&$open).await;
            }
        )*
    };
}
