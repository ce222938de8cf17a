//! Coalescing of concurrent single calls: [`Coalescing`] wraps a connector so that the reads and
//! upserts of many concurrent callers share requests ([`Connector::call_many`], one OData
//! `$batch` on the HTTP connectors), like a database's group commit.
//!
//! There is no timer and no artificial delay. At most `max_in_flight` requests are in flight;
//! while a slot is free, whatever calls are waiting go out at once — one call as the plain single
//! call, several (at most `max_batch`) as one `call_many`. While every slot is busy, new calls
//! wait and leave together in the next request. Under light load every call is sent alone and
//! immediately; under heavy load the batches grow by themselves.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use dualwrite_core::Side;
use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorError, ConnectorErrorKind, Page, Query,
    RecordRef, WriteCondition, WriteOutcome,
};
use dualwrite_core::record::Record;
use tokio::sync::oneshot;

/// How [`Coalescing`] groups calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescingConfig {
    /// Most requests in flight at once (single calls and batches together); at least 1. Fewer
    /// means larger batches and fewer requests, more means lower latency under light load.
    pub max_in_flight: usize,
    /// Most calls in one request; at least 1. Keep it at or below the connector's own
    /// `max_batch` so one batch is one `$batch`.
    pub max_batch: usize,
}

/// Calls per request unless configured otherwise. The services run the requests of a `$batch`
/// one after the other, so a batch's latency grows with its size while throughput comes from
/// the requests in flight: small batches keep each caller's wait short and still save most
/// requests (Dataverse's guidance is to start with batches of 10, PA api-limits.md). In
/// `bench live` 10 sent 0.3 F&O requests per write instead of 1; 100 sent more (0.5) and
/// held writes back long enough for half of their echoes to overtake the final commit.
pub const DEFAULT_MAX_BATCH: usize = 10;

/// Requests in flight unless configured otherwise: enough to keep a request on the wire while
/// the answer of another is read, few enough that concurrent callers share batches. It also
/// matches the services' execution-time limit (1,200 s of server time per 300 s window: four
/// requests executing all the time), which more requests in flight would only run into.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

impl Default for CoalescingConfig {
    fn default() -> Self {
        CoalescingConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// What a [`Coalescing`] connector sent, for status and benchmarks.
#[derive(Debug, Default)]
pub struct CoalescingStats {
    requests: AtomicU64,
    calls: AtomicU64,
    largest_batch: AtomicU64,
}

/// A copy of [`CoalescingStats`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoalescingSnapshot {
    /// Requests handed to the wrapped connector: a single call or one `call_many` (one
    /// `$batch`, or a few when it holds more calls than the connector sends at once).
    pub requests: u64,
    /// Reads and upserts callers made through the wrapper (`calls / requests` per request).
    pub calls: u64,
    /// Most calls sent in one request.
    pub largest_batch: u64,
}

impl CoalescingStats {
    fn sent(&self, calls: usize) {
        let calls = calls as u64;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(calls, Ordering::Relaxed);
        self.largest_batch.fetch_max(calls, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> CoalescingSnapshot {
        CoalescingSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
        }
    }
}

/// A call waiting to be sent, and where its result goes.
struct Waiting {
    call: ConnectorCall,
    reply: oneshot::Sender<CallResult>,
}

/// The calls waiting and the requests in flight.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    in_flight: usize,
}

struct Shared<C> {
    inner: C,
    config: CoalescingConfig,
    queue: Mutex<Queue>,
    stats: Arc<CoalescingStats>,
}

/// A [`Connector`] whose `read` and `upsert` calls are coalesced into shared requests (see the
/// module documentation); `query`, `delete`, `upsert_batch` and `call_many` go straight to the
/// wrapped connector.
///
/// Each caller gets exactly the result the wrapped connector's single call would give (that is
/// [`Connector::call_many`]'s guarantee); a failure of a shared request reaches every caller it
/// carried. Requests run in their own tasks: a caller that stops waiting (its future dropped)
/// breaks no other caller — a call not yet sent is then left out, one already sent completes.
/// Needs a Tokio runtime.
pub struct Coalescing<C> {
    shared: Arc<Shared<C>>,
}

impl<C> fmt::Debug for Coalescing<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queue = self.shared.lock();
        f.debug_struct("Coalescing")
            .field("config", &self.shared.config)
            .field("waiting", &queue.waiting.len())
            .field("in_flight", &queue.in_flight)
            .finish_non_exhaustive()
    }
}

impl<C: Connector + 'static> Coalescing<C> {
    /// Wraps `inner`; `config` values below 1 count as 1.
    pub fn new(inner: C, config: CoalescingConfig) -> Self {
        let config = CoalescingConfig {
            max_in_flight: config.max_in_flight.max(1),
            max_batch: config.max_batch.max(1),
        };
        Coalescing {
            shared: Arc::new(Shared {
                inner,
                config,
                queue: Mutex::new(Queue::default()),
                stats: Arc::default(),
            }),
        }
    }

    /// The wrapped connector.
    pub fn inner(&self) -> &C {
        &self.shared.inner
    }

    /// The counters of this wrapper (shared: they keep counting after the call).
    pub fn stats(&self) -> Arc<CoalescingStats> {
        self.shared.stats.clone()
    }

    /// Queues `call`, sends what is waiting if a slot is free, and waits for the result;
    /// `None` when the request carrying it ended without an answer (its task panicked).
    async fn submit(&self, call: ConnectorCall) -> Option<CallResult> {
        let (reply, result) = oneshot::channel();
        self.shared
            .lock()
            .waiting
            .push_back(Waiting { call, reply });
        dispatch(&self.shared);
        result.await.ok()
    }

    fn lost(&self, entity: &str) -> ConnectorError {
        ConnectorError {
            side: self.shared.inner.side(),
            entity: entity.to_string(),
            kind: ConnectorErrorKind::Transient,
            status: None,
            message: "the request carrying this call ended without an answer; it is retried".into(),
        }
    }

    fn wrong_kind(&self, entity: &str) -> ConnectorError {
        ConnectorError {
            kind: ConnectorErrorKind::BadRequest,
            message: "the connector answered a read with a write result or the other way \
                      round; this is a bug of the connector, please report it"
                .into(),
            ..self.lost(entity)
        }
    }
}

impl<C> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// While a slot is free and calls wait, takes up to `max_batch` of them (leaving out those
/// whose caller stopped waiting) and sends them in a task of their own.
fn dispatch<C: Connector + 'static>(shared: &Arc<Shared<C>>) {
    loop {
        let batch = {
            let mut queue = shared.lock();
            if queue.in_flight >= shared.config.max_in_flight {
                return;
            }
            let mut batch = Vec::new();
            while batch.len() < shared.config.max_batch {
                match queue.waiting.pop_front() {
                    Some(w) if w.reply.is_closed() => {}
                    Some(w) => batch.push(w),
                    None => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            queue.in_flight += 1;
            batch
        };
        let slot = Slot(shared.clone());
        tokio::spawn(async move {
            slot.0.send(batch).await;
            drop(slot);
        });
    }
}

/// One request in flight: frees its slot and sends what waits when dropped (also when the
/// request's task panics).
struct Slot<C: Connector + 'static>(Arc<Shared<C>>);

impl<C: Connector + 'static> Drop for Slot<C> {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
        // A runtime shutting down drops its tasks: nothing is sent any more then.
        if tokio::runtime::Handle::try_current().is_ok() {
            dispatch(&self.0);
        }
    }
}

impl<C: Connector> Shared<C> {
    /// Sends `batch` as one request and answers each caller.
    async fn send(&self, mut batch: Vec<Waiting>) {
        self.stats.sent(batch.len());
        if batch.len() == 1
            && let Some(Waiting { call, reply }) = batch.pop()
        {
            let result = match call {
                ConnectorCall::Read { entity, at } => {
                    CallResult::Read(self.inner.read(&entity, &at).await)
                }
                ConnectorCall::Upsert {
                    entity,
                    at,
                    record,
                    condition,
                } => CallResult::Upsert(self.inner.upsert(&entity, &at, &record, condition).await),
            };
            // A caller that stopped waiting does not want the result.
            let _ = reply.send(result);
            return;
        }
        let (calls, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|w| (w.call, w.reply)).unzip();
        let results = self.inner.call_many(calls).await;
        // One result per call, in order (`call_many`'s guarantee); a caller left without one
        // gets the "ended without an answer" error when its sender is dropped.
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

#[async_trait]
impl<C: Connector + 'static> Connector for Coalescing<C> {
    fn side(&self) -> Side {
        self.shared.inner.side()
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        let call = ConnectorCall::Read {
            entity: entity.to_string(),
            at: at.clone(),
        };
        match self.submit(call).await {
            Some(CallResult::Read(result)) => result,
            Some(CallResult::Upsert(_)) => Err(self.wrong_kind(entity)),
            None => Err(self.lost(entity)),
        }
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        self.shared.inner.query(entity, query).await
    }

    async fn deletions(
        &self,
        entity: &str,
        from: Option<&str>,
    ) -> Result<Option<dualwrite_core::ports::DeletionsPage>, ConnectorError> {
        self.shared.inner.deletions(entity, from).await
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        let call = ConnectorCall::Upsert {
            entity: entity.to_string(),
            at: at.clone(),
            record: record.clone(),
            condition,
        };
        match self.submit(call).await {
            Some(CallResult::Upsert(result)) => result,
            Some(CallResult::Read(_)) => Err(self.wrong_kind(entity)),
            None => Err(self.lost(entity)),
        }
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        self.shared.inner.delete(entity, at).await
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        self.shared.inner.upsert_batch(entity, items).await
    }

    async fn call_many(&self, calls: Vec<ConnectorCall>) -> Vec<CallResult> {
        self.shared.inner.call_many(calls).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Answers every call after `delay`, with the record or outcome named by its id; counts
    /// single calls and the size of each `call_many`.
    #[derive(Debug, Default)]
    struct Fake {
        delay: Duration,
        singles: AtomicUsize,
        batches: Mutex<Vec<usize>>,
    }

    fn id_of(at: &RecordRef) -> String {
        match at {
            RecordRef::Id(id) => id.clone(),
            RecordRef::Key(k) => k.to_string(),
        }
    }

    fn found(entity: &str, at: &RecordRef) -> Option<Record> {
        let mut r = Record::new(entity);
        r.id = Some(id_of(at).into());
        Some(r)
    }

    fn written(at: &RecordRef) -> WriteOutcome {
        WriteOutcome {
            id: Some(id_of(at)),
            ..WriteOutcome::default()
        }
    }

    #[async_trait]
    impl Connector for Fake {
        fn side(&self) -> Side {
            Side::Erp
        }
        async fn read(
            &self,
            entity: &str,
            at: &RecordRef,
        ) -> Result<Option<Record>, ConnectorError> {
            assert!(
                id_of(at) != "boom",
                "the fake connector fails on record boom"
            );
            self.singles.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.delay).await;
            Ok(found(entity, at))
        }
        async fn query(&self, _: &str, _: &Query) -> Result<Page, ConnectorError> {
            Ok(Page::default())
        }
        async fn upsert(
            &self,
            _: &str,
            at: &RecordRef,
            _: &Record,
            _: WriteCondition,
        ) -> Result<WriteOutcome, ConnectorError> {
            self.singles.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.delay).await;
            Ok(written(at))
        }
        async fn delete(&self, _: &str, _: &RecordRef) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn upsert_batch(
            &self,
            _: &str,
            _: &[(RecordRef, Record)],
        ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
            Ok(Vec::new())
        }
        async fn call_many(&self, calls: Vec<ConnectorCall>) -> Vec<CallResult> {
            self.batches.lock().unwrap().push(calls.len());
            tokio::time::sleep(self.delay).await;
            calls
                .iter()
                .map(|c| match c {
                    ConnectorCall::Read { entity, at } => CallResult::Read(Ok(found(entity, at))),
                    ConnectorCall::Upsert { at, .. } => CallResult::Upsert(Ok(written(at))),
                })
                .collect()
        }
    }

    fn at(n: usize) -> RecordRef {
        RecordRef::Id(format!("r{n}"))
    }

    #[tokio::test]
    async fn a_call_alone_is_sent_as_the_plain_single_call() {
        let c = Coalescing::new(Fake::default(), CoalescingConfig::default());
        let r = c.read("E", &at(1)).await.unwrap().unwrap();
        assert_eq!(r.id.as_deref(), Some("r1"));
        let out = c
            .upsert("E", &at(2), &Record::new("E"), WriteCondition::None)
            .await
            .unwrap();
        assert_eq!(out.id.as_deref(), Some("r2"));
        assert_eq!(c.inner().singles.load(Ordering::Relaxed), 2);
        assert!(c.inner().batches.lock().unwrap().is_empty());
        let s = c.stats().snapshot();
        assert_eq!((s.requests, s.calls, s.largest_batch), (2, 2, 1));
    }

    #[tokio::test]
    async fn calls_gathered_while_slots_are_busy_leave_together_at_most_max_batch_at_a_time() {
        let fake = Fake {
            delay: Duration::from_millis(30),
            ..Fake::default()
        };
        let c = Arc::new(Coalescing::new(
            fake,
            CoalescingConfig {
                max_in_flight: 1,
                max_batch: 10,
            },
        ));
        let tasks: Vec<_> = (0..25)
            .map(|n| {
                let c = c.clone();
                tokio::spawn(async move {
                    if n % 2 == 0 {
                        let r = c.read("E", &at(n)).await.unwrap().unwrap();
                        r.id.map(|id| id.to_string())
                    } else {
                        let out = c
                            .upsert("E", &at(n), &Record::new("E"), WriteCondition::None)
                            .await
                            .unwrap();
                        out.id
                    }
                })
            })
            .collect();
        for (n, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap(), Some(format!("r{n}")), "caller {n}");
        }
        let batches = c.inner().batches.lock().unwrap().clone();
        let singles = c.inner().singles.load(Ordering::Relaxed);
        assert!(
            batches.iter().all(|&b| (2..=10).contains(&b)),
            "{batches:?}"
        );
        assert_eq!(batches.iter().sum::<usize>() + singles, 25);
        let s = c.stats().snapshot();
        assert_eq!(s.calls, 25);
        assert_eq!(s.requests as usize, batches.len() + singles);
        assert!(s.requests < 25 && s.largest_batch == 10, "{s:?}");
    }

    #[tokio::test]
    async fn a_request_that_ends_without_an_answer_fails_its_calls_and_frees_its_slot() {
        let c = Coalescing::new(
            Fake::default(),
            CoalescingConfig {
                max_in_flight: 1,
                max_batch: 10,
            },
        );
        let e = c
            .read("E", &RecordRef::Id("boom".into()))
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.entity.as_str()),
            (ConnectorErrorKind::Transient, "E")
        );
        assert!(e.message.contains("without an answer"), "{}", e.message);
        let r = c.read("E", &at(1)).await.unwrap();
        assert!(r.is_some(), "the slot was given back");
    }
}
