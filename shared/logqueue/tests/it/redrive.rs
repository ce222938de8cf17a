//! Redrive: dead letters go back to the queue behind what their group already queued, durably;
//! the same state after reopening, after a crash tearing the redrive's batch (queued, dead or
//! both, never neither), and after compaction and segment deletions around it; and queues
//! written in the previous segment format.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::ports::{DeadLetter, QueueDepth, RetryOutcome, WorkQueue};
use dualwrite_logqueue::{LogQueue, ManualClock, OpenError};

use crate::fixtures::{big_message, config, ids, message, message_ids, segment_files, t0};
use crate::recovery::{crash_copy, save_sealed, small_segments, with_deleted_back};

const VISIBILITY: Duration = Duration::from_secs(30);

fn dead_ids(dead: &[DeadLetter]) -> Vec<String> {
    dead.iter()
        .map(|d| d.message.event.event_id.clone())
        .collect()
}

/// Receives everything deliverable and retries it: on a queue allowing one attempt, each
/// becomes a dead letter, in delivery order. Returns their ids.
async fn dead_letter_all(queue: &LogQueue) -> Vec<String> {
    let deliveries = queue.receive(100, VISIBILITY).await.unwrap();
    for d in &deliveries {
        let outcome = queue
            .retry(&d.receipt, Duration::ZERO, "F&O unavailable")
            .await
            .unwrap();
        assert_eq!(outcome, RetryOutcome::DeadLettered);
    }
    ids(&deliveries).iter().map(|s| s.to_string()).collect()
}

fn depth(ready: u64, in_flight: u64, dead: u64) -> QueueDepth {
    QueueDepth {
        ready,
        in_flight,
        delayed: 0,
        dead,
    }
}

/// The offsets where the records of a segment start, and where the last one ends (before the
/// zeros written ahead): frames are walked by their length fields.
fn frame_offsets(segment: &[u8]) -> Vec<usize> {
    let mut at = 32;
    let mut offsets = vec![at];
    while at + 8 <= segment.len() {
        let length = u32::from_le_bytes(segment[at..at + 4].try_into().unwrap()) as usize;
        if length == 0 {
            break;
        }
        at += 8 + length;
        offsets.push(at);
    }
    offsets
}

/// Rewrites the format version of a segment's header (and the header's checksum).
fn set_format_version(segment: &Path, version: u32) {
    let mut data = std::fs::read(segment).unwrap();
    data[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c::crc32c(&data[..28]);
    data[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(segment, data).unwrap();
}

fn format_version(segment: &Path) -> u32 {
    let data = std::fs::read(segment).unwrap();
    u32::from_le_bytes(data[8..12].try_into().unwrap())
}

#[tokio::test]
async fn redriven_dead_letters_are_delivered_again_after_what_their_group_already_queued() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(dir.path().join("work.queue"), config(&clock, 1)).unwrap();
    queue
        .send(vec![message("a1", "A"), message("b1", "B")])
        .await
        .unwrap();
    assert_eq!(dead_letter_all(&queue).await, ["a1", "b1"]);
    queue.send(vec![message("a2", "A")]).await.unwrap();
    assert_eq!(queue.depth().await.unwrap(), depth(1, 0, 2));

    assert_eq!(queue.redrive(0).await.unwrap(), 0);
    assert_eq!(queue.redrive(1).await.unwrap(), 1, "the oldest death: a1");
    assert_eq!(dead_ids(&queue.dead_letters(10).await.unwrap()), ["b1"]);
    assert_eq!(queue.depth().await.unwrap(), depth(2, 0, 1));
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["a2", "a1"]);

    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(
        ids(&d),
        ["a2"],
        "a1 waits behind a2, queued before the redrive"
    );
    queue.ack(&d[0].receipt).await.unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["a1"]);
    assert_eq!(d[0].attempt, 1, "its attempt count starts again");
    assert_eq!(
        d[0].message,
        message("a1", "A"),
        "group, dedup id and event as sent"
    );
    queue.ack(&d[0].receipt).await.unwrap();

    assert_eq!(queue.redrive(10).await.unwrap(), 1);
    assert_eq!(queue.redrive(10).await.unwrap(), 0, "nothing left");
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["b1"]);
    assert_eq!(queue.depth().await.unwrap(), depth(0, 1, 0));
}

#[tokio::test]
async fn a_redrive_is_durable_when_it_returns_and_reopening_shows_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, config(&clock, 1)).unwrap();
    queue
        .send(vec![
            message("a1", "A"),
            message("b1", "B"),
            message("c1", "C"),
        ])
        .await
        .unwrap();
    dead_letter_all(&queue).await;
    queue.send(vec![message("a2", "A")]).await.unwrap();
    assert_eq!(queue.redrive(2).await.unwrap(), 2);

    // What a crash right after the redrive returned leaves (no sync asked for).
    let (_keep, copy) = crash_copy(&path);
    let check = |queue: LogQueue| async move {
        assert_eq!(queue.depth().await.unwrap(), depth(3, 0, 1));
        assert_eq!(message_ids(&queue.pending(10).unwrap()), ["a2", "a1", "b1"]);
        assert_eq!(dead_ids(&queue.dead_letters(10).await.unwrap()), ["c1"]);
        let d = queue.receive(10, VISIBILITY).await.unwrap();
        assert_eq!(ids(&d), ["a2", "b1"]);
        assert!(d.iter().all(|d| d.attempt == 1));
        (queue, d)
    };
    drop(check(LogQueue::open(&copy, config(&clock, 1)).unwrap()).await);

    // The queue goes on; reopened, the redriven messages are not dead again.
    let (queue, d) = check(queue).await;
    for delivery in &d {
        queue.ack(&delivery.receipt).await.unwrap();
    }
    drop(queue);
    let queue = LogQueue::open(&path, config(&clock, 1)).unwrap();
    assert_eq!(queue.depth().await.unwrap(), depth(1, 0, 1));
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["a1"]);
    assert_eq!(dead_ids(&queue.dead_letters(10).await.unwrap()), ["c1"]);
}

#[tokio::test]
async fn a_redrive_torn_by_a_crash_leaves_each_message_queued_or_dead_never_neither() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, config(&clock, 1)).unwrap();
    queue
        .send(vec![message("a1", "A"), message("b1", "B")])
        .await
        .unwrap();
    dead_letter_all(&queue).await;
    queue.sync().await.unwrap();
    let segment = path.join(segment_files(&path).pop().unwrap());
    let before = *frame_offsets(&std::fs::read(&segment).unwrap())
        .last()
        .unwrap();
    assert_eq!(queue.redrive(10).await.unwrap(), 2);
    let data = std::fs::read(&segment).unwrap();
    drop(queue);
    let frames: Vec<usize> = frame_offsets(&data)
        .into_iter()
        .filter(|&at| at >= before)
        .collect();
    assert_eq!(
        frames.len(),
        5,
        "Sent, Redriven, Sent, Redriven: {frames:?}"
    );

    // Cut at every record boundary of the redrive's batch and inside each record.
    let mut cuts: Vec<usize> = frames
        .windows(2)
        .flat_map(|w| {
            [
                w[0],
                w[0] + 1,
                w[0] + 7,
                w[0] + 8,
                (w[0] + w[1]) / 2,
                w[1] - 1,
            ]
        })
        .collect();
    cuts.push(*frames.last().unwrap());
    let mut both = 0;
    for cut in cuts {
        let copy = tempfile::tempdir().unwrap();
        let to = copy.path().join("copy.queue");
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join(segment.file_name().unwrap()), &data[..cut]).unwrap();
        let queue = LogQueue::open(&to, config(&clock, 1)).unwrap();
        let pending = message_ids(&queue.pending(10).unwrap());
        let dead = dead_ids(&queue.dead_letters(10).await.unwrap());
        for id in ["a1", "b1"] {
            let id = id.to_owned();
            assert!(
                pending.contains(&id) || dead.contains(&id),
                "cut at {cut}: {id} is neither queued ({pending:?}) nor dead ({dead:?})"
            );
            if pending.contains(&id) && dead.contains(&id) {
                both += 1;
            }
        }
        if cut == before {
            assert_eq!((pending.len(), dead.len()), (0, 2), "cut at {cut}");
        }
        if cut == *frames.last().unwrap() {
            assert_eq!((pending.len(), dead.len()), (2, 0), "cut at {cut}");
        }
        // A second redrive of what is still dead: queued twice at worst, never lost.
        queue.redrive(10).await.unwrap();
        assert_eq!(queue.dead_letters(10).await.unwrap().len(), 0);
    }
    assert!(both > 0, "a cut between a Sent and its Redriven keeps both");
}

#[tokio::test]
async fn a_redriven_dead_letter_is_not_brought_back_by_compaction_or_by_deleted_segments() {
    // D dies in the first segment and compaction carries it along; then it is redriven while
    // traffic comes and goes. The segments holding its dead-letter records go, oldest first;
    // whichever of them a crash among the deletions brings back, D is queued once and not dead.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    let queue = LogQueue::open(&path, small_segments(&clock, 2)).unwrap();
    queue.send(vec![big_message("D", "dead")]).await.unwrap();
    for _ in 0..2 {
        let d = queue.receive(10, VISIBILITY).await.unwrap();
        assert_eq!(ids(&d), ["D"]);
        queue
            .retry(&d[0].receipt, Duration::ZERO, "F&O unavailable")
            .await
            .unwrap();
    }
    assert_eq!(queue.depth().await.unwrap(), depth(0, 0, 1));
    let first_segment = segment_files(&path)[0].clone();
    let mut saved = BTreeMap::new();
    let mut batch = 0;
    for _ in 0..30 {
        traffic(&queue, &path, &mut batch, &mut saved).await;
        if !segment_files(&path).contains(&first_segment) {
            break;
        }
    }
    assert!(
        !segment_files(&path).contains(&first_segment),
        "compaction carried the dead letter out of the first segment: {:?}",
        queue.stats()
    );
    assert!(queue.stats().carried >= 1, "{:?}", queue.stats());
    assert_eq!(queue.depth().await.unwrap(), depth(0, 0, 1));

    assert_eq!(queue.redrive(10).await.unwrap(), 1);
    let at_redrive = segment_files(&path);
    for _ in 0..30 {
        traffic(&queue, &path, &mut batch, &mut saved).await;
    }
    for _ in 0..10 {
        queue.sync().await.unwrap();
    }
    let present = segment_files(&path);
    for name in &at_redrive[..at_redrive.len() - 1] {
        assert!(
            !present.contains(name),
            "{name} held only the dead letter's record and garbage: {present:?} {:?}",
            queue.stats()
        );
    }
    assert_eq!(queue.depth().await.unwrap(), depth(0, 1, 0));
    drop(queue);

    let deleted: Vec<&String> = saved.keys().filter(|n| !present.contains(n)).collect();
    assert!(deleted.len() >= 5, "{deleted:?} {present:?}");
    for crash_point in 0..=deleted.len() {
        let (_copy, to) = with_deleted_back(&path, &present, &saved, &deleted[crash_point..]);
        let queue = LogQueue::open(&to, small_segments(&clock, 2)).unwrap();
        let context = format!("{} deleted segments back", deleted.len() - crash_point);
        assert_eq!(message_ids(&queue.pending(10).unwrap()), ["D"], "{context}");
        assert!(
            queue.dead_letters(10).await.unwrap().is_empty(),
            "{context}"
        );
        assert_eq!(queue.depth().await.unwrap(), depth(1, 0, 0), "{context}");
        drop(queue);
    }

    let queue = LogQueue::open(&path, small_segments(&clock, 2)).unwrap();
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["D"]);
    assert_eq!(
        d[0].attempt, 2,
        "its first delivery after the redrive counted"
    );
    assert_eq!(d[0].message, big_message("D", "dead"));
}

/// Ten messages of 3 KB sent, received and acked (the redriven D, when delivered, is left in
/// flight: live, so compaction carries it as a message); sealed segments saved on the way.
async fn traffic(
    queue: &LogQueue,
    path: &Path,
    batch: &mut usize,
    saved: &mut BTreeMap<String, Vec<u8>>,
) {
    let messages = (0..10)
        .map(|i| big_message(&format!("x{batch}-{i}"), &format!("X{batch}-{i}")))
        .collect();
    *batch += 1;
    queue.send(messages).await.unwrap();
    save_sealed(path, saved);
    for delivery in queue.receive(100, VISIBILITY).await.unwrap() {
        if delivery.message.event.event_id != "D" {
            queue.ack(&delivery.receipt).await.unwrap();
        }
    }
    save_sealed(path, saved);
}

#[tokio::test]
async fn a_queue_of_the_previous_segment_format_is_read_and_continued_in_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.queue");
    let clock = Arc::new(ManualClock::new(t0()));
    {
        let queue = LogQueue::open(&path, config(&clock, 1)).unwrap();
        queue
            .send(vec![message("a1", "A"), message("b1", "B")])
            .await
            .unwrap();
        dead_letter_all(&queue).await;
        queue.send(vec![message("c1", "C")]).await.unwrap();
    }
    // Format 1 had the same records but `Redriven`: these files are what it wrote.
    let files = segment_files(&path);
    assert_eq!(files.len(), 1);
    let old = path.join(&files[0]);
    set_format_version(&old, 1);

    let queue = LogQueue::open(&path, config(&clock, 1)).unwrap();
    let files = segment_files(&path);
    assert_eq!(files.len(), 2, "the old segment sealed, a new one started");
    let new = path.join(&files[1]);
    assert_eq!(format_version(&old), 1);
    assert_eq!(format_version(&new), 2);
    let old_data = std::fs::read(&old).unwrap();
    assert_eq!(
        *frame_offsets(&old_data).last().unwrap(),
        old_data.len(),
        "sealed: no zeros after its records"
    );
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["c1"]);
    assert_eq!(
        dead_ids(&queue.dead_letters(10).await.unwrap()),
        ["a1", "b1"]
    );
    assert_eq!(queue.redrive(1).await.unwrap(), 1);
    drop(queue);
    assert_eq!(
        std::fs::read(&old).unwrap(),
        old_data,
        "nothing is written to a segment of the old format"
    );

    let queue = LogQueue::open(&path, config(&clock, 1)).unwrap();
    assert_eq!(segment_files(&path).len(), 2, "no second rotation");
    assert_eq!(message_ids(&queue.pending(10).unwrap()), ["c1", "a1"]);
    assert_eq!(dead_ids(&queue.dead_letters(10).await.unwrap()), ["b1"]);
    let d = queue.receive(10, VISIBILITY).await.unwrap();
    assert_eq!(ids(&d), ["c1", "a1"]);
    drop(queue);

    // A format this build does not know is refused as newer, naming the file.
    set_format_version(&new, 3);
    let err = LogQueue::open(&path, config(&clock, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::NewerFormat {
                found: 3,
                known: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&files[1]), "{err}");
}
