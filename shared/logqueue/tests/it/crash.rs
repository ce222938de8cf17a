//! The crash test: kill a process using the queue with SIGKILL at random instants and check
//! that no accepted message was lost and that groups kept their order.
//!
//! The test binary re-invokes itself (this same test, with [`CHILD_DIR`] set) as the child.
//! The child loops: it prints `SENDING <id>`, sends the message, prints `ACCEPTED <id>` only
//! after `send` returned; then it receives, and for each delivery either retries it (every
//! fifth, with no delay; every seventeenth with a delay longer than a round, so that old
//! segments stay pinned and compaction runs) or "processes" it: appends the id to the
//! processed file, syncs that file, and only then acks. Segments are 64 KiB, so rotation,
//! deletion and compaction all happen while the child is being killed. The parent kills it,
//! reopens the queue (cutting any torn tail) and checks, exactly:
//! - every accepted id is still queued or was processed (nothing lost), and nothing was
//!   dead-lettered;
//! - everything queued or processed was sent (nothing invented);
//! - within a group, messages were first processed in send order (a message may be processed
//!   again after a crash lost its ack, never before an earlier message of its group).
//!
//! In the first round the parent also tries to open the queue while the child has it open:
//! the lock refuses. Finally the parent drains the queue itself and checks every accepted id
//! was processed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use chrono::Utc;
use dualwrite_core::ports::{Delivery, QueueMessage, WorkQueue};
use dualwrite_logqueue::{LogQueue, ManualClock, OpenError, QueueConfig, SystemClock};
use rand::Rng;

use crate::fixtures::big_message;

/// Set in the child: the queue directory to work on.
const CHILD_DIR: &str = "DUALWRITE_LOGQUEUE_CRASH_CHILD_DIR";
/// Set in the child: the round number (keeps ids unique across rounds).
const CHILD_ROUND: &str = "DUALWRITE_LOGQUEUE_CRASH_CHILD_ROUND";
/// This test's name, as the harness filters it.
const TEST_NAME: &str = "crash::killing_the_process_at_any_instant_loses_no_accepted_message";
const GROUPS: i64 = 5;
const ROUNDS: i64 = 20;
/// Short, so deliveries of a killed child would expire during the next round anyway (they
/// are ready at once after a restart).
const VISIBILITY: Duration = Duration::from_millis(150);
/// Longer than most rounds: such a message outlives several segments.
const LONG_DELAY: Duration = Duration::from_millis(400);
/// Large enough that the test never dead-letters (it asserts that nothing was).
const MAX_ATTEMPTS: u32 = 10_000;
const SEGMENT_BYTES: u64 = 64 << 10;

/// The message's global sequence number: round * 1e6 + number within the round.
fn sequence(round: i64, n: i64) -> i64 {
    round * 1_000_000 + n
}

fn group_of(seq: i64) -> i64 {
    seq % GROUPS
}

fn crash_message(seq: i64) -> QueueMessage {
    big_message(&format!("e{seq}"), &format!("k{}", group_of(seq)))
}

fn seq_of(id: &str) -> i64 {
    id.trim_start_matches('e').parse().unwrap()
}

fn config(clock: Arc<dyn dualwrite_core::ports::Clock>) -> QueueConfig {
    QueueConfig {
        max_attempts: MAX_ATTEMPTS,
        clock,
        segment_bytes: SEGMENT_BYTES,
    }
}

fn processed_file(dir: &Path) -> std::path::PathBuf {
    dir.with_extension("processed")
}

/// Records `d` as processed (synced), then acks it.
async fn process(queue: &LogQueue, processed: &mut std::fs::File, d: &Delivery) {
    // One `write` for the whole line: `writeln!` on a `File` writes the id and the newline
    // with two system calls, and a kill between them left an unterminated id that the next
    // child's first line was appended to ("e240e84"), so the check saw neither id processed.
    processed
        .write_all(format!("{}\n", d.message.event.event_id).as_bytes())
        .unwrap();
    processed.sync_data().unwrap();
    queue.ack(&d.receipt).await.unwrap();
}

/// The child: send, receive, process or retry, until killed.
fn run_child(dir: &Path, round: i64) -> ! {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let queue = LogQueue::open(dir, config(Arc::new(SystemClock))).unwrap();
        let mut processed = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(processed_file(dir))
            .unwrap();
        let mut n = 0;
        let mut deliveries = 0u64;
        loop {
            let batch: Vec<i64> = (0..1 + n % 3).map(|i| sequence(round, n + i + 1)).collect();
            n += batch.len() as i64;
            for seq in &batch {
                println!("SENDING e{seq}");
            }
            queue
                .send(batch.iter().map(|s| crash_message(*s)).collect())
                .await
                .unwrap();
            for seq in &batch {
                println!("ACCEPTED e{seq}");
            }
            for d in queue.receive(3, VISIBILITY).await.unwrap() {
                deliveries += 1;
                if deliveries.is_multiple_of(17) {
                    queue.retry(&d.receipt, LONG_DELAY, "slow").await.unwrap();
                } else if deliveries.is_multiple_of(5) {
                    queue
                        .retry(&d.receipt, Duration::ZERO, "flaky")
                        .await
                        .unwrap();
                } else {
                    process(&queue, &mut processed, &d).await;
                }
            }
        }
    })
}

/// Ids after `prefix` in complete lines of `text` (a line cut by the kill does not count).
fn complete_lines<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        // The harness writes `test <name> ... ` without a newline before the first id line.
        .filter_map(move |l| l.split_once(prefix).map(|(_, id)| id.to_owned()))
}

/// Every processed id, in the order processed (repeats included).
fn processed_ids(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(processed_file(dir)).unwrap_or_default();
    // Each line is one `write`, synced before the ack: a kill never leaves half a line.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

/// Checks the invariants of the module docs after a kill.
async fn check(dir: &Path, round: i64, sent: &BTreeSet<String>, accepted: &BTreeSet<String>) {
    let queue = LogQueue::open(dir, config(Arc::new(SystemClock)))
        .unwrap_or_else(|e| panic!("round {round}: reopening failed: {e}"));
    assert!(
        queue.dead_letters(10).await.unwrap().is_empty(),
        "round {round}: dead letters"
    );
    let pending: BTreeSet<String> = queue
        .pending(usize::MAX)
        .unwrap()
        .into_iter()
        .map(|m| m.event.event_id)
        .collect();
    let processed = processed_ids(dir);
    let processed_set: BTreeSet<String> = processed.iter().cloned().collect();
    for id in accepted {
        assert!(
            pending.contains(id) || processed_set.contains(id),
            "round {round}: accepted {id} was lost"
        );
    }
    assert!(
        pending.is_subset(sent) && processed_set.is_subset(sent),
        "round {round}: the queue holds or delivered messages never sent"
    );
    check_group_order(&processed, &format!("round {round}"));
}

/// Within each group, first processings come in send order.
fn check_group_order(processed: &[String], context: &str) {
    let mut seen = BTreeSet::new();
    let mut last_first: BTreeMap<i64, i64> = BTreeMap::new();
    for id in processed {
        if !seen.insert(id.clone()) {
            continue;
        }
        let seq = seq_of(id);
        if let Some(previous) = last_first.insert(group_of(seq), seq) {
            assert!(
                previous < seq,
                "{context}: group {} processed e{seq} for the first time after e{previous}",
                group_of(seq)
            );
        }
    }
}

/// Streams the child's stdout lines to a channel, and returns all of it at the end.
fn read_lines(
    stdout: std::process::ChildStdout,
) -> (mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(line.clone());
            out.push_str(&line);
            line.clear();
        }
        out
    });
    (rx, reader)
}

#[test]
fn killing_the_process_at_any_instant_loses_no_accepted_message() {
    if let (Ok(dir), Ok(round)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ROUND)) {
        run_child(Path::new(&dir), round.parse().unwrap());
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crash.queue");
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut sent = BTreeSet::new();
    let mut accepted = BTreeSet::new();

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, &dir)
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, reader) = read_lines(child.stdout.take().unwrap());
        if round == 0 {
            // Once the child has accepted a message it holds the queue: a second process
            // (this one) is refused with the lock error.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let line = lines
                    .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                    .expect("the child accepted nothing within 30 s");
                if line.contains("ACCEPTED ") {
                    break;
                }
            }
            let err = LogQueue::open(&dir, config(Arc::new(SystemClock))).unwrap_err();
            assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..300)));
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("round {round}: the child exited by itself ({status}):\n{err}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let out = reader.join().unwrap();
        sent.extend(complete_lines(&out, "SENDING "));
        accepted.extend(complete_lines(&out, "ACCEPTED "));
        rt.block_on(check(&dir, round, &sent, &accepted));
    }
    assert!(
        accepted.len() > ROUNDS as usize,
        "the children accepted too little to test anything"
    );

    // Drain what the last child left, an hour later (every delay has passed).
    rt.block_on(async {
        let clock = Arc::new(ManualClock::new(Utc::now() + chrono::Duration::hours(1)));
        let queue = LogQueue::open(&dir, config(clock.clone())).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(processed_file(&dir))
            .unwrap();
        loop {
            let deliveries = queue.receive(10, VISIBILITY).await.unwrap();
            if deliveries.is_empty() && queue.pending(1).unwrap().is_empty() {
                break;
            }
            for d in &deliveries {
                process(&queue, &mut file, d).await;
            }
            clock.advance(Duration::from_secs(1));
        }
        let processed: BTreeSet<String> = processed_ids(&dir).into_iter().collect();
        for id in &accepted {
            assert!(processed.contains(id), "accepted {id} was never processed");
        }
        check_group_order(&processed_ids(&dir), "after draining");
        queue.sync().await.unwrap();
        let stats = queue.stats();
        assert!(
            stats.segments <= 2,
            "drained, dead segments deleted: {stats:?}"
        );
    });
    rt.block_on(check(&dir, ROUNDS, &sent, &accepted));
}

/// Set in the child of the last-attempt test: the queue directory.
const LAST_ACK_CHILD_DIR: &str = "DUALWRITE_LOGQUEUE_LAST_ACK_CHILD_DIR";
const LAST_ACK_TEST: &str = "crash::the_ack_of_a_last_attempt_survives_a_kill_right_after_it";

/// The ack of a message's last attempt is durable when `ack` returns: a process killed right
/// after it leaves the message done, neither delivered again nor dead-lettered. (Other acks
/// may be lost in such a kill: the message is then delivered again, which idempotency
/// absorbs; a lost last-attempt ack would make the restart dead-letter work that was done.)
#[test]
fn the_ack_of_a_last_attempt_survives_a_kill_right_after_it() {
    let config = || QueueConfig {
        max_attempts: 1,
        ..QueueConfig::default()
    };
    if let Ok(dir) = std::env::var(LAST_ACK_CHILD_DIR) {
        let queue = LogQueue::open(&dir, config()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let id = format!("e{}", Utc::now().timestamp_nanos_opt().unwrap_or_default());
            queue.send(vec![big_message(&id, "k1")]).await.unwrap();
            let delivered = queue.receive(1, Duration::from_secs(30)).await.unwrap();
            assert_eq!(delivered[0].attempt, 1, "the last attempt");
            queue.ack(&delivered[0].receipt).await.unwrap();
        });
        println!("ACKED");
        std::io::stdout().flush().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("last-ack.queue");
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for round in 0..5 {
        let mut child = Command::new(&exe)
            .args([LAST_ACK_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(LAST_ACK_CHILD_DIR, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, _reader) = read_lines(child.stdout.take().unwrap());
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the child acked within 30 s");
            if line.contains("ACKED") {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let queue = LogQueue::open(&dir, config()).unwrap();
        let depth = rt.block_on(queue.depth()).unwrap();
        assert_eq!(
            (depth.ready, depth.in_flight, depth.delayed, depth.dead),
            (0, 0, 0, 0),
            "round {round}: the acked message is gone, not redelivered nor dead-lettered"
        );
    }
}
