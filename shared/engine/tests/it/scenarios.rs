//! One test per behaviour of the worker step.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::decision::SkipReason;
use dualwrite_core::map::{ConflictPolicy, DeletePolicy};
use dualwrite_core::ports::{
    ConnectorErrorKind, ErrorClass, JournalStore, LinkStore, RecordRef, WorkQueue,
};
use dualwrite_core::{IntegrationKey, Operation, RecordKey, Side, Value};
use dualwrite_engine::memory::MemoryQueue;
use dualwrite_engine::{EventStatus, MapAction, drain, ingest, run_worker};

use crate::harness::{ACCOUNTS, CUSTOMERS, World, accounts_map, orders_map};

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn action(outcome: &dualwrite_engine::ProcessOutcome) -> &MapAction {
    &outcome.maps[0].action
}

/// A linked pair A1 = ("Contoso", 100) on both sides, echoes settled.
async fn linked(conflict: ConflictPolicy, delete: DeletePolicy) -> World {
    let w = World::accounts(conflict, delete);
    let ev = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    w.settle(vec![ev]).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Contoso"), Value::Integer(100)))
    );
    w
}

#[tokio::test]
async fn dualwrites_own_write_coming_back_is_not_written_back() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let ev = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    let out = w.engine.process(&ev).await.unwrap();
    assert!(matches!(
        action(&out),
        MapAction::Written {
            writes: 1,
            conflict: None
        }
    ));
    let echoes = w.erp.take_echoes();
    assert_eq!(echoes.len(), 1);
    let out = w.engine.process(&echoes[0]).await.unwrap();
    // The write's own version is already in the link, so the echo is also a duplicate of
    // what dualwrite knows; either way it is suppressed.
    assert!(
        matches!(
            action(&out),
            MapAction::Skipped(SkipReason::Echo | SkipReason::Duplicate)
        ),
        "{out:?}"
    );
    assert_eq!(w.crm.write_count(), 0);
    assert_eq!(w.erp.write_count(), 1);
    assert_eq!(w.engine.stats().echoes_suppressed, 1);
    let link = w
        .store
        .link("accounts", &IntegrationKey("A1".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        link.erp.version, echoes[0].record.version,
        "the echo's version is what the link knows"
    );
}

#[tokio::test]
async fn an_older_change_after_a_newer_one_is_dropped() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let old = w.edit_account(Side::Crm, "A1", Some("Old"), Some(1));
    w.tick();
    let new = w.edit_account(Side::Crm, "A1", Some("New"), None);
    w.engine.process(&new).await.unwrap();
    let out = w.engine.process(&old).await.unwrap();
    assert_eq!(action(&out), &MapAction::Skipped(SkipReason::Stale));
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("New"), Value::Integer(1)))
    );
    assert_eq!(w.engine.stats().stale_dropped, 1);
}

#[tokio::test]
async fn two_changes_with_the_same_version_are_settled_by_reading_the_source() {
    // Two edits within the clock's resolution (or a webhook without `versionnumber`): the
    // versions tie. The older values delivered last must not overwrite the newer ones.
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let mut old = w.edit_account(Side::Crm, "A1", Some("Old"), Some(1));
    w.tick();
    let new = w.edit_account(Side::Crm, "A1", Some("New"), None);
    old.record.version = new.record.version;
    w.engine.process(&new).await.unwrap();
    let reads = w.crm.read_count();
    let out = w.engine.process(&old).await.unwrap();
    assert!(
        matches!(action(&out), MapAction::Skipped(_)),
        "the source says New is current: {out:?}"
    );
    assert_eq!(
        w.crm.read_count(),
        reads + 1,
        "the tie is settled by one read"
    );
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("New"), Value::Integer(1)))
    );
    assert_eq!(w.erp.write_count(), 1);
}

#[tokio::test]
async fn the_same_event_delivered_many_times_writes_once() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let ev = w.edit_account(Side::Crm, "A1", Some("Contoso"), None);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(w.engine.process(&ev).await.unwrap().status);
    }
    assert_eq!(statuses[0], EventStatus::Processed);
    assert!(statuses[1..].iter().all(|s| *s == EventStatus::Duplicate));
    assert_eq!(w.erp.write_count(), 1);
    assert_eq!(w.engine.stats().duplicates, 4);
}

/// Both sides edit A1 (CRM first, ERP one second later), then the CRM event is processed.
async fn both_edit(
    conflict: ConflictPolicy,
    crm_later: bool,
) -> (World, dualwrite_engine::ProcessOutcome) {
    let w = linked(conflict, DeletePolicy::Propagate).await;
    w.tick();
    let (crm_ev, _erp_ev) = if crm_later {
        let e = w.edit_account(Side::Erp, "A1", Some("ErpName"), Some(200));
        w.tick();
        (
            w.edit_account(Side::Crm, "A1", Some("CrmName"), Some(300)),
            e,
        )
    } else {
        let c = w.edit_account(Side::Crm, "A1", Some("CrmName"), Some(300));
        w.tick();
        (
            c,
            w.edit_account(Side::Erp, "A1", Some("ErpName"), Some(200)),
        )
    };
    let out = w.engine.process(&crm_ev).await.unwrap();
    (w, out)
}

async fn only_conflict(w: &World) -> dualwrite_core::ports::ConflictRecord {
    let conflicts = w.store.conflicts(false, 10).await.unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let c = conflicts[0].clone();
    assert_eq!(
        c.crm.get("name"),
        Some(&text("CrmName")),
        "the CRM version is recorded"
    );
    assert_eq!(
        c.erp.get("Name"),
        Some(&text("ErpName")),
        "the ERP version is recorded"
    );
    c
}

#[tokio::test]
async fn last_writer_wins_takes_the_later_change_either_way() {
    let (w, _) = both_edit(ConflictPolicy::LastWriterWins, false).await;
    assert_eq!(
        w.account(Side::Crm, "A1"),
        Some((text("ErpName"), Value::Integer(200)))
    );
    assert_eq!(only_conflict(&w).await.winner, Some(Side::Erp));

    let (w, _) = both_edit(ConflictPolicy::LastWriterWins, true).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("CrmName"), Value::Integer(300)))
    );
    assert_eq!(only_conflict(&w).await.winner, Some(Side::Crm));
    assert_eq!(w.engine.stats().conflicts, 1);
}

/// A change that loses its conflict is decided on the source's current row before anything
/// is written back over it: an edit of its own side queued behind it (newer than the other
/// side's) is neither overwritten unseen nor then dropped as stale.
#[tokio::test]
async fn a_losing_change_is_not_written_back_over_a_newer_edit_of_its_own_side() {
    let w = linked(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate).await;
    w.tick();
    let mut crm_first = w.edit_account(Side::Crm, "A1", Some("Crm2"), Some(2));
    // As a webhook delivers it: no ETag (RemoteExecutionContext carries none).
    crm_first.record.etag = None;
    w.tick();
    let erp = w.edit_account(Side::Erp, "A1", Some("Erp3"), Some(3));
    w.tick();
    let crm_again = w.edit_account(Side::Crm, "A1", Some("Crm4"), Some(4));
    w.settle(vec![crm_first, erp, crm_again]).await;
    let newest = Some((text("Crm4"), Value::Integer(4)));
    assert_eq!(
        w.account(Side::Crm, "A1"),
        newest,
        "the newest edit is kept"
    );
    assert_eq!(w.account(Side::Erp, "A1"), newest, "and reaches the ERP");
}

/// A field only one side writes is no part of a conflict: when the other side's edit of the
/// shared fields wins, a pending change of the one-way field still reaches its target (it was
/// folded into the link's hash unsent, and its own event then dropped as stale).
#[tokio::test]
async fn a_one_way_field_changed_during_a_conflict_still_flows_its_way() {
    for policy in [
        ConflictPolicy::LastWriterWins,
        ConflictPolicy::CrmWins,
        ConflictPolicy::ErpWins,
    ] {
        let mut map = accounts_map(policy, DeletePolicy::Propagate);
        // Credit flows from the ERP only (`>`), the name both ways.
        map.fields[2].direction = dualwrite_core::map::FieldDirection::ErpToCrm;
        map.fields[2].notation = ">".into();
        map.fields[2].source_of_truth = None;
        map.fields[1].source_of_truth = None;
        let w = World::new(vec![map]);
        let created = w.edit_account(Side::Erp, "A1", Some("Contoso"), Some(100));
        w.settle(vec![created]).await;
        assert_eq!(
            w.account(Side::Crm, "A1"),
            Some((text("Contoso"), Value::Integer(100)))
        );
        w.tick();
        let erp_credit = w.edit_account(Side::Erp, "A1", None, Some(200));
        w.tick();
        let mut crm_name = w.edit_account(Side::Crm, "A1", Some("CrmName"), None);
        crm_name.record.etag = None;
        // The CRM's later edit is processed first: the ERP changed too (a conflict).
        w.settle(vec![crm_name, erp_credit]).await;
        let name = if policy == ConflictPolicy::ErpWins {
            "Contoso"
        } else {
            "CrmName"
        };
        assert_eq!(
            w.account(Side::Crm, "A1"),
            Some((text(name), Value::Integer(200))),
            "{policy:?}: the ERP's credit reached the CRM"
        );
        assert_eq!(
            w.account(Side::Erp, "A1").map(|(n, _)| n),
            Some(text(name)),
            "{policy:?}"
        );
    }
}

/// A two-way field whose way to one side loses information (here: cut to 3 characters in
/// the CRM) is not written back over the fuller value when another field changes there.
#[tokio::test]
async fn a_field_cut_on_its_way_to_one_side_is_not_cut_on_the_other_by_an_unrelated_change() {
    let mut map = accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    map.fields[1].to_crm = vec![dualwrite_core::map::TransformStep::Truncate(3)];
    let w = World::new(vec![map]);
    let created = w.edit_account(Side::Erp, "A1", Some("Contoso Ltd"), Some(100));
    w.settle(vec![created]).await;
    assert_eq!(
        w.account(Side::Crm, "A1"),
        Some((text("Con"), Value::Integer(100)))
    );
    w.tick();
    let credit = w.edit_account(Side::Crm, "A1", None, Some(250));
    w.settle(vec![credit]).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Contoso Ltd"), Value::Integer(250))),
        "the credit synced, the full name kept"
    );
    // A real change of the field in the CRM is written, of course.
    w.tick();
    let renamed = w.edit_account(Side::Crm, "A1", Some("Fab"), None);
    w.settle(vec![renamed]).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Fab"), Value::Integer(250)))
    );
}

#[tokio::test]
async fn crm_wins_and_erp_wins_ignore_timestamps() {
    let (w, _) = both_edit(ConflictPolicy::CrmWins, false).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("CrmName"), Value::Integer(300)))
    );
    assert_eq!(only_conflict(&w).await.winner, Some(Side::Crm));

    let (w, _) = both_edit(ConflictPolicy::ErpWins, true).await;
    assert_eq!(
        w.account(Side::Crm, "A1"),
        Some((text("ErpName"), Value::Integer(200)))
    );
    assert_eq!(only_conflict(&w).await.winner, Some(Side::Erp));
}

#[tokio::test]
async fn field_level_takes_each_field_from_its_owner_and_writes_both_sides() {
    let (w, out) = both_edit(ConflictPolicy::FieldLevel, false).await;
    assert!(
        matches!(
            action(&out),
            MapAction::Written {
                writes: 2,
                conflict: Some(_)
            }
        ),
        "{out:?}"
    );
    // name is owned by CRM, credit by ERP.
    let expected = Some((text("CrmName"), Value::Integer(200)));
    assert_eq!(w.account(Side::Crm, "A1"), expected);
    assert_eq!(w.account(Side::Erp, "A1"), expected);
    assert_eq!(only_conflict(&w).await.winner, None);
    w.settle(Vec::new()).await;
    assert_eq!(w.account(Side::Crm, "A1"), w.account(Side::Erp, "A1"));
}

#[tokio::test]
async fn manual_conflicts_write_nothing_and_park_later_changes() {
    let writes_before = 1;
    let (w, out) = both_edit(ConflictPolicy::Manual, false).await;
    assert!(matches!(action(&out), MapAction::ConflictHeld { .. }));
    assert_eq!(w.writes(), writes_before);
    let conflict = only_conflict(&w).await;
    assert!(conflict.open);
    assert_eq!(w.store.conflicts(true, 10).await.unwrap().len(), 1);
    let link = w
        .store
        .link("accounts", &IntegrationKey("A1".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(link.open_conflict.as_deref(), Some(conflict.id.as_str()));
    w.tick();
    let later = w.edit_account(Side::Crm, "A1", Some("Again"), None);
    let out = w.engine.process(&later).await.unwrap();
    assert!(matches!(action(&out), MapAction::Parked { .. }), "{out:?}");
    assert_eq!(w.store.parked_count().await.unwrap(), 1);
    assert_eq!(w.writes(), writes_before);
}

#[tokio::test]
async fn a_person_resolves_a_manual_conflict_and_parked_changes_move_on() {
    let (w, _) = both_edit(ConflictPolicy::Manual, false).await;
    let conflict = only_conflict(&w).await;
    w.tick();
    let later = w.edit_account(Side::Crm, "A1", Some("Again"), None);
    w.engine.process(&later).await.unwrap();
    assert_eq!(w.store.parked_count().await.unwrap(), 1);

    let out = w
        .engine
        .resolve_conflict(&conflict.id, Side::Crm)
        .await
        .unwrap();
    assert!(
        matches!(action(&out), MapAction::Written { writes: 1, .. }),
        "{out:?}"
    );
    // The CRM record as it stands now (with the later edit) won.
    assert_eq!(w.account(Side::Erp, "A1"), w.account(Side::Crm, "A1"));
    assert_eq!(w.account(Side::Erp, "A1").map(|a| a.0), Some(text("Again")));
    let closed = &w.store.conflicts(false, 10).await.unwrap()[0];
    assert!(!closed.open);
    assert_eq!(closed.winner, Some(Side::Crm));
    assert!(w.store.conflicts(true, 10).await.unwrap().is_empty());

    // The parked change is released and finds nothing left to do.
    let queue = MemoryQueue::new(w.clock.clone(), 5);
    assert_eq!(w.engine.sweep_parked(&queue).await.unwrap(), 1);
    let writes = w.writes();
    drain(&queue, &w.engine).await.unwrap();
    assert_eq!(w.writes(), writes, "the released change is already applied");
    w.settle(Vec::new()).await;
    assert_eq!(w.account(Side::Erp, "A1"), w.account(Side::Crm, "A1"));

    // Resolving again is refused with the reason.
    let err = w
        .engine
        .resolve_conflict(&conflict.id, Side::Erp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no open conflict"), "{err}");
}

/// A resolution whose write fails for now (the other side throttles or is down) keeps the
/// person's decision: the change is in the error log, and sending it again writes the winner.
/// It used to be lost: the conflict was closed and the failure only reported.
#[tokio::test]
async fn a_resolution_whose_write_fails_for_now_is_kept_and_written_when_sent_again() {
    let (w, _) = both_edit(ConflictPolicy::Manual, false).await;
    let conflict = only_conflict(&w).await;
    w.tick();
    w.erp
        .fail_next(dualwrite_core::ports::ConnectorErrorKind::Transient);
    let err = w
        .engine
        .resolve_conflict(&conflict.id, Side::Crm)
        .await
        .unwrap_err();
    let text = err.to_string();
    let event_id = format!("resolve:{}", conflict.id);
    assert!(
        text.contains(&format!("dualwrite errors retry {event_id}")),
        "{text}"
    );
    assert!(
        w.store.conflicts(true, 10).await.unwrap().is_empty(),
        "closed"
    );
    assert_ne!(
        w.account(Side::Erp, "A1"),
        w.account(Side::Crm, "A1"),
        "not written yet"
    );
    let logged = w.store.errors(10).await.unwrap();
    let kept = logged
        .iter()
        .find(|e| e.event_id.as_deref() == Some(event_id.as_str()))
        .expect("the resolution's change is in the error log");
    assert_eq!(kept.class, dualwrite_core::ports::ErrorClass::Retryable);
    assert!(kept.event.is_some(), "with the change itself");

    let replay = dualwrite_engine::replay::failed_events(
        w.store.as_ref(),
        std::slice::from_ref(&event_id),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(replay.events.len(), 1);
    let out = w.engine.process(&replay.events[0]).await.unwrap();
    assert!(
        matches!(action(&out), MapAction::Written { writes: 1, .. }),
        "{out:?}"
    );
    assert_eq!(w.account(Side::Erp, "A1"), w.account(Side::Crm, "A1"));
    w.settle(Vec::new()).await;
    assert_eq!(w.account(Side::Erp, "A1"), w.account(Side::Crm, "A1"));
}

/// A change without a version, older than the engine remembers completed events (a dead
/// letter redriven late), may have been applied and forgotten: it is decided on its source
/// record read again, never by writing its own, possibly outdated, values.
#[tokio::test]
async fn a_versionless_change_older_than_the_idempotency_window_rereads_its_source() {
    use dualwrite_core::ports::Clock;

    let w = linked(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate).await;
    let current = w.account(Side::Crm, "A1");
    let template = w.edit_account(Side::Crm, "A1", None, None);
    w.settle(vec![template.clone()]).await;
    let outdated = |id: &str, age_hours: i64| {
        let mut ev = template.clone();
        ev.event_id = id.into();
        ev.record.version = None;
        ev.record
            .fields
            .insert("name", dualwrite_core::Value::Text("Outdated".into()));
        ev.received_at = w.clock.now() - chrono::Duration::hours(age_hours);
        ev
    };
    let late = outdated("late-1", 200);
    w.engine.process(&late).await.unwrap();
    w.settle(Vec::new()).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        current,
        "the source's current record wins"
    );
    assert_eq!(w.account(Side::Crm, "A1"), current);

    // Within the window, a complete versionless change is taken as it is.
    let recent = outdated("recent-1", 1);
    w.engine.process(&recent).await.unwrap();
    assert_eq!(
        w.account(Side::Erp, "A1").map(|a| a.0),
        Some(text("Outdated"))
    );
}

#[tokio::test]
async fn delete_propagate_removes_the_other_record_and_the_link() {
    let w = linked(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate).await;
    let at = RecordRef::Key(RecordKey::new([("accountnumber", "A1")]));
    let ev = w.crm.delete_by_user(ACCOUNTS, &at).unwrap();
    let out = w.engine.process(&ev).await.unwrap();
    assert_eq!(action(&out), &MapAction::Deleted);
    assert_eq!(w.account(Side::Erp, "A1"), None);
    assert!(
        w.store
            .link("accounts", &IntegrationKey("A1".into()))
            .await
            .unwrap()
            .is_none()
    );
    // The ERP delete's own event finds no link: nothing more happens.
    w.settle(Vec::new()).await;
    assert_eq!(w.account(Side::Crm, "A1"), None);
}

#[tokio::test]
async fn delete_ignore_keeps_the_other_record_and_drops_the_link() {
    let w = linked(ConflictPolicy::LastWriterWins, DeletePolicy::Ignore).await;
    let at = RecordRef::Key(RecordKey::new([("accountnumber", "A1")]));
    let ev = w.crm.delete_by_user(ACCOUNTS, &at).unwrap();
    w.engine.process(&ev).await.unwrap();
    assert!(w.account(Side::Erp, "A1").is_some());
    assert!(
        w.store
            .link("accounts", &IntegrationKey("A1".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(w.erp.write_count(), 1, "only the initial create");
}

#[tokio::test]
async fn delete_deactivate_writes_the_deactivation_fields_without_resurrecting() {
    let policy = DeletePolicy::Deactivate {
        crm: vec![("statecode".into(), Value::Choice(1))],
        erp: vec![("Blocked".into(), Value::Enum("Yes".into()))],
    };
    let w = linked(ConflictPolicy::LastWriterWins, policy).await;
    let at = RecordRef::Key(RecordKey::new([("accountnumber", "A1")]));
    let ev = w.crm.delete_by_user(ACCOUNTS, &at).unwrap();
    w.engine.process(&ev).await.unwrap();
    let erp = w
        .erp
        .record(
            CUSTOMERS,
            &RecordRef::Key(RecordKey::new([("CustomerAccount", "A1")])),
        )
        .unwrap();
    assert_eq!(erp.get("Blocked"), Some(&Value::Enum("Yes".into())));
    w.settle(Vec::new()).await;
    assert_eq!(
        w.account(Side::Crm, "A1"),
        None,
        "the deactivation's echo does not recreate the CRM row"
    );
    let link = w
        .store
        .link("accounts", &IntegrationKey("A1".into()))
        .await
        .unwrap()
        .expect("the link stays, with the deactivated ERP row");
    assert_eq!(link.crm_id, None, "the deleted CRM row's id is forgotten");
    assert!(link.erp_id.is_some());
}

/// A late change of a pair deleted since — the echo of an earlier write, delayed past the
/// delete — does not create the pair anew on the side the delete emptied; a record created
/// again under the key later is a new pair and syncs.
#[tokio::test]
async fn a_late_change_of_a_deleted_pair_does_not_bring_it_back() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let created = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    w.engine.process(&created).await.unwrap();
    let late = w.erp.take_echoes();
    assert_eq!(late.len(), 1, "the ERP echo of the create, held back");
    let at = RecordRef::Key(RecordKey::new([("accountnumber", "A1")]));
    let deleted = w.crm.delete_by_user(ACCOUNTS, &at).unwrap();
    w.engine.process(&deleted).await.unwrap();
    assert_eq!(
        w.account(Side::Erp, "A1"),
        None,
        "the delete was propagated"
    );

    let out = w.engine.process(&late[0]).await.unwrap();
    assert_eq!(action(&out), &MapAction::SourceGone, "{out:?}");
    w.settle(Vec::new()).await;
    assert_eq!(w.account(Side::Crm, "A1"), None, "not brought back");
    assert_eq!(w.account(Side::Erp, "A1"), None);

    let again = w.edit_account(Side::Crm, "A1", Some("Contoso again"), Some(5));
    w.settle(vec![again]).await;
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Contoso again"), Value::Integer(5)))
    );
}

/// A change of a linked pair whose other record was deleted (that delete missed, or not
/// processed yet) creates it again, whatever the policy — nothing is overwritten — and logs
/// the meeting of the delete and the change as a conflict an operator can see.
#[tokio::test]
async fn a_change_of_a_pair_deleted_on_the_other_side_recreates_it_and_logs_why() {
    for policy in [ConflictPolicy::LastWriterWins, ConflictPolicy::Manual] {
        let w = linked(policy, DeletePolicy::Propagate).await;
        let at = RecordRef::Key(RecordKey::new([("CustomerAccount", "A1")]));
        let _missed = w.erp.delete_by_user(CUSTOMERS, &at).unwrap();
        w.tick();
        let edit = w.edit_account(Side::Crm, "A1", Some("Renamed"), None);
        w.settle(vec![edit]).await;
        assert_eq!(
            w.account(Side::Erp, "A1"),
            Some((text("Renamed"), Value::Integer(100))),
            "{policy:?}"
        );
        let conflicts = w.store.conflicts(false, 10).await.unwrap();
        assert_eq!(conflicts.len(), 1, "{policy:?}: {conflicts:?}");
        let c = &conflicts[0];
        assert_eq!(c.policy, dualwrite_core::decision::RECREATE_POLICY);
        assert_eq!(c.winner, Some(Side::Crm));
        assert!(!c.open, "nothing waits for a person");
        assert!(c.erp.fields.is_empty(), "the deleted side: {c:?}");
        assert_eq!(c.crm.get("name"), Some(&text("Renamed")));
    }
}

#[tokio::test]
async fn a_delete_of_an_unlinked_record_is_skipped() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    w.edit_account(Side::Crm, "A1", Some("x"), None);
    let ev = w
        .crm
        .delete_by_user(
            ACCOUNTS,
            &RecordRef::Key(RecordKey::new([("accountnumber", "A1")])),
        )
        .unwrap();
    assert_eq!(ev.operation, Operation::Delete);
    let out = w.engine.process(&ev).await.unwrap();
    assert_eq!(action(&out), &MapAction::Skipped(SkipReason::NoLink));
    assert_eq!(w.writes(), 0);
}

/// The sweep reads the parked list a page at a time, around and around: more events parked for
/// good than one page holds (orders of customers that never come) cannot hide a later event
/// whose customer did arrive. It used to look at the oldest page only, for ever.
#[tokio::test]
async fn the_sweep_reaches_events_behind_a_full_page_parked_for_good() {
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let order = |number: String, customer: String| {
        w.erp.edit(
            "SalesOrders",
            &RecordRef::Key(RecordKey::new([("SalesOrderNumber", number.as_str())])),
            [("CustomerAccount".into(), text(&customer))],
        )
    };
    let stuck = dualwrite_engine::SWEEP_LIMIT + 3;
    for n in 0..stuck {
        let ev = order(format!("SO-STUCK-{n}"), format!("C-NEVER-{n}"));
        w.engine.process(&ev).await.unwrap();
    }
    w.tick();
    let last = order("SO-LATE".into(), "C-LATE".into());
    w.engine.process(&last).await.unwrap();
    assert_eq!(w.store.parked_count().await.unwrap(), stuck as u64 + 1);
    // Its customer arrives, but the release that would follow is lost (a crash): only the
    // sweep can find it now.
    let customer = w.edit_account(Side::Erp, "C-LATE", Some("Late"), None);
    let out = w.engine.process(&customer).await.unwrap();
    assert_eq!(out.released.len(), 1);

    let queue = dualwrite_engine::memory::MemoryQueue::new(w.clock.clone(), 5);
    let mut released = 0;
    for _ in 0..3 {
        released += w.engine.sweep_parked(&queue).await.unwrap();
    }
    assert_eq!(
        released, 1,
        "the late order was found behind the stuck page"
    );
    assert_eq!(w.store.parked_count().await.unwrap(), stuck as u64);
    let deliveries = queue
        .receive(10, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].message.event.event_id, last.event_id);
}

#[tokio::test]
async fn an_order_waits_for_its_customer_then_syncs_with_the_reference() {
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let order_at = RecordRef::Key(RecordKey::new([("SalesOrderNumber", "SO1")]));
    let order = w.erp.edit(
        "SalesOrders",
        &order_at,
        [("CustomerAccount".into(), text("C9"))],
    );
    let out = w.engine.process(&order).await.unwrap();
    assert!(
        matches!(action(&out), MapAction::Parked { waiting_map, waiting_key, .. } if waiting_map == "accounts" && waiting_key.as_str() == "C9"),
        "{out:?}"
    );
    assert_eq!(w.store.parked_count().await.unwrap(), 1);
    assert!(
        w.crm.records("salesorders").is_empty(),
        "never a dangling reference"
    );

    let customer = w.edit_account(Side::Erp, "C9", Some("Fabrikam"), None);
    let out = w.engine.process(&customer).await.unwrap();
    assert_eq!(out.released.len(), 1, "the parked order is released");
    assert_eq!(
        w.store.parked_count().await.unwrap(),
        1,
        "it stays parked until it is back in the queue"
    );
    let queue = dualwrite_engine::memory::MemoryQueue::new(w.clock.clone(), 5);
    let released = out.released[0].event.clone();
    assert_eq!(w.engine.release(&queue, out.released).await.unwrap(), 1);
    assert_eq!(w.store.parked_count().await.unwrap(), 0);
    let deliveries = queue
        .receive(10, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].message.event, released);
    let out = w.engine.process(&released).await.unwrap();
    assert!(
        matches!(action(&out), MapAction::Written { writes: 1, .. }),
        "{out:?}"
    );
    let crm_order = &w.crm.records("salesorders")[0];
    let crm_customer = w
        .crm
        .record(
            ACCOUNTS,
            &RecordRef::Key(RecordKey::new([("accountnumber", "C9")])),
        )
        .unwrap();
    match crm_order.get("customerid") {
        Some(Value::Lookup(l)) => {
            assert_eq!(l.entity_set, ACCOUNTS);
            assert_eq!(l.id, crm_customer.id.map(Into::into));
        }
        other => panic!("expected a lookup, got {other:?}"),
    }
    w.settle(Vec::new()).await;
    assert_eq!(w.crm.records("salesorders").len(), 1);
}

#[tokio::test]
async fn an_unsynced_customer_that_exists_is_synced_before_its_order() {
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let _customer_event_not_yet_processed = w.edit_account(Side::Erp, "C1", Some("Contoso"), None);
    let order = w.erp.edit(
        "SalesOrders",
        &RecordRef::Key(RecordKey::new([("SalesOrderNumber", "SO1")])),
        [("CustomerAccount".into(), text("C1"))],
    );
    let out = w.engine.process(&order).await.unwrap();
    assert!(matches!(action(&out), MapAction::Written { .. }), "{out:?}");
    assert_eq!(
        w.account(Side::Crm, "C1"),
        Some((text("Contoso"), Value::Null))
    );
    assert_eq!(w.engine.stats().dependencies_synced, 1);
    assert_eq!(w.store.parked_count().await.unwrap(), 0);
}

/// Both systems find a record by its key without case: an order naming its customer `c1` is
/// about the linked customer `C1`. It syncs with the reference to that customer's row instead
/// of waiting for a link `c1` that never comes, and the next such order needs no read.
#[tokio::test]
async fn a_reference_spelled_in_another_case_resolves_to_the_linked_record() {
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let customer = w.edit_account(Side::Erp, "C1", Some("Contoso"), None);
    w.settle(vec![customer]).await;
    let link = w
        .store
        .link("accounts", &IntegrationKey("C1".into()))
        .await
        .unwrap()
        .unwrap();
    for number in ["SO1", "SO2"] {
        let order = w.erp.edit(
            "SalesOrders",
            &RecordRef::Key(RecordKey::new([("SalesOrderNumber", number)])),
            [("CustomerAccount".into(), text("c1"))],
        );
        let out = w.engine.process(&order).await.unwrap();
        assert!(matches!(action(&out), MapAction::Written { .. }), "{out:?}");
        let crm_order = w
            .crm
            .record(
                "salesorders",
                &RecordRef::Key(RecordKey::new([("ordernumber", number)])),
            )
            .unwrap();
        match crm_order.get("customerid") {
            Some(Value::Lookup(l)) => assert_eq!(l.id.as_deref(), link.crm_id.as_deref()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(w.store.parked_count().await.unwrap(), 0);
    assert_eq!(
        w.engine.stats().dependencies_synced,
        1,
        "the second order resolved through what the first learned"
    );
}

/// The losing side's reference to a record synced nowhere does not hold the winner's write:
/// under `crm_wins`, the CRM's edit of an order lands although the ERP meanwhile named a
/// customer that does not exist, and the CRM's customer is kept on both sides.
#[tokio::test]
async fn a_losing_sides_unresolvable_reference_does_not_hold_the_winners_write() {
    let mut orders = orders_map();
    orders.conflict = ConflictPolicy::CrmWins;
    let mut memo = orders.fields[0].clone();
    memo.is_key = false;
    memo.erp = Some(dualwrite_core::map::FieldRef {
        name: "Memo".into(),
        ty: dualwrite_core::ValueType::Text,
    });
    memo.crm = Some(dualwrite_core::map::FieldRef {
        name: "description".into(),
        ty: dualwrite_core::ValueType::Text,
    });
    orders.fields.push(memo);
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders,
    ]);
    let customer = w.edit_account(Side::Erp, "C1", Some("Contoso"), None);
    w.settle(vec![customer]).await;
    let erp_at = RecordRef::Key(RecordKey::new([("SalesOrderNumber", "SO1")]));
    let order = w.erp.edit(
        "SalesOrders",
        &erp_at,
        [
            ("CustomerAccount".into(), text("C1")),
            ("Memo".into(), text("m0")),
        ],
    );
    w.settle(vec![order]).await;
    w.tick();
    let _erp_names_a_customer_synced_nowhere = w.erp.edit(
        "SalesOrders",
        &erp_at,
        [("CustomerAccount".into(), text("C9"))],
    );
    w.tick();
    let crm_edit = w.crm.edit(
        "salesorders",
        &RecordRef::Key(RecordKey::new([("ordernumber", "SO1")])),
        [("description".into(), text("crm memo"))],
    );
    let out = w.engine.process(&crm_edit).await.unwrap();
    assert!(matches!(action(&out), MapAction::Written { .. }), "{out:?}");
    let erp = w.erp.record("SalesOrders", &erp_at).unwrap();
    assert_eq!(erp.get("Memo"), Some(&text("crm memo")));
    assert_eq!(
        erp.get("CustomerAccount"),
        Some(&text("C1")),
        "the CRM's customer"
    );
    assert_eq!(w.store.parked_count().await.unwrap(), 0);
}

/// An order parked on a customer spelled `c1` before the customer existed is released once
/// the customer `C1` is linked and the spelling is known (learned from a later reference).
#[tokio::test]
async fn an_order_parked_on_another_spelling_is_released_by_the_records_link() {
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let so1 = w.erp.edit(
        "SalesOrders",
        &RecordRef::Key(RecordKey::new([("SalesOrderNumber", "SO1")])),
        [("CustomerAccount".into(), text("c1"))],
    );
    let out = w.engine.process(&so1).await.unwrap();
    assert!(matches!(action(&out), MapAction::Parked { .. }), "{out:?}");
    let customer = w.edit_account(Side::Erp, "C1", Some("Contoso"), None);
    w.settle(vec![customer]).await;
    let queue = dualwrite_engine::memory::MemoryQueue::new(w.clock.clone(), 5);
    assert_eq!(
        w.engine.sweep_parked(&queue).await.unwrap(),
        0,
        "nothing tells yet that c1 is C1"
    );
    let so2 = w.erp.edit(
        "SalesOrders",
        &RecordRef::Key(RecordKey::new([("SalesOrderNumber", "SO2")])),
        [("CustomerAccount".into(), text("c1"))],
    );
    let out = w.engine.process(&so2).await.unwrap();
    assert!(matches!(action(&out), MapAction::Written { .. }), "{out:?}");
    assert_eq!(
        w.engine.sweep_parked(&queue).await.unwrap(),
        1,
        "SO1 released"
    );
    let deliveries = queue
        .receive(10, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let out = w
        .engine
        .process(&deliveries[0].message.event)
        .await
        .unwrap();
    assert!(matches!(action(&out), MapAction::Written { .. }), "{out:?}");
    assert_eq!(w.store.parked_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_permanent_connector_error_is_logged_and_the_event_completed() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    w.erp.fail_next(ConnectorErrorKind::BadRequest);
    let ev = w.edit_account(Side::Crm, "A1", Some("x"), None);
    let out = w.engine.process(&ev).await.unwrap();
    assert!(matches!(action(&out), MapAction::Failed { .. }));
    let errors = w.store.errors(10).await.unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].class, ErrorClass::Permanent);
    assert_eq!(errors[0].event_id.as_deref(), Some(ev.event_id.as_str()));
    assert_eq!(
        w.engine.process(&ev).await.unwrap().status,
        EventStatus::Duplicate,
        "not retried forever"
    );
}

#[tokio::test]
async fn a_transient_error_asks_for_a_retry_and_the_retry_succeeds() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    w.erp.fail_next(ConnectorErrorKind::Throttled {
        retry_after_ms: 3_000,
    });
    let ev = w.edit_account(Side::Crm, "A1", Some("x"), None);
    let err = w.engine.process(&ev).await.unwrap_err();
    assert!(err.retry_after() >= Duration::from_secs(3), "{err}");
    let out = w.engine.process_attempt(&ev, 2).await.unwrap();
    assert!(matches!(action(&out), MapAction::Written { .. }));
}

#[tokio::test]
async fn a_412_is_read_again_and_decided_again() {
    let w = linked(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate).await;
    w.tick();
    let ev = w.edit_account(Side::Crm, "A1", Some("New"), None);
    w.erp.fail_next(ConnectorErrorKind::PreconditionFailed);
    let out = w.engine.process(&ev).await.unwrap();
    assert!(matches!(action(&out), MapAction::Written { .. }));
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("New"), Value::Integer(100)))
    );
    assert!(w.engine.stats().redecisions >= 1);
}

#[tokio::test]
async fn the_worker_loop_drains_the_queue_and_stops_on_shutdown() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let queue = Arc::new(MemoryQueue::new(w.clock.clone(), 5));
    let events: Vec<_> = (0..5)
        .map(|i| w.edit_account(Side::Crm, &format!("A{i}"), Some("n"), Some(i)))
        .collect();
    assert_eq!(ingest(queue.as_ref(), events).await.unwrap(), 5);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let engine = w.engine.clone();
    let q = queue.clone();
    let worker = tokio::spawn(async move { run_worker(q.as_ref(), &engine, rx).await });
    for _ in 0..200 {
        if queue.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.send(true).unwrap();
    let report = worker.await.unwrap().unwrap();
    assert_eq!(report.acked, 5);
    assert_eq!(w.erp.records(CUSTOMERS).len(), 5);
    // The echoes go through the queue too and change nothing.
    ingest(queue.as_ref(), w.erp.take_echoes()).await.unwrap();
    let report = drain(queue.as_ref(), &w.engine).await.unwrap();
    assert_eq!(report.acked, 5);
    assert_eq!(w.crm.write_count(), 0);
    assert_eq!(queue.depth().await.unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_both_sides_of_one_pair_end_consistent() {
    for round in 0..20 {
        let w = linked(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate).await;
        let mut crm_events = Vec::new();
        let mut erp_events = Vec::new();
        for i in 0..4 {
            w.tick();
            crm_events.push(w.edit_account(
                Side::Crm,
                "A1",
                Some(&format!("crm{round}-{i}")),
                None,
            ));
            erp_events.push(w.edit_account(Side::Erp, "A1", None, Some(i)));
        }
        let (e1, e2) = (w.engine.clone(), w.engine.clone());
        let a = tokio::spawn(async move {
            for ev in crm_events {
                let mut attempt = 1;
                while e1.process_attempt(&ev, attempt).await.is_err() {
                    attempt += 1;
                    tokio::task::yield_now().await;
                }
            }
        });
        let b = tokio::spawn(async move {
            for ev in erp_events {
                let mut attempt = 1;
                while e2.process_attempt(&ev, attempt).await.is_err() {
                    attempt += 1;
                    tokio::task::yield_now().await;
                }
            }
        });
        a.await.unwrap();
        b.await.unwrap();
        w.settle(Vec::new()).await;
        assert_eq!(
            w.account(Side::Crm, "A1"),
            w.account(Side::Erp, "A1"),
            "round {round}"
        );
        let link = w
            .store
            .link("accounts", &IntegrationKey("A1".into()))
            .await
            .unwrap()
            .unwrap();
        assert!(link.open_conflict.is_none());
    }
}

#[tokio::test]
async fn a_release_interrupted_by_a_crash_is_completed_by_the_sweep() {
    let w = World::new(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let order_at = RecordRef::Key(RecordKey::new([("SalesOrderNumber", "SO1")]));
    let order = w.erp.edit(
        "SalesOrders",
        &order_at,
        [("CustomerAccount".into(), text("C9"))],
    );
    w.engine.process(&order).await.unwrap();
    let customer = w.edit_account(Side::Erp, "C9", Some("Fabrikam"), None);
    let out = w.engine.process(&customer).await.unwrap();
    assert_eq!(out.released.len(), 1);
    // The worker dies here: the released order was never sent. It is still parked.
    drop(out);
    assert_eq!(w.store.parked_count().await.unwrap(), 1);
    let queue = dualwrite_engine::memory::MemoryQueue::new(w.clock.clone(), 5);
    assert_eq!(
        w.engine.sweep_parked(&queue).await.unwrap(),
        1,
        "the sweep releases it"
    );
    assert_eq!(w.store.parked_count().await.unwrap(), 0);
    let deliveries = queue
        .receive(10, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].message.event.event_id, order.event_id);
    // A sweep with nothing ready releases nothing.
    assert_eq!(w.engine.sweep_parked(&queue).await.unwrap(), 0);
}

#[tokio::test]
async fn echoes_and_redeliveries_cost_no_read_of_the_other_side() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let ev = w.edit_account(Side::Crm, "A9", Some("Contoso"), Some(10));
    w.engine.process(&ev).await.unwrap();
    let echoes = w.erp.take_echoes();
    assert_eq!(echoes.len(), 1, "dualwrite wrote F&O once");
    let reads = (w.crm.read_count(), w.erp.read_count());
    // The echo of dualwrite's F&O write, and the same CRM change delivered again.
    w.engine.process(&echoes[0]).await.unwrap();
    let mut again = ev.clone();
    again.event_id = format!("{}-redelivered", ev.event_id);
    w.engine.process(&again).await.unwrap();
    assert_eq!(
        (w.crm.read_count(), w.erp.read_count()),
        reads,
        "decided from the link alone: no API call"
    );
    assert_eq!(w.writes(), 1);
}

#[tokio::test]
async fn a_new_record_is_created_without_reading_the_other_side_first() {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let ev = w.edit_account(Side::Crm, "N1", Some("Northwind"), Some(10));
    let out = w.engine.process(&ev).await.unwrap();
    assert!(
        matches!(action(&out), MapAction::Written { writes: 1, .. }),
        "{out:?}"
    );
    assert_eq!(w.erp.read_count(), 0, "one call: the create");
    assert_eq!(
        w.account(Side::Erp, "N1"),
        Some((text("Northwind"), Value::Integer(10)))
    );
    assert_eq!(w.engine.stats().redecisions, 0);
}

#[tokio::test]
async fn a_record_already_on_the_other_side_refuses_the_create_and_the_conflict_policy_decides() {
    // Both systems got "N1" on their own, with other values, before any link existed.
    let w = World::accounts(ConflictPolicy::CrmWins, DeletePolicy::Propagate);
    let _erp_ev = w.edit_account(Side::Erp, "N1", Some("ErpName"), Some(200));
    w.tick();
    let crm_ev = w.edit_account(Side::Crm, "N1", Some("CrmName"), Some(300));
    let out = w.engine.process(&crm_ev).await.unwrap();
    assert!(
        matches!(
            action(&out),
            MapAction::Written {
                conflict: Some(_),
                ..
            }
        ),
        "the refused create is decided again, as a conflict: {out:?}"
    );
    assert_eq!(
        w.account(Side::Erp, "N1"),
        Some((text("CrmName"), Value::Integer(300))),
        "CRM wins"
    );
    assert_eq!(w.engine.stats().redecisions, 1);
    assert!(w.erp.read_count() >= 1, "the second decision read F&O");
    assert_eq!(w.engine.stats().conflicts, 1);
}
