//! `Engine::settled`: what a receiver may answer without queueing (echoes, duplicates, stale
//! changes), decided from the store alone, and everything it must leave to the worker.

use dualwrite_core::decision::{SkipReason, side_hash};
use dualwrite_core::map::{ConflictPolicy, DeletePolicy};
use dualwrite_core::ports::{LinkStore, PendingWrite, StoreOp};
use dualwrite_core::{IntegrationKey, Side, Value};
use dualwrite_engine::MapAction;

use crate::harness::World;

fn key() -> IntegrationKey {
    IntegrationKey("A1".into())
}

/// A1 = ("Contoso", 100), written to F&O by the engine; returns the world and F&O's echo of
/// that write, not processed yet.
async fn written_with_echo() -> (World, dualwrite_core::ChangeEvent) {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let ev = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    w.engine.process(&ev).await.unwrap();
    let mut echoes = w.erp.take_echoes();
    assert_eq!(echoes.len(), 1);
    (w, echoes.remove(0))
}

#[tokio::test]
async fn the_echo_of_a_write_is_settled_from_the_store_without_any_call() {
    let (w, echo) = written_with_echo().await;
    let (reads, writes) = (w.crm.read_count() + w.erp.read_count(), w.writes());
    let reason = w.engine.settled(&echo).await;
    assert!(
        matches!(reason, Some(SkipReason::Echo | SkipReason::Duplicate)),
        "{reason:?}"
    );
    assert_eq!(w.crm.read_count() + w.erp.read_count(), reads, "no read");
    assert_eq!(w.writes(), writes, "no write");
    let stats = w.engine.stats();
    assert_eq!((stats.screened, stats.echoes_suppressed), (1, 1));
    assert_eq!(stats.events, 1, "the echo was not processed");
    // Processing it anyway would only have skipped it.
    let out = w.engine.process(&echo).await.unwrap();
    assert!(
        matches!(out.maps[0].action, MapAction::Skipped(_)),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_change_with_other_values_is_left_to_the_worker() {
    let (w, _echo) = written_with_echo().await;
    w.tick();
    let edit = w.edit_account(Side::Erp, "A1", None, Some(250));
    assert_eq!(w.engine.settled(&edit).await, None);
    w.tick();
    let rename = w.edit_account(Side::Crm, "A1", Some("Contoso Ltd"), None);
    assert_eq!(w.engine.settled(&rename).await, None);
    assert_eq!(w.engine.stats().screened, 0);
}

#[tokio::test]
async fn partial_events_deletes_and_unlinked_records_are_left_to_the_worker() {
    let (w, echo) = written_with_echo().await;
    let mut partial = echo.clone();
    partial.partial = true;
    assert_eq!(w.engine.settled(&partial).await, None, "a partial event");
    let mut delete = echo.clone();
    delete.operation = dualwrite_core::Operation::Delete;
    assert_eq!(w.engine.settled(&delete).await, None, "a delete");
    let fresh = w.edit_account(Side::Crm, "B2", Some("Fabrikam"), Some(5));
    assert_eq!(w.engine.settled(&fresh).await, None, "no link yet");
}

#[tokio::test]
async fn the_echo_of_a_write_still_in_flight_is_settled() {
    // The link announces a write to F&O that has not been committed as done: the echo
    // overtaking that commit is recognised by the pending hash.
    let (w, echo) = written_with_echo().await;
    let link = w.store.link("accounts", &key()).await.unwrap().unwrap();
    let map = &w.engine.maps()[0];
    let mut announced = link.clone();
    announced.erp.hash = None;
    announced.erp.version = None;
    announced.pending = Some(PendingWrite {
        side: Side::Erp,
        hash: side_hash(map, Side::Erp, &echo.record),
    });
    w.store
        .commit(vec![StoreOp::PutLink {
            link: announced,
            expected_revision: link.revision,
        }])
        .await
        .unwrap();
    assert_eq!(w.engine.settled(&echo).await, Some(SkipReason::Echo));
}

#[tokio::test]
async fn an_older_change_is_settled_as_stale() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let old = w.edit_account(Side::Crm, "A1", Some("Old"), Some(1));
    w.tick();
    let new = w.edit_account(Side::Crm, "A1", Some("New"), None);
    w.settle(vec![new]).await;
    assert_eq!(w.engine.settled(&old).await, Some(SkipReason::Stale));
    assert_eq!(w.engine.stats().stale_dropped, 1);
    assert_eq!(
        w.account(Side::Erp, "A1").map(|(name, _)| name),
        Some(Value::Text("New".into()))
    );
}

#[tokio::test]
async fn an_echo_that_would_advance_the_link_is_left_to_the_worker() {
    // Same values as the link records, but a newer version than it knows: processing it
    // commits the newer version, which a receiver must not skip.
    let (w, mut echo) = written_with_echo().await;
    w.settle(Vec::new()).await;
    let known = echo
        .record
        .version
        .expect("the memory connector versions its records");
    let newer = dualwrite_core::SourceVersion {
        modified_on: known.modified_on + chrono::TimeDelta::seconds(5),
        sequence: known.sequence + 1,
    };
    echo.record.version = Some(newer);
    assert_eq!(w.engine.settled(&echo).await, None);
    let out = w.engine.process(&echo).await.unwrap();
    assert_eq!(out.maps[0].action, MapAction::Skipped(SkipReason::Echo));
    let link = w.store.link("accounts", &key()).await.unwrap().unwrap();
    assert_eq!(
        link.erp.version,
        Some(newer),
        "the worker advanced the link"
    );
}
