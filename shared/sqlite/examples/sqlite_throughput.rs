//! Micro-benchmark of the SQLite queue and store under concurrency (group commit at work).
//!
//! Run with `cargo run --release -p dualwrite-sqlite --example sqlite_throughput`. It measures, on a
//! fresh database file in a temporary directory (WAL, `synchronous=FULL`, as in production):
//! - sends/s: 64 concurrent tasks, each sending 200 one-message batches;
//! - commits/s: 8 concurrent tasks, each committing 500 times "link revision + 1, event
//!   complete" on a key of its own;
//! - events/s end to end: 64 senders and 8 workers doing receive, claim, commit, ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dualwrite_core::ports::{
    EventClaim, IdempotencyStore, Link, LinkStore, QueueMessage, SideState, StoreOp, WorkQueue,
};
use dualwrite_core::{ChangeEvent, IntegrationKey, Operation, Record, Side, Value};
use dualwrite_sqlite::{QueueConfig, SqliteQueue, SqliteStore};

const SENDERS: usize = 64;
const SENDS_EACH: usize = 200;
const COMMITTERS: usize = 8;
const COMMITS_EACH: usize = 500;
const WORKERS: usize = 8;
const PIPELINE_EVENTS_EACH: usize = 100;
const VISIBILITY: Duration = Duration::from_secs(60);

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
}

fn message(event_id: String, record_id: String) -> QueueMessage {
    let mut record = Record::new("accounts").with("name", Value::Text("Contoso Ltd".into()));
    record.id = Some(record_id.into());
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

fn link(key: &str) -> Link {
    Link {
        map: "accounts".to_owned().into(),
        key: IntegrationKey(key.to_owned().into()),
        crm_id: Some(key.to_owned().into()),
        erp_id: Some(format!("dataAreaId='usmf',AccountNum='{key}'").into()),
        crm: SideState::default(),
        erp: SideState::default(),
        revision: 0,
        open_conflict: None,
        pending: None,
        provisional: false,
        updated_at: t0(),
    }
}

async fn sends_per_second(queue: Arc<SqliteQueue>) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..SENDS_EACH {
                let m = message(format!("s{s}-{i}"), format!("row{s}"));
                queue.send(vec![m]).await.expect("send");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender task");
    }
    (SENDERS * SENDS_EACH) as f64 / start.elapsed().as_secs_f64()
}

async fn commits_per_second(store: Arc<SqliteStore>) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..COMMITTERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("c{c}");
            for i in 0..COMMITS_EACH {
                let ops = vec![
                    StoreOp::PutLink {
                        link: link(&key),
                        expected_revision: i as u64,
                    },
                    StoreOp::CompleteEvent {
                        event_id: format!("commit-{c}-{i}"),
                    },
                ];
                store.commit(ops).await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("committer task");
    }
    (COMMITTERS * COMMITS_EACH) as f64 / start.elapsed().as_secs_f64()
}

async fn events_per_second(queue: Arc<SqliteQueue>, store: Arc<SqliteStore>) -> f64 {
    let total = SENDERS * PIPELINE_EVENTS_EACH;
    let applied = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PIPELINE_EVENTS_EACH {
                let m = message(format!("p{s}-{i}"), format!("p{s}-{}", i % 4));
                queue.send(vec![m]).await.expect("send");
            }
        }));
    }
    for _ in 0..WORKERS {
        let (queue, store, applied) = (queue.clone(), store.clone(), applied.clone());
        tasks.push(tokio::spawn(async move {
            while applied.load(Ordering::SeqCst) < total {
                let deliveries = queue.receive(10, VISIBILITY).await.expect("receive");
                if deliveries.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                // The deliveries of one receive are handled concurrently, as the engine does.
                let mut handlers = Vec::with_capacity(deliveries.len());
                for d in deliveries {
                    let (queue, store) = (queue.clone(), store.clone());
                    handlers.push(tokio::spawn(async move {
                        let event = &d.message.event;
                        let claim = store
                            .claim_event(&event.event_id, Utc::now(), VISIBILITY)
                            .await
                            .expect("claim");
                        if claim == EventClaim::Claimed {
                            let key = IntegrationKey(event.record.id.clone().unwrap_or_default());
                            let current = store.link("accounts", &key).await.expect("link");
                            let revision = current.as_ref().map_or(0, |l| l.revision);
                            let ops = vec![
                                StoreOp::PutLink {
                                    link: link(key.as_str()),
                                    expected_revision: revision,
                                },
                                StoreOp::CompleteEvent {
                                    event_id: event.event_id.clone(),
                                },
                            ];
                            store.commit(ops).await.expect("commit");
                        }
                        queue.ack(&d.receipt).await.expect("ack");
                    }));
                }
                for h in handlers {
                    h.await.expect("handler task");
                    applied.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("pipeline task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    runtime.block_on(async {
        let db = dir.path().join("throughput.db");
        let queue = Arc::new(SqliteQueue::open(&db, QueueConfig::default()).expect("queue"));
        let store = Arc::new(SqliteStore::open(&db).expect("store"));
        let sends = sends_per_second(queue.clone()).await;
        println!("sends/s   ({SENDERS} concurrent senders, 1 message each): {sends:>8.0}");
        println!("          queue writer: {:?}", queue.writer_stats());
        let commits = commits_per_second(store.clone()).await;
        println!("commits/s ({COMMITTERS} concurrent committers, 2 ops each):  {commits:>8.0}");
        println!("          store writer: {:?}", store.writer_stats());
        let pipeline_db = dir.path().join("pipeline.db");
        let queue = Arc::new(SqliteQueue::open(&pipeline_db, QueueConfig::default()).expect("q"));
        let store = Arc::new(SqliteStore::open(&pipeline_db).expect("store"));
        let events = events_per_second(queue.clone(), store.clone()).await;
        println!(
            "events/s  ({SENDERS} senders, {WORKERS} workers: send, receive, claim, commit, ack): \
             {events:>8.0}"
        );
        println!(
            "          queue writer: {:?}, store writer: {:?}",
            queue.writer_stats(),
            store.writer_stats()
        );
    });
}
