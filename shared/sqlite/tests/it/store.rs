//! SqliteStore: LinkStore, IdempotencyStore and JournalStore guarantees.

use std::sync::Arc;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use dualwrite_core::ports::{
    ConflictRecord, ErrorClass, ErrorRecord, EventClaim, IdempotencyStore, JournalStore, LinkStore,
    MAX_COMMIT_OPS, MapState, MapStatus, ParkedEvent, StoreError, StoreOp,
};
use dualwrite_core::{IntegrationKey, Record, Side};
use dualwrite_sqlite::{SqliteStore, StoreCounts};

use crate::fixtures::{event, link, t0};

fn key(k: &str) -> IntegrationKey {
    IntegrationKey(k.to_owned().into())
}

fn put(l: dualwrite_core::ports::Link, expected_revision: u64) -> StoreOp {
    StoreOp::PutLink {
        link: l,
        expected_revision,
    }
}

#[tokio::test]
async fn put_link_is_readable_by_key_and_by_either_side_id() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .commit(vec![put(
            link("customers", "USMF/US-001", Some("guid-1"), Some("acct-1")),
            0,
        )])
        .await
        .unwrap();

    let by_key = store
        .link("customers", &key("USMF/US-001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        by_key.revision, 1,
        "the stored link gets expected_revision + 1"
    );
    assert_eq!(by_key.crm_id.as_deref(), Some("guid-1"));
    let by_crm = store
        .link_by_id("customers", Side::Crm, "guid-1")
        .await
        .unwrap()
        .unwrap();
    let by_erp = store
        .link_by_id("customers", Side::Erp, "acct-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_crm, by_key);
    assert_eq!(by_erp, by_key);

    assert!(
        store
            .link_by_id("customers", Side::Erp, "guid-1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .link_by_id("vendors", Side::Crm, "guid-1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .link("vendors", &key("USMF/US-001"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn stale_revisions_fail_with_conflict_and_change_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    let l = link("customers", "K1", Some("a"), None);
    store.commit(vec![put(l.clone(), 0)]).await.unwrap();

    // A second writer that also read "no link" loses.
    let err = store.commit(vec![put(l.clone(), 0)]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected: 0, ref key, .. } if key == "K1"),
        "{err}"
    );

    let mut newer = l.clone();
    newer.erp_id = Some("b".to_owned().into());
    store.commit(vec![put(newer, 1)]).await.unwrap();
    let err = store.commit(vec![put(l.clone(), 1)]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected: 1, .. }),
        "{err}"
    );
    let stored = store.link("customers", &key("K1")).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.erp_id.as_deref()), (2, Some("b")));

    // Delete is conditional too.
    let delete = |rev| StoreOp::DeleteLink {
        map: "customers".into(),
        key: key("K1"),
        expected_revision: rev,
    };
    assert!(matches!(
        store.commit(vec![delete(1)]).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(store.link("customers", &key("K1")).await.unwrap().is_some());
    store.commit(vec![delete(2)]).await.unwrap();
    assert!(store.link("customers", &key("K1")).await.unwrap().is_none());
    assert!(
        store
            .link_by_id("customers", Side::Crm, "a")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_failing_commit_applies_none_of_its_operations() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .commit(vec![put(link("m", "existing", None, None), 0)])
        .await
        .unwrap();

    let err = store
        .commit(vec![
            put(link("m", "new", None, None), 0),
            StoreOp::CompleteEvent {
                event_id: "ev-1".into(),
            },
            StoreOp::RecordError(error_at(0, "boom")),
            put(link("m", "existing", None, None), 0), // stale: fails the whole commit
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(store.link("m", &key("new")).await.unwrap().is_none());
    assert!(!store.event_done("ev-1").unwrap());
    assert!(store.errors(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn commits_are_limited_to_max_commit_ops() {
    let store = SqliteStore::open_in_memory().unwrap();
    let ops = |n: usize| -> Vec<StoreOp> {
        (0..n)
            .map(|i| StoreOp::CompleteEvent {
                event_id: format!("ev-{n}-{i}"),
            })
            .collect()
    };
    let err = store.commit(ops(MAX_COMMIT_OPS + 1)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { max: MAX_COMMIT_OPS, got } if got == MAX_COMMIT_OPS + 1)
    );
    assert_eq!(store.counts().unwrap().completed_events, 0);
    store.commit(ops(MAX_COMMIT_OPS)).await.unwrap();
    assert_eq!(
        store.counts().unwrap().completed_events,
        MAX_COMMIT_OPS as u64
    );
}

#[tokio::test]
async fn claims_follow_the_lease_release_and_completion() {
    let store = SqliteStore::open_in_memory().unwrap();
    let lease = Duration::from_secs(30);
    assert_eq!(
        store.claim_event("ev", t0(), lease).await.unwrap(),
        EventClaim::Claimed
    );
    let during = t0() + ChronoDuration::seconds(29);
    assert_eq!(
        store.claim_event("ev", during, lease).await.unwrap(),
        EventClaim::InProgress
    );
    // The holder died: after the lease the event may be claimed again.
    let after = t0() + ChronoDuration::seconds(30);
    assert_eq!(
        store.claim_event("ev", after, lease).await.unwrap(),
        EventClaim::Claimed
    );
    // Released: claimable at once.
    store.release_event("ev").await.unwrap();
    assert_eq!(
        store.claim_event("ev", after, lease).await.unwrap(),
        EventClaim::Claimed
    );

    store
        .commit(vec![StoreOp::CompleteEvent {
            event_id: "ev".into(),
        }])
        .await
        .unwrap();
    let much_later = t0() + ChronoDuration::days(3);
    assert_eq!(
        store.claim_event("ev", much_later, lease).await.unwrap(),
        EventClaim::AlreadyDone
    );
    // Releasing a completed event does not undo the completion.
    store.release_event("ev").await.unwrap();
    assert_eq!(
        store.claim_event("ev", much_later, lease).await.unwrap(),
        EventClaim::AlreadyDone
    );
    // Completion without a prior claim works too.
    store
        .commit(vec![StoreOp::CompleteEvent {
            event_id: "other".into(),
        }])
        .await
        .unwrap();
    assert_eq!(
        store.claim_event("other", t0(), lease).await.unwrap(),
        EventClaim::AlreadyDone
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_concurrent_claims_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // Two stores on one file (two connections) plus tasks sharing each: both kinds of race.
    let stores = [
        Arc::new(SqliteStore::open(&path).unwrap()),
        Arc::new(SqliteStore::open(&path).unwrap()),
    ];
    for round in 0..5 {
        let event_id = format!("ev-{round}");
        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = Arc::clone(&stores[i % 2]);
            let event_id = event_id.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .claim_event(&event_id, t0(), Duration::from_secs(60))
                    .await
                    .unwrap()
            }));
        }
        let mut claims = Vec::new();
        for t in tasks {
            claims.push(t.await.unwrap());
        }
        let winners = claims.iter().filter(|c| **c == EventClaim::Claimed).count();
        assert_eq!(winners, 1, "round {round}: {claims:?}");
        assert!(
            claims
                .iter()
                .all(|c| matches!(c, EventClaim::Claimed | EventClaim::InProgress))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_lose_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let stores = [
        Arc::new(SqliteStore::open(&path).unwrap()),
        Arc::new(SqliteStore::open(&path).unwrap()),
    ];
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&stores[w % 2]);
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..10 {
                loop {
                    let current = store.link("m", &key("hot")).await.unwrap();
                    let rev = current.as_ref().map_or(0, |l| l.revision);
                    let l = current.unwrap_or_else(|| link("m", "hot", None, None));
                    match store.commit(vec![put(l, rev)]).await {
                        Ok(()) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stored = stores[0].link("m", &key("hot")).await.unwrap().unwrap();
    assert_eq!(
        stored.revision, 80,
        "each of 8 writers x 10 successful commits is one revision"
    );
}

fn error_at(secs: i64, message: &str) -> ErrorRecord {
    ErrorRecord {
        at: t0() + ChronoDuration::seconds(secs),
        map: Some("m".into()),
        key: None,
        event_id: None,
        class: ErrorClass::Retryable,
        message: message.to_owned(),
        event: None,
    }
}

fn conflict(id: &str, secs: i64, open: bool) -> ConflictRecord {
    ConflictRecord {
        id: id.to_owned(),
        map: "m".into(),
        key: key("K"),
        detected_at: t0() + ChronoDuration::seconds(secs),
        policy: "manual".into(),
        crm: Record::new("accounts"),
        erp: Record::new("CustomersV3"),
        winner: None,
        open,
    }
}

#[tokio::test]
async fn conflict_and_error_logs_list_newest_first() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .commit(vec![
            StoreOp::RecordConflict(conflict("c1", 1, true)),
            StoreOp::RecordConflict(conflict("c2", 2, false)),
            StoreOp::RecordConflict(conflict("c3", 3, true)),
            StoreOp::RecordError(error_at(5, "first")),
            StoreOp::RecordError(error_at(7, "second")),
            StoreOp::RecordError(error_at(6, "third")),
        ])
        .await
        .unwrap();
    let ids = |cs: Vec<ConflictRecord>| cs.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.conflicts(false, 10).await.unwrap()),
        ["c3", "c2", "c1"]
    );
    assert_eq!(ids(store.conflicts(true, 10).await.unwrap()), ["c3", "c1"]);
    assert_eq!(ids(store.conflicts(false, 1).await.unwrap()), ["c3"]);

    // Same id replaces: c1 resolved.
    store
        .commit(vec![StoreOp::RecordConflict(conflict("c1", 1, false))])
        .await
        .unwrap();
    assert_eq!(ids(store.conflicts(true, 10).await.unwrap()), ["c3"]);
    assert_eq!(store.conflicts(false, 10).await.unwrap().len(), 3);
    // By id, open or not.
    assert_eq!(
        store.conflict("c1").await.unwrap(),
        Some(conflict("c1", 1, false))
    );
    assert_eq!(
        store.conflict("c3").await.unwrap(),
        Some(conflict("c3", 3, true))
    );
    assert_eq!(store.conflict("c4").await.unwrap(), None);

    let messages: Vec<String> = store
        .errors(2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(messages, ["second", "third"]);
    assert_eq!(store.errors(10).await.unwrap()[2], error_at(5, "first"));

    // The failed change is kept with its error, so that it can be sent again.
    let with_event = ErrorRecord {
        event: Some(event("ev-9", "accounts", "a9", 3)),
        ..error_at(9, "refused")
    };
    store
        .commit(vec![StoreOp::RecordError(with_event.clone())])
        .await
        .unwrap();
    assert_eq!(store.errors(1).await.unwrap(), [with_event]);
}

#[tokio::test]
async fn completed_events_are_forgotten_oldest_first_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("db.sqlite")).unwrap();
    let complete = |id: &str| StoreOp::CompleteEvent {
        event_id: id.to_owned(),
    };
    store
        .commit(vec![complete("old-1"), complete("old-2")])
        .await
        .unwrap();
    // The records carry the wall-clock time they were written (ms): the next ones are later.
    std::thread::sleep(Duration::from_millis(5));
    let cutoff = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(5));
    store.commit(vec![complete("new-1")]).await.unwrap();
    assert_eq!(store.counts().unwrap().completed_events, 3);

    assert_eq!(store.forget_completed_events(cutoff, 1).await.unwrap(), 1);
    assert_eq!(store.counts().unwrap().completed_events, 2);
    assert_eq!(store.forget_completed_events(cutoff, 100).await.unwrap(), 1);
    assert_eq!(store.forget_completed_events(cutoff, 100).await.unwrap(), 0);
    assert!(!store.event_done("old-1").unwrap());
    assert!(!store.event_done("old-2").unwrap());
    assert!(
        store.event_done("new-1").unwrap(),
        "inside the window: kept"
    );
    // A forgotten event can be claimed again (its link then tells a duplicate, see the
    // engine's tests); a remembered one cannot.
    let lease = std::time::Duration::from_secs(60);
    assert_eq!(
        store.claim_event("old-1", t0(), lease).await.unwrap(),
        EventClaim::Claimed
    );
    assert_eq!(
        store.claim_event("new-1", t0(), lease).await.unwrap(),
        EventClaim::AlreadyDone
    );
}

#[tokio::test]
async fn parked_events_are_kept_per_awaited_link_until_unparked() {
    let store = SqliteStore::open_in_memory().unwrap();
    let parked = |id: &str, waiting: &str, secs: i64| ParkedEvent {
        waiting_map: "currencies".into(),
        waiting_key: key(waiting),
        reason: format!("lookup currency = '{waiting}' in map currencies"),
        event: event(id, "salesorders", id, 0),
        parked_at: t0() + ChronoDuration::seconds(secs),
    };
    store
        .commit(vec![
            StoreOp::Park(parked("e2", "EUR", 2)),
            StoreOp::Park(parked("e1", "EUR", 1)),
            StoreOp::Park(parked("e3", "USD", 3)),
        ])
        .await
        .unwrap();
    let eur = store.parked_for("currencies", &key("EUR")).await.unwrap();
    assert_eq!(eur, vec![parked("e1", "EUR", 1), parked("e2", "EUR", 2)]);
    assert_eq!(store.parked_count().await.unwrap(), 3);
    assert!(
        store
            .parked_for("customers", &key("EUR"))
            .await
            .unwrap()
            .is_empty()
    );

    store
        .commit(vec![StoreOp::Unpark {
            waiting_map: "currencies".into(),
            waiting_key: key("EUR"),
            event_id: "e1".into(),
        }])
        .await
        .unwrap();
    assert_eq!(
        store.parked_for("currencies", &key("EUR")).await.unwrap(),
        vec![parked("e2", "EUR", 2)]
    );
    assert_eq!(store.parked_count().await.unwrap(), 2);
}

#[tokio::test]
async fn map_states_are_created_replaced_and_listed_by_name() {
    let store = SqliteStore::open_in_memory().unwrap();
    let state = |map: &str, status| MapState {
        map: map.to_owned(),
        status,
        crm_watermark: Some(t0()),
        erp_watermark: None,
        crm_deletions: None,
        erp_deletions: None,
        updated_at: t0(),
    };
    assert!(store.map_state("customers").await.unwrap().is_none());
    store
        .commit(vec![
            StoreOp::PutMapState(state("vendors", MapStatus::Running)),
            StoreOp::PutMapState(state("customers", MapStatus::Running)),
        ])
        .await
        .unwrap();
    store
        .commit(vec![StoreOp::PutMapState(state(
            "customers",
            MapStatus::Paused,
        ))])
        .await
        .unwrap();
    assert_eq!(
        store.map_state("customers").await.unwrap(),
        Some(state("customers", MapStatus::Paused))
    );
    let names: Vec<String> = store
        .map_states()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.map)
        .collect();
    assert_eq!(names, ["customers", "vendors"]);
}

#[tokio::test]
async fn reopening_the_file_keeps_everything_but_the_claims_of_a_closed_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .commit(vec![
                put(link("customers", "K1", Some("g1"), Some("a1")), 0),
                put(link("vendors", "K2", None, Some("v2")), 0),
                StoreOp::CompleteEvent {
                    event_id: "done".into(),
                },
                StoreOp::RecordConflict(conflict("c1", 1, true)),
                StoreOp::RecordError(error_at(1, "oops")),
            ])
            .await
            .unwrap();
        store
            .claim_event("held", t0(), Duration::from_secs(60))
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    store.integrity_check().unwrap();
    assert_eq!(
        store
            .link("customers", &key("K1"))
            .await
            .unwrap()
            .unwrap()
            .revision,
        1
    );
    assert!(
        store
            .link_by_id("vendors", Side::Erp, "v2")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store
            .claim_event("done", t0(), Duration::from_secs(1))
            .await
            .unwrap(),
        EventClaim::AlreadyDone
    );
    assert_eq!(
        store.counts().unwrap(),
        StoreCounts {
            links: 2,
            open_conflicts: 1,
            conflicts: 1,
            errors: 1,
            parked: 0,
            completed_events: 1,
            claimed_events: 0,
        }
    );
    // Claims live in the process: the store that held "held" is gone (as after a crash), so
    // the event is claimable at once instead of after its lease.
    assert_eq!(
        store
            .claim_event("held", t0(), Duration::from_secs(1))
            .await
            .unwrap(),
        EventClaim::Claimed
    );
    assert_eq!(store.counts().unwrap().claimed_events, 1);
    let all: Vec<String> = store
        .links(None)
        .unwrap()
        .into_iter()
        .map(|l| l.map.to_string())
        .collect();
    assert_eq!(all, ["customers", "vendors"]);
    let vendors = store.links(Some("vendors")).unwrap();
    assert_eq!(vendors.len(), 1);
    assert_eq!(vendors[0].key, key("K2"));
}

/// A deleted pair is remembered across a reopen, replaced by a later delete of the same pair,
/// and forgotten with the completion records once the window has passed.
#[tokio::test]
async fn deleted_pairs_are_remembered_then_forgotten_with_the_window() {
    use dualwrite_core::IntegrationKey;
    use dualwrite_core::ports::LinkStore;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let key = IntegrationKey("USMF/US-001".into());
    let old = chrono::Utc::now() - chrono::Duration::hours(2);
    {
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.deleted_at("customers", &key).await.unwrap(), None);
        store
            .commit(vec![StoreOp::RememberDeleted {
                map: "customers".into(),
                key: key.clone(),
                at: old,
            }])
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let at = store.deleted_at("customers", &key).await.unwrap().unwrap();
    assert_eq!(at.timestamp_millis(), old.timestamp_millis());
    assert_eq!(store.deleted_at("vendors", &key).await.unwrap(), None);

    let cutoff = chrono::Utc::now() - chrono::Duration::hours(1);
    store.forget_completed_events(cutoff, 100).await.unwrap();
    assert_eq!(
        store.deleted_at("customers", &key).await.unwrap(),
        None,
        "older than the window: forgotten"
    );
    let now = chrono::Utc::now();
    store
        .commit(vec![StoreOp::RememberDeleted {
            map: "customers".into(),
            key: key.clone(),
            at: now,
        }])
        .await
        .unwrap();
    store.forget_completed_events(cutoff, 100).await.unwrap();
    assert!(store.deleted_at("customers", &key).await.unwrap().is_some());
}
