//! Property tests that pin echo suppression, ordering, convergence per conflict policy and
//! idempotency, each stated precisely enough that breaking the rule it proves makes it fail.
//!
//! Every property was checked against a deliberately broken `decide` (echo branch removed,
//! stale check removed, last-writer-wins tie reversed, winner reversed): each fails then.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use dualwrite_core::decision::SkipReason;
use dualwrite_core::map::{ConflictPolicy, DeletePolicy};
use dualwrite_core::ports::{
    Connector, ConnectorError, Page, Query, RecordRef, WriteCondition, WriteOutcome,
};
use dualwrite_core::{ChangeEvent, Record, Side, SourceVersion, Value};
use dualwrite_engine::memory::{MemoryConnector, MemoryStore};
use dualwrite_engine::{Engine, EventStatus, MapAction, ProcessOutcome, WorkerConfig};
use proptest::prelude::*;

use crate::harness::{ACCOUNTS, CUSTOMERS, World, accounts_map};

/// Cases per property: enough to hit ties, reorders and duplicates many times, fast in debug.
const CASES: u32 = 96;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn side_of(crm: bool) -> Side {
    if crm { Side::Crm } else { Side::Erp }
}

fn entity(side: Side) -> &'static str {
    match side {
        Side::Crm => ACCOUNTS,
        Side::Erp => CUSTOMERS,
    }
}

/// The account `number` on `side` as (name, credit) in CRM terms, `None` when absent.
type Values = Option<(Value, Value)>;

/// A connector whose writes report no version, like an F&O `PATCH` answered `204 No Content`
/// or a Dataverse batch part: the link then cannot know the version of dualwrite's own write,
/// and only the hash tells the echo apart from a change.
#[derive(Debug)]
struct VersionlessWrites(Arc<MemoryConnector>);

#[async_trait]
impl Connector for VersionlessWrites {
    fn side(&self) -> Side {
        self.0.side()
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        self.0.read(entity, at).await
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        self.0.query(entity, query).await
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        let mut out = self.0.upsert(entity, at, record, condition).await?;
        out.version = None;
        Ok(out)
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        self.0.delete(entity, at).await
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        let mut out = self.0.upsert_batch(entity, items).await?;
        for o in out.iter_mut().flatten() {
            o.version = None;
        }
        Ok(out)
    }
}

/// A world over the accounts map; with `report_versions` false the connectors hide the
/// version of dualwrite's writes (see [`VersionlessWrites`]).
fn world(conflict: ConflictPolicy, report_versions: bool) -> World {
    let w = World::accounts(conflict, DeletePolicy::Propagate);
    if report_versions {
        return w;
    }
    let crm: Arc<dyn Connector> = Arc::new(VersionlessWrites(w.crm.clone()));
    let erp: Arc<dyn Connector> = Arc::new(VersionlessWrites(w.erp.clone()));
    let store = Arc::new(MemoryStore::new());
    let engine = Arc::new(Engine::new(
        store.clone(),
        crm,
        erp,
        vec![accounts_map(conflict, DeletePolicy::Propagate)],
        w.clock.clone(),
        WorkerConfig::default(),
    ));
    World {
        clock: w.clock,
        store,
        crm: w.crm,
        erp: w.erp,
        engine,
    }
}

/// The one map action of a processed event, `None` for a duplicate delivery.
fn action(out: &ProcessOutcome) -> Option<&MapAction> {
    match out.status {
        EventStatus::Duplicate => None,
        _ => out.maps.first().map(|m| &m.action),
    }
}

fn current_version(w: &World, ev: &ChangeEvent) -> Option<SourceVersion> {
    let id = ev.record.id.clone()?;
    w.side(ev.source)
        .record(&ev.record.entity, &RecordRef::Id(id.into()))
        .and_then(|r| r.version)
}

async fn process(w: &World, ev: &ChangeEvent) -> Result<ProcessOutcome, TestCaseError> {
    let out = w
        .engine
        .process(ev)
        .await
        .map_err(|e| TestCaseError::fail(format!("processing {} failed: {e}", ev.event_id)))?;
    prop_assert!(
        out.released.is_empty(),
        "nothing parks under the accounts map"
    );
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Echo suppression
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum EchoStep {
    /// A user edit of account R<record> on one side: name `n<value>` or credit `value`. Small
    /// value ranges make some edits leave the mapped values as they were.
    Edit {
        crm: bool,
        record: usize,
        name: bool,
        value: i64,
        tick: bool,
    },
    /// Process the oldest pending user event.
    DeliverUser,
    /// Process one pending echo (by index, modulo), keeping a copy when `duplicate`.
    DeliverEcho { pick: usize, duplicate: bool },
}

fn echo_step() -> impl Strategy<Value = EchoStep> {
    prop_oneof![
        3 => (any::<bool>(), 0..2usize, any::<bool>(), 0..3i64, any::<bool>()).prop_map(
            |(crm, record, name, value, tick)| EchoStep::Edit { crm, record, name, value, tick }
        ),
        2 => Just(EchoStep::DeliverUser),
        3 => (any::<usize>(), any::<bool>())
            .prop_map(|(pick, duplicate)| EchoStep::DeliverEcho { pick, duplicate }),
    ]
}

/// Drives the echo property: user events are applied in order (one queue group per record),
/// only one side has unapplied user edits at a time (so no conflict arises), and echoes of
/// dualwrite's writes come back at random moments, reordered and duplicated — in particular
/// while the user has changed the source side again and that change is still pending.
struct EchoRun {
    w: World,
    users: VecDeque<ChangeEvent>,
    echoes: Vec<ChangeEvent>,
    /// Writes made while processing user events.
    user_writes: usize,
    /// Echo deliveries seen.
    echoes_seen: usize,
}

impl EchoRun {
    fn collect_echoes(&mut self) {
        self.echoes.extend(self.w.crm.take_echoes());
        self.echoes.extend(self.w.erp.take_echoes());
    }

    /// An echo: skipped, and not one connector write.
    async fn deliver_echo(&mut self, ev: &ChangeEvent) -> Result<(), TestCaseError> {
        let before = self.w.writes();
        let current = current_version(&self.w, ev);
        let out = process(&self.w, ev).await?;
        prop_assert_eq!(
            self.w.writes(),
            before,
            "echo {} of dualwrite's own write caused a write: {:?}",
            ev.event_id,
            out
        );
        self.echoes_seen += 1;
        let Some(act) = action(&out) else {
            return Ok(());
        };
        let reason = match act {
            MapAction::Skipped(r) => *r,
            other => {
                return Err(TestCaseError::fail(format!(
                    "echo {}: {other:?}",
                    ev.event_id
                )));
            }
        };
        let newest = current == ev.record.version;
        // When a write does not report its version, the engine reads it back; either way the
        // link holds the write's version, so the echo is recognised by version (duplicate) or
        // by hash (echo), or is stale when the record changed since.
        prop_assert!(
            matches!(reason, SkipReason::Duplicate | SkipReason::Echo)
                || (!newest && reason == SkipReason::Stale),
            "echo {} skipped as {:?}",
            ev.event_id,
            reason
        );
        Ok(())
    }

    /// The oldest pending user event. Echoes of earlier writes stay in flight in any order:
    /// with writes that report no version (F&O's PATCH), the engine reads the version back, so a
    /// late echo of a first write cannot undo a second one (a regression this pins).
    async fn deliver_user(&mut self) -> Result<(), TestCaseError> {
        let Some(ev) = self.users.pop_front() else {
            return Ok(());
        };
        let before = self.w.writes();
        process(&self.w, &ev).await?;
        self.user_writes += self.w.writes() - before;
        self.collect_echoes();
        Ok(())
    }
}

async fn echo_property(report_versions: bool, steps: Vec<EchoStep>) -> Result<(), TestCaseError> {
    let mut run = EchoRun {
        w: world(ConflictPolicy::LastWriterWins, report_versions),
        users: VecDeque::new(),
        echoes: Vec::new(),
        user_writes: 0,
        echoes_seen: 0,
    };
    let mut changing_edits = 0usize;
    for step in steps {
        match step {
            EchoStep::Edit {
                crm,
                record,
                name,
                value,
                tick,
            } => {
                let side = side_of(crm);
                // Only one side has unapplied user edits at a time: no conflicts.
                while run.users.front().is_some_and(|e| e.source != side) {
                    run.deliver_user().await?;
                }
                let number = format!("R{record}");
                let before = run.w.account(side, &number);
                let ev = if name {
                    run.w
                        .edit_account(side, &number, Some(&format!("n{value}")), None)
                } else {
                    run.w.edit_account(side, &number, None, Some(value))
                };
                if run.w.account(side, &number) != before {
                    changing_edits += 1;
                }
                run.users.push_back(ev);
                if tick {
                    run.w.tick();
                }
            }
            EchoStep::DeliverUser => run.deliver_user().await?,
            EchoStep::DeliverEcho { pick, duplicate } => {
                run.collect_echoes();
                if run.echoes.is_empty() {
                    continue;
                }
                let i = pick % run.echoes.len();
                let ev = if duplicate {
                    run.echoes[i].clone()
                } else {
                    run.echoes.remove(i)
                };
                run.deliver_echo(&ev).await?;
            }
        }
    }
    // Quiesce: remaining user events in order, then every echo until none is produced.
    while !run.users.is_empty() {
        run.deliver_user().await?;
    }
    loop {
        run.collect_echoes();
        let Some(ev) = run.echoes.pop() else { break };
        run.deliver_echo(&ev).await?;
    }

    prop_assert_eq!(
        run.w.writes(),
        run.user_writes,
        "every write must come from a user's change, none from an echo"
    );
    prop_assert_eq!(
        run.w.writes(),
        changing_edits,
        "each edit that changed mapped values is written exactly once to the other side"
    );
    prop_assert!(
        run.echoes_seen >= run.w.writes(),
        "every write's echo came back"
    );
    for r in 0..2 {
        let number = format!("R{r}");
        prop_assert_eq!(
            run.w.account(Side::Crm, &number),
            run.w.account(Side::Erp, &number),
            "record {} differs between the sides",
            number
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ordering
// ---------------------------------------------------------------------------------------------

/// One version of the record: new name and/or credit (small ranges, so versions may repeat
/// values) and whether time passes after it.
type VersionEdit = (Option<i64>, Option<i64>, bool);

fn ordering_case() -> impl Strategy<Value = (bool, Vec<VersionEdit>, Vec<usize>)> {
    (
        any::<bool>(),
        proptest::collection::vec(
            (
                proptest::option::of(0..4i64),
                proptest::option::of(0..4i64),
                any::<bool>(),
            ),
            1..8,
        ),
    )
        .prop_flat_map(|(crm, edits)| {
            let n = edits.len();
            let order = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
            let dups = proptest::collection::vec((0..n, any::<usize>()), 0..=n);
            (Just(crm), Just(edits), order, dups).prop_map(|(crm, edits, mut order, dups)| {
                for (event, at) in dups {
                    let at = at % (order.len() + 1);
                    order.insert(at, event);
                }
                (crm, edits, order)
            })
        })
}

/// Versions of one record, delivered in `order` (a permutation of them with duplicates): the
/// other side ends with the newest version's values, and once a version was applied no older
/// one causes a write.
async fn ordering_property(
    crm: bool,
    edits: Vec<VersionEdit>,
    order: Vec<usize>,
) -> Result<(), TestCaseError> {
    let w = world(ConflictPolicy::LastWriterWins, true);
    let side = side_of(crm);
    let mut events = Vec::new();
    for (name, credit, tick) in &edits {
        let name = name.map(|n| format!("n{n}"));
        events.push(w.edit_account(side, "R0", name.as_deref(), *credit));
        if *tick {
            w.tick();
        }
    }
    let newest = w.account(side, "R0");
    let mut applied: Option<SourceVersion> = None;
    for i in order {
        let ev = &events[i];
        let before = w.writes();
        let out = process(&w, ev).await?;
        let older = applied.is_some_and(|a| ev.record.version.is_some_and(|v| v < a));
        if older {
            prop_assert_eq!(
                w.writes(),
                before,
                "stale version {} was written after a newer one: {:?}",
                i,
                out
            );
            if let Some(act) = action(&out) {
                prop_assert_eq!(act, &MapAction::Skipped(SkipReason::Stale));
            }
        }
        applied = applied.max(ev.record.version);
    }
    w.settle(Vec::new()).await;
    prop_assert_eq!(
        w.account(side.other(), "R0"),
        newest,
        "the other side must hold the newest version"
    );
    prop_assert!(w.writes() <= edits.len(), "{} writes", w.writes());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Convergence per policy
// ---------------------------------------------------------------------------------------------

/// One user edit in a round: side, record (0..3), field (name or credit), whether time passes.
type RoundEdit = (bool, usize, bool, bool);

/// A round: edits on both sides with no processing in between, then every event delivered in
/// a random order (`picks`: index modulo the pool, and whether a copy stays for redelivery).
type Round = (Vec<RoundEdit>, Vec<(usize, bool)>);

fn round() -> impl Strategy<Value = Round> {
    (
        proptest::collection::vec(
            (any::<bool>(), 0..3usize, any::<bool>(), any::<bool>()),
            0..10,
        ),
        proptest::collection::vec((any::<usize>(), any::<bool>()), 0..30),
    )
}

fn policy() -> impl Strategy<Value = ConflictPolicy> {
    prop_oneof![
        Just(ConflictPolicy::LastWriterWins),
        Just(ConflictPolicy::CrmWins),
        Just(ConflictPolicy::ErpWins),
    ]
}

/// Each side's state of one record at the end of a round's edits.
struct Edited {
    values: Values,
    at: Option<chrono::DateTime<chrono::Utc>>,
    edited: bool,
}

/// The values both sides must hold after a round, per the policy.
///
/// Every edit writes a value never used before, so an edit always changes its side. Then:
/// neither side edited → the values before the round; one side edited → that side's values;
/// both edited (a conflict) → the whole record of the winner: `crm_wins` CRM, `erp_wins` ERP,
/// `last_writer_wins` the side whose last edit has the later source timestamp, **ERP on a tie**.
fn expected(policy: ConflictPolicy, before: Values, crm: &Edited, erp: &Edited) -> Values {
    match (crm.edited, erp.edited) {
        (false, false) => before,
        (true, false) => crm.values.clone(),
        (false, true) => erp.values.clone(),
        (true, true) => {
            let crm_wins = match policy {
                ConflictPolicy::CrmWins => true,
                ConflictPolicy::ErpWins => false,
                _ => crm.at > erp.at,
            };
            if crm_wins {
                crm.values.clone()
            } else {
                erp.values.clone()
            }
        }
    }
}

async fn convergence_property(
    policy: ConflictPolicy,
    created_on_crm: [bool; 3],
    rounds: Vec<Round>,
) -> Result<(), TestCaseError> {
    let w = world(policy, true);
    let mut fresh = 0i64;
    let mut edits = 0usize;
    let mut created = Vec::new();
    for (r, crm) in created_on_crm.iter().enumerate() {
        fresh += 1;
        created.push(w.edit_account(
            side_of(*crm),
            &format!("R{r}"),
            Some(&format!("n{fresh}")),
            Some(fresh),
        ));
        edits += 1;
    }
    w.settle(created).await;

    for (round_no, (round_edits, picks)) in rounds.into_iter().enumerate() {
        let before: Vec<Values> = (0..3)
            .map(|r| w.account(Side::Crm, &format!("R{r}")))
            .collect();
        let mut edited = [[false; 2]; 3];
        let mut pool = Vec::new();
        for (crm, record, name, tick) in round_edits {
            let side = side_of(crm);
            fresh += 1;
            let number = format!("R{record}");
            pool.push(if name {
                w.edit_account(side, &number, Some(&format!("n{fresh}")), None)
            } else {
                w.edit_account(side, &number, None, Some(fresh))
            });
            edited[record][usize::from(crm)] = true;
            edits += 1;
            if tick {
                w.tick();
            }
        }
        let state = |side: Side, r: usize| {
            let number = format!("R{r}");
            let at = w
                .side(side)
                .record(entity(side), &record_ref(side, &number))
                .and_then(|rec| rec.version)
                .map(|v| v.modified_on);
            Edited {
                values: w.account(side, &number),
                at,
                edited: edited[r][usize::from(side == Side::Crm)],
            }
        };
        let wanted: Vec<Values> = (0..3)
            .map(|r| {
                expected(
                    policy,
                    before[r].clone(),
                    &state(Side::Crm, r),
                    &state(Side::Erp, r),
                )
            })
            .collect();

        for (pick, duplicate) in picks {
            pool.extend(w.crm.take_echoes());
            pool.extend(w.erp.take_echoes());
            if pool.is_empty() {
                break;
            }
            let i = pick % pool.len();
            let ev = if duplicate {
                pool[i].clone()
            } else {
                pool.remove(i)
            };
            process(&w, &ev).await?;
        }
        w.settle(pool).await;

        for (r, want) in wanted.iter().enumerate() {
            let number = format!("R{r}");
            let crm = w.account(Side::Crm, &number);
            prop_assert_eq!(
                &crm,
                &w.account(Side::Erp, &number),
                "round {}: record {} differs between the sides",
                round_no,
                number
            );
            prop_assert_eq!(
                &crm,
                want,
                "round {}: record {} does not hold the {:?} winner's values",
                round_no,
                number,
                policy
            );
        }
    }
    prop_assert!(
        w.writes() <= 2 * edits,
        "{} writes for {} edits",
        w.writes(),
        edits
    );
    Ok(())
}

fn record_ref(side: Side, number: &str) -> RecordRef {
    let field = match side {
        Side::Crm => "accountnumber",
        Side::Erp => "CustomerAccount",
    };
    RecordRef::Key(dualwrite_core::RecordKey::new([(field, number)]))
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

/// A create and then an update, each delivered `copies` times (interleaved with the echoes):
/// one write each.
async fn idempotency_property(
    crm: bool,
    copies: usize,
    report_versions: bool,
) -> Result<(), TestCaseError> {
    let w = world(ConflictPolicy::LastWriterWins, report_versions);
    let side = side_of(crm);
    let create = w.edit_account(side, "R0", Some("first"), Some(1));
    w.tick();
    for copy in 0..copies {
        let out = process(&w, &create).await?;
        let want = if copy == 0 {
            EventStatus::Processed
        } else {
            EventStatus::Duplicate
        };
        prop_assert_eq!(out.status, want);
    }
    prop_assert_eq!(w.writes(), 1, "the create is written once");
    w.settle(Vec::new()).await;
    let update = w.edit_account(side, "R0", Some("second"), None);
    for _ in 0..copies {
        process(&w, &update).await?;
        w.settle(Vec::new()).await;
    }
    prop_assert_eq!(w.writes(), 2, "the update is written once");
    prop_assert_eq!(
        w.account(side.other(), "R0"),
        Some((Value::Text("second".into()), Value::Integer(1)))
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn echoes_of_dualwrites_own_writes_never_cause_a_write(
        report_versions in any::<bool>(),
        steps in proptest::collection::vec(echo_step(), 1..40),
    ) {
        runtime().block_on(echo_property(report_versions, steps))?;
    }

    #[test]
    fn the_newest_version_wins_whatever_the_delivery_order(
        (crm, edits, order) in ordering_case(),
    ) {
        runtime().block_on(ordering_property(crm, edits, order))?;
    }

    #[test]
    fn both_sides_converge_on_the_policys_winner(
        policy in policy(),
        created_on_crm in any::<[bool; 3]>(),
        rounds in proptest::collection::vec(round(), 1..4),
    ) {
        runtime().block_on(convergence_property(policy, created_on_crm, rounds))?;
    }

    #[test]
    fn an_event_delivered_many_times_is_written_once(
        crm in any::<bool>(),
        copies in 1..=5usize,
        report_versions in any::<bool>(),
    ) {
        runtime().block_on(idempotency_property(crm, copies, report_versions))?;
    }
}
