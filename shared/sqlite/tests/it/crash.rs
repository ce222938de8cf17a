//! The crash test: kill a worker process with SIGKILL at random instants and check that no
//! accepted event was lost, no effect was applied twice or half, and the file is sound.
//!
//! The test binary re-invokes itself (this same test, with [`CHILD_DB`] set) as the child. The
//! child loops: it prints `SENDING <id>`, sends the message, prints `ACCEPTED <id>` only
//! after `send` returned; then it receives, and for each delivery claims the event and commits
//! "link revision + 1, link version = the event's sequence, event complete" in one store
//! transaction, then acks. The parent kills it, reopens the file and checks, exactly:
//! - `PRAGMA integrity_check` is ok;
//! - every accepted id is still in the queue or completed in the store (nothing lost), and no
//!   message was dead-lettered;
//! - every completed id was sent, and per link `revision` equals the number of completed events
//!   of its key (effect and completion are atomic: never one without the other, never twice);
//! - per link the version is the highest completed sequence of its key (per-group order), and
//!   revisions never go backwards from one round to the next.
//!
//! Finally the parent drains the queue itself and checks every accepted id was applied.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dualwrite_core::IntegrationKey;
use dualwrite_core::ports::{
    Clock, Delivery, EventClaim, IdempotencyStore, LinkStore, QueueMessage, StoreError, StoreOp,
    WorkQueue,
};
use dualwrite_sqlite::{ManualClock, QueueConfig, SqliteQueue, SqliteStore, SystemClock};
use rand::Rng;

use crate::fixtures::{event, link};

/// Set in the child: the database file to work on.
const CHILD_DB: &str = "DUALWRITE_SQLITE_CRASH_CHILD_DB";
/// Set in the child: the round number (keeps ids unique across rounds).
const CHILD_ROUND: &str = "DUALWRITE_SQLITE_CRASH_CHILD_ROUND";
/// This test's name, as the harness filters it.
const TEST_NAME: &str = "crash::killing_the_process_at_any_instant_loses_no_accepted_event";
const MAP: &str = "crash";
const KEYS: i64 = 5;
const ROUNDS: i64 = 20;
/// Short, so deliveries and claims of a killed child expire during the next round.
const VISIBILITY: Duration = Duration::from_millis(150);
const LEASE: Duration = Duration::from_millis(150);
/// Large enough that the test never dead-letters (it asserts that nothing was).
const MAX_ATTEMPTS: u32 = 10_000;

/// The event's global sequence number: round * 1e6 + number within the round.
fn sequence(round: i64, n: i64) -> i64 {
    round * 1_000_000 + n
}

fn key_of(seq: i64) -> String {
    format!("k{}", seq % KEYS)
}

fn crash_message(seq: i64) -> QueueMessage {
    QueueMessage::for_event(event(&format!("e{seq}"), MAP, &key_of(seq), seq))
}

/// Applies one delivery: claim, then link update + completion in one commit, then ack.
async fn apply(store: &SqliteStore, queue: &SqliteQueue, d: Delivery, now: DateTime<Utc>) {
    let event = &d.message.event;
    match store
        .claim_event(&event.event_id, now, LEASE)
        .await
        .unwrap()
    {
        EventClaim::AlreadyDone => queue.ack(&d.receipt).await.unwrap(),
        EventClaim::InProgress => {
            queue
                .retry(&d.receipt, Duration::from_millis(20), "claimed elsewhere")
                .await
                .unwrap();
        }
        EventClaim::Claimed => {
            let key = IntegrationKey(event.record.id.clone().unwrap());
            let current = store.link(MAP, &key).await.unwrap();
            let revision = current.as_ref().map_or(0, |l| l.revision);
            let mut l =
                current.unwrap_or_else(|| link(MAP, key.as_str(), Some(key.as_str()), None));
            l.crm.version = event.record.version;
            let ops = vec![
                StoreOp::PutLink {
                    link: l,
                    expected_revision: revision,
                },
                StoreOp::CompleteEvent {
                    event_id: event.event_id.clone(),
                },
            ];
            match store.commit(ops).await {
                Ok(()) => queue.ack(&d.receipt).await.unwrap(),
                Err(StoreError::Conflict { .. }) => {
                    store.release_event(&event.event_id).await.unwrap();
                    queue
                        .retry(&d.receipt, Duration::ZERO, "link conflict")
                        .await
                        .unwrap();
                }
                Err(e) => panic!("commit failed: {e}"),
            }
        }
    }
}

/// The child: send and apply until killed.
fn run_child(db: &str, round: i64) -> ! {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = QueueConfig {
            max_attempts: MAX_ATTEMPTS,
            clock: Arc::new(SystemClock),
        };
        let queue = SqliteQueue::open(db, config).unwrap();
        let store = SqliteStore::open(db).unwrap();
        let mut n = 0;
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
            for d in queue.receive(2, VISIBILITY).await.unwrap() {
                apply(&store, &queue, d, SystemClock.now()).await;
            }
        }
    })
}

/// Ids the child printed after `prefix`, from complete lines only (a line cut by the kill
/// does not count).
fn printed(stdout: &str, prefix: &str) -> Vec<String> {
    let complete = match stdout.rfind('\n') {
        Some(end) => &stdout[..=end],
        None => "",
    };
    complete
        .lines()
        // The harness writes `test <name> ... ` without a newline before the first id line.
        .filter_map(|l| l.split_once(prefix).map(|(_, id)| id.to_owned()))
        .collect()
}

fn seq_of(id: &str) -> i64 {
    id.trim_start_matches('e').parse().unwrap()
}

/// Checks the exact invariants; returns each link's revision.
async fn check(
    db: &Path,
    round: i64,
    sent: &BTreeSet<String>,
    accepted: &BTreeSet<String>,
) -> BTreeMap<String, u64> {
    let store = SqliteStore::open(db).unwrap();
    let queue = SqliteQueue::open(db, QueueConfig::default()).unwrap();
    store
        .integrity_check()
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
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
    let mut done = BTreeSet::new();
    for id in sent {
        if store.event_done(id).unwrap() {
            done.insert(id.clone());
        }
    }
    for id in accepted {
        assert!(
            pending.contains(id) || done.contains(id),
            "round {round}: accepted {id} was lost"
        );
    }
    assert!(
        pending.is_subset(sent),
        "round {round}: queue holds messages never sent"
    );
    let counts = store.counts().unwrap();
    assert_eq!(
        counts.completed_events,
        done.len() as u64,
        "round {round}: completed an unsent id"
    );

    let mut revisions = BTreeMap::new();
    for l in store.links(Some(MAP)).unwrap() {
        let of_key: Vec<i64> = done
            .iter()
            .map(|id| seq_of(id))
            .filter(|s| key_of(*s) == l.key.as_str())
            .collect();
        assert_eq!(
            l.revision,
            of_key.len() as u64,
            "round {round}: link {} revision vs completed events",
            l.key
        );
        let newest = l.crm.version.map(|v| v.sequence);
        assert_eq!(
            newest,
            of_key.iter().max().copied(),
            "round {round}: link {} order",
            l.key
        );
        revisions.insert(l.key.0.to_string(), l.revision);
    }
    let linked: u64 = revisions.values().sum();
    assert_eq!(
        linked,
        done.len() as u64,
        "round {round}: completions without a link update"
    );
    revisions
}

#[test]
fn killing_the_process_at_any_instant_loses_no_accepted_event() {
    if let (Ok(db), Ok(round)) = (std::env::var(CHILD_DB), std::env::var(CHILD_ROUND)) {
        run_child(&db, round.parse().unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut sent = BTreeSet::new();
    let mut accepted = BTreeSet::new();
    let mut last_revisions: BTreeMap<String, u64> = BTreeMap::new();

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, &db)
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (started, has_started) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut told = false;
            loop {
                let n = stdout.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
                if !told && String::from_utf8_lossy(&out).contains("ACCEPTED ") {
                    told = true;
                    let _ = started.send(());
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        });
        // Killed at a random instant once it is at work (its first event accepted): a slow
        // start on a loaded machine must not make rounds that accept nothing.
        let _ = has_started.recv_timeout(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(rng.random_range(0..280)));
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
        sent.extend(printed(&out, "SENDING "));
        accepted.extend(printed(&out, "ACCEPTED "));

        let revisions = rt.block_on(check(&db, round, &sent, &accepted));
        for (key, before) in &last_revisions {
            let now = revisions.get(key).copied().unwrap_or(0);
            assert!(
                now >= *before,
                "round {round}: link {key} went back from {before} to {now}"
            );
        }
        last_revisions = revisions;
    }
    assert!(
        accepted.len() > ROUNDS as usize,
        "the children accepted too little to test anything"
    );

    // Drain what the last child left, an hour later (every delivery and claim has expired).
    rt.block_on(async {
        let clock = Arc::new(ManualClock::new(Utc::now() + chrono::Duration::hours(1)));
        let config = QueueConfig {
            max_attempts: MAX_ATTEMPTS,
            clock: clock.clone(),
        };
        let queue = SqliteQueue::open(&db, config).unwrap();
        let store = SqliteStore::open(&db).unwrap();
        loop {
            let deliveries = queue.receive(10, VISIBILITY).await.unwrap();
            if deliveries.is_empty() && queue.pending(1).unwrap().is_empty() {
                break;
            }
            for d in deliveries {
                apply(&store, &queue, d, clock.now()).await;
            }
            clock.advance(Duration::from_secs(1));
        }
        for id in &accepted {
            assert!(
                store.event_done(id).unwrap(),
                "accepted {id} was never applied"
            );
        }
    });
    rt.block_on(check(&db, ROUNDS, &sent, &accepted));
}
