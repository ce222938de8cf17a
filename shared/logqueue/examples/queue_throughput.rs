//! Micro-benchmark of the log queue against the SQLite queue, on the same workload.
//!
//! Run with `cargo run --release -p dualwrite-logqueue --example queue_throughput`. For each queue,
//! on a fresh directory or file in a temporary directory (synced as in production: the log
//! queue `fdatasync`s each batch, SQLite runs WAL with `synchronous=FULL`), it measures:
//! - sends/s: 64 concurrent tasks, each sending 200 one-message batches of about 3 KB;
//! - receive+ack/s: 8 concurrent tasks draining those 12,800 messages (receive up to 10, ack
//!   each);
//! - mixed/s: 64 senders and 8 consumers at the same time, 6,400 messages;
//! - lone sender: one task sending 500 messages one after the other (each send waits for its
//!   own sync: the latency of an accepted webhook at low load, with no batching to share it).
//!
//! Messages are built before each phase starts. For each phase it reports the CPU time the
//! whole process spent per message, and how it splits by thread (`logq-writer`,
//! `sqlite-writer`, `sqlite-checkpt`, the tokio workers), from `/proc/self/task/*/schedstat`
//! (nanoseconds; Linux only, else only rates are shown). `--log-only` skips the SQLite queue;
//! `--rounds N` repeats each measurement N times.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dualwrite_core::ports::{QueueMessage, WorkQueue};
use dualwrite_core::{ChangeEvent, Operation, Record, Side, SourceVersion, Value};
use dualwrite_logqueue::LogQueue;
use dualwrite_sqlite::SqliteQueue;

const SENDERS: usize = 64;
const SENDS_EACH: usize = 200;
const CONSUMERS: usize = 8;
const MIXED_EACH: usize = 100;
const LONE_SENDS: usize = 500;
const VISIBILITY: Duration = Duration::from_secs(600);

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
}

/// An account change of about 3 KB of JSON, like the ones `bench live` queues.
fn message(event_id: String, record_id: String) -> QueueMessage {
    let mut record = Record::new("accounts");
    record.id = Some(record_id.into());
    record.version = Some(SourceVersion {
        modified_on: t0(),
        sequence: 1,
    });
    for i in 0..30 {
        record.fields.insert(
            format!("field_{i:02}"),
            Value::Text(format!("value {i} of {event_id}, {}", "x".repeat(40)).into()),
        );
    }
    QueueMessage::for_event(ChangeEvent {
        event_id,
        source: Side::Crm,
        operation: Operation::Upsert,
        record,
        partial: false,
        received_at: t0(),
        correlation_id: None,
        depth: None,
    })
}

/// CPU time used so far by each live thread of this process, by thread id: (name, ns).
fn thread_cpu() -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            let tid = task.file_name().to_string_lossy().into_owned();
            out.insert(tid, (name.trim().to_owned(), ns));
        }
    }
    out
}

/// One phase's figures.
struct Measured {
    rate: f64,
    /// CPU µs per message, whole process, and by thread name.
    cpu_us: Option<f64>,
    by_thread: BTreeMap<String, f64>,
}

/// Runs `phase`, which handles `messages` messages, and measures its rate and CPU.
async fn measure<F: std::future::Future<Output = ()>>(messages: usize, phase: F) -> Measured {
    let before = thread_cpu();
    let start = Instant::now();
    phase.await;
    let elapsed = start.elapsed().as_secs_f64();
    let after = thread_cpu();
    let mut by_thread: BTreeMap<String, f64> = BTreeMap::new();
    for (tid, (name, ns)) in &after {
        let was = before.get(tid).map_or(0, |b| b.1);
        // Tokio names its workers `tokio-runtime-w`; keep the per-thread split readable.
        *by_thread.entry(name.clone()).or_default() +=
            ns.saturating_sub(was) as f64 / 1e3 / messages as f64;
    }
    let total: f64 = by_thread.values().sum();
    Measured {
        rate: messages as f64 / elapsed,
        cpu_us: (!after.is_empty()).then_some(total),
        by_thread,
    }
}

/// Each sender's messages, built before the clock starts (building one costs about as much
/// as queueing it, and is not the queue's work).
fn build(prefix: &str, each: usize) -> Vec<Vec<QueueMessage>> {
    (0..SENDERS)
        .map(|s| {
            (0..each)
                // A few groups per sender, as records of a busy source would be.
                .map(|i| message(format!("{prefix}{s}-{i}"), format!("row{s}-{}", i % 4)))
                .collect()
        })
        .collect()
}

async fn send_all(queue: Arc<dyn WorkQueue>, messages: Vec<Vec<QueueMessage>>) {
    let mut tasks = Vec::new();
    for mine in messages {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for m in mine {
                queue.send(vec![m]).await.expect("send");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender task");
    }
}

async fn consume(queue: Arc<dyn WorkQueue>, total: usize) {
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONSUMERS {
        let (queue, done) = (queue.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < total {
                let deliveries = queue.receive(10, VISIBILITY).await.expect("receive");
                if deliveries.is_empty() {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    continue;
                }
                for d in deliveries {
                    queue.ack(&d.receipt).await.expect("ack");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("consumer task");
    }
}

fn print(phase: &str, m: &Measured) {
    let cpu = m
        .cpu_us
        .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.1} µs"));
    let threads: Vec<String> = m
        .by_thread
        .iter()
        .filter(|(_, us)| **us >= 0.05)
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect();
    println!(
        "  {phase:<13} {:>9.0}/s   CPU/msg {cpu:>9}   [{}]",
        m.rate,
        threads.join(", ")
    );
}

async fn run(name: &str, queue: Arc<dyn WorkQueue>, stats: &dyn Fn() -> String) {
    println!("{name}");
    let total = SENDERS * SENDS_EACH;
    let messages = build("s", SENDS_EACH);
    let sends = measure(total, send_all(queue.clone(), messages)).await;
    print("sends", &sends);
    let drain = measure(total, consume(queue.clone(), total)).await;
    print("receive+ack", &drain);
    let mixed_total = SENDERS * MIXED_EACH;
    let messages = build("m", MIXED_EACH);
    let mixed = measure(mixed_total, async {
        let senders = tokio::spawn(send_all(queue.clone(), messages));
        consume(queue.clone(), mixed_total).await;
        senders.await.expect("senders");
    })
    .await;
    print("mixed", &mixed);
    let lone: Vec<QueueMessage> = (0..LONE_SENDS)
        .map(|i| message(format!("l{i}"), format!("lone{}", i % 4)))
        .collect();
    let lone = measure(LONE_SENDS, async {
        for m in lone {
            queue.send(vec![m]).await.expect("send");
        }
    })
    .await;
    print("lone sender", &lone);
    println!("  {:<13} {:>9.0} µs per send", "", 1e6 / lone.rate);
    // The lone sender's messages are left in the queue; drained here, unmeasured.
    consume(queue.clone(), LONE_SENDS).await;
    println!("  {}", stats());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let log_only = args.iter().any(|a| a == "--log-only");
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let size =
        serde_json::to_vec(&message("s0-0".into(), "row0-0".into()).event).map_or(0, |j| j.len());
    println!(
        "{SENDERS} senders x {SENDS_EACH} sends, {CONSUMERS} consumers, messages of {size} bytes \
         of JSON; CPU per message by thread in µs"
    );
    for _ in 0..rounds {
        let dir = tempfile::tempdir().expect("temporary directory");
        runtime.block_on(async {
            let log = Arc::new(
                LogQueue::open(dir.path().join("bench.queue"), Default::default()).expect("log"),
            );
            let stats_of = log.clone();
            run("LogQueue", log, &move || format!("{:?}", stats_of.stats())).await;
            if !log_only {
                let sqlite = Arc::new(
                    SqliteQueue::open(dir.path().join("bench.db"), Default::default())
                        .expect("sqlite"),
                );
                let stats_of = sqlite.clone();
                run("SqliteQueue", sqlite, &move || {
                    format!("{:?}", stats_of.writer_stats())
                })
                .await;
            }
        });
    }
}
