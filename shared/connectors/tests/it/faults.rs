//! Throttling and failures injected by the simulators: the bare connectors classify them, the
//! [`RetryingConnector`] waits as the error policy says and succeeds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualwrite_connectors::{ConnectorStats, RetryingConnector};
use dualwrite_core::error_policy::Backoff;
use dualwrite_core::ports::{Connector, ConnectorErrorKind, Query, RecordRef, WriteCondition};
use dualwrite_simulators::{Fault, ThrottleConfig};

use crate::harness::{Env, account, account_key, customer, customer_key};

/// Short backoff so the transient retries take milliseconds; throttling still waits for the
/// server's `Retry-After` (1 s from the simulators).
fn fast() -> Backoff {
    Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_millis(100),
        max_attempts: 4,
    }
}

#[tokio::test]
async fn dataverse_throttling_waits_retry_after_then_succeeds() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("T-1", "USMF"));
    // Token and company cache first, so the throttled request is the upsert.
    env.dataverse.read("accounts", &key).await.unwrap();

    env.dv.throttle_next(1);
    let err = env
        .dataverse
        .upsert(
            "accounts",
            &key,
            &account("T-1", "x", "1"),
            WriteCondition::None,
        )
        .await
        .expect_err("throttled");
    assert_eq!(
        err.kind,
        ConnectorErrorKind::Throttled {
            retry_after_ms: 1000
        }
    );
    assert_eq!(err.status, Some(429));

    let stats = Arc::new(ConnectorStats::default());
    let retrying = RetryingConnector::new(env.dataverse_with(&stats), fast(), stats.clone());
    retrying.read("accounts", &key).await.unwrap();
    env.dv.throttle_next(1);
    let started = Instant::now();
    let out = retrying
        .upsert(
            "accounts",
            &key,
            &account("T-1", "x", "1"),
            WriteCondition::None,
        )
        .await
        .expect("succeeds after waiting");
    assert!(out.created);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited Retry-After"
    );
    let s = stats.snapshot();
    assert_eq!((s.throttled, s.retries), (1, 1));
    // Every answer that was not a success is counted by kind: the read of the absent row
    // (404) and the 429.
    assert_eq!(
        (s.failures, s.not_found, s.refused, s.transient),
        (2, 1, 0, 0)
    );
    assert_eq!(env.dv.stats().throttled, 2);
}

#[tokio::test]
async fn fno_rate_limit_waits_retry_after_then_succeeds() {
    let env = Env::start().await;
    let stats = Arc::new(ConnectorStats::default());
    let retrying = RetryingConnector::new(env.erp_with(&stats), fast(), stats.clone());
    let key = RecordRef::Key(customer_key("usmf", "T-2"));
    retrying.read("CustomersV3", &key).await.unwrap();
    env.fno.set_throttle(ThrottleConfig {
        requests_per_window: Some(2),
        window: Duration::from_secs(1),
        max_concurrent: None,
    });
    let started = Instant::now();
    for n in 0..4 {
        retrying
            .query("CustomersV3", &Query::default())
            .await
            .unwrap_or_else(|e| panic!("query {n}: {e}"));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for the window"
    );
    let s = stats.snapshot();
    assert!(s.throttled >= 1, "{s:?}");
    assert_eq!(s.throttled, s.retries);
    assert_eq!(env.fno.stats().throttled, s.throttled);
    env.fno.set_throttle(ThrottleConfig::default());
    let out = retrying
        .upsert(
            "CustomersV3",
            &key,
            &customer("usmf", "T-2", "x", "No"),
            WriteCondition::None,
        )
        .await
        .unwrap();
    assert!(out.created);
}

#[tokio::test]
async fn an_injected_503_is_transient_and_retried_with_backoff() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("F-1", "USMF"));
    env.dataverse.read("accounts", &key).await.unwrap();

    env.dv.inject_faults([Fault::Status(503)]);
    let err = env.dataverse.read("accounts", &key).await.expect_err("503");
    assert_eq!(err.kind, ConnectorErrorKind::Transient);
    assert_eq!(err.status, Some(503));

    let stats = Arc::new(ConnectorStats::default());
    let retrying = RetryingConnector::new(env.dataverse_with(&stats), fast(), stats.clone());
    retrying.read("accounts", &key).await.unwrap();
    env.dv
        .inject_faults([Fault::Status(503), Fault::Status(503)]);
    let out = retrying
        .upsert(
            "accounts",
            &key,
            &account("F-1", "x", "1"),
            WriteCondition::None,
        )
        .await
        .expect("succeeds on the third attempt");
    assert!(out.created);
    let s = stats.snapshot();
    assert_eq!((s.retries, s.throttled), (2, 0));
    assert_eq!((s.transient, s.not_found), (2, 1), "{s:?}");
    assert_eq!(env.dv.rows("accounts").len(), 1);
}

#[tokio::test]
async fn a_dropped_connection_is_transient_on_both_sides() {
    let env = Env::start().await;
    let dv_key = RecordRef::Key(account_key("D-1", "USMF"));
    env.dataverse.read("accounts", &dv_key).await.unwrap();
    env.dv.inject_faults([Fault::DropConnection]);
    let err = env
        .dataverse
        .read("accounts", &dv_key)
        .await
        .expect_err("dropped");
    assert_eq!(err.kind, ConnectorErrorKind::Transient);
    assert_eq!(err.status, None);

    let fno_key = RecordRef::Key(customer_key("usmf", "D-1"));
    env.erp.read("CustomersV3", &fno_key).await.unwrap();
    env.fno.inject_faults([Fault::DropConnection]);
    let err = env
        .erp
        .read("CustomersV3", &fno_key)
        .await
        .expect_err("dropped");
    assert_eq!(err.kind, ConnectorErrorKind::Transient);

    let stats = Arc::new(ConnectorStats::default());
    let retrying = RetryingConnector::new(env.erp_with(&stats), fast(), stats.clone());
    retrying.read("CustomersV3", &fno_key).await.unwrap();
    env.fno
        .inject_faults([Fault::DropConnection, Fault::Status(500)]);
    let out = retrying
        .upsert(
            "CustomersV3",
            &fno_key,
            &customer("usmf", "D-1", "x", "Yes"),
            WriteCondition::None,
        )
        .await
        .expect("succeeds after two transient failures");
    assert!(out.created);
    assert_eq!(stats.snapshot().retries, 2);
}
