//! One map's processing of one change event, as a sequence of named steps.
//!
//! Each attempt reads the full source record, finds the pair's key and link, decides (from the
//! link alone when it can, else after reading the other side and resolving lookups) and carries
//! out the decision. A step that finds the pair changed under it (a 412, a moved link, a failed
//! revision condition) interrupts the attempt and the next one reads again and decides again,
//! at most [`crate::WorkerConfig::max_redecisions`] times.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use dualwrite_core::decision::{
    Decision, DecisionInput, DeleteAction, DeletePlan, LinkChange, LinkCommit, ParkCause,
    SkipReason, WritePlan, decide, entity_of,
};
use dualwrite_core::map::apply::{ResolvedLookups, integration_key, record_key};
use dualwrite_core::map::{SideFieldsAt, TableMap};
use dualwrite_core::ports::{
    ConflictRecord, ConnectorError, FieldsHash, Link, ParkedEvent, PendingWrite, RecordRef,
    SideState, StoreOp,
};
use dualwrite_core::{ChangeEvent, IntegrationKey, Operation, Record, Side};
use tracing::{debug, info, warn};

use super::{
    Engine, Failure, FailureCommit, MapAction, MapResult, MapStep, ProcessError,
    decided_by_link_alone, jitter, record_write,
};
use crate::stats::Counter;

/// Why an attempt stopped before carrying its decision out to the end.
enum Interrupt {
    /// The pair changed under the attempt: read again, decide again (counted as a
    /// re-decision).
    Redecide,
    /// A missing dependency was synced on the spot: decide again, not counted as a
    /// re-decision (the world got better, nothing was contended).
    DependencySynced,
    /// The map is done early with this result (source gone, no link to delete, an unmappable
    /// record, a permanent connector failure).
    Finished(MapStep),
    /// The event must be retried later.
    Error(ProcessError),
}

impl From<ProcessError> for Interrupt {
    fn from(e: ProcessError) -> Self {
        Interrupt::Error(e)
    }
}

impl From<Failure> for Interrupt {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Redecide => Interrupt::Redecide,
            Failure::Done(step) => Interrupt::Finished(step),
        }
    }
}

/// What one attempt knows of the pair once it has the source record, the key and the link.
struct Pair {
    /// When the attempt started (for the decision and a park's timestamp).
    now: DateTime<Utc>,
    /// The full, current source record (as the event carried it for a delete).
    record: Record,
    /// The pair's integration key.
    key: IntegrationKey,
    /// The pair's link, if any.
    link: Option<Link>,
    /// The hash of the source record's mapped fields.
    source_hash: FieldsHash,
    /// Where `record` keeps them (located once, for the hash and the decision's map).
    source_fields: SideFieldsAt,
}

/// A decision to wait for another pair's link ([`Decision::Park`], unpacked).
struct Parking {
    /// The map whose link is awaited.
    waiting_map: String,
    /// The key of the awaited link.
    waiting_key: IntegrationKey,
    /// Why, as data.
    cause: ParkCause,
    /// Why, in words.
    reason: String,
}

/// The processing of one event under one map: what stays fixed, and what carries over from
/// one attempt to the next.
pub(super) struct MapRun<'a> {
    engine: &'a Engine,
    map: &'a TableMap,
    event: &'a ChangeEvent,
    /// Whether this map's commit also completes the event.
    complete: bool,
    /// How deep in dependency syncs this run is (0: the event itself).
    depth: u32,
    /// The event's delivery attempt (for the error policy's backoff).
    attempt: u32,
    /// Decisions taken so far (dependency syncs excepted).
    decisions: u32,
    /// Whether the source record must be read rather than taken from the event.
    reread: bool,
    /// Dependencies already synced on the spot (each is tried once).
    tried_dependencies: HashSet<(String, IntegrationKey)>,
    /// Parked events released by dependency syncs so far.
    released: Vec<ParkedEvent>,
}

impl<'a> MapRun<'a> {
    /// A run of `event` under `map`; `complete`: its last commit also completes the event.
    pub(super) fn new(
        engine: &'a Engine,
        map: &'a TableMap,
        event: &'a ChangeEvent,
        complete: bool,
        depth: u32,
        attempt: u32,
    ) -> Self {
        MapRun {
            engine,
            map,
            event,
            complete,
            depth,
            attempt,
            decisions: 0,
            reread: event.partial || unplaceable_and_forgotten(engine, event),
            tried_dependencies: HashSet::new(),
            released: Vec::new(),
        }
    }

    /// Runs attempts until one finishes the map or the pair has changed under the worker too
    /// many times in a row.
    pub(super) async fn run(mut self) -> Result<MapStep, ProcessError> {
        loop {
            if !self.count_decision() {
                return Err(self.contention());
            }
            match self.attempt().await {
                Ok(mut step) | Err(Interrupt::Finished(mut step)) => {
                    // Events a dependency sync released go back to the queue whatever this
                    // map's own outcome (skip, delete, held conflict…), not at the next sweep.
                    step.released.append(&mut self.released);
                    return Ok(step);
                }
                Err(Interrupt::Error(e)) => return Err(e),
                Err(Interrupt::Redecide) => {}
                // Not a re-decision: the world got better.
                Err(Interrupt::DependencySynced) => self.decisions -= 1,
            }
        }
    }

    /// Counts the decision about to be taken; `false` past the limit of decisions. From the
    /// second decision on, the source record is read again.
    fn count_decision(&mut self) -> bool {
        self.decisions += 1;
        if self.decisions > self.engine.config.max_redecisions {
            return false;
        }
        if self.decisions > 1 {
            self.engine.stats.inc(Counter::Redecisions);
            self.reread = true;
        }
        true
    }

    /// The pair kept changing under the worker: the event is handed back for later.
    fn contention(&self) -> ProcessError {
        ProcessError::Contention {
            event_id: self.event.event_id.clone(),
            map: self.map.name.clone(),
            key: self.event.record.id.clone().unwrap_or_default().into(),
            attempts: self.decisions - 1,
            retry_after: self
                .engine
                .config
                .backoff
                .delay(self.attempt, jitter(&self.event.event_id)),
        }
    }

    /// One attempt: the steps from the source record to the executed decision.
    async fn attempt(&mut self) -> Result<MapStep, Interrupt> {
        let now = self.engine.clock.now();
        let mut record = self.source_record().await?;
        if !self.reread
            && self.event.source == Side::Crm
            && self.event.operation == Operation::Upsert
            && !self
                .engine
                .resolve_company_reference(self.map, &mut record)
                .await
        {
            // The webhook named the company by id and no link tells its code: read the row.
            self.reread = true;
            record = self.source_record().await?;
        }
        self.complete_key_lookups(&mut record).await?;
        let (key, link) = self.key_and_link(&record).await?;
        if link.is_none() && !self.reread && self.recently_deleted(&key).await? {
            // The pair was deleted lately (its link removed): this change may be a late one
            // from before the delete — the echo of an earlier write, delayed — whose values
            // would create the pair anew. Only its source can tell: read it (gone, nothing to
            // sync; there, a record created again under the key, synced as new).
            self.reread = true;
            return Err(Interrupt::Redecide);
        }
        let source_fields = SideFieldsAt::new(self.map, self.event.source, &record);
        let pair = Pair {
            now,
            source_hash: source_fields.hash(self.map, &record),
            source_fields,
            record,
            key,
            link,
        };
        if self.ties_with_other_values(&pair) {
            // The event's version ties with the one the link holds (two changes within the
            // clock's resolution, or a webhook without `versionnumber` against the Web API's
            // row), yet it carries other values: which are current only the source can say.
            // Read it rather than write values that may be the older ones.
            self.reread = true;
            return Err(Interrupt::Redecide);
        }
        let decision = match self.decide_by_link_alone(&pair) {
            Some(d) => d,
            None => self.decide_with_other_side(&pair).await?,
        };
        if !self.reread && pair.record.etag.is_none() && writes_to(&decision, self.event.source) {
            // The change lost (a conflict, or a field-level merge): its own side is to be
            // written, over a row known only by the event's values, which a later edit queued
            // behind this event may have replaced, and with no ETag to condition the write on.
            // Read the row and decide again: a newer edit then takes part in the decision
            // instead of being overwritten unseen (and dropped as stale after).
            self.reread = true;
            return Err(Interrupt::Redecide);
        }
        debug!(event_id = %self.event.event_id, map = %self.map.name, key = %pair.key, decision = ?decision, "decided");
        self.execute(decision, pair).await
    }

    /// What [`Engine::settled`] asks of one map: the steps of [`MapRun::attempt`] up to the
    /// decision from the link alone, reading the store only. `Some` for a skip as echo,
    /// duplicate or stale with nothing to commit; `None` otherwise or when unsure.
    pub(super) async fn settled(&self) -> Option<SkipReason> {
        let (engine, map, event) = (self.engine, self.map, self.event);
        let mut record = event.record.clone();
        if event.source == Side::Crm {
            if !engine.resolve_company_reference(map, &mut record).await {
                return None;
            }
            engine
                .complete_key_lookups_with(map, &mut record, false)
                .await
                .ok()?;
        }
        let key = integration_key(map, event.source, &record).ok()?;
        let link = engine.store.link(&map.name, &key).await.ok()??;
        let source_fields = SideFieldsAt::new(map, event.source, &record);
        let pair = Pair {
            now: engine.clock.now(),
            source_hash: source_fields.hash(map, &record),
            source_fields,
            record,
            key,
            link: Some(link),
        };
        if self.ties_with_other_values(&pair) {
            return None;
        }
        match self.decide_by_link_alone(&pair)? {
            Decision::Skip {
                reason: reason @ (SkipReason::Echo | SkipReason::Duplicate | SkipReason::Stale),
                link: None,
            } => Some(reason),
            _ => None,
        }
    }

    /// True when the event (not read) ties with the source version the link knows (see
    /// [`dualwrite_core::SourceVersion::ties_with`]) and carries other values than the link's hash of that side.
    fn ties_with_other_values(&self, pair: &Pair) -> bool {
        if self.reread || self.event.operation != Operation::Upsert {
            return false;
        }
        let Some(link) = &pair.link else {
            return false;
        };
        let known = link.side(self.event.source);
        matches!((pair.record.version, known.version), (Some(r), Some(k)) if r.ties_with(&k))
            && known.hash.is_some_and(|h| h != pair.source_hash)
    }

    /// Step 1: the full, current source record. The event's own record on a first decision of
    /// a full event and for a delete; read from the source otherwise.
    async fn source_record(&self) -> Result<Record, Interrupt> {
        let (map, event, source) = (self.map, self.event, self.event.source);
        if event.operation == Operation::Delete || !self.reread {
            return Ok(event.record.clone());
        }
        let at = match &event.record.id {
            Some(id) => RecordRef::Id(id.clone().into()),
            None => match integration_key(map, source, &event.record) {
                Ok(k) => RecordRef::Key(record_key(map, source, &k)),
                Err(e) => return Err(self.invalid(None, e.to_string()).await),
            },
        };
        match self
            .engine
            .connector(source)
            .read(&event.record.entity, &at)
            .await
        {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.finish_unkeyed(MapAction::SourceGone).await),
            Err(e) => Err(self.connector_failure(None, e).await),
        }
    }

    /// Step 1b: Dataverse sends key lookups (an order line's order) as ids only; gives them
    /// the referenced row's alternate key (see [`Engine::complete_key_lookups`]).
    async fn complete_key_lookups(&self, record: &mut Record) -> Result<(), Interrupt> {
        if self.event.source == Side::Crm
            && self.event.operation == Operation::Upsert
            && let Err(e) = self.engine.complete_key_lookups(self.map, record).await
        {
            return Err(self.connector_failure(None, e).await);
        }
        Ok(())
    }

    /// Step 2: the pair's key and link. A delete finds its link by the record's id (or key);
    /// without one there is nothing to delete and the map is done.
    async fn key_and_link(
        &self,
        record: &Record,
    ) -> Result<(IntegrationKey, Option<Link>), Interrupt> {
        let (engine, map, event, source) = (self.engine, self.map, self.event, self.event.source);
        if event.operation == Operation::Delete {
            let found = match &record.id {
                Some(id) => engine.store.link_by_id(&map.name, source, id).await,
                None => match integration_key(map, source, record) {
                    Ok(k) => engine.store.link(&map.name, &k).await,
                    Err(_) => Ok(None),
                },
            }
            .map_err(|e| engine.store_error(event, e))?;
            return match found {
                Some(link) => Ok((link.key.clone(), Some(link))),
                None => Err(self
                    .finish_unkeyed(MapAction::Skipped(SkipReason::NoLink))
                    .await),
            };
        }
        let key = match integration_key(map, source, record) {
            Ok(k) => k,
            Err(e) => return Err(self.invalid(None, e.to_string()).await),
        };
        let link = engine
            .store
            .link(&map.name, &key)
            .await
            .map_err(|e| engine.store_error(event, e))?;
        Ok((key, link))
    }

    /// Whether the pair `key` of this map was deleted within the idempotency window (an
    /// upsert only: a delete of a pair with no link is skipped anyway).
    async fn recently_deleted(&self, key: &IntegrationKey) -> Result<bool, Interrupt> {
        if self.event.operation != Operation::Upsert {
            return Ok(false);
        }
        let at = self
            .engine
            .store
            .deleted_at(&self.map.name, key)
            .await
            .map_err(|e| Interrupt::Error(self.engine.store_error(self.event, e)))?;
        Ok(at.is_some())
    }

    /// Step 3: what the link alone decides (stale, duplicate, echo, filtered out) for an
    /// upsert of a linked pair. Needs neither the other side nor lookups: no read, no API call
    /// for those. `None`: the full decision is needed.
    fn decide_by_link_alone(&self, pair: &Pair) -> Option<Decision> {
        if pair.link.is_none() || self.event.operation != Operation::Upsert {
            return None;
        }
        let none = ResolvedLookups::new();
        let d = decide(&self.decision_input(pair, None, &none, &none));
        decided_by_link_alone(&d).then_some(d)
    }

    /// Steps 4 and 5: reads the other side as it stands, resolves the lookups both ways,
    /// decides, and holds back a Dataverse write whose company is not linked yet
    /// ([`Engine::company_gate`]).
    async fn decide_with_other_side(&self, pair: &Pair) -> Result<Decision, Interrupt> {
        let other = self.read_other_side(pair).await?;
        let (lookups, other_lookups) = self
            .resolve_lookups(&pair.record, &pair.source_fields, other.as_ref())
            .await?;
        let input = self.decision_input(pair, other.as_ref(), &lookups, &other_lookups);
        Ok(self
            .engine
            .company_gate(self.map, self.event, decide(&input))
            .await?)
    }

    /// Step 4: the other side's record, by the link's id, else (for an upsert) by key. `None`
    /// when it does not exist or there is nothing to read it by.
    ///
    /// A pair never seen before (no link, not even a provisional one, on the first decision)
    /// is not read: the other side is taken not to have the record, so the decision creates
    /// it with "must not exist" (`If-None-Match: *`, an F&O POST). Should the record exist after
    /// all, the create is refused (412, or F&O's "already exists") without changing anything
    /// and the next decision reads it and decides as before (conflict policy included). A new
    /// record then costs one call instead of a read and a write.
    async fn read_other_side(&self, pair: &Pair) -> Result<Option<Record>, Interrupt> {
        if pair.link.is_none() && self.decisions == 1 && self.event.operation == Operation::Upsert {
            return Ok(None);
        }
        let other_side = self.event.source.other();
        let other_at = match pair.link.as_ref().and_then(|l| l.id(other_side)) {
            Some(id) => RecordRef::Id(id.to_string()),
            None if self.event.operation == Operation::Upsert => {
                RecordRef::Key(record_key(self.map, other_side, &pair.key))
            }
            None => return Ok(None),
        };
        match self
            .engine
            .connector(other_side)
            .read(&entity_of(self.map, other_side), &other_at)
            .await
        {
            Ok(r) => Ok(r),
            Err(e) => Err(self.connector_failure(Some(&pair.key), e).await),
        }
    }

    /// Step 4b: the lookups of the source record and of the other side's record (empty for a
    /// delete, and for the other side when it has no record).
    async fn resolve_lookups(
        &self,
        record: &Record,
        located: &SideFieldsAt,
        other: Option<&Record>,
    ) -> Result<(ResolvedLookups, ResolvedLookups), ProcessError> {
        if self.event.operation != Operation::Upsert {
            return Ok((ResolvedLookups::new(), ResolvedLookups::new()));
        }
        let (engine, map, event, source) = (self.engine, self.map, self.event, self.event.source);
        let mine = engine
            .resolve_lookups(event, map, source, record, Some(located))
            .await?;
        let theirs = match other {
            Some(o) => {
                engine
                    .resolve_lookups(event, map, source.other(), o, None)
                    .await?
            }
            None => ResolvedLookups::new(),
        };
        Ok((mine, theirs))
    }

    /// The input of [`decide`] for this attempt.
    fn decision_input<'p>(
        &'p self,
        pair: &'p Pair,
        other: Option<&'p Record>,
        lookups: &'p ResolvedLookups,
        other_lookups: &'p ResolvedLookups,
    ) -> DecisionInput<'p> {
        DecisionInput {
            map: self.map,
            source: self.event.source,
            operation: self.event.operation,
            event_id: &self.event.event_id,
            key: &pair.key,
            record: &pair.record,
            link: pair.link.as_ref(),
            other,
            source_hash: pair.source_hash,
            source_fields: Some(&pair.source_fields),
            lookups,
            other_lookups,
            now: pair.now,
        }
    }

    /// Step 6: carries the decision out.
    async fn execute(&mut self, decision: Decision, pair: Pair) -> Result<MapStep, Interrupt> {
        match decision {
            Decision::Skip { reason, link } => self.skip(reason, link, pair.key).await,
            Decision::Write(plan) => self.write(plan, pair.key, pair.link).await,
            Decision::Delete(plan) => self.delete(plan, pair.key, pair.link).await,
            Decision::HoldConflict { link, conflict } => {
                self.hold_conflict(link, conflict, pair.key).await
            }
            Decision::Park {
                waiting_map,
                waiting_key,
                cause,
                reason,
            } => {
                let parking = Parking {
                    waiting_map,
                    waiting_key,
                    cause,
                    reason,
                };
                self.park(parking, pair.key, pair.now).await
            }
            Decision::Invalid(e) => Ok(self
                .engine
                .invalid(
                    self.map,
                    self.event,
                    Some(pair.key),
                    self.complete,
                    e.to_string(),
                )
                .await?),
        }
    }

    /// Nothing to write: commits the link change, if any, with the completion.
    async fn skip(
        &self,
        reason: SkipReason,
        link: Option<LinkCommit>,
        key: IntegrationKey,
    ) -> Result<MapStep, Interrupt> {
        let mut ops: Vec<StoreOp> = link
            .map(|c| StoreOp::PutLink {
                link: c.link,
                expected_revision: c.expected_revision,
            })
            .into_iter()
            .collect();
        ops.extend(self.complete_op());
        self.commit_or_redecide(ops).await?;
        self.engine.stats.inc(match reason {
            SkipReason::Echo | SkipReason::Duplicate => Counter::EchoesSuppressed,
            SkipReason::Stale => Counter::StaleDropped,
            _ => Counter::Skipped,
        });
        debug!(event_id = %self.event.event_id, map = %self.map.name, key = %key, reason = reason.as_str(), "skipped");
        Ok(self.done(Some(key), MapAction::Skipped(reason)))
    }

    /// Writes the plan's records, then commits the link (and the conflict it resolves) with
    /// the completion. A newly created link releases the events parked on it.
    ///
    /// Before each write to an already linked pair the write is announced: `read` (the link
    /// the decision was made on) is committed with [`Link::pending`] set to the hash the
    /// target will hold, nothing else changed and the event not completed. The target's echo
    /// can then be told from a person's change even when it is processed before the final
    /// commit. The first announcement also records the conflict the writes resolve: should
    /// another change of the pair move the link before the final commit, the decision taken
    /// again finds nothing left to resolve (the winner's values are already written), and the
    /// conflict would otherwise never be recorded. A crash in between leaves the event to be
    /// redelivered and decided again. A write failing for good clears the announcement in the
    /// commit that logs the error; one that will be retried (or decided again) leaves it,
    /// since the write may have landed, and the next announcement or commit replaces it.
    ///
    /// A new pair is announced the same way on a [provisional](Link::provisional) link: the
    /// source record's id and the pending write only, so the target's echo overtaking the
    /// final commit is an echo (not a pair found on both sides with different values, a
    /// conflict); lookups and parked events do not see the pair until the final commit, and a
    /// write failing for good deletes the provisional link.
    async fn write(
        &mut self,
        mut plan: WritePlan,
        key: IntegrationKey,
        read: Option<Link>,
    ) -> Result<MapStep, Interrupt> {
        let (engine, map, event) = (self.engine, self.map, self.event);
        // A conflict found against a link that moved meanwhile is usually the other side's
        // echo overtaking the commit of the write it echoes: decide again on the new link
        // rather than "resolve" it with a write.
        if plan.conflict.is_some()
            && engine
                .link_moved(event, map, &key, plan.link.expected_revision)
                .await?
        {
            return Err(Interrupt::Redecide);
        }
        // A pair being created: no link yet, or the provisional one of an earlier attempt.
        let created =
            plan.link.expected_revision == 0 || read.as_ref().is_some_and(|l| l.provisional);
        // The link as it stands in the store while the writes run (announcements included).
        let mut current = if plan.link.expected_revision == 0 {
            Some(provisional(&plan.link.link, event.source))
        } else {
            read.map(|mut link| {
                link.revision = plan.link.expected_revision;
                link
            })
        };
        // Counted by the worker whose commit first logs it: the other side's own change, or
        // this one's earlier attempt, may have logged the very same conflict.
        let new_conflict = match &plan.conflict {
            Some(c) => !engine.conflict_logged(event, &c.id).await?,
            None => false,
        };
        let mut conflict_recorded = false;
        // The announcement the link held before this write's own (see `write_failure`).
        let mut before_announcing = None;
        for write in &plan.writes {
            if let Some(link) = current.as_mut()
                && let Some(hash) = plan.link.link.side(write.side).hash
            {
                before_announcing = link.pending;
                let conflict = plan.conflict.as_ref().filter(|_| !conflict_recorded);
                self.announce(link, write.side, hash, conflict).await?;
                conflict_recorded |= conflict.is_some();
                plan.link.expected_revision = link.revision;
            }
            let result = engine
                .connector(write.side)
                .upsert(
                    &write.entity,
                    &write.at,
                    &write.record,
                    write.condition.clone(),
                )
                .await;
            match result {
                Ok(out) => {
                    engine.stats.inc(Counter::Writes);
                    let version = engine
                        .written_version(&write.entity, &write.at, write.side, &out)
                        .await;
                    record_write(&mut plan.link.link, write.side, out.id, version);
                }
                // A 412 (the target changed since it was read) reads again and decides again.
                Err(e) => {
                    return Err(self
                        .write_failure(&key, current.as_ref(), before_announcing, e)
                        .await);
                }
            }
        }
        let conflict_id = plan.conflict.as_ref().map(|c| c.id.clone());
        let mut ops = vec![StoreOp::PutLink {
            link: plan.link.link,
            expected_revision: plan.link.expected_revision,
        }];
        if let Some(c) = plan.conflict {
            ops.push(StoreOp::RecordConflict(c));
        }
        ops.extend(self.complete_op());
        let committed = self.commit_or_redecide(ops).await;
        // Counted once: when its resolution is committed, or, when the link moved first, as
        // recorded with the announcement (the decision taken again will not find it).
        if new_conflict && (committed.is_ok() || conflict_recorded) {
            engine.stats.inc(Counter::Conflicts);
        }
        committed?;
        if created {
            self.released
                .extend(engine.parked_on(event, map, &key).await?);
        }
        info!(event_id = %event.event_id, map = %map.name, key = %key, writes = plan.writes.len(), "record synced");
        let mut step = self.done(
            Some(key),
            MapAction::Written {
                writes: plan.writes.len(),
                conflict: conflict_id,
            },
        );
        step.released = std::mem::take(&mut self.released);
        Ok(step)
    }

    /// Commits `link` (as stored, at its revision) announcing a write of `hash` to `side`, with
    /// `conflict` recorded in the same commit when given, and moves `link` to the stored state.
    /// [`Interrupt::Redecide`] when the link moved.
    async fn announce(
        &self,
        link: &mut Link,
        side: Side,
        hash: FieldsHash,
        conflict: Option<&ConflictRecord>,
    ) -> Result<(), Interrupt> {
        let mut next = link.clone();
        next.pending = Some(PendingWrite { side, hash });
        next.updated_at = self.engine.clock.now();
        let mut ops = vec![StoreOp::PutLink {
            link: next.clone(),
            expected_revision: link.revision,
        }];
        ops.extend(conflict.cloned().map(StoreOp::RecordConflict));
        self.commit_or_redecide(ops).await?;
        next.revision = link.revision + 1;
        *link = next;
        Ok(())
    }

    /// A failed write: classified like any connector failure; when it fails for good, or was
    /// refused with a 412 and is decided again, the link's announcement of it (`announced`,
    /// the link as stored) is cleared, as no echo of it will come — unless the link announced
    /// that very write already before (`before_announcing`): another worker's write of the same
    /// values to the same side, which may have landed and whose echo must still be known. (A
    /// target holding the announced hash holds what the source dictates either way, so keeping
    /// it cannot hide a change.)
    async fn write_failure(
        &self,
        key: &IntegrationKey,
        announced: Option<&Link>,
        before_announcing: Option<PendingWrite>,
        error: ConnectorError,
    ) -> Interrupt {
        let cleanup = announced
            .filter(|l| l.pending.is_some() && l.pending != before_announcing)
            .map(|l| {
                if l.provisional {
                    return StoreOp::DeleteLink {
                        map: l.map.to_string(),
                        key: l.key.clone(),
                        expected_revision: l.revision,
                    };
                }
                let mut cleared = l.clone();
                cleared.pending = None;
                cleared.updated_at = self.engine.clock.now();
                StoreOp::PutLink {
                    link: cleared,
                    expected_revision: l.revision,
                }
            })
            .into_iter()
            .collect::<Vec<_>>();
        let withdraw = cleanup.clone();
        let failure = self
            .engine
            .connector_failure(
                self.map,
                Some(key),
                self.event,
                FailureCommit {
                    complete: self.complete,
                    cleanup,
                },
                self.attempt,
                error,
            )
            .await;
        match failure {
            // Refused before any change (412: the target moved since it was read): the write
            // did not land, so no echo of it will come. Withdraw its announcement before
            // deciding again, or the target's current values, were they the same, would pass
            // for the echo of a write that never happened. A link that moved meanwhile was
            // replaced already (the commit fails and changes nothing).
            Ok(Failure::Redecide) => {
                if !withdraw.is_empty()
                    && let Err(e) = self.engine.commit(self.event, withdraw).await
                {
                    return Interrupt::Error(e);
                }
                Interrupt::Redecide
            }
            Ok(failure) => failure.into(),
            Err(e) => Interrupt::Error(e),
        }
    }

    /// Applies a delete per the map's delete policy (delete or deactivate the other side, or
    /// leave it), then removes or updates the link with the completion.
    ///
    /// A delete of the other side is announced on the link first (`stored`, the link as
    /// read): the other side's webhook of that delete may arrive before the link's removal is
    /// committed, and must be known as the echo it is, not taken for a delete to propagate
    /// back. A failed delete withdraws its announcement as a failed write does.
    async fn delete(
        &self,
        mut plan: DeletePlan,
        key: IntegrationKey,
        stored: Option<Link>,
    ) -> Result<MapStep, Interrupt> {
        let engine = self.engine;
        let mut announced = None;
        let mut before_announcing = None;
        if let (DeleteAction::DeleteOther { side, .. }, Some(mut link)) = (&plan.action, stored) {
            before_announcing = link.pending;
            self.announce(&mut link, *side, FieldsHash::DELETED, None)
                .await?;
            if let LinkChange::Remove {
                expected_revision, ..
            } = &mut plan.link
            {
                *expected_revision = link.revision;
            }
            announced = Some(link);
        }
        let result = match &plan.action {
            DeleteAction::DeleteOther { side, entity, at } => engine
                .connector(*side)
                .delete(entity, at)
                .await
                .map(|()| None),
            DeleteAction::Deactivate(w) => engine
                .connector(w.side)
                .upsert(&w.entity, &w.at, &w.record, w.condition.clone())
                .await
                .map(Some),
            DeleteAction::Nothing => Ok(None),
        };
        match result {
            Ok(out) => match (&plan.action, out, &mut plan.link) {
                (DeleteAction::Deactivate(w), Some(out), LinkChange::Put(c)) => {
                    engine.stats.inc(Counter::Writes);
                    let version = engine.written_version(&w.entity, &w.at, w.side, &out).await;
                    record_write(&mut c.link, w.side, out.id, version);
                }
                (DeleteAction::DeleteOther { .. }, _, _) => engine.stats.inc(Counter::Deletes),
                _ => {}
            },
            Err(e) if announced.is_some() => {
                return Err(self
                    .write_failure(&key, announced.as_ref(), before_announcing, e)
                    .await);
            }
            Err(e) => return Err(self.connector_failure(Some(&key), e).await),
        }
        let mut ops = match plan.link {
            LinkChange::Remove {
                map,
                key,
                expected_revision,
            } => vec![
                StoreOp::RememberDeleted {
                    map: map.clone(),
                    key: key.clone(),
                    at: engine.clock.now(),
                },
                StoreOp::DeleteLink {
                    map,
                    key,
                    expected_revision,
                },
            ],
            LinkChange::Put(c) => vec![StoreOp::PutLink {
                link: c.link,
                expected_revision: c.expected_revision,
            }],
        };
        ops.extend(self.complete_op());
        self.commit_or_redecide(ops).await?;
        info!(event_id = %self.event.event_id, map = %self.map.name, key = %key, "delete applied");
        Ok(self.done(Some(key), MapAction::Deleted))
    }

    /// Policy `manual`: records the open conflict and marks the link, writing nothing.
    async fn hold_conflict(
        &self,
        link: LinkCommit,
        conflict: ConflictRecord,
        key: IntegrationKey,
    ) -> Result<MapStep, Interrupt> {
        let conflict_id = conflict.id.clone();
        let mut ops = vec![
            StoreOp::PutLink {
                link: link.link,
                expected_revision: link.expected_revision,
            },
            StoreOp::RecordConflict(conflict),
        ];
        ops.extend(self.complete_op());
        self.commit_or_redecide(ops).await?;
        self.engine.stats.inc(Counter::Conflicts);
        warn!(event_id = %self.event.event_id, map = %self.map.name, key = %key, conflict = %conflict_id, "conflict held for a person");
        Ok(self.done(Some(key), MapAction::ConflictHeld { conflict_id }))
    }

    /// Waits for another pair's link. A missing lookup or company is first synced on the spot
    /// when either system has it (once per dependency, within the depth limit), and the change
    /// is decided again; otherwise the event is parked. Parking does not complete the event.
    async fn park(
        &mut self,
        parking: Parking,
        key: IntegrationKey,
        now: DateTime<Utc>,
    ) -> Result<MapStep, Interrupt> {
        let (engine, event) = (self.engine, self.event);
        let Parking {
            waiting_map,
            waiting_key,
            cause,
            reason,
        } = parking;
        let missing_lookup = matches!(
            cause,
            ParkCause::MissingLookup { .. } | ParkCause::MissingCompany { .. }
        );
        if missing_lookup
            && self.depth < engine.config.max_dependency_depth
            && self
                .tried_dependencies
                .insert((waiting_map.clone(), waiting_key.clone()))
        {
            let synced = engine
                .sync_dependency(event, &waiting_map, &waiting_key, self.depth, self.attempt)
                .await?;
            if let Some(step) = synced {
                engine.stats.inc(Counter::DependenciesSynced);
                self.released.extend(step.released);
                return Err(Interrupt::DependencySynced);
            }
        }
        // A reference spelled in another case than its record's key waits on the record's
        // own key, whose link is the one that will come.
        let waiting_key = match missing_lookup {
            true => engine
                .key_alias(&waiting_map, &waiting_key)
                .unwrap_or(waiting_key),
            false => waiting_key,
        };
        let parked = ParkedEvent {
            waiting_map: waiting_map.clone(),
            waiting_key: waiting_key.clone(),
            reason: reason.clone(),
            event: event.clone(),
            parked_at: now,
        };
        engine
            .commit(event, vec![StoreOp::Park(parked.clone())])
            .await?;
        engine.stats.inc(Counter::Parked);
        info!(event_id = %event.event_id, map = %self.map.name, key = %key, waiting_map = %waiting_map, waiting_key = %waiting_key, "change parked");
        // The awaited link may have been created between the lookup and the park: its creator
        // then did not see this event. Release it ourselves.
        if missing_lookup
            && engine
                .store
                .link(&waiting_map, &waiting_key)
                .await
                .map_err(|e| engine.store_error(event, e))?
                .and_then(Link::linked)
                .is_some()
        {
            self.released.push(parked);
        }
        let mut step = self.done(
            Some(key),
            MapAction::Parked {
                waiting_map,
                waiting_key,
                reason,
            },
        );
        step.parked = true;
        step.released = std::mem::take(&mut self.released);
        Ok(step)
    }

    /// The event's completion, when this map's commit completes it.
    fn complete_op(&self) -> Option<StoreOp> {
        self.complete.then(|| StoreOp::CompleteEvent {
            event_id: self.event.event_id.clone(),
        })
    }

    /// This map's result, releasing nothing.
    fn done(&self, key: Option<IntegrationKey>, action: MapAction) -> MapStep {
        MapStep {
            result: MapResult {
                map: self.map.name.clone(),
                key,
                action,
            },
            released: Vec::new(),
            parked: false,
        }
    }

    /// Commits `ops`; [`Interrupt::Redecide`] when a revision condition failed.
    async fn commit_or_redecide(&self, ops: Vec<StoreOp>) -> Result<(), Interrupt> {
        if self.engine.commit(self.event, ops).await? {
            Ok(())
        } else {
            Err(Interrupt::Redecide)
        }
    }

    /// Ends the map before a key was found (`action`: the source is gone, or a delete has no
    /// link): commits the completion and counts a skip.
    async fn finish_unkeyed(&self, action: MapAction) -> Interrupt {
        let completion = self.complete_op().into_iter().collect();
        if let Err(e) = self.engine.commit(self.event, completion).await {
            return Interrupt::Error(e);
        }
        self.engine.stats.inc(Counter::Skipped);
        Interrupt::Finished(self.done(None, action))
    }

    /// Logs an unmappable record for a person and completes the event: the map is done.
    async fn invalid(&self, key: Option<IntegrationKey>, message: String) -> Interrupt {
        let result = self
            .engine
            .invalid(self.map, self.event, key, self.complete, message)
            .await;
        match result {
            Ok(step) => Interrupt::Finished(step),
            Err(e) => Interrupt::Error(e),
        }
    }

    /// Classifies a connector failure by the error policy: decide again, retry the event
    /// later, or log it and finish the map.
    async fn connector_failure(
        &self,
        key: Option<&IntegrationKey>,
        error: ConnectorError,
    ) -> Interrupt {
        let failure = self
            .engine
            .connector_failure(
                self.map,
                key,
                self.event,
                FailureCommit::new(self.complete),
                self.attempt,
                error,
            )
            .await;
        match failure {
            Ok(failure) => failure.into(),
            Err(e) => Interrupt::Error(e),
        }
    }
}

/// The provisional link a new pair is announced on (revision 0: not stored yet), from the link
/// its final commit will store: the source record's id only, no hash or version of either side.
fn provisional(final_link: &Link, source: Side) -> Link {
    let mut link = final_link.clone();
    link.revision = 0;
    link.crm = SideState::default();
    link.erp = SideState::default();
    match source {
        Side::Crm => link.erp_id = None,
        Side::Erp => link.crm_id = None,
    }
    link.open_conflict = None;
    link.pending = None;
    link.provisional = true;
    link
}

/// True for an upsert that carries no version and is older than the engine remembers
/// completed events: it may have been applied already, and without a version the stale check
/// cannot tell it from a newer change, so its own values must not be written; the source is
/// read again instead.
fn unplaceable_and_forgotten(engine: &Engine, event: &ChangeEvent) -> bool {
    event.operation == Operation::Upsert
        && event.record.version.is_none()
        && chrono::Duration::from_std(engine.config().events_remembered)
            .is_ok_and(|window| engine.clock.now() - event.received_at > window)
}

/// Whether `decision` writes to `side`.
fn writes_to(decision: &Decision, side: Side) -> bool {
    matches!(decision, Decision::Write(plan) if plan.writes.iter().any(|w| w.side == side))
}
