//! [`RetryingConnector`]: retries throttled (429/503 `Retry-After`) and transient (5xx,
//! timeouts) failures of another connector, waiting as [`error_policy::disposition`] says.
//! The catch-up polls (and later batch jobs) use it; the real-time worker uses the bare
//! connector and lets its queue retry.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use dualwrite_core::error_policy::{self, Backoff, Disposition};
use dualwrite_core::ports::{
    Connector, ConnectorError, Page, Query, RecordRef, WriteCondition, WriteOutcome,
};
use dualwrite_core::record::{Record, Side};
use tracing::warn;

use crate::stats::ConnectorStats;

/// Wraps a connector and repeats calls that failed for a reason that passes with time.
///
/// Only [`Disposition::RetryAfter`] is acted on; every other disposition (refresh a token —
/// which the inner connector has already done once —, re-read, permanent) returns the error
/// to the caller. Upserts are idempotent by the [`Connector`] contract, so repeating is safe.
#[derive(Debug)]
pub struct RetryingConnector<C> {
    inner: C,
    backoff: Backoff,
    stats: Arc<ConnectorStats>,
}

impl<C: Connector> RetryingConnector<C> {
    /// Wraps `inner`, counting retries and throttles in `stats` (usually the inner
    /// connector's own counters).
    pub fn new(inner: C, backoff: Backoff, stats: Arc<ConnectorStats>) -> Self {
        RetryingConnector {
            inner,
            backoff,
            stats,
        }
    }

    /// The wrapped connector.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    async fn retry<T, F, Fut>(&self, entity: &str, mut call: F) -> Result<T, ConnectorError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ConnectorError>>,
    {
        let mut attempt = 1;
        loop {
            let error = match call().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let jitter = rand::random::<f64>();
            match error_policy::disposition(&error, attempt, &self.backoff, jitter) {
                Disposition::RetryAfter(wait) => {
                    self.stats.retry();
                    warn!(
                        side = %self.inner.side(),
                        entity,
                        status = error.status.unwrap_or(0),
                        attempt,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        error = %error.message,
                        "retrying after a passing failure"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                _ => return Err(error),
            }
        }
    }
}

#[async_trait]
impl<C: Connector> Connector for RetryingConnector<C> {
    fn side(&self) -> Side {
        self.inner.side()
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        self.retry(entity, || self.inner.read(entity, at)).await
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        self.retry(entity, || self.inner.query(entity, query)).await
    }

    async fn deletions(
        &self,
        entity: &str,
        from: Option<&str>,
    ) -> Result<Option<dualwrite_core::ports::DeletionsPage>, ConnectorError> {
        self.retry(entity, || self.inner.deletions(entity, from))
            .await
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        self.retry(entity, || {
            self.inner.upsert(entity, at, record, condition.clone())
        })
        .await
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        self.retry(entity, || self.inner.delete(entity, at)).await
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        self.retry(entity, || self.inner.upsert_batch(entity, items))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use dualwrite_core::ports::ConnectorErrorKind;

    use super::*;

    /// Fails with the scripted errors, then succeeds.
    #[derive(Debug)]
    struct Flaky {
        failures: Mutex<Vec<ConnectorErrorKind>>,
        calls: Mutex<u32>,
    }

    impl Flaky {
        fn new(mut failures: Vec<ConnectorErrorKind>) -> Self {
            failures.reverse();
            Flaky {
                failures: Mutex::new(failures),
                calls: Mutex::new(0),
            }
        }
        fn next(&self) -> Result<(), ConnectorError> {
            *self.calls.lock().unwrap() += 1;
            match self.failures.lock().unwrap().pop() {
                Some(kind) => Err(ConnectorError {
                    side: Side::Crm,
                    entity: "accounts".into(),
                    kind,
                    status: Some(500),
                    message: "x".into(),
                }),
                None => Ok(()),
            }
        }
    }

    #[async_trait]
    impl Connector for Flaky {
        fn side(&self) -> Side {
            Side::Crm
        }
        async fn read(&self, _: &str, _: &RecordRef) -> Result<Option<Record>, ConnectorError> {
            self.next().map(|_| None)
        }
        async fn query(&self, _: &str, _: &Query) -> Result<Page, ConnectorError> {
            self.next().map(|_| Page::default())
        }
        async fn upsert(
            &self,
            _: &str,
            _: &RecordRef,
            _: &Record,
            _: WriteCondition,
        ) -> Result<WriteOutcome, ConnectorError> {
            self.next().map(|_| WriteOutcome::default())
        }
        async fn delete(&self, _: &str, _: &RecordRef) -> Result<(), ConnectorError> {
            self.next()
        }
        async fn upsert_batch(
            &self,
            _: &str,
            _: &[(RecordRef, Record)],
        ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
            self.next().map(|_| vec![])
        }
    }

    fn fast() -> Backoff {
        Backoff {
            base: Duration::from_millis(5),
            max: Duration::from_millis(20),
            max_attempts: 4,
        }
    }

    #[tokio::test]
    async fn throttling_waits_retry_after_then_succeeds() {
        let stats = Arc::new(ConnectorStats::default());
        let c = RetryingConnector::new(
            Flaky::new(vec![ConnectorErrorKind::Throttled {
                retry_after_ms: 300,
            }]),
            fast(),
            stats.clone(),
        );
        let started = Instant::now();
        c.read("accounts", &RecordRef::Id("1".into()))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The retry is counted here; the 429 itself by the HTTP client that received it.
        assert_eq!(stats.snapshot().retries, 1);
        assert_eq!(*c.inner().calls.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn transient_failures_back_off_and_give_up_after_max_attempts() {
        let stats = Arc::new(ConnectorStats::default());
        let c = RetryingConnector::new(
            Flaky::new(vec![ConnectorErrorKind::Transient; 10]),
            fast(),
            stats.clone(),
        );
        let e = c
            .delete("accounts", &RecordRef::Id("1".into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ConnectorErrorKind::Transient);
        assert_eq!(*c.inner().calls.lock().unwrap(), 4);
        assert_eq!(stats.snapshot().retries, 3);
        assert_eq!(stats.snapshot().throttled, 0);
    }

    #[tokio::test]
    async fn permanent_and_reread_errors_are_returned_at_once() {
        for kind in [
            ConnectorErrorKind::BadRequest,
            ConnectorErrorKind::PreconditionFailed,
            ConnectorErrorKind::Unauthorized,
        ] {
            let c = RetryingConnector::new(
                Flaky::new(vec![kind.clone()]),
                fast(),
                Arc::new(ConnectorStats::default()),
            );
            let e = c
                .upsert(
                    "accounts",
                    &RecordRef::Id("1".into()),
                    &Record::new("accounts"),
                    WriteCondition::None,
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind, kind);
            assert_eq!(*c.inner().calls.lock().unwrap(), 1);
        }
    }
}
