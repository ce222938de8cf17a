//! The per-map plan: what the per-record path needs to know about a [`TableMap`] (sorted field
//! lists, their name hashes, each mapping's position in them, key flags, the lookups read from
//! each side, and per direction the `FieldStep`s that map a record), computed once per map on
//! first use and kept in the map itself; and [`SideFieldsAt`], where one record keeps a side's
//! mapped fields, located once per record.
//!
//! A map is data that the engine reads millions of times and never changes after loading, so
//! the plan is derived lazily from `&TableMap` and stored in its [`PlanCell`]. The price is a
//! rule: **a `TableMap` must not be mutated after its first use** (build a new map instead; a
//! clone starts with an empty plan). Debug builds check the rule on every use and panic with the
//! map's name when it is broken; release builds trust it.

use std::fmt;
use std::sync::OnceLock;

use smol_str::SmolStr;

use crate::hash::{hash_sorted_fields, names_hash};
use crate::map::TableMap;
use crate::map::apply::{is_key_field, mapped_fields};
use crate::ports::FieldsHash;
use crate::record::{Record, Side};
use crate::value::Value;

/// Where a [`TableMap`] keeps its plan. Not part of the map's meaning: it compares equal to
/// every other cell, is not serialised, and a clone starts empty.
///
/// Build one with `PlanCell::default()` (or `Default::default()` in a `TableMap { .. }`
/// literal).
#[derive(Default)]
pub struct PlanCell(OnceLock<MapPlan>);

impl Clone for PlanCell {
    /// An empty cell: the clone may be changed before its first use, so it computes its own.
    fn clone(&self) -> Self {
        PlanCell::default()
    }
}

impl PartialEq for PlanCell {
    /// Always true: two maps with the same content are equal whatever they have computed.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for PlanCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "PlanCell(computed)"
        } else {
            "PlanCell(empty)"
        })
    }
}

/// What the per-record path needs to know about a map, computed once (see the module docs).
#[derive(Debug, PartialEq)]
pub(crate) struct MapPlan {
    /// The Dataverse side's mapped fields.
    crm: SideFields,
    /// The F&O side's mapped fields.
    erp: SideFields,
    /// Per field mapping (by index in `map.fields`): whether it is a key field
    /// ([`is_key_field`]).
    pub(crate) is_key: Box<[bool]>,
    /// What mapping a Dataverse record to F&O does, field by field.
    from_crm: Box<[FieldStep]>,
    /// What mapping an F&O record to Dataverse does, field by field.
    from_erp: Box<[FieldStep]>,
}

impl MapPlan {
    fn new(map: &TableMap) -> Self {
        let crm = SideFields::new(map, Side::Crm);
        let erp = SideFields::new(map, Side::Erp);
        let is_key: Box<[bool]> = map.fields.iter().map(|f| is_key_field(map, f)).collect();
        MapPlan {
            from_crm: FieldStep::plan(map, Side::Crm, &crm, &erp, &is_key),
            from_erp: FieldStep::plan(map, Side::Erp, &erp, &crm, &is_key),
            crm,
            erp,
            is_key,
        }
    }

    /// The mapped fields of `side`.
    pub(crate) fn side(&self, side: Side) -> &SideFields {
        match side {
            Side::Crm => &self.crm,
            Side::Erp => &self.erp,
        }
    }

    /// The steps that map a record of `source` to the other side, in map order.
    pub(crate) fn steps_from(&self, source: Side) -> &[FieldStep] {
        match source {
            Side::Crm => &self.from_crm,
            Side::Erp => &self.from_erp,
        }
    }
}

/// How one target field gets its value when a record of one side is mapped to the other:
/// what `apply::fill_slots` reads per field, a few bytes instead of the whole
/// [`crate::map::FieldMapping`] (which it reads only for the rare kinds and for errors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FieldStep {
    /// The mapping's index in `map.fields`.
    pub(crate) index: u32,
    /// Position of the target field in the target side's `names`.
    pub(crate) slot: u32,
    /// Position of the source field in the source side's `names` (unused for a constant).
    pub(crate) source: u32,
    pub(crate) kind: StepKind,
    /// A key field: written whatever its direction, and never null.
    pub(crate) is_key: bool,
    /// The mapping has a default, written in place of a null.
    pub(crate) has_default: bool,
}

/// What a [`FieldStep`] does with the source value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepKind {
    /// No source field: the mapping's default is written.
    Constant,
    /// The value as it is (no value map, no steps towards the target).
    Copy,
    /// The value resolved through another map's links.
    Lookup,
    /// The value through the value map and the target side's steps.
    Transform,
}

impl FieldStep {
    /// The steps of the mappings that write a field of the other side when a record of
    /// `source` is mapped (see `apply::apply_map` for the rules), in map order.
    fn plan(
        map: &TableMap,
        source: Side,
        from: &SideFields,
        to: &SideFields,
        is_key: &[bool],
    ) -> Box<[FieldStep]> {
        let target = source.other();
        let mut steps = Vec::new();
        for (index, fm) in map.fields.iter().enumerate() {
            let Some(slot) = to.position[index] else {
                continue;
            };
            let flows = fm.direction.flows_from(source);
            let (kind, source_position) = match (fm.field(source), from.position[index]) {
                (None, _) if flows && fm.default.is_some() => (StepKind::Constant, 0),
                (Some(_), Some(position)) if flows || is_key[index] => {
                    let steps_to_target = match target {
                        Side::Crm => &fm.to_crm,
                        Side::Erp => &fm.to_erp,
                    };
                    let kind = if fm.lookup.is_some() {
                        StepKind::Lookup
                    } else if fm.value_map.is_none() && steps_to_target.is_empty() {
                        StepKind::Copy
                    } else {
                        StepKind::Transform
                    };
                    (kind, position)
                }
                _ => continue,
            };
            steps.push(FieldStep {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                source: u32::try_from(source_position).unwrap_or(u32::MAX),
                kind,
                is_key: is_key[index],
                has_default: fm.default.is_some(),
            });
        }
        steps.into_boxed_slice()
    }
}

impl TableMap {
    /// The map's plan, computed on first use.
    ///
    /// # Panics
    /// In debug builds, when the map was changed after the plan was computed (see the module
    /// docs): a stale plan would silently hash and map the wrong fields.
    pub(crate) fn plan(&self) -> &MapPlan {
        let plan = self.plan.0.get_or_init(|| MapPlan::new(self));
        debug_assert!(
            *plan == MapPlan::new(self),
            "table map {} was changed after its first use; a TableMap must not be mutated once \
             used: build a new one (or clone it before the change)",
            self.name
        );
        plan
    }
}

/// The mapped fields of one side of a map, prepared for the per-record path.
#[derive(Debug, PartialEq)]
pub(crate) struct SideFields {
    /// [`mapped_fields`]: sorted, deduplicated.
    pub(crate) names: Box<[SmolStr]>,
    /// Per field mapping (by index in `map.fields`), the position of its field of this side
    /// in `names`; `None` for a mapping without a field on this side.
    pub(crate) position: Box<[Option<usize>]>,
    /// [`names_hash`] of `names`.
    pub(crate) names_hash: u128,
    /// Indices in `map.fields` of the mappings with a `lookup` that a record of this side
    /// feeds (flowing from this side, with a field on both sides), in map order.
    pub(crate) lookups: Box<[usize]>,
}

impl SideFields {
    fn new(map: &TableMap, side: Side) -> Self {
        let names: Box<[SmolStr]> = mapped_fields(map, side)
            .into_iter()
            .map(SmolStr::from)
            .collect();
        let position = map
            .fields
            .iter()
            .map(|f| {
                let name = f.field(side)?.name.as_str();
                names.binary_search_by(|n| (**n).cmp(name)).ok()
            })
            .collect();
        let names_hash = names_hash(&names);
        let lookups = map
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                f.lookup.is_some()
                    && f.direction.flows_from(side)
                    && f.field(side).is_some()
                    && f.field(side.other()).is_some()
            })
            .map(|(i, _)| i)
            .collect();
        SideFields {
            names,
            position,
            names_hash,
            lookups,
        }
    }

    /// Hash of `record`'s values of these fields (what `decision::side_hash` returns).
    pub(crate) fn hash(&self, record: &Record) -> FieldsHash {
        hash_sorted_fields(record, &self.names, self.names_hash)
    }
}

/// Where a record keeps the mapped fields of one side of a map: for each of the side's sorted
/// field names, the position of that field in the record's [`crate::Fields`].
///
/// The worker hashes the source record before deciding (echo and staleness are decided from
/// the hash), and the decision then maps the same fields: locating them once serves both, so
/// the map reads the values by position instead of searching the names again. Positions are
/// only meaningful for the record they were taken from, unchanged; a record with another
/// number of fields is located again, and debug builds check every name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideFieldsAt {
    side: Side,
    /// Per name of the side (sorted), its index in the record's fields, or [`ABSENT`].
    positions: Box<[u32]>,
    /// How many fields the record had.
    fields_len: usize,
}

/// [`SideFieldsAt`]'s mark for a name the record does not carry.
const ABSENT: u32 = u32::MAX;

impl SideFieldsAt {
    /// Locates `map`'s mapped fields of `side` in `record` (one walk through its fields).
    pub fn new(map: &TableMap, side: Side, record: &Record) -> Self {
        let names = &map.plan().side(side).names;
        let fields = record.fields.as_slice();
        let mut at = 0usize;
        let positions = names
            .iter()
            .map(|name| {
                while let Some((field, _)) = fields.get(at) {
                    // Usually the record carries exactly the mapped names: two short names
                    // compare equal as a whole (inline `SmolStr`s), without reading their text.
                    if field == name {
                        at += 1;
                        return u32::try_from(at - 1).unwrap_or(ABSENT);
                    }
                    match crate::hash::compare_names(field, name) {
                        std::cmp::Ordering::Less => at += 1,
                        std::cmp::Ordering::Equal => {
                            at += 1;
                            return u32::try_from(at - 1).unwrap_or(ABSENT);
                        }
                        std::cmp::Ordering::Greater => return ABSENT,
                    }
                }
                ABSENT
            })
            .collect();
        SideFieldsAt {
            side,
            positions,
            fields_len: fields.len(),
        }
    }

    /// The side these positions are of.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The hash of `record`'s mapped fields of the side: what `decision::side_hash` returns,
    /// without searching the names.
    pub fn hash(&self, map: &TableMap, record: &Record) -> FieldsHash {
        let side_fields = map.plan().side(self.side);
        if !self.fits(side_fields, record) {
            return side_fields.hash(record);
        }
        let fields = record.fields.as_slice();
        crate::hash::hash_sorted_with(&side_fields.names, side_fields.names_hash, |i, name| {
            value_at(fields, self.positions[i], name)
        })
    }

    /// The value in `record` of the field of mapping `field_index` (by index in `map.fields`)
    /// on this side (`Some(None)` when the record does not carry it); `None` when `record`
    /// cannot be the record these positions were taken from (the caller searches instead).
    pub(crate) fn value_of_mapping<'r>(
        &self,
        map: &TableMap,
        record: &'r Record,
        field_index: usize,
    ) -> Option<Option<&'r Value>> {
        let side_fields = map.plan().side(self.side);
        if !self.fits(side_fields, record) {
            return None;
        }
        let Some(Some(name_position)) = side_fields.position.get(field_index) else {
            return Some(None);
        };
        Some(value_at(
            record.fields.as_slice(),
            self.positions[*name_position],
            &side_fields.names[*name_position],
        ))
    }

    /// True when `record` can be the record these positions were taken from.
    fn fits(&self, side_fields: &SideFields, record: &Record) -> bool {
        record.fields.len() == self.fields_len && side_fields.names.len() == self.positions.len()
    }

    /// `record`'s values of the side's names, by position in the sorted names; `None` when
    /// `record` cannot be the record these positions were taken from (another field count),
    /// so the caller locates the fields itself.
    pub(crate) fn values<'s, 'r>(
        &'s self,
        map: &TableMap,
        record: &'r Record,
    ) -> Option<PositionedValues<'s, 'r>> {
        let side_fields = map.plan().side(self.side);
        self.fits(side_fields, record).then(|| PositionedValues {
            fields: record.fields.as_slice(),
            positions: &self.positions,
        })
    }
}

/// A record's values of one side's names, read by the positions of a [`SideFieldsAt`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct PositionedValues<'s, 'r> {
    fields: &'r [(SmolStr, Value)],
    positions: &'s [u32],
}

impl<'r> PositionedValues<'_, 'r> {
    /// The value of the side's `index`-th name (in sorted order), `None` when absent.
    #[inline]
    pub(crate) fn get(&self, index: usize) -> Option<&'r Value> {
        let at = *self.positions.get(index)?;
        self.fields.get(at as usize).map(|(_, value)| value)
    }
}

/// The value at position `at` of `fields` (the field `name`), `None` for [`ABSENT`].
#[inline]
fn value_at<'r>(fields: &'r [(SmolStr, Value)], at: u32, name: &str) -> Option<&'r Value> {
    let (field, value) = fields.get(at as usize)?;
    debug_assert_eq!(field, name, "SideFieldsAt used with another record");
    let _ = name;
    Some(value)
}

#[cfg(test)]
mod tests {
    use crate::map::validate::load_maps;
    use crate::record::Side;

    const MAP: &str = "\
name: m
description: test
crm: { entity_set: accounts, logical_name: account, primary_id: accountid, key: [accountnumber] }
erp: { entity: Customers, key: [CustomerAccount], company_specific: false }
fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: \"=\" }
  - { erp: Name, crm: name, dir: \"=\" }
  - { erp: Group, crm: groupid, dir: \"=\", crm_type: lookup, lookup: m }
";

    fn map() -> crate::map::TableMap {
        let mut maps = load_maps(&[("m.yaml".into(), MAP.into())]).unwrap_or_else(|d| {
            panic!(
                "{}",
                d.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        maps.remove(0)
    }

    #[test]
    fn the_plan_lists_sorted_fields_positions_keys_and_lookups() {
        let m = map();
        let plan = m.plan();
        let crm: Vec<&str> = plan.side(Side::Crm).names.iter().map(|n| &**n).collect();
        assert_eq!(crm, ["accountnumber", "groupid", "name"]);
        assert_eq!(&*plan.side(Side::Crm).position, [Some(0), Some(2), Some(1)]);
        assert_eq!(&*plan.is_key, [true, false, false]);
        assert_eq!(&*plan.side(Side::Crm).lookups, [2]);
        assert_eq!(&*plan.side(Side::Erp).lookups, [2]);
    }

    #[test]
    fn each_side_lists_the_lookups_it_feeds() {
        const LOOKUPS: &str = "\
name: m
description: test
crm: { entity_set: accounts, logical_name: account, primary_id: accountid, key: [accountnumber] }
erp: { entity: Customers, key: [CustomerAccount], company_specific: false }
fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: \"=\" }
  - { erp: Zone, crm: azoneid, dir: \"=\", crm_type: lookup, lookup: m }
  - { erp: Group, crm: groupid, dir: \">\", crm_type: lookup, lookup: m }
  - { erp: Area, crm: zareaid, dir: \"<\", crm_type: lookup, lookup: m }
";
        let m = load_maps(&[("m.yaml".into(), LOOKUPS.into())])
            .unwrap_or_else(|d| panic!("{d:?}"))
            .remove(0);
        let plan = m.plan();
        // From F&O: Zone and Group (Area flows only to F&O).
        assert_eq!(&*plan.side(Side::Erp).lookups, [1, 2]);
        // From Dataverse: Zone and Area (Group flows only to Dataverse).
        assert_eq!(&*plan.side(Side::Crm).lookups, [1, 3]);
    }

    #[test]
    fn a_clone_starts_without_a_plan_and_equals_its_original() {
        let m = map();
        let _ = m.plan();
        assert_eq!(format!("{:?}", m.plan), "PlanCell(computed)");
        let copy = m.clone();
        assert_eq!(format!("{:?}", copy.plan), "PlanCell(empty)");
        assert_eq!(copy, m);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "table map m was changed after its first use")]
    fn changing_a_used_map_is_caught_in_debug_builds() {
        let mut m = map();
        let _ = m.plan();
        if let Some(crm) = m.fields[1].crm.as_mut() {
            crm.name = "description".into();
        }
        let _ = m.plan();
    }
}
