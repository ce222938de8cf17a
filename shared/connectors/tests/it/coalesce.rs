//! [`Coalescing`] over the F&O connector against FnoSim: concurrent callers share `$batch`
//! requests and each gets its own result; a failed `$batch` reaches every caller it carried.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_connectors::{Coalescing, CoalescingConfig, ConnectorStats};
use dualwrite_core::ports::{Connector, ConnectorErrorKind, RecordRef, WriteCondition};
use dualwrite_simulators::Fault;

use crate::harness::{Env, customer, customer_key};

const CALLERS: usize = 40;

#[tokio::test]
async fn concurrent_callers_share_requests_and_get_their_own_results() {
    let env = Env::start().await;
    let stats = Arc::new(ConnectorStats::default());
    let erp = Arc::new(Coalescing::new(
        env.erp_with(&stats),
        CoalescingConfig {
            max_in_flight: 2,
            max_batch: 100,
        },
    ));
    // The token first, so every request counted below carries calls.
    erp.read("CustomersV3", &RecordRef::Key(customer_key("usmf", "X")))
        .await
        .expect("read");
    let before = env.fno.stats().requests;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|n| {
            let erp = erp.clone();
            tokio::spawn(async move {
                let account = format!("C-{n:03}");
                let at = RecordRef::Key(customer_key("usmf", &account));
                let missing = erp.read("CustomersV3", &at).await.expect("read");
                assert_eq!(missing, None);
                let record = customer("usmf", &account, &format!("caller {n}"), "No");
                let out = erp
                    .upsert("CustomersV3", &at, &record, WriteCondition::MustNotExist)
                    .await
                    .expect("create");
                (account, out)
            })
        })
        .collect();
    for task in tasks {
        let (account, out) = task.await.expect("caller");
        assert!(out.created);
        assert_eq!(
            out.id.as_deref(),
            Some(customer_key("usmf", &account).to_string().as_str()),
            "each caller gets its own record's outcome"
        );
    }
    let requests = env.fno.stats().requests - before;
    let s = erp.stats().snapshot();
    assert_eq!(s.calls, 2 * CALLERS as u64 + 1);
    assert!(
        requests < 2 * CALLERS as u64,
        "{requests} requests for {} calls",
        2 * CALLERS
    );
    assert!(s.largest_batch > 1 && s.largest_batch <= 100, "{s:?}");
    assert_eq!(env.fno.rows("CustomersV3").len(), CALLERS);
}

#[tokio::test]
async fn a_failed_batch_fails_every_caller_it_carried() {
    let env = Env::start().await;
    let stats = Arc::new(ConnectorStats::default());
    let erp = Arc::new(Coalescing::new(
        env.erp_with(&stats),
        CoalescingConfig {
            max_in_flight: 1,
            max_batch: 100,
        },
    ));
    erp.read("CustomersV3", &RecordRef::Key(customer_key("usmf", "X")))
        .await
        .expect("read");
    // The first request is slow, so the other callers gather behind it; the next request (their
    // batch) fails with a 503.
    env.fno
        .inject_faults([Fault::Delay(Duration::from_millis(300)), Fault::Status(503)]);
    let tasks: Vec<_> = (0..CALLERS)
        .map(|n| {
            let erp = erp.clone();
            tokio::spawn(async move {
                let at = RecordRef::Key(customer_key("usmf", &format!("F-{n:03}")));
                erp.read("CustomersV3", &at).await
            })
        })
        .collect();
    let mut ok = 0;
    let mut failed = 0;
    for task in tasks {
        match task.await.expect("caller") {
            Ok(None) => ok += 1,
            Ok(Some(r)) => panic!("nothing exists, read {r:?}"),
            Err(e) => {
                assert_eq!(e.kind, ConnectorErrorKind::Transient);
                assert_eq!(e.status, Some(503));
                assert_eq!(e.entity, "CustomersV3");
                failed += 1;
            }
        }
    }
    let s = erp.stats().snapshot();
    assert!(ok >= 1, "the slow first request succeeded");
    assert!(failed > 1, "the failed batch carried several callers");
    assert_eq!(ok + failed, CALLERS);
    assert!(s.requests < s.calls, "{s:?}");
}

#[tokio::test]
async fn a_caller_that_stops_waiting_breaks_no_other() {
    let env = Env::start().await;
    let stats = Arc::new(ConnectorStats::default());
    let erp = Arc::new(Coalescing::new(
        env.erp_with(&stats),
        CoalescingConfig {
            max_in_flight: 1,
            max_batch: 100,
        },
    ));
    erp.read("CustomersV3", &RecordRef::Key(customer_key("usmf", "X")))
        .await
        .expect("read");
    env.fno
        .inject_faults([Fault::Delay(Duration::from_millis(300))]);
    let at = |n: usize| RecordRef::Key(customer_key("usmf", &format!("W-{n}")));
    let write = |n: usize| {
        let erp = erp.clone();
        async move {
            let record = customer("usmf", &format!("W-{n}"), "w", "No");
            erp.upsert("CustomersV3", &at(n), &record, WriteCondition::MustNotExist)
                .await
        }
    };
    // Caller 0's request is in flight (slow); callers 1 and 2 wait behind it; caller 1 gives up.
    let first = tokio::spawn(write(0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let gives_up = tokio::time::timeout(Duration::from_millis(50), write(1)).await;
    assert!(gives_up.is_err(), "still waiting when it gave up");
    let third = tokio::spawn(write(2));
    assert!(first.await.expect("caller 0").expect("written").created);
    assert!(third.await.expect("caller 2").expect("written").created);
    let accounts: Vec<String> = env
        .fno
        .rows("CustomersV3")
        .iter()
        .filter_map(|r| r["CustomerAccount"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        accounts,
        ["W-0", "W-2"],
        "the abandoned call was never sent"
    );
}
