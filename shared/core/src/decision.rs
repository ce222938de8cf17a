//! Sync decisions: pure functions from (change, map, link, other side) to what the worker must do.
//!
//! [`decide`] does no I/O and reads no clock: the worker gathers everything it needs into a
//! [`DecisionInput`] (the full current source record, the link, the other side's current
//! record, resolved lookups, `now`) and executes the returned [`Decision`]. Every decision that
//! changes what dualwrite knows of a pair carries the [`Link`] to commit, so the worker never
//! computes sync state by itself.
//!
//! Rules, in the order they are applied to an upsert:
//! 1. The map (or every field) does not flow from the source side → [`SkipReason::DirectionNotSynced`].
//! 2. The source filter does not match → [`SkipReason::FilteredOut`].
//! 3. With a link: a version older than the one applied → [`SkipReason::Stale`]; the same
//!    version and hash → [`SkipReason::Duplicate`]; the same hash → [`SkipReason::Echo`] (what
//!    dualwrite wrote, or already applied; the link's version for the side may advance); the
//!    hash of a write still in flight to that side ([`Link::pending`]) → [`SkipReason::Echo`]
//!    too, with nothing to commit (the echo overtook the write's commit). A provisional link
//!    (a new pair whose first write is in flight, [`Link::provisional`]) holds no hash or
//!    version, only that pending write: its echo is recognised the same way, and any other
//!    change is decided as for a linked pair that has never been synced.
//! 4. An open (manual) conflict on the pair → [`Decision::Park`].
//! 5. Both sides changed since the last sync (or, without a link, both exist and differ) → the
//!    map's [`ConflictPolicy`]. `last_writer_wins` compares the two records'
//!    `SourceVersion::modified_on`; on a tie **the ERP side wins** (F&O is the system of record
//!    for master data in Dual-write's own defaults). The other side holding exactly the link's
//!    pending write has not changed by itself: it holds what dualwrite is writing.
//! 6. Otherwise the source's mapped fields are written to the other side, unless the other side
//!    already holds them ([`SkipReason::InSync`], link still committed).
//!
//! A lookup resolved as missing parks the change ([`Decision::Park`]) until the referenced
//! pair is linked: never a dangling reference, never a dropped event.
//!
//! A delete: without a link → [`SkipReason::NoLink`]; the echo of dualwrite's own delete of
//! the source side (the link announces it: [`Link::pending`] holding [`FieldsHash::DELETED`]
//! for that side) → [`SkipReason::Echo`], with nothing to commit; older than the link's
//! version of the source → [`SkipReason::Stale`]; an open conflict parks it; otherwise the
//! map's [`DeletePolicy`] on the other side, and the link removed.

use chrono::{DateTime, Utc};
use smol_str::SmolStr;

use crate::event::Operation;
use crate::hash::{SortedFields, hash_sorted_with};
use crate::map::apply::{
    ApplyError, LookupResolution, ResolvedLookups, fill_slots, keep_round_trip_equivalents,
    record_key, slots_to_record, with_slots,
};
use crate::map::plan::{SideFields, SideFieldsAt};
use crate::map::{ConflictPolicy, DeletePolicy, FieldDirection, TableMap};
use crate::ports::{ConflictRecord, FieldsHash, Link, RecordRef, SideState, WriteCondition};
use crate::record::{IntegrationKey, Record, Side, SourceVersion};

/// Everything [`decide`] needs to know about one change of one record under one map.
#[derive(Debug, Clone, Copy)]
pub struct DecisionInput<'a> {
    /// The map the change is decided under.
    pub map: &'a TableMap,
    /// The side the change happened on.
    pub source: Side,
    /// What happened.
    pub operation: Operation,
    /// The change's event id (for conflict records and messages).
    pub event_id: &'a str,
    /// The pair's integration key (for a delete: the key of the link found by id).
    pub key: &'a IntegrationKey,
    /// The FULL current source record (read by the worker if the event was partial). For a
    /// delete, the record as the event carried it (usually only its id).
    pub record: &'a Record,
    /// The pair's link, if any.
    pub link: Option<&'a Link>,
    /// The other side's current record, if it exists.
    pub other: Option<&'a Record>,
    /// `hash_fields(record, mapped_fields(map, source))`.
    pub source_hash: FieldsHash,
    /// Where `record` keeps the source side's mapped fields, when the caller located them to
    /// compute `source_hash` ([`SideFieldsAt::hash`]): the map then reads them by position.
    /// `None` lets the decision find them itself.
    pub source_fields: Option<&'a SideFieldsAt>,
    /// Lookups of `record` (source → other side), resolved by the worker.
    pub lookups: &'a ResolvedLookups,
    /// Lookups of `other` (other side → source), resolved by the worker; used only when the
    /// other side wins a conflict. Empty when there is no other record.
    pub other_lookups: &'a ResolvedLookups,
    /// The current time (for `updated_at` and conflict records).
    pub now: DateTime<Utc>,
}

/// Why nothing is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The source filter of the map does not match the record.
    FilteredOut,
    /// The map or its fields do not flow from the change's side.
    DirectionNotSynced,
    /// The change is older than the version already applied: newer data is never overwritten.
    Stale,
    /// The change carries exactly what dualwrite last wrote or applied for that side.
    Echo,
    /// The same version and hash were applied before.
    Duplicate,
    /// The other side already holds the values: only the link is (re)committed.
    InSync,
    /// A delete of a record that was never linked.
    NoLink,
}

impl SkipReason {
    /// A snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::FilteredOut => "filtered_out",
            SkipReason::DirectionNotSynced => "direction_not_synced",
            SkipReason::Stale => "stale",
            SkipReason::Echo => "echo",
            SkipReason::Duplicate => "duplicate",
            SkipReason::InSync => "in_sync",
            SkipReason::NoLink => "no_link",
        }
    }
}

/// A link to store, on the revision condition of the link the decision was made on.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkCommit {
    /// The new link state. `revision` is left as read; the store sets `expected_revision + 1`.
    pub link: Link,
    /// The revision read (0 when there was no link).
    pub expected_revision: u64,
}

/// One record write on one side.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncWrite {
    /// The side written to.
    pub side: Side,
    /// Entity set / data entity written to.
    pub entity: String,
    /// Where: the record's id when known, else its key (upsert by key).
    pub at: RecordRef,
    /// The fields to write (the mapped record).
    pub record: Record,
    /// `IfMatch` with the target's ETag when known; `MustNotExist` when the target was absent.
    pub condition: WriteCondition,
}

/// Writes to execute, then the link (and conflict) to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct WritePlan {
    /// One write, or two for a field-level merge where both sides differ. Never empty.
    pub writes: Vec<SyncWrite>,
    /// The link to commit after the writes. The worker fills in, for each written side, the id,
    /// and the version the write returned (when it returns one).
    pub link: LinkCommit,
    /// The conflict this write resolves, if any (both versions, winner recorded).
    pub conflict: Option<ConflictRecord>,
}

/// What a delete does on the other side.
#[derive(Debug, Clone, PartialEq)]
pub enum DeleteAction {
    /// Delete the other side's linked record (policy `propagate`).
    DeleteOther {
        /// The side deleted on.
        side: Side,
        /// Entity set / data entity.
        entity: String,
        /// The linked record.
        at: RecordRef,
    },
    /// Write the deactivation fields to the other side (policy `deactivate`).
    Deactivate(SyncWrite),
    /// Leave the other side alone (policy `ignore`, or nothing left to deactivate).
    Nothing,
}

/// What happens to the link after a delete.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkChange {
    /// Remove it, on the revision condition.
    Remove {
        /// Map of the link.
        map: String,
        /// Key of the link.
        key: IntegrationKey,
        /// The revision read.
        expected_revision: u64,
    },
    /// Store this state (boxed: a link is much larger than a removal).
    Put(Box<LinkCommit>),
}

/// The effects of a delete.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletePlan {
    /// What to do on the other side.
    pub action: DeleteAction,
    /// What to do with the link.
    pub link: LinkChange,
}

/// Why a change waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParkCause {
    /// The lookup of field `field_index` refers to a record that is not linked yet.
    MissingLookup {
        /// Index of the field mapping in `map.fields`.
        field_index: usize,
    },
    /// The record's company (legal entity) has no linked `cdm_companies` row yet: a
    /// company-specific row cannot be written to Dataverse before its company exists there.
    MissingCompany {
        /// The company code.
        company: String,
    },
    /// The pair has an open conflict that a person must resolve first.
    OpenConflict {
        /// The conflict's id.
        conflict_id: String,
    },
}

/// What the worker must do with one change under one map.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write nothing. `link`, when set, is committed (a version advanced, or the pair was found
    /// in sync and is linked now).
    Skip {
        /// Why.
        reason: SkipReason,
        /// Link state to commit, if it changed.
        link: Option<LinkCommit>,
    },
    /// Write one or both sides, then commit the link (and conflict record).
    Write(WritePlan),
    /// Execute a delete per the map's delete policy.
    Delete(DeletePlan),
    /// Policy `manual`: write nothing, record the open conflict and mark the link.
    HoldConflict {
        /// The link, with `open_conflict` set.
        link: LinkCommit,
        /// The open conflict with both versions.
        conflict: ConflictRecord,
    },
    /// Wait until the pair `waiting_map`/`waiting_key` is linked (or its conflict resolved).
    Park {
        /// The map whose link is awaited.
        waiting_map: String,
        /// The key of the awaited link.
        waiting_key: IntegrationKey,
        /// Why.
        cause: ParkCause,
        /// Why, in words.
        reason: String,
    },
    /// The record cannot be mapped (bad value, missing key): log it for a person.
    Invalid(ApplyError),
}

/// Decides what to do with one change. Pure: same input, same decision.
pub fn decide(input: &DecisionInput<'_>) -> Decision {
    let map = input.map;
    if !flows_from(map, input.source) {
        return skip(SkipReason::DirectionNotSynced);
    }
    match input.operation {
        Operation::Delete => decide_delete(input),
        Operation::Upsert => match decide_upsert(input) {
            Ok(d) => d,
            Err(e) => Decision::Invalid(e),
        },
    }
}

fn skip(reason: SkipReason) -> Decision {
    Decision::Skip { reason, link: None }
}

/// True when the map and at least one field carry changes from `source` to the other side.
fn flows_from(map: &TableMap, source: Side) -> bool {
    map.direction.flows_from(source)
        && map
            .fields
            .iter()
            .any(|f| f.direction.flows_from(source) && f.field(source.other()).is_some())
}

fn is_older(record: Option<SourceVersion>, known: Option<SourceVersion>) -> bool {
    matches!((record, known), (Some(r), Some(k)) if r.is_older_than(&k))
}

fn decide_upsert(input: &DecisionInput<'_>) -> Result<Decision, ApplyError> {
    let map = input.map;
    let source = input.source;
    let other_side = source.other();
    let record = input.record;

    if let Some(filter) = map.filters.of(source)
        && !filter.matches(record)
    {
        return Ok(skip(SkipReason::FilteredOut));
    }

    if let Some(link) = input.link {
        let known = link.side(source);
        if is_older(record.version, known.version) {
            return Ok(skip(SkipReason::Stale));
        }
        if known.hash == Some(input.source_hash) {
            if record.version.is_some() && record.version == known.version {
                return Ok(skip(SkipReason::Duplicate));
            }
            // An echo: advance what we know of the side (version, id) without writing.
            let advanced = record
                .version
                .is_some_and(|v| known.version.is_none_or(|k| v > k));
            let id_learned = record.id.is_some() && link.id(source) != record.id.as_deref();
            let commit = (advanced || id_learned).then(|| {
                let mut next = link.clone();
                if advanced {
                    next.side_mut(source).version = record.version;
                }
                set_id(&mut next, source, record.id.clone());
                next.updated_at = input.now;
                LinkCommit {
                    expected_revision: link.revision,
                    link: next,
                }
            });
            return Ok(Decision::Skip {
                reason: SkipReason::Echo,
                link: commit,
            });
        }
        if is_pending(link, source, input.source_hash) {
            // The echo of a write still in flight: its own commit records the side's hash and
            // version; advancing them from here would race with it.
            return Ok(skip(SkipReason::Echo));
        }
        if let Some(conflict_id) = &link.open_conflict {
            return Ok(Decision::Park {
                waiting_map: map.name.clone(),
                waiting_key: input.key.clone(),
                cause: ParkCause::OpenConflict {
                    conflict_id: conflict_id.clone(),
                },
                reason: format!(
                    "map {}, key {}: open conflict {conflict_id} awaits a person",
                    map.name, input.key
                ),
            });
        }
    }

    // The other side's current hash, computed once: the conflict check and the write plan
    // both need it. A record still at the row version the link holds is unchanged since, and
    // its hash is the link's (see `unchanged_since_link`).
    let other_hash = input.other.map(|other| {
        unchanged_since_link(input.link, other_side, other)
            .unwrap_or_else(|| side_hash(map, other_side, other))
    });
    let other_changed = match (input.other, input.link) {
        // Linked, and the other side's record is gone: deleted there since the last sync (its
        // delete not processed yet, or missed) while this side changed.
        (None, Some(link)) if link.side(other_side).hash.is_some() => {
            // Unless this very record is being deleted by dualwrite (the other side's delete,
            // propagated here, is in flight): the change predates that delete.
            if is_pending(link, source, FieldsHash::DELETED) {
                return Ok(skip(SkipReason::Stale));
            }
            return recreate_deleted_other(input);
        }
        (None, _) => false,
        // The other side holding exactly the write in flight to it did not change by itself.
        (Some(_), Some(link)) => {
            other_hash != link.side(other_side).hash
                && !other_hash.is_some_and(|h| is_pending(link, other_side, h))
        }
        // Both exist but were never linked: they are the same pair only if the write would
        // change nothing; otherwise both sides hold data of their own.
        (Some(other), None) => {
            if let Some(park) = missing_lookup(input, input.lookups) {
                return Ok(park);
            }
            let projected = project(
                map,
                source,
                record,
                input.source_fields,
                input.lookups,
                Some(other),
                other_hash,
            )?;
            if !projected.changes {
                return Ok(planned_write(input, projected, None));
            }
            true
        }
    };

    if other_changed && let Some(other) = input.other {
        return resolve_conflict(input, other);
    }
    plain_write(input, None, other_hash)
}

/// The policy named in the conflict log for a change to a linked pair whose other side was
/// deleted: the change creates it again.
pub const RECREATE_POLICY: &str = "recreate";

/// A change of a linked pair whose other record was deleted: the change is newer than anything
/// known of the pair, so it wins — the other record is created again with its values — and,
/// as a delete and an update met, the conflict is logged (policy [`RECREATE_POLICY`], the
/// other side as an empty record), so an operator sees a deleted record came back. Nothing is
/// overwritten, whatever the map's policy, `manual` included.
fn recreate_deleted_other(input: &DecisionInput<'_>) -> Result<Decision, ApplyError> {
    let map = input.map;
    let source = input.source;
    let gone = Record::new(entity_of(map, source.other()));
    let (crm, erp) = match source {
        Side::Crm => (input.record.clone(), gone),
        Side::Erp => (gone, input.record.clone()),
    };
    let conflict = ConflictRecord {
        id: conflict_id(&map.name, input.key, crm.version, erp.version),
        map: map.name.clone(),
        key: input.key.clone(),
        detected_at: input.now,
        policy: RECREATE_POLICY.to_string(),
        crm,
        erp,
        winner: Some(source),
        open: false,
    };
    plain_write(input, Some(conflict), None)
}

/// True when `hash` is the write to `side` that `link` announces as in flight.
fn is_pending(link: &Link, side: Side, hash: FieldsHash) -> bool {
    link.pending
        .is_some_and(|p| p.side == side && p.hash == hash)
}

/// The source's values go to the other side (no conflict, or the source won one).
/// `other_hash` is `side_hash` of `input.other`, when the caller has it.
fn plain_write(
    input: &DecisionInput<'_>,
    conflict: Option<ConflictRecord>,
    other_hash: Option<FieldsHash>,
) -> Result<Decision, ApplyError> {
    if let Some(park) = missing_lookup(input, input.lookups) {
        return Ok(park);
    }
    let projected = project(
        input.map,
        input.source,
        input.record,
        input.source_fields,
        input.lookups,
        input.other,
        other_hash,
    )?;
    Ok(planned_write(input, projected, conflict))
}

/// The plan for writing `projected` (the source mapped onto the other side) to the other side.
fn planned_write(
    input: &DecisionInput<'_>,
    projected: Projection,
    conflict: Option<ConflictRecord>,
) -> Decision {
    let source = input.source;
    let mut link = base_link(input);
    *link.link.side_mut(source) = SideState {
        hash: Some(input.source_hash),
        version: input.record.version,
    };
    set_id(&mut link.link, source, input.record.id.clone());
    apply_target_state(&mut link.link, source.other(), &projected, input.other);
    if projected.changes {
        let write = sync_write(input, source.other(), projected.written, input.other);
        return Decision::Write(WritePlan {
            writes: vec![write],
            link,
            conflict,
        });
    }
    skip_in_sync(input, link, conflict)
}

/// Nothing to write: commit the link if it changed (and the conflict record, if any).
fn skip_in_sync(
    input: &DecisionInput<'_>,
    link: LinkCommit,
    conflict: Option<ConflictRecord>,
) -> Decision {
    if let Some(conflict) = conflict {
        // Record the conflict even though no write is needed: the commit carries it.
        return Decision::Write(WritePlan {
            writes: Vec::new(),
            link,
            conflict: Some(conflict),
        });
    }
    let unchanged = input.link.is_some_and(|old| same_state(old, &link.link));
    Decision::Skip {
        reason: SkipReason::InSync,
        link: (!unchanged).then_some(link),
    }
}

fn same_state(a: &Link, b: &Link) -> bool {
    a.crm == b.crm
        && a.erp == b.erp
        && a.crm_id == b.crm_id
        && a.erp_id == b.erp_id
        && a.open_conflict == b.open_conflict
        && a.pending == b.pending
        && a.provisional == b.provisional
}

fn resolve_conflict(input: &DecisionInput<'_>, other: &Record) -> Result<Decision, ApplyError> {
    let map = input.map;
    let source = input.source;
    let (crm, erp) = match source {
        Side::Crm => (input.record, other),
        Side::Erp => (other, input.record),
    };
    let winner = match map.conflict {
        ConflictPolicy::CrmWins => Some(Side::Crm),
        ConflictPolicy::ErpWins => Some(Side::Erp),
        ConflictPolicy::LastWriterWins => {
            let c = crm.version.map(|v| v.modified_on);
            let e = erp.version.map(|v| v.modified_on);
            // Tie (or both unknown): ERP wins, see the module docs.
            Some(if c > e { Side::Crm } else { Side::Erp })
        }
        ConflictPolicy::FieldLevel | ConflictPolicy::Manual => None,
    };
    let mut conflict = ConflictRecord {
        id: conflict_id(&map.name, input.key, crm.version, erp.version),
        map: map.name.clone(),
        key: input.key.clone(),
        detected_at: input.now,
        policy: policy_name(map.conflict).to_string(),
        crm: crm.clone(),
        erp: erp.clone(),
        winner,
        open: false,
    };
    match map.conflict {
        ConflictPolicy::Manual => {
            conflict.open = true;
            let mut link = base_link(input);
            link.link.open_conflict = Some(conflict.id.clone());
            Ok(Decision::HoldConflict { link, conflict })
        }
        // The winner's values of the fields both sides write; the fields only one side writes
        // are no part of the conflict and go their one way (a changed ERP-only amount still
        // reaches the CRM when the CRM's edit wins the rest).
        _ => field_level_merge(input, other, conflict, winner),
    }
}

/// Merges both sides of a conflict: each field the two sides both write takes the value of
/// `winner` when the policy names one, else (`field_level`) of its `source_of_truth` side (the
/// change's source when a field names none); a field one side alone writes goes from that side.
/// Each side is written only where it differs.
fn field_level_merge(
    input: &DecisionInput<'_>,
    other: &Record,
    conflict: ConflictRecord,
    winner: Option<Side>,
) -> Result<Decision, ApplyError> {
    let map = input.map;
    let source = input.source;
    let other_side = source.other();
    // A field a side does not own here is not written from it: its lookup need not resolve
    // (the losing side's reference to a record not synced must not hold the winner's write).
    let owner = |f: &crate::map::FieldMapping| {
        winner.unwrap_or_else(|| f.source_of_truth.unwrap_or(source))
    };
    let needed = |from: Side, lookups: &ResolvedLookups| -> ResolvedLookups {
        lookups
            .iter()
            .map(|(index, resolution)| {
                let f = &map.fields[index];
                let written =
                    f.direction != FieldDirection::Bidirectional || f.is_key || owner(f) == from;
                let resolution = if written {
                    resolution.clone()
                } else {
                    // Removed from the write below; any value does.
                    LookupResolution::Resolved(crate::Value::Null)
                };
                (index, resolution)
            })
            .collect()
    };
    let (source_lookups, other_lookups) = (
        needed(source, input.lookups),
        needed(other_side, input.other_lookups),
    );
    for lookups in [&source_lookups, &other_lookups] {
        if let Some(park) = missing_lookup(input, lookups) {
            return Ok(park);
        }
    }
    let mut link = base_link(input);
    let mut writes = Vec::new();
    for (from, from_record, lookups, to_record) in [
        (source, input.record, &source_lookups, other),
        (other_side, other, &other_lookups, input.record),
    ] {
        let to = from.other();
        let located = input.source_fields.filter(|_| from == source);
        let mut projected = project(
            map,
            from,
            from_record,
            located,
            lookups,
            Some(to_record),
            None,
        )?;
        // Keep only the fields `from` owns (keys always travel).
        for f in &map.fields {
            if f.direction == FieldDirection::Bidirectional
                && !f.is_key
                && owner(f) != from
                && let Some(target_field) = f.field(to)
            {
                projected.written.fields.remove(target_field.name.as_str());
            }
        }
        let projected = merge_into(
            map.plan().side(to),
            projected.written,
            Some(to_record),
            None,
        );
        apply_target_state(&mut link.link, to, &projected, Some(to_record));
        set_id(&mut link.link, from, from_record.id.clone());
        if projected.changes {
            writes.push(sync_write(input, to, projected.written, Some(to_record)));
        }
    }
    if writes.is_empty() {
        return Ok(skip_in_sync(input, link, Some(conflict)));
    }
    Ok(Decision::Write(WritePlan {
        writes,
        link,
        conflict: Some(conflict),
    }))
}

fn decide_delete(input: &DecisionInput<'_>) -> Decision {
    let map = input.map;
    let source = input.source;
    let other_side = source.other();
    let Some(link) = input.link else {
        return skip(SkipReason::NoLink);
    };
    // The delete dualwrite is making of this very record (a delete on the other side
    // propagated here), whose echo overtook the worker's commit removing the link.
    if is_pending(link, source, FieldsHash::DELETED) {
        return skip(SkipReason::Echo);
    }
    if is_older(input.record.version, link.side(source).version) {
        return skip(SkipReason::Stale);
    }
    if let Some(conflict_id) = &link.open_conflict {
        return Decision::Park {
            waiting_map: map.name.clone(),
            waiting_key: input.key.clone(),
            cause: ParkCause::OpenConflict {
                conflict_id: conflict_id.clone(),
            },
            reason: format!(
                "map {}, key {}: open conflict {conflict_id} awaits a person",
                map.name, input.key
            ),
        };
    }
    let remove = LinkChange::Remove {
        map: map.name.clone(),
        key: link.key.clone(),
        expected_revision: link.revision,
    };
    let other_at = match link.id(other_side) {
        Some(id) => RecordRef::Id(id.to_string()),
        None => RecordRef::Key(record_key(map, other_side, &link.key)),
    };
    match &map.delete {
        DeletePolicy::Ignore => Decision::Delete(DeletePlan {
            action: DeleteAction::Nothing,
            link: remove,
        }),
        DeletePolicy::Propagate => Decision::Delete(DeletePlan {
            action: DeleteAction::DeleteOther {
                side: other_side,
                entity: entity_of(map, other_side),
                at: other_at,
            },
            link: remove,
        }),
        DeletePolicy::Deactivate { crm, erp } => {
            let Some(other) = input.other else {
                return Decision::Delete(DeletePlan {
                    action: DeleteAction::Nothing,
                    link: remove,
                });
            };
            let fields = match other_side {
                Side::Crm => crm,
                Side::Erp => erp,
            };
            let mut written = Record::new(entity_of(map, other_side));
            for (name, value) in fields {
                written.fields.insert(name.as_str(), value.clone());
            }
            // Deactivation fields are usually not mapped: compare them, not the mapped hash.
            let already = written
                .fields
                .iter()
                .all(|(name, value)| other.get(name) == Some(value));
            let projected = merge_into(map.plan().side(other_side), written, Some(other), None);
            let mut next = link.clone();
            // The source record is gone: a record created again under the key is a change.
            *next.side_mut(source) = SideState {
                hash: None,
                version: input.record.version,
            };
            match source {
                Side::Crm => next.crm_id = None,
                Side::Erp => next.erp_id = None,
            }
            apply_target_state(&mut next, other_side, &projected, Some(other));
            next.updated_at = input.now;
            let commit = LinkChange::Put(Box::new(LinkCommit {
                link: next,
                expected_revision: link.revision,
            }));
            if already {
                return Decision::Delete(DeletePlan {
                    action: DeleteAction::Nothing,
                    link: commit,
                });
            }
            let write = SyncWrite {
                side: other_side,
                entity: entity_of(map, other_side),
                at: other_at,
                record: projected.written,
                condition: other
                    .etag
                    .clone()
                    .map_or(WriteCondition::MustExist, WriteCondition::IfMatch),
            };
            Decision::Delete(DeletePlan {
                action: DeleteAction::Deactivate(write),
                link: commit,
            })
        }
    }
}

/// The result of mapping a record onto the other side's current record.
struct Projection {
    /// The fields to write.
    written: Record,
    /// Hash of the target's mapped fields as they will stand after the write.
    merged_hash: FieldsHash,
    /// True when the write changes the target's mapped fields (or creates it).
    changes: bool,
}

/// The link's hash of `side` when `record` provably has not changed since the link was
/// written: same source version, and a version with a real row sequence (Dataverse
/// `versionnumber`, F&O `ControlNumber`). A time-only version (sequence 0) may cover two edits
/// within one timestamp, so it proves nothing and the record is hashed.
fn unchanged_since_link(link: Option<&Link>, side: Side, record: &Record) -> Option<FieldsHash> {
    let known = link?.side(side);
    let version = record.version?;
    if version.sequence != 0 && known.version == Some(version) {
        known.hash
    } else {
        None
    }
}

/// Maps `record` from `from` onto the other side's current record. `target_hash` is
/// `side_hash` of `target_current`, when the caller has it.
///
/// The hash after the write is computed from the mapped values before they become the written
/// record (the written value of a field where there is one, else the current value).
fn project(
    map: &TableMap,
    from: Side,
    record: &Record,
    located: Option<&SideFieldsAt>,
    lookups: &ResolvedLookups,
    target_current: Option<&Record>,
    target_hash: Option<FieldsHash>,
) -> Result<Projection, ApplyError> {
    let plan = map.plan();
    let to = from.other();
    let target_fields = plan.side(to);
    with_slots(|slots| {
        fill_slots(map, plan, from, record, located, lookups, slots)?;
        if let Some(current) = target_current {
            keep_round_trip_equivalents(map, plan, from, record, current, slots);
        }
        let mut old_values = target_current.map(SortedFields::new);
        let merged_hash = hash_sorted_with(
            &target_fields.names,
            target_fields.names_hash,
            |i, name| match (&slots[i], &mut old_values) {
                (Some(new_value), _) => Some(new_value),
                (None, Some(old_values)) => old_values.seek(name),
                (None, None) => None,
            },
        );
        let changes = target_current.is_none_or(|current| {
            target_hash.unwrap_or_else(|| target_fields.hash(current)) != merged_hash
        });
        Ok(Projection {
            written: slots_to_record(map, to, record, plan, slots),
            merged_hash,
            changes,
        })
    })
}

/// What `written` makes of `target_current`: the hash of the target's mapped fields after the
/// write (the written value of a field where there is one, else the current value; the merged
/// record is never built) and whether that changes them. `target_hash` is `side_hash` of
/// `target_current`, when the caller has it.
fn merge_into(
    target_fields: &SideFields,
    written: Record,
    target_current: Option<&Record>,
    target_hash: Option<FieldsHash>,
) -> Projection {
    let merged_hash = match target_current {
        None => target_fields.hash(&written),
        Some(current) => {
            let mut new_values = SortedFields::new(&written);
            let mut old_values = SortedFields::new(current);
            hash_sorted_with(&target_fields.names, target_fields.names_hash, |_, name| {
                // Both readers must see every name, in order: seek both before choosing.
                let new_value = new_values.seek(name);
                let old_value = old_values.seek(name);
                new_value.or(old_value)
            })
        }
    };
    let changes = target_current.is_none_or(|current| {
        target_hash.unwrap_or_else(|| target_fields.hash(current)) != merged_hash
    });
    Projection {
        written,
        merged_hash,
        changes,
    }
}

/// The hash of `record`'s mapped fields on `side`: `hash_fields(record, mapped_fields(map,
/// side))`, with the sorted field list of the map computed once per map (see
/// [`crate::map::plan`]).
pub fn side_hash(map: &TableMap, side: Side, record: &Record) -> FieldsHash {
    map.plan().side(side).hash(record)
}

fn apply_target_state(
    link: &mut Link,
    to: Side,
    projected: &Projection,
    target_current: Option<&Record>,
) {
    *link.side_mut(to) = SideState {
        hash: Some(projected.merged_hash),
        version: target_current.and_then(|r| r.version),
    };
    if let Some(id) = target_current.and_then(|r| r.id.clone()) {
        set_id(link, to, Some(id));
    }
}

fn sync_write(
    input: &DecisionInput<'_>,
    to: Side,
    record: Record,
    target_current: Option<&Record>,
) -> SyncWrite {
    let map = input.map;
    let known_id = target_current.and_then(|r| r.id.clone()).or_else(|| {
        input
            .link
            .and_then(|l| l.id(to).map(str::to_string))
            .map(Into::into)
    });
    let at = match known_id {
        Some(id) => RecordRef::Id(id.into()),
        None => RecordRef::Key(record_key(map, to, input.key)),
    };
    let condition = match target_current {
        None => WriteCondition::MustNotExist,
        Some(current) => current
            .etag
            .clone()
            .map_or(WriteCondition::MustExist, WriteCondition::IfMatch),
    };
    SyncWrite {
        side: to,
        entity: entity_of(map, to),
        at,
        record,
        condition,
    }
}

/// The link the decision starts from: the current one, or a fresh one for a new pair. Any
/// pending write is cleared: the decided link states the pair as it stands after this
/// decision, and an in-flight write's own commit then fails its revision condition.
fn base_link(input: &DecisionInput<'_>) -> LinkCommit {
    match input.link {
        Some(link) => {
            let mut next = link.clone();
            next.pending = None;
            next.provisional = false;
            next.updated_at = input.now;
            LinkCommit {
                expected_revision: link.revision,
                link: next,
            }
        }
        None => LinkCommit {
            expected_revision: 0,
            link: Link {
                map: input.map.name.clone().into(),
                key: input.key.clone(),
                crm_id: None,
                erp_id: None,
                crm: SideState::default(),
                erp: SideState::default(),
                revision: 0,
                open_conflict: None,
                pending: None,
                provisional: false,
                updated_at: input.now,
            },
        },
    }
}

fn set_id(link: &mut Link, side: Side, id: Option<SmolStr>) {
    match side {
        Side::Crm => link.crm_id = id.or_else(|| link.crm_id.take()),
        Side::Erp => link.erp_id = id.or_else(|| link.erp_id.take()),
    }
}

fn missing_lookup(input: &DecisionInput<'_>, lookups: &ResolvedLookups) -> Option<Decision> {
    // The first missing lookup in field order.
    let (index, map, key) = lookups
        .iter()
        .filter_map(|(index, resolution)| match resolution {
            LookupResolution::Missing { map, key } => Some((index, map, key)),
            LookupResolution::Resolved(_) => None,
        })
        .min_by_key(|(index, _, _)| *index)?;
    let label = input
        .map
        .fields
        .get(index)
        .map_or_else(|| format!("field #{index}"), |f| f.label());
    Some(Decision::Park {
        waiting_map: map.clone(),
        waiting_key: key.clone(),
        cause: ParkCause::MissingLookup { field_index: index },
        reason: format!(
            "map {}, key {}: lookup {label} = {key} in map {map} is not linked yet",
            input.map.name, input.key
        ),
    })
}

/// The entity (set) of `side` in `map`.
pub fn entity_of(map: &TableMap, side: Side) -> String {
    match side {
        Side::Crm => map.crm.entity_set.clone(),
        Side::Erp => map.erp.entity.clone(),
    }
}

/// The policy's name as written in a map file.
pub fn policy_name(policy: ConflictPolicy) -> &'static str {
    match policy {
        ConflictPolicy::LastWriterWins => "last_writer_wins",
        ConflictPolicy::CrmWins => "crm_wins",
        ConflictPolicy::ErpWins => "erp_wins",
        ConflictPolicy::FieldLevel => "field_level",
        ConflictPolicy::Manual => "manual",
    }
}

fn conflict_id(
    map: &str,
    key: &IntegrationKey,
    crm: Option<SourceVersion>,
    erp: Option<SourceVersion>,
) -> String {
    let v = |v: Option<SourceVersion>| {
        v.map_or_else(
            || "-".to_string(),
            |v| format!("{}.{}", v.modified_on.timestamp_micros(), v.sequence),
        )
    };
    format!("{map}/{key}@crm:{}/erp:{}", v(crm), v(erp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::filter::{CompareOp, Literal};
    use crate::map::{
        CrmEntity, ErpEntity, FieldMapping, FieldRef, Filter, MapDirection, SideFilters,
    };
    use crate::value::{Value, ValueType};

    fn fm(erp: &str, crm: &str, is_key: bool) -> FieldMapping {
        FieldMapping {
            erp: Some(FieldRef {
                name: erp.into(),
                ty: ValueType::Text,
            }),
            crm: Some(FieldRef {
                name: crm.into(),
                ty: ValueType::Text,
            }),
            direction: FieldDirection::Bidirectional,
            notation: "=".into(),
            is_key,
            value_map: None,
            default: None,
            lookup: None,
            to_crm: Vec::new(),
            to_erp: Vec::new(),
            source_of_truth: None,
            line: 1,
        }
    }

    fn map() -> TableMap {
        TableMap {
            name: "m".into(),
            description: String::new(),
            source: "test".into(),
            crm: CrmEntity {
                entity_set: "accounts".into(),
                logical_name: "account".into(),
                primary_id: "accountid".into(),
                key: vec!["accountnumber".into()],
                company_field: None,
            },
            erp: ErpEntity {
                entity: "Customers".into(),
                key: vec!["CustomerAccount".into()],
                company_specific: false,
                physical_name: None,
            },
            direction: MapDirection::Bidirectional,
            fields: vec![
                fm("CustomerAccount", "accountnumber", true),
                fm("Name", "name", false),
            ],
            filters: SideFilters::default(),
            depends_on: Vec::new(),
            conflict: ConflictPolicy::LastWriterWins,
            delete: DeletePolicy::Propagate,
            plan: Default::default(),
        }
    }

    fn at(secs: i64, seq: i64) -> Option<SourceVersion> {
        Some(SourceVersion {
            modified_on: DateTime::from_timestamp(secs, 0).unwrap_or_default(),
            sequence: seq,
        })
    }

    fn crm(name: &str, version: Option<SourceVersion>) -> Record {
        let mut r = Record::new("accounts")
            .with("accountnumber", Value::Text("A1".into()))
            .with("name", Value::Text(name.into()));
        r.id = Some("guid-1".into());
        r.version = version;
        r
    }

    fn erp(name: &str, version: Option<SourceVersion>) -> Record {
        let mut r = Record::new("Customers")
            .with("CustomerAccount", Value::Text("A1".into()))
            .with("Name", Value::Text(name.into()));
        r.id = Some("CustomerAccount='A1'".into());
        r.etag = Some("W/\"7\"".into());
        r.version = version;
        r
    }

    /// The link as it stands after `crm_rec` and `erp_rec` were last synced.
    fn link_of(m: &TableMap, crm_rec: &Record, erp_rec: &Record) -> Link {
        Link {
            map: m.name.clone().into(),
            key: IntegrationKey("A1".into()),
            crm_id: crm_rec.id.clone(),
            erp_id: erp_rec.id.clone(),
            crm: SideState {
                hash: Some(side_hash(m, Side::Crm, crm_rec)),
                version: crm_rec.version,
            },
            erp: SideState {
                hash: Some(side_hash(m, Side::Erp, erp_rec)),
                version: erp_rec.version,
            },
            revision: 3,
            open_conflict: None,
            pending: None,
            provisional: false,
            updated_at: DateTime::UNIX_EPOCH,
        }
    }

    fn run(m: &TableMap, record: &Record, link: Option<&Link>, other: Option<&Record>) -> Decision {
        let empty = ResolvedLookups::new();
        let key = IntegrationKey("A1".into());
        let source = if record.entity == "accounts" {
            Side::Crm
        } else {
            Side::Erp
        };
        let input = |source_fields| DecisionInput {
            map: m,
            source,
            operation: Operation::Upsert,
            event_id: "e1",
            key: &key,
            record,
            link,
            other,
            source_hash: side_hash(m, source, record),
            source_fields,
            lookups: &empty,
            other_lookups: &empty,
            now: DateTime::UNIX_EPOCH,
        };
        // The source fields located once (as the engine does) or searched by the decision:
        // the same hash and the same decision.
        let located = SideFieldsAt::new(m, source, record);
        assert_eq!(located.hash(m, record), side_hash(m, source, record));
        let searched = decide(&input(None));
        assert_eq!(decide(&input(Some(&located))), searched);
        searched
    }

    #[test]
    fn a_new_record_is_created_on_the_other_side_by_key() {
        let m = map();
        let Decision::Write(plan) = run(&m, &crm("Contoso", at(10, 1)), None, None) else {
            panic!("expected a write")
        };
        assert_eq!(plan.writes.len(), 1);
        let w = &plan.writes[0];
        assert_eq!(w.side, Side::Erp);
        assert_eq!(w.condition, WriteCondition::MustNotExist);
        assert_eq!(
            w.at,
            RecordRef::Key(crate::record::RecordKey::new([("CustomerAccount", "A1")]))
        );
        assert_eq!(plan.link.expected_revision, 0);
        assert_eq!(plan.link.link.crm.version, at(10, 1));
        assert!(plan.link.link.erp.hash.is_some());
    }

    #[test]
    fn stale_echo_and_duplicate_are_told_apart() {
        let m = map();
        let (c, e) = (crm("Contoso", at(10, 5)), erp("Contoso", at(11, 1)));
        let link = link_of(&m, &c, &e);
        let older = crm("Older", at(9, 1));
        assert_eq!(
            run(&m, &older, Some(&link), Some(&e)),
            Decision::Skip {
                reason: SkipReason::Stale,
                link: None
            }
        );
        assert_eq!(
            run(&m, &c, Some(&link), Some(&e)),
            Decision::Skip {
                reason: SkipReason::Duplicate,
                link: None
            }
        );
        // Same values, newer version: an echo that advances the link's version.
        let Decision::Skip {
            reason: SkipReason::Echo,
            link: Some(next),
        } = run(&m, &crm("Contoso", at(12, 6)), Some(&link), Some(&e))
        else {
            panic!("expected an echo")
        };
        assert_eq!(next.link.crm.version, at(12, 6));
        assert_eq!(next.expected_revision, 3);
    }

    #[test]
    fn a_pending_write_is_an_echo_from_its_side_and_no_change_of_the_other_side() {
        use crate::ports::PendingWrite;
        let m = map();
        let (c, e) = (crm("Contoso", at(10, 5)), erp("Contoso", at(11, 1)));
        let mut link = link_of(&m, &c, &e);
        // A CRM edit is being written to F&O; its echo overtakes the write's commit.
        let (c2, e2) = (crm("Renamed", at(20, 6)), erp("Renamed", at(21, 2)));
        link.pending = Some(PendingWrite {
            side: Side::Erp,
            hash: side_hash(&m, Side::Erp, &e2),
        });
        assert_eq!(
            run(&m, &e2, Some(&link), Some(&c2)),
            Decision::Skip {
                reason: SkipReason::Echo,
                link: None
            }
        );
        // The CRM change itself again (another delivery): F&O holds the pending write, which
        // is no change of its own: in sync, no conflict, the announcement cleared.
        let Decision::Skip {
            reason: SkipReason::InSync,
            link: Some(next),
        } = run(&m, &c2, Some(&link), Some(&e2))
        else {
            panic!("expected in sync")
        };
        assert_eq!(next.link.pending, None);
        assert_eq!(next.link.erp.hash, link.pending.map(|p| p.hash));
        // A real F&O change with other values is not hidden by the announcement.
        let e3 = erp("Other", at(22, 3));
        assert!(matches!(
            run(&m, &e3, Some(&link), Some(&c)),
            Decision::Write(_)
        ));
    }

    #[test]
    fn the_echo_of_a_delete_dualwrite_is_making_is_an_echo() {
        use crate::ports::PendingWrite;
        let m = map();
        let (c, e) = (crm("Contoso", at(10, 5)), erp("Contoso", at(11, 1)));
        let mut link = link_of(&m, &c, &e);
        let empty = ResolvedLookups::new();
        let key = IntegrationKey("A1".into());
        let mut gone = Record::new("Customers");
        gone.version = at(12, 2);
        let erp_delete = |link: &Link| {
            decide(&DecisionInput {
                map: &m,
                source: Side::Erp,
                operation: Operation::Delete,
                event_id: "e2",
                key: &key,
                record: &gone,
                link: Some(link),
                other: None,
                source_hash: FieldsHash(0),
                source_fields: None,
                lookups: &empty,
                other_lookups: &empty,
                now: DateTime::UNIX_EPOCH,
            })
        };
        // A CRM delete is being propagated to F&O; F&O's webhook of it overtakes the commit.
        link.pending = Some(PendingWrite {
            side: Side::Erp,
            hash: FieldsHash::DELETED,
        });
        assert_eq!(erp_delete(&link), skip(SkipReason::Echo));
        // A delete announced to the other side does not hide a delete made here.
        link.pending = Some(PendingWrite {
            side: Side::Crm,
            hash: FieldsHash::DELETED,
        });
        assert!(matches!(erp_delete(&link), Decision::Delete(_)));
    }

    /// A linked pair whose other record is gone: the change creates it again (and logs
    /// why) — unless dualwrite is deleting this very record (the other side's delete,
    /// propagated here, in flight): then the change predates that delete.
    #[test]
    fn a_change_of_a_record_being_deleted_does_not_recreate_the_other_side() {
        let m = map();
        let (c, e) = (crm("Contoso", at(10, 5)), erp("Contoso", at(11, 1)));
        let mut link = link_of(&m, &c, &e);
        let changed = crm("Renamed", at(20, 6));
        let Decision::Write(plan) = run(&m, &changed, Some(&link), None) else {
            panic!("recreated");
        };
        assert_eq!(plan.writes[0].condition, WriteCondition::MustNotExist);
        assert_eq!(
            plan.conflict.map(|c| c.policy),
            Some(RECREATE_POLICY.to_string())
        );
        link.pending = Some(crate::ports::PendingWrite {
            side: Side::Crm,
            hash: FieldsHash::DELETED,
        });
        assert_eq!(
            run(&m, &changed, Some(&link), None),
            skip(SkipReason::Stale)
        );
    }

    #[test]
    fn a_change_with_an_unchanged_other_side_is_written_with_if_match() {
        let m = map();
        let (c, e) = (crm("Contoso", at(10, 5)), erp("Contoso", at(11, 1)));
        let link = link_of(&m, &c, &e);
        let Decision::Write(plan) = run(&m, &crm("Renamed", at(20, 6)), Some(&link), Some(&e))
        else {
            panic!()
        };
        assert_eq!(
            plan.writes[0].condition,
            WriteCondition::IfMatch("W/\"7\"".into())
        );
        assert_eq!(
            plan.writes[0].record.get("Name"),
            Some(&Value::Text("Renamed".into()))
        );
        assert!(plan.conflict.is_none());
    }

    #[test]
    fn last_writer_wins_tie_goes_to_the_erp_side() {
        let m = map();
        let (c, e) = (crm("Contoso", at(10, 5)), erp("Contoso", at(11, 1)));
        let link = link_of(&m, &c, &e);
        let (c2, e2) = (crm("FromCrm", at(30, 9)), erp("FromErp", at(30, 2)));
        let Decision::Write(plan) = run(&m, &c2, Some(&link), Some(&e2)) else {
            panic!()
        };
        assert_eq!(
            plan.writes[0].side,
            Side::Crm,
            "the ERP values go back to CRM"
        );
        assert_eq!(
            plan.writes[0].record.get("name"),
            Some(&Value::Text("FromErp".into()))
        );
        assert_eq!(plan.conflict.map(|c| c.winner), Some(Some(Side::Erp)));
    }

    #[test]
    fn direction_and_filter_are_checked_first() {
        let mut m = map();
        m.direction = MapDirection::ErpToCrm;
        assert!(matches!(
            run(&m, &crm("x", at(1, 1)), None, None),
            Decision::Skip {
                reason: SkipReason::DirectionNotSynced,
                ..
            }
        ));
        let mut m = map();
        m.filters.crm = Some(Filter::Compare {
            field: "name".into(),
            op: CompareOp::Eq,
            value: Literal::Text("Only".into()),
        });
        assert!(matches!(
            run(&m, &crm("x", at(1, 1)), None, None),
            Decision::Skip {
                reason: SkipReason::FilteredOut,
                ..
            }
        ));
        assert!(matches!(
            run(&m, &crm("Only", at(1, 1)), None, None),
            Decision::Write(_)
        ));
    }

    #[test]
    fn a_missing_lookup_parks_the_change() {
        let m = map();
        let mut lookups = ResolvedLookups::new();
        lookups.insert(
            1,
            LookupResolution::Missing {
                map: "currencies".into(),
                key: IntegrationKey("EUR".into()),
            },
        );
        let key = IntegrationKey("A1".into());
        let record = crm("x", at(1, 1));
        let d = decide(&DecisionInput {
            map: &m,
            source: Side::Crm,
            operation: Operation::Upsert,
            event_id: "e1",
            key: &key,
            record: &record,
            link: None,
            other: None,
            source_hash: side_hash(&m, Side::Crm, &record),
            source_fields: None,
            lookups: &lookups,
            other_lookups: &ResolvedLookups::new(),
            now: DateTime::UNIX_EPOCH,
        });
        assert!(
            matches!(d, Decision::Park { ref waiting_map, cause: ParkCause::MissingLookup { field_index: 1 }, .. } if waiting_map == "currencies"),
            "{d:?}"
        );
    }

    #[test]
    fn side_hash_is_hash_fields_of_mapped_fields_and_follows_map_changes() {
        use crate::hash::hash_fields;
        use crate::map::apply::mapped_fields;
        let m = map();
        let r = crm("Contoso", at(1, 1)).with("description", Value::Text("d".into()));
        let expected = |m: &TableMap| hash_fields(&r, mapped_fields(m, Side::Crm));
        let before = side_hash(&m, Side::Crm, &r);
        assert_eq!(before, expected(&m));
        // A map with other fields (a map is never changed once used: a new one is built, here
        // from a clone, which starts without a plan): the hash follows its fields.
        let mut m = m.clone();
        if let Some(crm) = m.fields[1].crm.as_mut() {
            crm.name = "description".into();
        }
        assert_ne!(side_hash(&m, Side::Crm, &r), before);
        assert_eq!(side_hash(&m, Side::Crm, &r), expected(&m));
    }

    #[test]
    fn a_record_at_the_linked_row_version_is_not_rehashed_but_a_time_only_version_is() {
        use crate::ports::SideState;
        let at = chrono::DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        let record = |sequence| {
            let mut r = Record::new("accounts");
            r.version = Some(SourceVersion {
                modified_on: at,
                sequence,
            });
            r
        };
        let link = |sequence| Link {
            map: "m".into(),
            key: IntegrationKey("K".into()),
            crm_id: None,
            erp_id: None,
            crm: SideState {
                hash: Some(FieldsHash(7)),
                version: Some(SourceVersion {
                    modified_on: at,
                    sequence,
                }),
            },
            erp: SideState::default(),
            revision: 1,
            open_conflict: None,
            pending: None,
            provisional: false,
            updated_at: at,
        };
        assert_eq!(
            unchanged_since_link(Some(&link(5)), Side::Crm, &record(5)),
            Some(FieldsHash(7))
        );
        assert_eq!(
            unchanged_since_link(Some(&link(5)), Side::Crm, &record(6)),
            None
        );
        assert_eq!(
            unchanged_since_link(Some(&link(0)), Side::Crm, &record(0)),
            None
        );
        assert_eq!(unchanged_since_link(None, Side::Crm, &record(5)), None);
    }
}
