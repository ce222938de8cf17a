//! Recovery and reclaiming: torn tails are cut and nothing before them lost; every kind of
//! record is replayed; dead segments are deleted; compaction moves long-lived messages and
//! dead letters without changing what is delivered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::ports::{QueueDepth, RetryOutcome, WorkQueue};
use dualwrite_logqueue::{LogQueue, ManualClock, OpenError, QueueConfig};
use rand::Rng;

use crate::fixtures::{big_message, config, ids, message, message_ids, segment_files, t0};

const VISIBILITY: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);

/// Copies the segment files of a queue that is still open: what a crash (SIGKILL) at this
/// instant would leave behind, since everything written is in the page cache.
pub(crate) fn crash_copy(queue_dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let copy = tempfile::tempdir().unwrap();
    let to = copy.path().join("copy.queue");
    std::fs::create_dir(&to).unwrap();
    for name in segment_files(queue_dir) {
        std::fs::copy(queue_dir.join(&name), to.join(&name)).unwrap();
    }
    (copy, to)
}

fn newest_segment(dir: &Path) -> PathBuf {
    dir.join(segment_files(dir).pop().unwrap())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Where the records of a segment end: before the zeros the writer puts ahead of them (a
/// record never ends in a zero byte: its last byte closes the event's JSON).
fn records_end(segment: &[u8]) -> u64 {
    segment
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

pub(crate) fn small_segments(clock: &Arc<ManualClock>, max_attempts: u32) -> QueueConfig {
    QueueConfig {
        segment_bytes: 16 << 10,
        ..config(clock, max_attempts)
    }
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_every_record_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    {
        let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
        queue.send(vec![big_message("m1", "A")]).await.unwrap();
        queue.send(vec![big_message("m2", "B")]).await.unwrap();
    }
    let segment = newest_segment(&path);
    let two = records_end(&std::fs::read(&segment).unwrap());
    {
        let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
        queue.send(vec![big_message("m3", "C")]).await.unwrap();
    }
    let with_zeros = std::fs::read(&segment).unwrap();
    assert!(
        with_zeros.len() as u64 >= 1 << 20,
        "the writer puts zeros ahead of its records"
    );
    let three = with_zeros[..records_end(&with_zeros) as usize].to_vec();
    assert!(three.len() as u64 > two + 3000, "m3's record is about 3 KB");

    // The batch holding m3 torn at any point: a part of its header, of its payload, or all of
    // it but its last byte.
    let record = three.len() as u64 - two;
    for cut in [1, 3, 4, 7, 8, 9, 100, record / 2, record - 1] {
        std::fs::write(&segment, &three[..(two + cut) as usize]).unwrap();
        let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
        assert_eq!(
            message_ids(&queue.pending(10).unwrap()),
            ["m1", "m2"],
            "cut {cut} bytes into m3's record"
        );
        assert_eq!(file_len(&segment), two, "the torn tail is cut off the file");
        drop(queue);
    }

    // After whole records: the writer's zeros (kept: the clean end), random bytes (cut), a
    // flipped bit in the last record (cut with it).
    let mut rng = rand::rng();
    let random: Vec<u8> = (0..257).map(|_| rng.random()).collect();
    let mut flipped = three.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x10;
    let whole = three.len() as u64;
    for (what, bytes, kept, len_after) in [
        (
            "zeros",
            [three.clone(), vec![0; 4096]].concat(),
            3,
            whole + 4096,
        ),
        (
            "random bytes",
            [three.clone(), random.clone()].concat(),
            3,
            whole,
        ),
        (
            "zeros, then a later part of a torn batch",
            [three.clone(), vec![0; 512], random].concat(),
            3,
            whole,
        ),
        ("a flipped bit in m3", flipped, 2, two),
    ] {
        std::fs::write(&segment, &bytes).unwrap();
        let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
        let pending = message_ids(&queue.pending(10).unwrap());
        assert_eq!(pending.len(), kept, "{what}: {pending:?}");
        assert_eq!(file_len(&segment), len_after, "{what}");
        drop(queue);
    }

    // After a cut, the queue appends where the good records end and reads it all back.
    std::fs::write(&segment, &three[..(two + 5) as usize]).unwrap();
    {
        let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
        queue.send(vec![big_message("m4", "D")]).await.unwrap();
    }
    let queue = LogQueue::open(&path, config(&clock, 5)).unwrap();
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["m1", "m2", "m4"]);
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(d[2].message, big_message("m4", "D"));
}

#[tokio::test]
async fn damage_in_an_older_segment_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    {
        let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
        for i in 0..12 {
            let m = big_message(&format!("m{i}"), &format!("G{i}"));
            queue.send(vec![m]).await.unwrap();
        }
    }
    let files = segment_files(&path);
    assert!(files.len() >= 2, "{files:?}");
    let oldest = path.join(&files[0]);
    let mut bytes = std::fs::read(&oldest).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&oldest, &bytes).unwrap();
    let err = LogQueue::open(&path, small_segments(&clock, 5)).unwrap_err();
    assert!(matches!(err, OpenError::Damaged { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&files[0]), "{text}");
    assert!(text.contains("move this file out"), "{text}");
    assert_eq!(std::fs::read(&oldest).unwrap(), bytes, "nothing was cut");
}

#[tokio::test]
async fn each_kind_of_record_is_replayed_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, config(&clock, 2)).unwrap();
    let reopen = |copy: &Path| LogQueue::open(copy, config(&clock, 2)).unwrap();

    // Sent.
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
    let (_keep, copy) = crash_copy(&path);
    let q = reopen(&copy);
    assert_eq!(
        message_ids(&q.pending(10).unwrap()),
        ["a1", "a2", "b1", "c1", "d1"]
    );
    drop(q);

    // Delivered: written with the next batch (here: the one `sync` asks for).
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1", "b1", "c1", "d1"]);
    queue.sync().await.unwrap();
    let (_keep, copy) = crash_copy(&path);
    let q = reopen(&copy);
    let again = q.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&again), ["a1", "b1", "c1", "d1"], "ready at once");
    assert!(again.iter().all(|d| d.attempt == 2), "the delivery counted");
    drop(q);

    // Acked.
    queue.ack(&d[3].receipt).await.unwrap();
    queue.sync().await.unwrap();
    let (_keep, copy) = crash_copy(&path);
    let q = reopen(&copy);
    assert_eq!(
        message_ids(&q.pending(10).unwrap()),
        ["a1", "a2", "b1", "c1"]
    );
    drop(q);

    // Retried: synced before `retry` returns, no `sync` needed; the delay is kept.
    queue.retry(&d[1].receipt, HOUR, "throttled").await.unwrap();
    let (_keep, copy) = crash_copy(&path);
    let q = reopen(&copy);
    assert_eq!(q.depth().await.unwrap().delayed, 1);
    assert_eq!(ids(&q.receive(10, VISIBILITY).await.unwrap()), ["a1", "c1"]);
    clock.advance(HOUR);
    let b = q.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(
        ids(&b),
        ["a2", "b1"],
        "a1 timed out on its last attempt meanwhile, b1's delay is over"
    );
    assert_eq!(b[1].attempt, 2);
    clock.set(t0());
    drop(q);

    // DeadLettered by `retry` on the last attempt: synced before it returns, body kept.
    queue
        .retry(&d[2].receipt, Duration::ZERO, "bad data")
        .await
        .unwrap();
    let c = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&c), ["c1"]);
    assert_eq!(
        queue
            .retry(&c[0].receipt, Duration::ZERO, "still bad")
            .await
            .unwrap(),
        RetryOutcome::DeadLettered
    );
    // DeadLettered by a last delivery that timed out: written with the next batch.
    let (_keep, copy) = crash_copy(&path);
    let q = reopen(&copy);
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message, message("c1", "C"));
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_str()),
        (2, "still bad")
    );
    drop(q);

    clock.advance(VISIBILITY);
    let a = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&a), ["a1"], "redelivered: attempt 2");
    clock.advance(VISIBILITY);
    let a2 = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&a2), ["a2"], "a1 timed out on its last attempt");
    queue.sync().await.unwrap();
    let (_keep, copy) = crash_copy(&path);
    let q = reopen(&copy);
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(
        dead.iter()
            .map(|d| d.message.event.event_id.as_str())
            .collect::<Vec<_>>(),
        ["c1", "a1"],
        "in the order they died"
    );
    assert!(dead[1].last_error.contains("visibility timeout"));
    assert_eq!(
        q.depth().await.unwrap(),
        QueueDepth {
            ready: 1,
            in_flight: 0,
            delayed: 1,
            dead: 2
        },
        "a2 (in flight at the crash) ready, b1 delayed"
    );
}

#[tokio::test]
async fn segments_are_deleted_once_everything_in_them_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
    for batch in 0..6 {
        let messages = (0..10)
            .map(|i| big_message(&format!("m{batch}-{i}"), &format!("G{batch}-{i}")))
            .collect();
        queue.send(messages).await.unwrap();
    }
    let before = segment_files(&path);
    // A batch is never split: six batches of 30 KB, six sealed segments and a new head.
    assert!(before.len() >= 6, "{before:?}");

    let d = queue.receive(100, VISIBILITY).await.unwrap();
    assert_eq!(d.len(), 60);
    // The first batch filled the first segment: acking it deletes that segment alone, with
    // nothing to carry.
    for delivery in &d[..10] {
        queue.ack(&delivery.receipt).await.unwrap();
    }
    queue.sync().await.unwrap();
    let files = segment_files(&path);
    assert!(!files.contains(&before[0]), "{files:?}");
    assert_eq!(files[0], before[1]);
    assert_eq!(queue.stats().carried, 0);
    for delivery in &d[10..] {
        queue.ack(&delivery.receipt).await.unwrap();
    }
    queue.sync().await.unwrap();
    let after = segment_files(&path);
    assert!(after.len() <= 2, "{after:?}");
    assert!(!after.contains(&before[0]));
    assert!(queue.stats().deleted_segments >= before.len() as u64 - 2);
    drop(queue);

    // Reopened: empty, and new messages get new sequence numbers (receipts never repeat).
    let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
    queue.send(vec![message("n1", "N")]).await.unwrap();
    let n = queue.receive(1, VISIBILITY).await.unwrap();
    let seq: u64 = n[0].receipt.split('.').next().unwrap().parse().unwrap();
    assert!(seq > 60, "{}", n[0].receipt);
}

#[tokio::test]
async fn compaction_moves_long_lived_messages_and_dead_letters_and_delivers_them_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, small_segments(&clock, 2)).unwrap();
    // L is retried with an hour's delay, L2 waits behind it, D is dead-lettered: all three
    // live in the first segment for as long as the test runs.
    queue
        .send(vec![
            big_message("L", "long"),
            big_message("L2", "long"),
            big_message("D", "dead"),
        ])
        .await
        .unwrap();
    let first = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&first), ["L", "D"]);
    queue
        .retry(&first[0].receipt, HOUR, "throttled")
        .await
        .unwrap();
    queue
        .retry(&first[1].receipt, Duration::ZERO, "bad")
        .await
        .unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["D"]);
    queue
        .retry(&d[0].receipt, Duration::ZERO, "bad")
        .await
        .unwrap();
    let first_segment = segment_files(&path)[0].clone();

    // Traffic that comes and goes: 300 messages of 3 KB through 16 KiB segments.
    for batch in 0..30 {
        let messages = (0..10)
            .map(|i| big_message(&format!("x{batch}-{i}"), &format!("X{batch}-{i}")))
            .collect();
        queue.send(messages).await.unwrap();
        let got = queue.receive(100, VISIBILITY).await.unwrap();
        assert_eq!(got.len(), 10, "L is delayed, L2 behind it: batch {batch}");
        for delivery in got {
            queue.ack(&delivery.receipt).await.unwrap();
        }
    }
    // Compaction runs a step per batch; a few syncs let it finish and delete what it freed.
    for _ in 0..10 {
        queue.sync().await.unwrap();
    }
    let stats = queue.stats();
    let files = segment_files(&path);
    assert!(
        !files.contains(&first_segment),
        "the first segment was compacted away: {files:?} {stats:?}"
    );
    assert!(stats.carried >= 3, "L, L2 and the dead letter D: {stats:?}");
    assert!(
        files.len() <= 5,
        "the log stays a few segments long: {files:?} {stats:?}"
    );

    // Nothing changed for the queue's users, also after reopening from the compacted files.
    let check = |queue: LogQueue| async move {
        assert_eq!(
            queue.depth().await.unwrap(),
            QueueDepth {
                ready: 1,
                in_flight: 0,
                delayed: 1,
                dead: 1
            }
        );
        assert!(queue.receive(10, VISIBILITY).await.unwrap().is_empty());
        let dead = queue.dead_letters(10).await.unwrap();
        assert_eq!(dead[0].message, big_message("D", "dead"));
        assert_eq!((dead[0].attempts, dead[0].last_error.as_str()), (2, "bad"));
        queue
    };
    let queue = check(queue).await;
    drop(queue);
    let queue = check(LogQueue::open(&path, small_segments(&clock, 2)).unwrap()).await;
    clock.advance(HOUR);
    let l = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&l), ["L"]);
    assert_eq!(l[0].attempt, 2, "its attempt count moved with it");
    assert_eq!(l[0].message, big_message("L", "long"));
    assert!(queue.receive(10, VISIBILITY).await.unwrap().is_empty());
    queue.ack(&l[0].receipt).await.unwrap();
    let l2 = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&l2), ["L2"]);
    assert_eq!(l2[0].attempt, 1);
}

/// A copy of queue directory `path` as a crash would leave it when the segments in `back`
/// were not deleted yet: the `present` files copied, the `back` ones restored from `saved`.
pub(crate) fn with_deleted_back(
    path: &Path,
    present: &[String],
    saved: &BTreeMap<String, Vec<u8>>,
    back: &[&String],
) -> (tempfile::TempDir, PathBuf) {
    let copy = tempfile::tempdir().unwrap();
    let to = copy.path().join("copy.queue");
    std::fs::create_dir(&to).unwrap();
    for name in present {
        std::fs::copy(path.join(name), to.join(name)).unwrap();
    }
    for name in back {
        std::fs::write(to.join(name), &saved[*name]).unwrap();
    }
    (copy, to)
}

/// Copies every sealed segment (all but the newest) not copied yet: sealed segments never
/// change, so the copy is what a later crash could leave of it.
pub(crate) fn save_sealed(dir: &Path, saved: &mut BTreeMap<String, Vec<u8>>) {
    let mut files = segment_files(dir);
    files.pop();
    for name in files {
        if !saved.contains_key(&name) {
            saved.insert(name.clone(), std::fs::read(dir.join(&name)).unwrap());
        }
    }
}

#[tokio::test]
async fn segments_deleted_after_compaction_coming_back_change_nothing() {
    // Segments are deleted oldest first, each deletion synced before the next, after the
    // carried copies were synced: a crash among the deletions leaves the newest of the
    // deleted segments in place. For each such crash point, the queue reads back exactly the
    // state of the compacted log: no duplicate, no resurrected message, no lost one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, small_segments(&clock, 2)).unwrap();
    queue
        .send(vec![big_message("L", "long"), big_message("D", "dead")])
        .await
        .unwrap();
    let first = queue.receive(10, VISIBILITY).await.unwrap();
    queue
        .retry(&first[0].receipt, HOUR, "throttled")
        .await
        .unwrap();
    queue
        .retry(&first[1].receipt, Duration::ZERO, "bad")
        .await
        .unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["D"]);
    queue
        .retry(&d[0].receipt, Duration::ZERO, "bad")
        .await
        .unwrap();
    let mut saved = BTreeMap::new();
    for batch in 0..30 {
        let messages = (0..10)
            .map(|i| big_message(&format!("x{batch}-{i}"), &format!("X{batch}-{i}")))
            .collect();
        queue.send(messages).await.unwrap();
        save_sealed(&path, &mut saved);
        for delivery in queue.receive(100, VISIBILITY).await.unwrap() {
            queue.ack(&delivery.receipt).await.unwrap();
        }
        save_sealed(&path, &mut saved);
    }
    for _ in 0..10 {
        queue.sync().await.unwrap();
    }
    assert!(queue.stats().carried >= 2, "{:?}", queue.stats());
    drop(queue);
    let present = segment_files(&path);
    let deleted: Vec<&String> = saved.keys().filter(|n| !present.contains(n)).collect();
    assert!(deleted.len() >= 5, "{deleted:?} {present:?}");

    for crash_point in 0..=deleted.len() {
        let (_copy, to) = with_deleted_back(&path, &present, &saved, &deleted[crash_point..]);
        let queue = LogQueue::open(&to, small_segments(&clock, 2)).unwrap();
        let context = format!("{} deleted segments back", deleted.len() - crash_point);
        assert_eq!(message_ids(&queue.pending(10).unwrap()), ["L"], "{context}");
        let dead = queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1, "{context}");
        assert_eq!(dead[0].message, big_message("D", "dead"), "{context}");
        assert_eq!(
            queue.depth().await.unwrap(),
            QueueDepth {
                ready: 0,
                in_flight: 0,
                delayed: 1,
                dead: 1
            },
            "{context}"
        );
        // What came back homes nothing: it goes with the next batch.
        queue.sync().await.unwrap();
        for name in &deleted {
            assert!(!to.join(name).exists(), "{context}: {name} still there");
        }
        drop(queue);
    }

    let queue = LogQueue::open(&path, small_segments(&clock, 2)).unwrap();
    clock.advance(HOUR);
    let l = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&l), ["L"]);
    assert_eq!(l[0].attempt, 2);
}

#[tokio::test]
async fn a_failed_write_stops_the_queue_and_reopening_keeps_every_answered_send() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
    // Creating segment 1 will fail: a directory stands where its temporary file goes.
    let blocker = path.join("00000000000000000001.seg.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let mut answered = Vec::new();
    let mut failure = None;
    for i in 0..20 {
        let id = format!("m{i}");
        match queue.send(vec![big_message(&id, &format!("G{i}"))]).await {
            Ok(()) => answered.push(id),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the rotation failed").to_string();
    assert!(failure.contains("00000000000000000001.seg"), "{failure}");
    assert!(failure.contains("Restart dualwrite"), "{failure}");
    // Stopped for good: every later call says so.
    let later = queue.send(vec![message("late", "L")]).await.unwrap_err();
    assert!(later.to_string().contains("failed"), "{later}");
    assert!(queue.receive(10, VISIBILITY).await.is_err());
    drop(queue);

    std::fs::remove_dir(&blocker).unwrap();
    let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
    let pending = message_ids(&queue.pending(100).unwrap());
    for id in &answered {
        assert!(
            pending.contains(id),
            "{id} was answered Ok and is gone: {pending:?}"
        );
    }
    assert!(!pending.contains(&"late".to_owned()));
    queue.send(vec![message("after", "A")]).await.unwrap();
}

#[tokio::test]
async fn a_segment_retired_but_not_yet_removed_at_a_crash_is_removed_on_open() {
    // Dead segments are renamed out of the queue at once and removed by a thread of their
    // own (freeing a big file's blocks must not hold the sends up); a crash in between leaves
    // a retired file, which is not a segment and goes on the next open.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
    queue.send(vec![message("m1", "G1")]).await.unwrap();
    drop(queue);
    let retired = path.join("00000000000000000007.seg.retired");
    std::fs::write(&retired, b"whatever was in the dead segment").unwrap();

    let queue = LogQueue::open(&path, small_segments(&clock, 5)).unwrap();
    assert!(!retired.exists(), "the retired file is removed on open");
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["m1"]);
}
