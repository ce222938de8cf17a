//! Regression tests for races between workers, replayed deterministically: an F&O connector
//! that runs other events' processing at the instant a write has landed but before its writer
//! committed the link, and one that stops the writer there for good (a crash).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dualwrite_core::decision::SkipReason;
use dualwrite_core::map::{ConflictPolicy, DeletePolicy};
use dualwrite_core::ports::{
    Connector, ConnectorError, ConnectorErrorKind, JournalStore, Link, LinkStore, Page,
    PendingWrite, Query, RecordRef, WriteCondition, WriteOutcome,
};
use dualwrite_core::{ChangeEvent, IntegrationKey, Record, Side, Value};
use dualwrite_engine::memory::{MemoryConnector, MemoryStore};
use dualwrite_engine::{Engine, MapAction, ProcessOutcome, WorkerConfig};
use tokio::sync::Notify;

use crate::harness::{World, accounts_map, orders_map};

/// What the F&O connector does right after an upsert has landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterWrite {
    /// Nothing: the writer goes on to its commit.
    Proceed,
    /// Another worker processes the write's echo before the writer commits.
    ProcessEchoes,
    /// Another worker processes `event` (kept in `Hooked::overtaking`) before the writer
    /// commits.
    ProcessOvertaking,
}

/// The F&O side of the test world: a [`MemoryConnector`] with the hooks above.
struct Hooked {
    inner: Arc<MemoryConnector>,
    /// The engine, for the "other worker" (set once it is built).
    engine: OnceLock<Weak<Engine>>,
    /// What the next upsert does after landing (reset to `Proceed` once used).
    after_write: Mutex<AfterWrite>,
    /// The event processed by [`AfterWrite::ProcessOvertaking`].
    overtaking: Mutex<Option<ChangeEvent>>,
    /// Outcomes of what the other worker processed.
    outcomes: Mutex<Vec<ProcessOutcome>>,
    /// When set, the next upsert signals `stalled` and never returns (the writer crashed
    /// before its write reached F&O).
    stall: AtomicBool,
    stalled: Notify,
    /// When set, a person makes the next upsert's very edit first, and the upsert is then
    /// refused with 412 (the target moved since the writer read it).
    refuse_after_person_edit: AtomicBool,
}

impl Hooked {
    fn arm(&self, after: AfterWrite) {
        *self.after_write.lock().unwrap() = after;
    }

    fn outcomes(&self) -> Vec<ProcessOutcome> {
        self.outcomes.lock().unwrap().clone()
    }
}

#[async_trait]
impl Connector for Hooked {
    fn side(&self) -> Side {
        self.inner.side()
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        self.inner.read(entity, at).await
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        self.inner.query(entity, query).await
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        if self.stall.swap(false, Ordering::SeqCst) {
            self.stalled.notify_one();
            std::future::pending::<()>().await;
        }
        if self.refuse_after_person_edit.swap(false, Ordering::SeqCst) {
            self.inner
                .upsert(entity, at, record, WriteCondition::None)
                .await?;
            self.inner.fail_next(ConnectorErrorKind::PreconditionFailed);
        }
        let out = self.inner.upsert(entity, at, record, condition).await?;
        self.after_landing().await;
        Ok(out)
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        self.inner.delete(entity, at).await?;
        self.after_landing().await;
        Ok(())
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        self.inner.upsert_batch(entity, items).await
    }
}

impl Hooked {
    /// What a write (upsert or delete) does once it landed, as armed.
    async fn after_landing(&self) {
        let after = std::mem::replace(&mut *self.after_write.lock().unwrap(), AfterWrite::Proceed);
        let events = match after {
            AfterWrite::Proceed => Vec::new(),
            AfterWrite::ProcessEchoes => self.inner.take_echoes(),
            AfterWrite::ProcessOvertaking => {
                self.overtaking.lock().unwrap().take().into_iter().collect()
            }
        };
        if !events.is_empty() {
            let engine = self
                .engine
                .get()
                .and_then(Weak::upgrade)
                .expect("engine set");
            for event in events {
                let outcome = engine
                    .process(&event)
                    .await
                    .expect("the other worker's event");
                self.outcomes.lock().unwrap().push(outcome);
            }
        }
    }
}

/// The accounts world under `conflict`, its engine writing F&O through a [`Hooked`] connector.
fn hooked_world(conflict: ConflictPolicy) -> (World, Arc<Hooked>) {
    hooked_world_with(vec![accounts_map(conflict, DeletePolicy::Propagate)])
}

/// A world of `maps` (accounts first), its engine writing F&O through a [`Hooked`] connector.
fn hooked_world_with(maps: Vec<dualwrite_core::map::TableMap>) -> (World, Arc<Hooked>) {
    let conflict = maps[0].conflict;
    let plain = World::accounts(conflict, DeletePolicy::Propagate);
    let hooked = Arc::new(Hooked {
        inner: plain.erp.clone(),
        engine: OnceLock::new(),
        after_write: Mutex::new(AfterWrite::Proceed),
        overtaking: Mutex::new(None),
        outcomes: Mutex::new(Vec::new()),
        stall: AtomicBool::new(false),
        stalled: Notify::new(),
        refuse_after_person_edit: AtomicBool::new(false),
    });
    let store = Arc::new(MemoryStore::new());
    let engine = Arc::new(Engine::new(
        store.clone(),
        plain.crm.clone(),
        hooked.clone(),
        maps,
        plain.clock.clone(),
        WorkerConfig::default(),
    ));
    let _ = hooked.engine.set(Arc::downgrade(&engine));
    let world = World {
        clock: plain.clock,
        store,
        crm: plain.crm,
        erp: plain.erp,
        engine,
    };
    (world, hooked)
}

/// A1 = ("Contoso", 100) linked on both sides, echoes settled.
async fn linked(conflict: ConflictPolicy) -> (World, Arc<Hooked>) {
    let (w, hooked) = hooked_world(conflict);
    let ev = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    w.settle(vec![ev]).await;
    w.tick();
    (w, hooked)
}

async fn link_of(w: &World) -> Link {
    w.store
        .link("accounts", &IntegrationKey("A1".into()))
        .await
        .unwrap()
        .expect("A1 is linked")
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// The echo of a write processed by a second worker before the writer commits its link: it
/// used to be compared with the link's old F&O hash, taken for a person's change, and meet
/// the writer's own uncommitted source change as a "conflict" (written back under
/// `last_writer_wins`, held for a person under `manual`).
async fn an_echo_overtaking_the_commit_of_its_write_is_an_echo(conflict: ConflictPolicy) {
    let (w, hooked) = linked(conflict).await;
    let writes_before = w.writes();
    let user_edit = w.edit_account(Side::Crm, "A1", Some("Renamed"), None);
    hooked.arm(AfterWrite::ProcessEchoes);
    let out = w.engine.process(&user_edit).await.unwrap();

    assert_eq!(
        out.maps[0].action,
        MapAction::Written {
            writes: 1,
            conflict: None
        },
        "{conflict:?}"
    );
    let echoes = hooked.outcomes();
    assert_eq!(
        echoes.len(),
        1,
        "the echo was processed mid-write: {echoes:?}"
    );
    assert_eq!(
        echoes[0].maps[0].action,
        MapAction::Skipped(SkipReason::Echo),
        "{conflict:?}"
    );
    assert_eq!(
        w.writes(),
        writes_before + 1,
        "only the user's change was written"
    );
    assert!(
        w.store.conflicts(false, 10).await.unwrap().is_empty(),
        "{conflict:?}"
    );
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Renamed"), Value::Integer(100)))
    );
    assert_eq!(
        w.account(Side::Crm, "A1"),
        Some((text("Renamed"), Value::Integer(100)))
    );
    let link = link_of(&w).await;
    assert_eq!(
        link.pending, None,
        "the final commit clears the announcement"
    );
    assert!(link.open_conflict.is_none());
    // Nothing is left to do: no further echo, no ping-pong.
    w.settle(Vec::new()).await;
    assert_eq!(w.writes(), writes_before + 1);
}

#[tokio::test]
async fn an_echo_overtaking_its_writes_commit_is_skipped_under_last_writer_wins() {
    an_echo_overtaking_the_commit_of_its_write_is_an_echo(ConflictPolicy::LastWriterWins).await;
}

#[tokio::test]
async fn an_echo_overtaking_its_writes_commit_holds_no_conflict_under_manual() {
    an_echo_overtaking_the_commit_of_its_write_is_an_echo(ConflictPolicy::Manual).await;
}

/// A conflict resolved by a write whose final commit loses the race to another worker (here
/// the winning change delivered again, which finds F&O holding it and commits the link as in
/// sync): the writer's decision taken again has nothing left to resolve, so the conflict is
/// recorded with the write's announcement — logged and counted once, whatever the timing.
#[tokio::test]
async fn a_conflict_whose_commit_loses_a_race_is_still_recorded_and_counted_once() {
    let (w, hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let erp_edit = w.edit_account(Side::Erp, "A1", Some("Renamed in F&O"), None);
    w.tick();
    let crm_edit = w.edit_account(Side::Crm, "A1", Some("Renamed in Dataverse"), None);
    let mut again = crm_edit.clone();
    again.event_id = format!("{}-redelivered", crm_edit.event_id);
    *hooked.overtaking.lock().unwrap() = Some(again);
    hooked.arm(AfterWrite::ProcessOvertaking);
    let before = w.engine.stats().conflicts;
    let out = w.engine.process(&crm_edit).await.unwrap();

    let other = hooked.outcomes();
    assert_eq!(other.len(), 1);
    assert_eq!(
        other[0].maps[0].action,
        MapAction::Skipped(SkipReason::InSync),
        "the other worker moved the link: {other:?}"
    );
    assert!(
        matches!(
            out.maps[0].action,
            MapAction::Skipped(SkipReason::Duplicate | SkipReason::Echo)
        ),
        "the writer decided again and found its write applied: {out:?}"
    );
    let conflicts = w.store.conflicts(false, 10).await.unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].winner, Some(Side::Crm));
    assert!(!conflicts[0].open);
    assert_eq!(w.engine.stats().conflicts - before, 1);

    // The losing edit's own event, late: stale, no second conflict.
    w.settle(vec![erp_edit]).await;
    assert_eq!(w.store.conflicts(false, 10).await.unwrap().len(), 1);
    assert_eq!(w.engine.stats().conflicts - before, 1);
    for side in [Side::Crm, Side::Erp] {
        assert_eq!(
            w.account(side, "A1"),
            Some((text("Renamed in Dataverse"), Value::Integer(100)))
        );
    }
    assert_eq!(link_of(&w).await.pending, None);
}

/// Both changes of a conflict decide it: the later (winning) Dataverse change writes F&O, and
/// the earlier F&O change's own event, processed by another worker while that write is in
/// flight, finds the same conflict (same pair, same versions) and tries the same write, which
/// F&O refuses (412: the row moved). Its retry must still know the first write's announcement
/// — withdrawing it used to turn the first write's arrival into a second, false conflict
/// between Dataverse and dualwrite's own write. One conflict, logged and counted once.
#[tokio::test]
async fn a_conflict_decided_by_both_of_its_changes_is_logged_and_counted_once() {
    let (w, hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let erp_edit = w.edit_account(Side::Erp, "A1", Some("Renamed in F&O"), None);
    w.tick();
    let crm_edit = w.edit_account(Side::Crm, "A1", Some("Renamed in Dataverse"), None);
    *hooked.overtaking.lock().unwrap() = Some(erp_edit);
    hooked.arm(AfterWrite::ProcessOvertaking);
    let before = w.engine.stats().conflicts;
    w.engine.process(&crm_edit).await.unwrap();

    let other = hooked.outcomes();
    assert_eq!(other.len(), 1);
    assert_eq!(
        other[0].maps[0].action,
        MapAction::Skipped(SkipReason::Echo),
        "the F&O change's event, decided again after its 412, meets the write in flight"
    );
    let conflicts = w.store.conflicts(false, 10).await.unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].winner, Some(Side::Crm));
    assert_eq!(w.engine.stats().conflicts - before, 1);
    w.settle(Vec::new()).await;
    assert_eq!(w.engine.stats().conflicts - before, 1);
    for side in [Side::Crm, Side::Erp] {
        assert_eq!(
            w.account(side, "A1"),
            Some((text("Renamed in Dataverse"), Value::Integer(100)))
        );
    }
}

/// The same Dataverse change delivered again under another event id (a webhook retried)
/// processed while the first delivery's write is in flight: F&O already holds what dualwrite
/// is writing, which is no change of its own, so no conflict is found.
#[tokio::test]
async fn a_redelivered_change_during_the_write_finds_no_conflict() {
    for conflict in [ConflictPolicy::LastWriterWins, ConflictPolicy::Manual] {
        let (w, hooked) = linked(conflict).await;
        let writes_before = w.writes();
        let user_edit = w.edit_account(Side::Crm, "A1", Some("Renamed"), None);
        let mut again = user_edit.clone();
        again.event_id = format!("{}-redelivered", user_edit.event_id);
        *hooked.overtaking.lock().unwrap() = Some(again);
        hooked.arm(AfterWrite::ProcessOvertaking);
        let out = w.engine.process(&user_edit).await.unwrap();

        let other = hooked.outcomes();
        assert_eq!(other.len(), 1);
        assert_eq!(
            other[0].maps[0].action,
            MapAction::Skipped(SkipReason::InSync),
            "{conflict:?}"
        );
        // The writer finds its link moved, decides again and finds the change applied.
        assert!(
            matches!(
                out.maps[0].action,
                MapAction::Skipped(SkipReason::Duplicate | SkipReason::Echo)
            ),
            "{conflict:?}: {out:?}"
        );
        assert!(
            w.store.conflicts(false, 10).await.unwrap().is_empty(),
            "{conflict:?}"
        );
        assert_eq!(w.writes(), writes_before + 1, "{conflict:?}");
        w.settle(Vec::new()).await;
        assert_eq!(w.writes(), writes_before + 1, "{conflict:?}");
        assert_eq!(
            w.account(Side::Crm, "A1"),
            Some((text("Renamed"), Value::Integer(100)))
        );
        assert_eq!(link_of(&w).await.pending, None);
    }
}

/// A worker that dies after announcing its write and before the write reaches F&O leaves the
/// announcement and an uncompleted event; the redelivered event is processed normally.
#[tokio::test]
async fn a_crash_between_announcing_and_writing_is_repaired_by_the_redelivery() {
    let (w, hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let before = link_of(&w).await;
    let writes_before = w.writes();
    let user_edit = w.edit_account(Side::Crm, "A1", Some("Renamed"), None);
    hooked.stall.store(true, Ordering::SeqCst);
    let worker = {
        let (engine, event) = (w.engine.clone(), user_edit.clone());
        tokio::spawn(async move { engine.process(&event).await })
    };
    hooked.stalled.notified().await;
    worker.abort();
    assert!(worker.await.unwrap_err().is_cancelled());

    let announced = link_of(&w).await;
    assert_eq!(w.writes(), writes_before, "the write never happened");
    assert!(
        matches!(
            announced.pending,
            Some(PendingWrite {
                side: Side::Erp,
                ..
            })
        ),
        "{announced:?}"
    );
    assert_eq!(announced.crm, before.crm, "the source side is not advanced");
    assert_eq!(announced.erp, before.erp);
    assert_eq!(announced.revision, before.revision + 1);

    // The claim's lease runs out; the queue delivers the event again.
    w.clock
        .advance(WorkerConfig::default().lease + Duration::from_secs(1));
    let out = w.engine.process_attempt(&user_edit, 2).await.unwrap();
    assert_eq!(
        out.maps[0].action,
        MapAction::Written {
            writes: 1,
            conflict: None
        }
    );
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Renamed"), Value::Integer(100)))
    );
    let link = link_of(&w).await;
    assert_eq!(link.pending, None);
    assert_ne!(link.crm, before.crm);
    w.settle(Vec::new()).await;
    assert_eq!(w.writes(), writes_before + 1);
    assert!(w.store.conflicts(false, 10).await.unwrap().is_empty());
    // Delivered once more: a duplicate, nothing written.
    let again = w.engine.process(&user_edit).await.unwrap();
    assert!(again.maps.is_empty());
    assert_eq!(w.writes(), writes_before + 1);
}

/// A write refused for good clears its announcement in the commit that logs the error.
#[tokio::test]
async fn a_write_refused_for_good_clears_its_announcement() {
    let (w, _hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let user_edit = w.edit_account(Side::Crm, "A1", Some("Renamed"), None);
    w.erp
        .fail_next(dualwrite_core::ports::ConnectorErrorKind::BadRequest);
    let out = w.engine.process(&user_edit).await.unwrap();
    assert!(
        matches!(out.maps[0].action, MapAction::Failed { .. }),
        "{out:?}"
    );
    assert_eq!(w.store.errors(10).await.unwrap().len(), 1);
    assert_eq!(link_of(&w).await.pending, None);
}

/// A new pair: the echo of the create processed by a second worker before the writer's commit
/// meets the provisional link announcing the write and is an echo; it used to find the pair on
/// both sides without a link and compare them as strangers (a conflict whenever a value was
/// represented differently, written back to the source).
#[tokio::test]
async fn an_echo_overtaking_the_commit_of_a_new_pair_is_an_echo() {
    for conflict in [ConflictPolicy::LastWriterWins, ConflictPolicy::Manual] {
        let (w, hooked) = hooked_world(conflict);
        let create = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
        hooked.arm(AfterWrite::ProcessEchoes);
        let out = w.engine.process(&create).await.unwrap();

        assert!(
            matches!(
                out.maps[0].action,
                MapAction::Written {
                    writes: 1,
                    conflict: None
                }
            ),
            "{conflict:?}: {out:?}"
        );
        let echoes = hooked.outcomes();
        assert_eq!(echoes.len(), 1, "the echo was processed mid-write");
        assert_eq!(
            echoes[0].maps[0].action,
            MapAction::Skipped(SkipReason::Echo),
            "{conflict:?}"
        );
        assert_eq!(w.writes(), 1, "{conflict:?}: only the create was written");
        assert!(w.store.conflicts(false, 10).await.unwrap().is_empty());
        let link = link_of(&w).await;
        assert!(!link.provisional, "the final commit makes the pair linked");
        assert_eq!(link.pending, None);
        assert!(link.crm_id.is_some() && link.erp_id.is_some(), "{link:?}");
        w.settle(Vec::new()).await;
        assert_eq!(w.writes(), 1, "{conflict:?}: no ping-pong");
        assert_eq!(
            w.account(Side::Erp, "A1"),
            Some((text("Contoso"), Value::Integer(100)))
        );
    }
}

/// A worker that dies between announcing a new pair and writing it leaves a provisional link:
/// the pair is not linked for anyone else (an order referencing the customer syncs the
/// customer first instead of trusting the link), and the redelivered create writes nothing
/// twice.
#[tokio::test]
async fn a_crash_before_the_first_write_of_a_new_pair_leaves_it_unlinked_for_others() {
    let (w, hooked) = hooked_world_with(vec![
        accounts_map(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate),
        orders_map(),
    ]);
    let create = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    hooked.stall.store(true, Ordering::SeqCst);
    let worker = {
        let (engine, event) = (w.engine.clone(), create.clone());
        tokio::spawn(async move { engine.process(&event).await })
    };
    hooked.stalled.notified().await;
    worker.abort();
    assert!(worker.await.unwrap_err().is_cancelled());

    let announced = link_of(&w).await;
    assert!(announced.provisional, "{announced:?}");
    assert!(announced.erp_id.is_none() && announced.crm_id.is_some());
    assert_eq!(
        announced.crm.hash, None,
        "the source side is not recorded yet"
    );
    assert!(matches!(
        announced.pending,
        Some(PendingWrite {
            side: Side::Erp,
            ..
        })
    ));
    assert_eq!(w.writes(), 0);

    // An F&O order for customer A1 meanwhile: the provisional link does not resolve the
    // lookup; the customer is synced first, then the order is written to Dataverse.
    let order = w.erp.edit(
        "SalesOrders",
        &RecordRef::Key(dualwrite_core::RecordKey::new([(
            "SalesOrderNumber",
            "SO1",
        )])),
        [("CustomerAccount".into(), text("A1"))],
    );
    let out = w.engine.process(&order).await.unwrap();
    assert!(
        matches!(out.maps[0].action, MapAction::Written { writes: 1, .. }),
        "{out:?}"
    );
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("Contoso"), Value::Integer(100)))
    );
    assert!(!link_of(&w).await.provisional);

    // The redelivered create finds the pair linked and in step: nothing more is written.
    w.clock
        .advance(WorkerConfig::default().lease + Duration::from_secs(1));
    let writes = w.writes();
    w.engine.process_attempt(&create, 2).await.unwrap();
    w.settle(Vec::new()).await;
    assert_eq!(w.writes(), writes);
    assert!(w.store.conflicts(false, 10).await.unwrap().is_empty());
}

/// The first write of a new pair refused for good deletes the provisional link with the
/// commit that logs the error: no half pair is left behind.
#[tokio::test]
async fn a_new_pair_whose_write_is_refused_for_good_leaves_no_link() {
    let (w, _hooked) = hooked_world(ConflictPolicy::LastWriterWins);
    let create = w.edit_account(Side::Crm, "A1", Some("Contoso"), Some(100));
    w.erp
        .fail_next(dualwrite_core::ports::ConnectorErrorKind::BadRequest);
    let out = w.engine.process(&create).await.unwrap();
    assert!(
        matches!(out.maps[0].action, MapAction::Failed { .. }),
        "{out:?}"
    );
    assert_eq!(w.store.errors(10).await.unwrap().len(), 1);
    assert_eq!(
        w.store
            .link("accounts", &IntegrationKey("A1".into()))
            .await
            .unwrap(),
        None
    );
}

/// A write refused with 412 did not land: its announcement must not outlive it. Here F&O's
/// older edit loses to a newer CRM value; the write of that value to F&O is refused because a
/// person made the very same edit meanwhile. Deciding again, F&O's current values are the
/// announced ones: with the announcement left in place they passed for the echo of a write
/// that never happened, nothing was committed, and the stale announcement kept hiding F&O's
/// real changes (a case the convergence property found).
#[tokio::test]
async fn a_write_refused_with_412_leaves_no_announcement_behind() {
    let (w, hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let older_erp_edit = w.edit_account(Side::Erp, "A1", None, Some(200));
    w.tick();
    w.edit_account(Side::Crm, "A1", Some("New"), None);
    hooked
        .refuse_after_person_edit
        .store(true, Ordering::SeqCst);

    let out = w.engine.process(&older_erp_edit).await.unwrap();
    assert!(
        matches!(
            out.maps[0].action,
            MapAction::Skipped(_) | MapAction::Written { writes: 0, .. }
        ),
        "F&O already holds the CRM values: nothing left to write: {out:?}"
    );
    assert!(
        w.engine.stats().redecisions >= 1,
        "the 412 was decided again"
    );
    let link = link_of(&w).await;
    assert_eq!(
        link.pending, None,
        "the refused write's announcement is gone"
    );
    assert_eq!(
        w.account(Side::Erp, "A1"),
        Some((text("New"), Value::Integer(100)))
    );
    assert_eq!(w.account(Side::Crm, "A1"), w.account(Side::Erp, "A1"));
}

/// The link of A1, if any.
async fn link_a1(w: &World) -> Option<Link> {
    w.store
        .link("accounts", &IntegrationKey("A1".into()))
        .await
        .unwrap()
}

/// The echo of a propagated delete (the F&O webhook of dualwrite's own delete) processed by a
/// second worker before the writer commits the link's removal: the link announces the delete,
/// so it is an echo. It used to find the link and propagate the delete back to the side it
/// came from (an extra delete call, counted as a delete).
#[tokio::test]
async fn the_echo_of_a_delete_overtaking_its_commit_is_an_echo() {
    let (w, hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let writes_before = w.writes();
    let at = RecordRef::Key(dualwrite_core::RecordKey::new([("accountnumber", "A1")]));
    let user_delete = w.crm.delete_by_user("accounts", &at).expect("A1 exists");
    hooked.arm(AfterWrite::ProcessEchoes);
    let out = w.engine.process(&user_delete).await.unwrap();
    assert_eq!(out.maps[0].action, MapAction::Deleted);
    let echoes = hooked.outcomes();
    assert_eq!(echoes.len(), 1, "the echo was processed mid-delete");
    assert_eq!(
        echoes[0].maps[0].action,
        MapAction::Skipped(SkipReason::Echo)
    );
    assert_eq!(w.writes(), writes_before + 1, "one delete, nothing else");
    assert_eq!(w.account(Side::Erp, "A1"), None);
    assert_eq!(w.engine.stats().deletes, 1);
    assert!(
        link_a1(&w).await.is_none(),
        "the writer's commit removed the link"
    );
    w.settle(Vec::new()).await;
    assert_eq!(w.writes(), writes_before + 1);
}

/// A delete refused for good withdraws its announcement: a later delete made by a person on
/// the other side must not pass for the echo of the one that failed.
#[tokio::test]
async fn a_delete_refused_for_good_withdraws_its_announcement() {
    let (w, _hooked) = linked(ConflictPolicy::LastWriterWins).await;
    let at = RecordRef::Key(dualwrite_core::RecordKey::new([("accountnumber", "A1")]));
    let user_delete = w.crm.delete_by_user("accounts", &at).expect("A1 exists");
    w.erp.fail_next(ConnectorErrorKind::Forbidden);
    let out = w.engine.process(&user_delete).await.unwrap();
    assert!(
        matches!(out.maps[0].action, MapAction::Failed { .. }),
        "{out:?}"
    );
    let link = link_of(&w).await;
    assert_eq!(link.pending, None, "the announcement is withdrawn");
    assert!(w.account(Side::Erp, "A1").is_some(), "still in F&O");
    // The person deletes the F&O customer too: a delete of a linked pair, not an echo.
    let erp_at = RecordRef::Key(dualwrite_core::RecordKey::new([("CustomerAccount", "A1")]));
    let erp_delete = w
        .erp
        .delete_by_user(crate::harness::CUSTOMERS, &erp_at)
        .expect("exists");
    let out = w.engine.process(&erp_delete).await.unwrap();
    assert_eq!(out.maps[0].action, MapAction::Deleted, "{out:?}");
    assert!(link_a1(&w).await.is_none());
}
