//! Applying a table map: integration keys and record addresses, mapped field sets, lookups to
//! resolve, and the transform of a source record into the fields to write on the other side.
//!
//! Everything here is pure and allocation-conscious: the engine calls [`apply_map`] once per
//! change (budget: a few microseconds for a 40-field map), so nothing clones the map and values
//! are transformed in place where the step allows it. Decimals never go through floats.

use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use smol_str::{SmolStr, StrExt, ToSmolStr, format_smolstr};

use crate::fields::Fields;
use crate::hash::SortedFields;
use crate::map::plan::{MapPlan, SideFields, SideFieldsAt, StepKind};
use crate::map::{FieldDirection, FieldMapping, TableMap, TransformStep, ValueMap};
use crate::record::{IntegrationKey, Record, RecordKey, Side};
use crate::value::{Value, ValueType};

/// The F&O field that holds the company (legal entity) of a company-specific entity.
pub const ERP_COMPANY_FIELD: &str = "dataAreaId";
/// The Dataverse entity set of companies (what a map's `company_field` looks up).
pub const CRM_COMPANY_ENTITY_SET: &str = "cdm_companies";
/// The alternate-key column of [`CRM_COMPANY_ENTITY_SET`]: the company code (`USMF`).
pub const CRM_COMPANY_CODE_FIELD: &str = "cdm_companycode";

/// Why a record could not be mapped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// A key field is missing or null: the record cannot be linked.
    #[error(
        "map {map}: {side} record {record} has no value for key field {field}; the record cannot \
         be linked until the source fills it"
    )]
    MissingKey {
        map: String,
        side: Side,
        record: String,
        field: String,
    },
    /// A value does not fit the field (wrong type, not in the value map, failed conversion).
    #[error("map {map}, field {field}: {message}")]
    BadValue {
        map: String,
        field: String,
        message: String,
    },
}

/// A lookup the engine must resolve (through the store's links) before [`apply_map`].
///
/// Borrows its candidate map names from the map it was built from (`'m`), so building one
/// copies no name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LookupRequest<'m> {
    /// Index of the field mapping in `map.fields`.
    pub field_index: usize,
    /// Candidate maps, in order (several for a polymorphic lookup).
    pub maps: CandidateMaps<'m>,
    /// What to find: from F&O, the integration key the referenced map's link must have; from
    /// Dataverse, the referenced row's id.
    pub target: LookupTarget,
}

/// The candidate maps of a [`LookupRequest`], in order: the field's `lookup.maps`, borrowed
/// from its map. Reads as a `[String]` (`&request.maps` where a `&[String]` is expected,
/// `for name in &request.maps`, `request.maps.iter()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CandidateMaps<'m>(&'m [String]);

impl<'m> CandidateMaps<'m> {
    /// The candidates `names`, in order.
    pub fn new(names: &'m [String]) -> Self {
        CandidateMaps(names)
    }

    /// The names, with the map's lifetime (longer than a borrow of `self`).
    pub fn as_slice(&self) -> &'m [String] {
        self.0
    }
}

impl std::ops::Deref for CandidateMaps<'_> {
    type Target = [String];

    fn deref(&self) -> &[String] {
        self.0
    }
}

impl<'m> IntoIterator for &CandidateMaps<'m> {
    type Item = &'m String;
    type IntoIter = std::slice::Iter<'m, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'m> IntoIterator for CandidateMaps<'m> {
    type Item = &'m String;
    type IntoIter = std::slice::Iter<'m, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The identity a lookup searches for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LookupTarget {
    /// Find the link whose integration key is this (value came from F&O). The key includes
    /// the record's company when the referenced map is company-specific; the engine tries each
    /// candidate map with the key built for it, so one key per candidate map, in order.
    Keys(LookupKeys),
    /// Find the link whose Dataverse id is this (value came from Dataverse).
    CrmId(String),
}

/// The keys of a [`LookupTarget::Keys`], one per candidate map, in order. Reads as a
/// `[IntegrationKey]`; the usual single key is held without a separate allocation.
#[derive(Clone)]
pub struct LookupKeys(KeysRepr);

#[derive(Clone)]
enum KeysRepr {
    /// One candidate map (the usual lookup): the key inline.
    One([IntegrationKey; 1]),
    /// Any other number of candidates (a polymorphic lookup).
    Many(Vec<IntegrationKey>),
}

impl LookupKeys {
    /// The keys, in candidate order.
    pub fn as_slice(&self) -> &[IntegrationKey] {
        match &self.0 {
            KeysRepr::One(one) => one,
            KeysRepr::Many(many) => many,
        }
    }
}

impl std::ops::Deref for LookupKeys {
    type Target = [IntegrationKey];

    fn deref(&self) -> &[IntegrationKey] {
        self.as_slice()
    }
}

impl std::fmt::Debug for LookupKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl From<Vec<IntegrationKey>> for LookupKeys {
    fn from(keys: Vec<IntegrationKey>) -> Self {
        LookupKeys::from_iter(keys)
    }
}

impl From<IntegrationKey> for LookupKeys {
    fn from(key: IntegrationKey) -> Self {
        LookupKeys(KeysRepr::One([key]))
    }
}

impl FromIterator<IntegrationKey> for LookupKeys {
    /// One key is kept inline, whatever the iterator's size hint; more go to a vector.
    fn from_iter<I: IntoIterator<Item = IntegrationKey>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        let Some(first) = iter.next() else {
            return LookupKeys(KeysRepr::Many(Vec::new()));
        };
        match iter.next() {
            None => LookupKeys(KeysRepr::One([first])),
            Some(second) => {
                let mut many = Vec::with_capacity(2 + iter.size_hint().0);
                many.push(first);
                many.push(second);
                many.extend(iter);
                LookupKeys(KeysRepr::Many(many))
            }
        }
    }
}

impl<'a> IntoIterator for &'a LookupKeys {
    type Item = &'a IntegrationKey;
    type IntoIter = std::slice::Iter<'a, IntegrationKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl PartialEq for LookupKeys {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for LookupKeys {}

impl std::hash::Hash for LookupKeys {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq<Vec<IntegrationKey>> for LookupKeys {
    fn eq(&self, other: &Vec<IntegrationKey>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// The engine's answer to a [`LookupRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum LookupResolution {
    /// The value to write on the target side: a [`Value::Lookup`] to Dataverse, or the F&O
    /// natural key as [`Value::Text`].
    Resolved(Value),
    /// The referenced record is not linked yet: the change must wait for it (map, key).
    Missing { map: String, key: IntegrationKey },
}

/// Resolutions by field index (index of the field mapping in `map.fields`).
///
/// A map has a handful of lookups, so this is a small vector searched from the end (a later
/// [`ResolvedLookups::insert`] of an index replaces the earlier one), not a hash map.
#[derive(Debug, Clone, Default)]
pub struct ResolvedLookups {
    entries: Vec<(usize, LookupResolution)>,
}

impl ResolvedLookups {
    /// No resolutions.
    pub fn new() -> Self {
        ResolvedLookups::default()
    }

    /// No resolutions, with room for `capacity` of them.
    pub fn with_capacity(capacity: usize) -> Self {
        ResolvedLookups {
            entries: Vec::with_capacity(capacity),
        }
    }

    /// Records the resolution of field mapping `field_index`; returns the one it replaces.
    pub fn insert(
        &mut self,
        field_index: usize,
        resolution: LookupResolution,
    ) -> Option<LookupResolution> {
        match self.entries.iter_mut().find(|(i, _)| *i == field_index) {
            Some((_, slot)) => Some(std::mem::replace(slot, resolution)),
            None => {
                self.entries.push((field_index, resolution));
                None
            }
        }
    }

    /// The resolution of field mapping `field_index`.
    pub fn get(&self, field_index: usize) -> Option<&LookupResolution> {
        self.entries
            .iter()
            .find(|(i, _)| *i == field_index)
            .map(|(_, r)| r)
    }

    /// The resolutions with their field indices, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &LookupResolution)> {
        self.entries.iter().map(|(i, r)| (*i, r))
    }

    /// How many fields are resolved.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no field is resolved.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<(usize, LookupResolution)> for ResolvedLookups {
    fn from_iter<I: IntoIterator<Item = (usize, LookupResolution)>>(iter: I) -> Self {
        let mut out = ResolvedLookups::new();
        out.extend(iter);
        out
    }
}

impl Extend<(usize, LookupResolution)> for ResolvedLookups {
    fn extend<I: IntoIterator<Item = (usize, LookupResolution)>>(&mut self, iter: I) {
        for (index, resolution) in iter {
            self.insert(index, resolution);
        }
    }
}

/// The integration key of a record of `side`.
///
/// The company (upper-cased) comes first when the map is company-specific, then one part per
/// F&O natural-key field in `map.erp.key` order. From F&O the part is the field's value; from
/// Dataverse it is the value of the column mapped to that F&O field, translated the F&O way
/// (value map, then `to_erp` steps) when the key field carries a transform, so both records
/// of one pair yield the same key. Values render with [`Value`]'s `Display`.
///
/// The company is `record.company`; when that is empty it is read from the record itself
/// (`dataAreaId` on F&O, the `company_field` lookup's `cdm_companycode` on Dataverse).
///
/// # Errors
/// [`ApplyError::MissingKey`] when the company or a key value is missing, null or empty;
/// [`ApplyError::BadValue`] when a transformed key value cannot be translated.
pub fn integration_key(
    map: &TableMap,
    side: Side,
    record: &Record,
) -> Result<IntegrationKey, ApplyError> {
    let company = if map.erp.company_specific {
        match record_company(map, side, record) {
            Some(company) => Some(company),
            None => {
                return Err(missing_key(
                    map,
                    side,
                    record,
                    company_field_name(map, side),
                ));
            }
        }
    } else {
        None
    };
    let mut parts: Vec<String> = Vec::with_capacity(map.erp.key.len());
    for erp_name in &map.erp.key {
        parts.push(key_part(map, side, record, erp_name)?);
    }
    Ok(IntegrationKey::from_parts(
        company,
        parts.iter().map(String::as_str),
    ))
}

/// How to address the record of `side` with integration key `key` (alternate key incl.
/// company for Dataverse: `accountnumber='A1',msdyn_company=...`; `dataAreaId` + natural key
/// for F&O).
///
/// F&O: `[("dataAreaId", company in lower case), (natural-key field, value)…]`. Dataverse:
/// `[(alternate-key column, value)…, (company_field, company code)]`; a key column whose
/// field carries a value map or `to_crm` steps gets the translated value (the untranslated
/// text when the translation fails). The inverse of [`integration_key`]. A key with fewer
/// parts than the map expects (never produced by [`integration_key`]) leaves the missing
/// values empty.
pub fn record_key(map: &TableMap, side: Side, key: &IntegrationKey) -> RecordKey {
    let mut parts = split_key(key.as_str()).into_iter();
    let company = if map.erp.company_specific {
        Some(parts.next().unwrap_or_default())
    } else {
        None
    };
    let values: Vec<String> = parts.collect();
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(map.erp.key.len() + 1);
    match side {
        Side::Erp => {
            if let Some(company) = company {
                pairs.push((ERP_COMPANY_FIELD.to_owned(), company.to_lowercase()));
            }
            for (i, name) in map.erp.key.iter().enumerate() {
                pairs.push((name.clone(), values.get(i).cloned().unwrap_or_default()));
            }
        }
        Side::Crm => {
            for crm_name in &map.crm.key {
                pairs.push((crm_name.clone(), crm_key_value(map, crm_name, &values)));
            }
            if let (Some(company), Some(field)) = (company, &map.crm.company_field) {
                pairs.push((field.clone(), company));
            }
        }
    }
    RecordKey(pairs)
}

/// The fields of `side` that the map reads or writes (what [`crate::hash`] hashes).
///
/// Every field of that side named by a mapping, whatever its direction, sorted and
/// deduplicated. The company column is not included: it is part of the key, not of the data.
pub fn mapped_fields(map: &TableMap, side: Side) -> Vec<&str> {
    let mut names: Vec<&str> = map
        .fields
        .iter()
        .filter_map(|f| f.field(side))
        .map(|f| f.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The lookups to resolve before mapping `record` (from `source`) to the other side.
///
/// Knows only `map`, so an F&O natural key gets the record's company whenever the record has
/// one; use [`lookup_requests_with`] to build each candidate's key by its own map (company
/// only for company-specific referenced maps), which is what the engine should call.
pub fn lookup_requests<'m>(
    map: &'m TableMap,
    source: Side,
    record: &Record,
) -> Vec<LookupRequest<'m>> {
    lookup_requests_with(map, source, record, |_| None)
}

/// The lookups to resolve before mapping `record` (from `source`) to the other side, with
/// `find_map` giving the referenced maps by name.
///
/// One request per field with a `lookup` that flows from `source`, has a target field, and
/// whose source value is present and not null, in map order:
/// - an F&O value (the referenced record's natural key text) → [`LookupTarget::Keys`], one
///   key per candidate map: the record's company (when that map is company-specific, or, for
///   a map `find_map` does not know, when the record has a company) and the value;
/// - a Dataverse [`Value::Lookup`] with an id → [`LookupTarget::CrmId`]; with only an
///   alternate key → [`LookupTarget::Keys`] built from the key's values in the referenced
///   map's key order (all the key's values in order for a map `find_map` does not know).
///
/// A lookup carrying neither id nor key yields no request (so [`apply_map`] reports it as
/// unresolved). Key transforms of the referenced map are not applied. The requests borrow
/// their candidate map names from `map`.
pub fn lookup_requests_with<'m, 'f>(
    map: &'m TableMap,
    source: Side,
    record: &Record,
    find_map: impl Fn(&str) -> Option<&'f TableMap>,
) -> Vec<LookupRequest<'m>> {
    lookup_requests_at(map, source, record, None, find_map)
}

/// [`lookup_requests_with`], reading the lookup fields at the positions `located` took of
/// them (see [`SideFieldsAt`]) instead of searching the record, when it has them.
pub fn lookup_requests_at<'m, 'f>(
    map: &'m TableMap,
    source: Side,
    record: &Record,
    located: Option<&SideFieldsAt>,
    find_map: impl Fn(&str) -> Option<&'f TableMap>,
) -> Vec<LookupRequest<'m>> {
    let located = located.filter(|at| at.side() == source);
    // The plan lists the lookups this side feeds (direction and target field checked once).
    // A search per lookup, not a walk through the record: a map has a few lookups among
    // dozens of fields, and a walk to the last of them cost more (measured).
    let lookup_fields = &map.plan().side(source).lookups;
    let mut requests = Vec::with_capacity(lookup_fields.len());
    let company = record.company.as_deref().filter(|c| !c.is_empty());
    for &field_index in lookup_fields.iter() {
        let fm = &map.fields[field_index];
        let (Some(spec), Some(src)) = (&fm.lookup, fm.field(source)) else {
            continue;
        };
        let value = match located.and_then(|at| at.value_of_mapping(map, record, field_index)) {
            Some(value) => value,
            None => record.get(&src.name),
        };
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            continue;
        };
        let target = match value {
            Value::Lookup(reference) => match (&reference.id, &reference.key) {
                (Some(id), _) => LookupTarget::CrmId(id.clone()),
                (None, Some(key)) => LookupTarget::Keys(
                    spec.maps
                        .iter()
                        .map(|name| key_from_crm_ref(find_map(name), key, company))
                        .collect(),
                ),
                (None, None) => continue,
            },
            other => {
                // Text and enum values render as themselves: no formatting on the hot path.
                let text = other
                    .as_str()
                    .map_or_else(|| std::borrow::Cow::Owned(other.to_string()), Into::into);
                LookupTarget::Keys(
                    spec.maps
                        .iter()
                        .map(|name| {
                            // Without a company the key is the same either way: no map search.
                            let company = company
                                .filter(|_| find_map(name).is_none_or(|m| m.erp.company_specific));
                            IntegrationKey::from_parts(company, [&*text])
                        })
                        .collect(),
                )
            }
        };
        requests.push(LookupRequest {
            field_index,
            maps: CandidateMaps::new(&spec.maps),
            target,
        });
    }
    requests
}

/// Maps a record of `source` to the fields to write on the other side: fields flowing from
/// `source`, transformed; constants for the target; resolved lookups. Includes the target's
/// key fields and company.
///
/// The result is a record of the target entity with `company` = the source's company and no
/// id. For each field mapping with a target field:
/// - a field flowing from `source` whose source field is present in `record` is written:
///   value map (source value → target value; null passes through), then the target side's
///   steps (`to_crm`/`to_erp`) in order, then `default` when the result is null. A source
///   field absent from `record` is not written (partial update);
/// - a lookup field takes the [`LookupResolution::Resolved`] value from `lookups` (null
///   source values pass through);
/// - a field with no source-side field but a `default` (a constant) is written whenever the
///   field flows from `source`;
/// - key fields are written whatever their direction, whenever `record` carries them.
///
/// The company column is not written as a field: writers address the record with
/// [`record_key`] and take the company from `company`.
///
/// # Errors
/// [`ApplyError::BadValue`] for a value not in the value map (the message lists the allowed
/// values), a failed conversion or text step, or a lookup that is not resolved;
/// [`ApplyError::MissingKey`] when a key field is null.
pub fn apply_map(
    map: &TableMap,
    source: Side,
    record: &Record,
    lookups: &ResolvedLookups,
) -> Result<Record, ApplyError> {
    let plan = map.plan();
    with_slots(|slots| {
        fill_slots(map, plan, source, record, None, lookups, slots)?;
        Ok(slots_to_record(map, source.other(), record, plan, slots))
    })
}

/// Runs `f` with the per-thread slot buffer (one slot per target field), emptied after.
pub(crate) fn with_slots<T>(f: impl FnOnce(&mut Vec<Option<Value>>) -> T) -> T {
    let mut slots = SLOTS.take();
    let out = f(&mut slots);
    slots.clear();
    SLOTS.set(slots);
    out
}

thread_local! {
    /// [`with_slots`]' buffer, kept between calls (emptied after each).
    static SLOTS: std::cell::Cell<Vec<Option<Value>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The record [`apply_map`] returns, from the slots [`fill_slots`] filled: a record of the
/// `target` entity with the source record's company and the filled slots as fields. Takes the
/// values out of the slots.
///
/// The slots are in name order, so the record's fields are built in that order, with no sort.
pub(crate) fn slots_to_record(
    map: &TableMap,
    target: Side,
    source_record: &Record,
    plan: &MapPlan,
    slots: &mut [Option<Value>],
) -> Record {
    let entity = match target {
        Side::Crm => &map.crm.entity_set,
        Side::Erp => &map.erp.entity,
    };
    let mut out = Record::new(entity.as_str());
    out.company = source_record.company.clone();
    let target_fields = plan.side(target);
    let mut pairs = Vec::with_capacity(slots.len());
    for (name, slot) in target_fields.names.iter().zip(slots.iter_mut()) {
        if let Some(value) = slot.take() {
            pairs.push((name.clone(), value));
        }
    }
    // The slots are in name order, without repeats: the fields are built as they are.
    out.fields = Fields::from_sorted(pairs);
    out
}

/// Computes [`apply_map`]'s values into `slots` (cleared, then one per target field, by
/// position in the target side's sorted names).
///
/// The source record is read at the positions `located` took of it, or else in one pass in name
/// order (not one search per field).
/// Values are computed in field-mapping order, so the first error is the first bad field, and
/// a later mapping of the same target field wins.
pub(crate) fn fill_slots(
    map: &TableMap,
    plan: &MapPlan,
    source: Side,
    record: &Record,
    located: Option<&SideFieldsAt>,
    lookups: &ResolvedLookups,
    slots: &mut Vec<Option<Value>>,
) -> Result<(), ApplyError> {
    let source_fields: &SideFields = plan.side(source);
    let target_fields: &SideFields = plan.side(source.other());
    // The source values by position in the source side's names: read at the positions the
    // caller located, or found here in one walk.
    let positioned = located
        .filter(|at| at.side() == source)
        .and_then(|at| at.values(map, record));
    let searched: Vec<Option<&Value>> = match positioned {
        Some(_) => Vec::new(),
        None => {
            let mut reader = SortedFields::new(record);
            source_fields
                .names
                .iter()
                .map(|name| reader.seek(name))
                .collect()
        }
    };
    let source_value = |index: usize| match &positioned {
        Some(values) => values.get(index),
        None => searched.get(index).copied().flatten(),
    };
    slots.clear();
    slots.resize_with(target_fields.names.len(), || None);
    for step in plan.steps_from(source) {
        let index = step.index as usize;
        let fm = &map.fields[index];
        let value = if step.kind == StepKind::Constant {
            match &fm.default {
                Some(constant) => constant.clone(),
                None => continue,
            }
        } else {
            let Some(raw) = source_value(step.source as usize) else {
                continue;
            };
            let mut value = match step.kind {
                // Most fields: the value as it is, no translation to run.
                StepKind::Copy | StepKind::Constant => raw.clone(),
                StepKind::Lookup => resolve_lookup(map, fm, index, raw, lookups)?,
                StepKind::Transform => transform_value(map, fm, source, raw.clone())?,
            };
            if step.has_default
                && value.is_empty()
                && let Some(default) = &fm.default
            {
                value = default.clone();
            }
            if step.is_key && value.is_empty() {
                let name = fm.field(source).map_or("", |f| f.name.as_str());
                return Err(missing_key(map, source, record, name));
            }
            value
        };
        slots[step.slot as usize] = Some(value);
    }
    Ok(())
}

/// Keeps in `slots` (filled by [`fill_slots`] from `source`) the target's current value of
/// each two-way field whose steps back towards `source` already turn it into the source's
/// value. Such steps can lose information — a `truncate`, a case change, a `replace` — so the
/// target may hold more than the source shows (a 4,000-character memo shown cut to 2,000 in
/// the CRM): writing the source's value back over it, because another field changed, would
/// cut the target's. A field whose source value differs is written as usual.
pub(crate) fn keep_round_trip_equivalents(
    map: &TableMap,
    plan: &MapPlan,
    source: Side,
    record: &Record,
    target_current: &Record,
    slots: &mut [Option<Value>],
) {
    let target = source.other();
    for step in plan.steps_from(source) {
        let fm = &map.fields[step.index as usize];
        if !matches!(step.kind, StepKind::Copy | StepKind::Transform)
            || fm.direction != FieldDirection::Bidirectional
            || steps_to(fm, source).is_empty()
        {
            continue;
        }
        let (Some(from), Some(to)) = (fm.field(source), fm.field(target)) else {
            continue;
        };
        let (Some(current), Some(source_value)) = (
            target_current.get(to.name.as_str()),
            record.get(from.name.as_str()),
        ) else {
            continue;
        };
        if step.has_default && source_value.is_empty() {
            // The slot holds the mapping's default, which is what goes across for no value.
            continue;
        }
        let Ok(back) = transform_value(map, fm, target, current.clone()) else {
            continue;
        };
        if crate::hash::same_value(&back, source_value) {
            slots[step.slot as usize] = Some(current.clone());
        }
    }
}

/// Translates one value of `fm` from `source` to the other side: value map, then the target
/// side's steps. Null passes through the value map; no default is applied here.
///
/// # Errors
/// [`ApplyError::BadValue`] naming the field when the value is not in the value map or a step
/// fails.
pub fn transform_value(
    map: &TableMap,
    fm: &FieldMapping,
    source: Side,
    value: Value,
) -> Result<Value, ApplyError> {
    // Empty text is no value (`Value::is_empty`): it crosses as null, whatever the steps (a
    // prefix would make text of it, a conversion to a number would fail on it).
    let value = if value.is_empty() { Value::Null } else { value };
    let mut value = match &fm.value_map {
        Some(value_map) if !value.is_empty() => map_value(map, fm, value_map, source, &value)?,
        _ => value,
    };
    for step in steps_to(fm, source.other()) {
        value = apply_step(step, value).map_err(|message| bad_value(map, fm, message))?;
    }
    Ok(value)
}

/// The steps of `fm` applied on the way to `target`.
fn steps_to(fm: &FieldMapping, target: Side) -> &[TransformStep] {
    match target {
        Side::Crm => &fm.to_crm,
        Side::Erp => &fm.to_erp,
    }
}

/// Applies one transform step to a value. Null passes through every step.
///
/// # Errors
/// A sentence saying why the step does not apply: a text step on a non-text value, or a
/// conversion that fails (naming the value and the target type).
pub fn apply_step(step: &TransformStep, value: Value) -> Result<Value, String> {
    match step {
        TransformStep::Trim => text_step(step, value, |s| {
            let trimmed = s.trim();
            if trimmed.len() == s.len() {
                s
            } else {
                trimmed.into()
            }
        }),
        TransformStep::Upper => text_step(step, value, |s| s.to_uppercase_smolstr()),
        TransformStep::Lower => text_step(step, value, |s| s.to_lowercase_smolstr()),
        TransformStep::Truncate(max) => {
            text_step(step, value, |s| match s.char_indices().nth(*max) {
                Some((cut, _)) => SmolStr::new(&s[..cut]),
                None => s,
            })
        }
        TransformStep::Prefix(prefix) => text_step(step, value, |s| format_smolstr!("{prefix}{s}")),
        TransformStep::StripPrefix(prefix) => {
            text_step(step, value, |s| match s.strip_prefix(prefix.as_str()) {
                Some(rest) if !prefix.is_empty() => SmolStr::new(rest),
                _ => s,
            })
        }
        TransformStep::Replace { from, to } => text_step(step, value, |s| {
            if from.is_empty() || !s.contains(from.as_str()) {
                s
            } else {
                s.replace(from.as_str(), to).into()
            }
        }),
        TransformStep::Convert(ty) => convert(value, *ty),
    }
}

/// Converts a value to `ty`: text ↔ integer/decimal/boolean/date/datetime/choice/enum,
/// integer ↔ decimal (decimal → integer only when integral), choice ↔ integer, enum ↔ text,
/// boolean ↔ integer (0/1), boolean ↔ enum (`No`/`Yes`), date ↔ datetime (midnight UTC; the
/// date in the value's own offset). Null and values already of `ty` pass through. Text is
/// trimmed before parsing; decimals parse exactly (never through floats).
///
/// # Errors
/// A sentence naming the value, its type and `ty` when the conversion is not supported or
/// the value does not convert.
pub fn convert(value: Value, ty: ValueType) -> Result<Value, String> {
    let Some(from) = value.value_type() else {
        return Ok(value);
    };
    if from == ty {
        return Ok(value);
    }
    let converted = match (&value, ty) {
        (Value::Text(s), _) => text_to(s, ty),
        (Value::Enum(s), ValueType::Text) => Some(Value::Text(s.clone())),
        (Value::Enum(s), ValueType::Boolean) => parse_bool(s),
        (Value::Integer(i) | Value::Choice(i), ValueType::Text) => {
            Some(Value::Text(i.to_smolstr()))
        }
        (Value::Integer(i), ValueType::Decimal) => Some(Value::Decimal(Decimal::from(*i))),
        (Value::Integer(i), ValueType::Choice) => Some(Value::Choice(*i)),
        (Value::Choice(i), ValueType::Integer) => Some(Value::Integer(*i)),
        (Value::Integer(i), ValueType::Boolean) => match i {
            0 => Some(Value::Boolean(false)),
            1 => Some(Value::Boolean(true)),
            _ => None,
        },
        (Value::Decimal(d), ValueType::Text) => Some(Value::Text(d.normalize().to_smolstr())),
        (Value::Decimal(d), ValueType::Integer) if d.fract().is_zero() => {
            d.to_i64().map(Value::Integer)
        }
        (Value::Boolean(b), ValueType::Text) => Some(Value::Text(b.to_smolstr())),
        (Value::Boolean(b), ValueType::Integer) => Some(Value::Integer(i64::from(*b))),
        (Value::Boolean(b), ValueType::Enum) => Some(Value::Enum(SmolStr::new_static(if *b {
            "Yes"
        } else {
            "No"
        }))),
        (Value::Date(d), ValueType::Text) => {
            Some(Value::Text(format_smolstr!("{}", d.format("%Y-%m-%d"))))
        }
        (Value::Date(d), ValueType::DateTime) => d
            .and_hms_opt(0, 0, 0)
            .map(|t| Value::DateTime(t.and_utc().fixed_offset())),
        (Value::DateTime(t), ValueType::Text) => Some(Value::Text(t.to_rfc3339().into())),
        (Value::DateTime(t), ValueType::Date) => Some(Value::Date(t.date_naive())),
        _ => None,
    };
    converted.ok_or_else(|| format!("cannot convert the {from} value '{value}' to {ty}"))
}

fn text_to(s: &str, ty: ValueType) -> Option<Value> {
    let t = s.trim();
    match ty {
        ValueType::Text => Some(Value::Text(s.into())),
        ValueType::Integer => t.parse().ok().map(Value::Integer),
        ValueType::Choice => t.parse().ok().map(Value::Choice),
        ValueType::Decimal => Decimal::from_str_exact(t).ok().map(Value::Decimal),
        ValueType::Boolean => parse_bool(t),
        ValueType::Date => NaiveDate::from_str(t).ok().map(Value::Date),
        ValueType::DateTime => parse_datetime(t).map(Value::DateTime),
        ValueType::Enum => (!t.is_empty()).then(|| Value::Enum(t.into())),
        ValueType::Lookup => None,
    }
}

fn parse_bool(s: &str) -> Option<Value> {
    const TRUE: [&str; 3] = ["true", "yes", "1"];
    const FALSE: [&str; 3] = ["false", "no", "0"];
    let s = s.trim();
    if TRUE.iter().any(|t| t.eq_ignore_ascii_case(s)) {
        Some(Value::Boolean(true))
    } else if FALSE.iter().any(|f| f.eq_ignore_ascii_case(s)) {
        Some(Value::Boolean(false))
    } else {
        None
    }
}

/// RFC 3339, or an ISO date-time without offset read as UTC.
fn parse_datetime(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s).ok().or_else(|| {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .ok()
            .map(|t| t.and_utc().fixed_offset())
    })
}

fn step_name(step: &TransformStep) -> &'static str {
    match step {
        TransformStep::Trim => "trim",
        TransformStep::Upper => "upper",
        TransformStep::Lower => "lower",
        TransformStep::Truncate(_) => "truncate",
        TransformStep::Prefix(_) => "prefix",
        TransformStep::StripPrefix(_) => "strip_prefix",
        TransformStep::Replace { .. } => "replace",
        TransformStep::Convert(_) => "convert",
    }
}

fn text_step(
    step: &TransformStep,
    value: Value,
    f: impl FnOnce(SmolStr) -> SmolStr,
) -> Result<Value, String> {
    match value {
        Value::Null => Ok(Value::Null),
        Value::Text(s) => Ok(Value::Text(f(s))),
        Value::Enum(s) => Ok(Value::Enum(f(s))),
        other => Err(format!(
            "step {} applies to text, but the value '{other}' is {}; add a {{convert: text}} step \
             before it",
            step_name(step),
            other
                .value_type()
                .map(|t| t.to_string())
                .unwrap_or_default(),
        )),
    }
}

/// True when two values are the same entry of a value map: enum symbols compare without
/// case (and against text), integers against choices by number, decimals by value.
fn values_match(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Enum(x), Value::Enum(y) | Value::Text(y)) | (Value::Text(x), Value::Enum(y)) => {
            x.eq_ignore_ascii_case(y)
        }
        (Value::Integer(x) | Value::Choice(x), Value::Integer(y) | Value::Choice(y)) => x == y,
        _ => a == b,
    }
}

fn map_value(
    map: &TableMap,
    fm: &FieldMapping,
    value_map: &ValueMap,
    source: Side,
    value: &Value,
) -> Result<Value, ApplyError> {
    let found = value_map.pairs.iter().find_map(|(erp, crm)| match source {
        Side::Erp => values_match(erp, value).then_some(crm),
        Side::Crm => values_match(crm, value).then_some(erp),
    });
    match found {
        Some(mapped) => Ok(mapped.clone()),
        None => {
            let allowed: Vec<String> = value_map
                .pairs
                .iter()
                .map(|(erp, crm)| match source {
                    Side::Erp => erp.to_string(),
                    Side::Crm => crm.to_string(),
                })
                .collect();
            Err(bad_value(
                map,
                fm,
                format!(
                    "the {source} value '{value}' is not in the value map; allowed values: {}. \
                     Add it to the field's value_map or fix the source record",
                    allowed.join(", ")
                ),
            ))
        }
    }
}

fn resolve_lookup(
    map: &TableMap,
    fm: &FieldMapping,
    index: usize,
    raw: &Value,
    lookups: &ResolvedLookups,
) -> Result<Value, ApplyError> {
    if raw.is_empty() {
        return Ok(Value::Null);
    }
    match lookups.get(index) {
        Some(LookupResolution::Resolved(value)) => Ok(value.clone()),
        Some(LookupResolution::Missing {
            map: referenced,
            key,
        }) => Err(bad_value(
            map,
            fm,
            format!(
                "the lookup '{raw}' is unresolved: map {referenced} has no link for key {key}; \
                 sync that record first"
            ),
        )),
        None => Err(bad_value(
            map,
            fm,
            format!(
                "the lookup '{raw}' is unresolved: resolve the requests of lookup_requests \
                 before calling apply_map"
            ),
        )),
    }
}

fn bad_value(map: &TableMap, fm: &FieldMapping, message: String) -> ApplyError {
    ApplyError::BadValue {
        map: map.name.clone(),
        field: fm.label(),
        message,
    }
}

fn missing_key(map: &TableMap, side: Side, record: &Record, field: &str) -> ApplyError {
    let record = match &record.id {
        Some(id) => id.to_string(),
        None => format!("{} (no id)", record.entity),
    };
    ApplyError::MissingKey {
        map: map.name.clone(),
        side,
        record,
        field: field.to_owned(),
    }
}

fn company_field_name(map: &TableMap, side: Side) -> &str {
    match side {
        Side::Erp => ERP_COMPANY_FIELD,
        Side::Crm => map.crm.company_field.as_deref().unwrap_or("company"),
    }
}

/// The record's company: `record.company`, else read from the record's own company field.
fn record_company<'r>(map: &TableMap, side: Side, record: &'r Record) -> Option<&'r str> {
    if let Some(company) = record.company.as_deref().filter(|c| !c.is_empty()) {
        return Some(company);
    }
    let value = match side {
        Side::Erp => record.get(ERP_COMPANY_FIELD)?,
        Side::Crm => record.get(map.crm.company_field.as_deref()?)?,
    };
    let company = match value {
        Value::Text(s) | Value::Enum(s) => Some(s.as_str()),
        Value::Lookup(reference) => reference.key.as_ref()?.get(CRM_COMPANY_CODE_FIELD),
        _ => None,
    };
    company.filter(|c| !c.is_empty())
}

/// The mapping of the F&O key field `erp_name`.
fn key_mapping<'m>(map: &'m TableMap, erp_name: &str) -> Option<&'m FieldMapping> {
    map.fields
        .iter()
        .find(|f| f.erp.as_ref().is_some_and(|e| e.name == erp_name))
}

pub(crate) fn is_key_field(map: &TableMap, fm: &FieldMapping) -> bool {
    fm.is_key
        || fm
            .erp
            .as_ref()
            .is_some_and(|e| map.erp.key.contains(&e.name))
        || fm
            .crm
            .as_ref()
            .is_some_and(|c| map.crm.key.contains(&c.name))
}

/// One part of the integration key: the value of F&O key field `erp_name`, read on `side`.
fn key_part(
    map: &TableMap,
    side: Side,
    record: &Record,
    erp_name: &str,
) -> Result<String, ApplyError> {
    let fm = key_mapping(map, erp_name);
    let (field, raw) = match side {
        Side::Erp => (erp_name, record.get(erp_name)),
        Side::Crm => match fm.and_then(|f| f.crm.as_ref()) {
            Some(crm) => (crm.name.as_str(), record.get(&crm.name)),
            None => return Err(missing_key(map, side, record, erp_name)),
        },
    };
    let Some(value) = raw.filter(|v| !v.is_empty()) else {
        return Err(missing_key(map, side, record, field));
    };
    let text = match (side, fm, value) {
        // A key that is a lookup (a parent reference, e.g. an order line's order): the part
        // is the referenced row's alternate-key value, which the connector must supply.
        (_, _, Value::Lookup(reference)) => {
            match reference.key.as_ref().and_then(|k| k.0.first()) {
                Some((_, key_value)) => key_value.clone(),
                None => {
                    return Err(ApplyError::BadValue {
                        map: map.name.clone(),
                        field: field.to_owned(),
                        message: format!(
                            "the key lookup '{value}' carries only an id; read the record with the \
                         referenced row's alternate key so the link key can be built"
                        ),
                    });
                }
            }
        }
        (Side::Crm, Some(fm), _) if fm.value_map.is_some() || !fm.to_erp.is_empty() => {
            let translated = transform_value(map, fm, Side::Crm, value.clone())?;
            if translated.is_empty() {
                return Err(missing_key(map, side, record, field));
            }
            translated.to_string()
        }
        _ => value.to_string(),
    };
    if text.is_empty() {
        return Err(missing_key(map, side, record, field));
    }
    Ok(text)
}

/// The Dataverse value of alternate-key column `crm_name`, from the key parts in F&O order.
fn crm_key_value(map: &TableMap, crm_name: &str, parts: &[String]) -> String {
    let Some(fm) = map
        .fields
        .iter()
        .find(|f| f.crm.as_ref().is_some_and(|c| c.name == crm_name))
    else {
        return String::new();
    };
    let Some(erp) = &fm.erp else {
        return String::new();
    };
    let Some(part) = map
        .erp
        .key
        .iter()
        .position(|k| *k == erp.name)
        .and_then(|i| parts.get(i))
    else {
        return String::new();
    };
    if fm.value_map.is_none() && fm.to_crm.is_empty() {
        return part.clone();
    }
    let typed = text_to(part, erp.ty).unwrap_or_else(|| Value::Text(part.as_str().into()));
    match transform_value(map, fm, Side::Erp, typed) {
        Ok(value) if !value.is_empty() => value.to_string(),
        _ => part.clone(),
    }
}

/// Splits an integration key into its unescaped parts (inverse of `IntegrationKey::from_parts`).
fn split_key(key: &str) -> Vec<String> {
    let mut parts = Vec::with_capacity(2);
    let mut current = String::with_capacity(key.len());
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    current.push(escaped);
                }
            }
            '/' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
}

/// The integration key a Dataverse alternate-key reference points at, for referenced map
/// `referenced` (or, unknown, all the key's values in order).
fn key_from_crm_ref(
    referenced: Option<&TableMap>,
    key: &RecordKey,
    company: Option<&str>,
) -> IntegrationKey {
    match referenced {
        Some(m) => {
            let company = if m.erp.company_specific {
                company.or_else(|| m.crm.company_field.as_deref().and_then(|f| key.get(f)))
            } else {
                None
            };
            let values = m.erp.key.iter().map(|erp_name| {
                key_mapping(m, erp_name)
                    .and_then(|fm| fm.crm.as_ref())
                    .and_then(|crm| key.get(&crm.name))
                    .unwrap_or("")
            });
            IntegrationKey::from_parts(company, values)
        }
        None => IntegrationKey::from_parts(company, key.0.iter().map(|(_, v)| v.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{
        ConflictPolicy, CrmEntity, DeletePolicy, ErpEntity, FieldDirection, FieldRef, LookupSpec,
        MapDirection, SideFilters,
    };
    use crate::value::LookupRef;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn dec(s: &str) -> Value {
        Value::Decimal(Decimal::from_str_exact(s).unwrap())
    }

    fn side_ref(name: Option<&str>, ty: ValueType) -> Option<FieldRef> {
        name.map(|n| FieldRef {
            name: n.to_owned(),
            ty,
        })
    }

    /// A field mapping with the same type on both sides and nothing else set.
    fn field(erp: Option<&str>, crm: Option<&str>, direction: FieldDirection) -> FieldMapping {
        typed_field(erp, ValueType::Text, crm, ValueType::Text, direction)
    }

    fn typed_field(
        erp: Option<&str>,
        erp_ty: ValueType,
        crm: Option<&str>,
        crm_ty: ValueType,
        direction: FieldDirection,
    ) -> FieldMapping {
        let notation = match direction {
            FieldDirection::Bidirectional => "=",
            FieldDirection::ErpToCrm => ">",
            FieldDirection::CrmToErp => "<",
        };
        FieldMapping {
            erp: side_ref(erp, erp_ty),
            crm: side_ref(crm, crm_ty),
            direction,
            notation: notation.to_owned(),
            is_key: false,
            value_map: None,
            default: None,
            lookup: None,
            to_crm: Vec::new(),
            to_erp: Vec::new(),
            source_of_truth: None,
            line: 1,
        }
    }

    fn key_field(erp: &str, crm: &str) -> FieldMapping {
        FieldMapping {
            is_key: true,
            ..field(Some(erp), Some(crm), FieldDirection::Bidirectional)
        }
    }

    fn table_map(
        name: &str,
        erp: (&str, &[&str], bool),
        crm: (&str, &[&str], Option<&str>),
        fields: Vec<FieldMapping>,
    ) -> TableMap {
        TableMap {
            name: name.to_owned(),
            description: String::new(),
            source: "test".to_owned(),
            crm: CrmEntity {
                entity_set: crm.0.to_owned(),
                logical_name: crm.0.trim_end_matches('s').to_owned(),
                primary_id: format!("{}id", crm.0.trim_end_matches('s')),
                key: crm.1.iter().map(|s| (*s).to_owned()).collect(),
                company_field: crm.2.map(str::to_owned),
            },
            erp: ErpEntity {
                entity: erp.0.to_owned(),
                key: erp.1.iter().map(|s| (*s).to_owned()).collect(),
                company_specific: erp.2,
                physical_name: None,
            },
            direction: MapDirection::Bidirectional,
            fields,
            filters: SideFilters::default(),
            depends_on: Vec::new(),
            conflict: ConflictPolicy::default(),
            delete: DeletePolicy::default(),
            plan: Default::default(),
        }
    }

    /// A two-way field whose value comes back from the target as the source's is left as the
    /// target holds it (a memo cut on its way to the CRM stays whole in F&O); a field whose
    /// source is empty still gets its default.
    #[test]
    fn round_trip_equivalent_targets_are_kept_and_defaults_still_go_across() {
        let mut memo = field(
            Some("Memo"),
            Some("description"),
            FieldDirection::Bidirectional,
        );
        memo.to_crm = vec![TransformStep::Truncate(3)];
        let mut note = field(Some("Note"), Some("note"), FieldDirection::Bidirectional);
        note.to_crm = vec![TransformStep::Trim];
        note.default = Some(text("N/A"));
        let mut city = field(Some("City"), Some("city"), FieldDirection::Bidirectional);
        city.to_crm = vec![TransformStep::Upper];
        let map = table_map(
            "m",
            ("Es", &["K"], false),
            ("cs", &["k"], None),
            vec![key_field("K", "k"), memo, note, city],
        );
        let mut crm = Record::new("cs");
        crm.fields.insert("k", text("1"));
        crm.fields.insert("description", text("abc"));
        crm.fields.insert("note", Value::Null);
        crm.fields.insert("city", text("OSLO"));
        let mut erp = Record::new("Es");
        erp.fields.insert("K", text("1"));
        erp.fields.insert("Memo", text("abcdef"));
        erp.fields.insert("Note", Value::Null);
        erp.fields.insert("City", text("Bergen"));
        let plan = map.plan();
        let mut slots = Vec::new();
        fill_slots(
            &map,
            plan,
            Side::Crm,
            &crm,
            None,
            &ResolvedLookups::new(),
            &mut slots,
        )
        .unwrap();
        keep_round_trip_equivalents(&map, plan, Side::Crm, &crm, &erp, &mut slots);
        let written = slots_to_record(&map, Side::Erp, &crm, plan, &mut slots);
        assert_eq!(written.get("Memo"), Some(&text("abcdef")), "kept whole");
        assert_eq!(written.get("Note"), Some(&text("N/A")), "the default");
        assert_eq!(
            written.get("City"),
            Some(&text("OSLO")),
            "a real difference"
        );
    }

    const CURRENCY: usize = 3;

    /// A cut-down Customers V3 ↔ accounts map exercising every kind of field.
    fn customers() -> TableMap {
        let fields = vec![
            key_field("CustomerAccount", "accountnumber"),
            field(
                Some("OrganizationName"),
                Some("name"),
                FieldDirection::Bidirectional,
            ),
            typed_field(
                Some("CreditLimit"),
                ValueType::Decimal,
                Some("creditlimit"),
                ValueType::Decimal,
                FieldDirection::Bidirectional,
            ),
            FieldMapping {
                lookup: Some(LookupSpec {
                    maps: vec!["currencies".to_owned()],
                }),
                ..typed_field(
                    Some("SalesCurrencyCode"),
                    ValueType::Text,
                    Some("transactioncurrencyid"),
                    ValueType::Lookup,
                    FieldDirection::Bidirectional,
                )
            },
            FieldMapping {
                value_map: Some(ValueMap {
                    pairs: vec![
                        (Value::Enum("No".into()), Value::Boolean(false)),
                        (Value::Enum("Yes".into()), Value::Boolean(true)),
                    ],
                }),
                ..typed_field(
                    Some("CreditLimitIsMandatory"),
                    ValueType::Enum,
                    Some("msdyn_creditlimitismandatory"),
                    ValueType::Boolean,
                    FieldDirection::Bidirectional,
                )
            },
            FieldMapping {
                default: Some(Value::Enum("Organization".into())),
                ..typed_field(
                    Some("PartyType"),
                    ValueType::Enum,
                    None,
                    ValueType::Enum,
                    FieldDirection::CrmToErp,
                )
            },
            FieldMapping {
                default: Some(Value::Choice(3)),
                ..typed_field(
                    None,
                    ValueType::Choice,
                    Some("customertypecode"),
                    ValueType::Choice,
                    FieldDirection::ErpToCrm,
                )
            },
            FieldMapping {
                to_crm: vec![TransformStep::Trim, TransformStep::Truncate(10)],
                default: Some(text("(none)")),
                ..field(
                    Some("SalesMemo"),
                    Some("description"),
                    FieldDirection::Bidirectional,
                )
            },
            field(
                Some("AddressCity"),
                Some("address1_city"),
                FieldDirection::ErpToCrm,
            ),
            field(Some("Notes"), Some("msdyn_notes"), FieldDirection::CrmToErp),
        ];
        table_map(
            "customers-v3-accounts",
            ("CustomersV3", &["CustomerAccount"], true),
            ("accounts", &["accountnumber"], Some("msdyn_company")),
            fields,
        )
    }

    fn currencies() -> TableMap {
        table_map(
            "currencies",
            ("Currencies", &["CurrencyCode"], false),
            ("transactioncurrencies", &["isocurrencycode"], None),
            vec![key_field("CurrencyCode", "isocurrencycode")],
        )
    }

    fn erp_customer() -> Record {
        let mut r = Record::new("CustomersV3")
            .with("CustomerAccount", text("US-001"))
            .with("OrganizationName", text("Contoso"))
            .with("CreditLimit", dec("1500.50"))
            .with("SalesCurrencyCode", text("USD"))
            .with("CreditLimitIsMandatory", Value::Enum("Yes".into()))
            .with("PartyType", Value::Enum("Organization".into()))
            .with("SalesMemo", text("  a memo that is long  "))
            .with("AddressCity", text("Seattle"))
            .with("Notes", text("erp notes"));
        r.company = Some("usmf".into());
        r.id = Some("dataAreaId='usmf',CustomerAccount='US-001'".into());
        r
    }

    fn crm_account() -> Record {
        let mut r = Record::new("accounts")
            .with("accountnumber", text("US-001"))
            .with("name", text("Contoso"))
            .with("creditlimit", dec("1500.5"))
            .with(
                "transactioncurrencyid",
                Value::Lookup(Arc::new(LookupRef {
                    entity_set: "transactioncurrencies".into(),
                    id: Some("c0ffee00-0000-0000-0000-000000000001".into()),
                    key: None,
                })),
            )
            .with("msdyn_creditlimitismandatory", Value::Boolean(false))
            .with("customertypecode", Value::Choice(3))
            .with("description", text("hello"))
            .with("address1_city", text("Redmond"))
            .with("msdyn_notes", text("crm notes"));
        r.company = Some("USMF".into());
        r.id = Some("5b2c0c6e-0000-0000-0000-000000000001".into());
        r
    }

    fn usd_lookup() -> Value {
        Value::Lookup(Arc::new(LookupRef {
            entity_set: "transactioncurrencies".into(),
            id: None,
            key: Some(RecordKey::new([("isocurrencycode", "USD")])),
        }))
    }

    fn keys(keys: Vec<IntegrationKey>) -> LookupTarget {
        LookupTarget::Keys(keys.into())
    }

    fn resolved(index: usize, value: Value) -> ResolvedLookups {
        ResolvedLookups::from_iter([(index, LookupResolution::Resolved(value))])
    }

    fn bad_value_message(result: Result<Record, ApplyError>) -> (String, String) {
        match result {
            Err(ApplyError::BadValue { field, message, .. }) => (field, message),
            other => panic!("expected BadValue, got {other:?}"),
        }
    }

    // ---- keys -------------------------------------------------------------------------------

    #[test]
    fn both_sides_of_a_pair_have_the_same_integration_key() {
        let map = customers();
        let erp = integration_key(&map, Side::Erp, &erp_customer()).unwrap();
        let crm = integration_key(&map, Side::Crm, &crm_account()).unwrap();
        assert_eq!(erp.as_str(), "USMF/US-001");
        assert_eq!(erp, crm);
    }

    #[test]
    fn company_is_read_from_the_record_when_not_set() {
        let map = customers();
        let mut erp = erp_customer();
        erp.company = None;
        erp.fields.insert(ERP_COMPANY_FIELD, text("usmf"));
        let mut crm = crm_account();
        crm.company = None;
        crm.fields.insert(
            "msdyn_company",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: CRM_COMPANY_ENTITY_SET.into(),
                id: None,
                key: Some(RecordKey::new([(CRM_COMPANY_CODE_FIELD, "USMF")])),
            })),
        );
        assert_eq!(
            integration_key(&map, Side::Erp, &erp).unwrap().as_str(),
            "USMF/US-001"
        );
        assert_eq!(
            integration_key(&map, Side::Crm, &crm).unwrap().as_str(),
            "USMF/US-001"
        );
    }

    #[test]
    fn missing_company_or_key_names_map_side_record_and_field() {
        let map = customers();
        let mut no_company = crm_account();
        no_company.company = None;
        assert_eq!(
            integration_key(&map, Side::Crm, &no_company),
            Err(ApplyError::MissingKey {
                map: "customers-v3-accounts".into(),
                side: Side::Crm,
                record: "5b2c0c6e-0000-0000-0000-000000000001".into(),
                field: "msdyn_company".into(),
            })
        );
        let mut null_key = erp_customer();
        null_key.id = None;
        null_key.fields.insert("CustomerAccount", Value::Null);
        let err = integration_key(&map, Side::Erp, &null_key).unwrap_err();
        assert_eq!(
            err,
            ApplyError::MissingKey {
                map: "customers-v3-accounts".into(),
                side: Side::Erp,
                record: "CustomersV3 (no id)".into(),
                field: "CustomerAccount".into(),
            }
        );
        assert!(
            err.to_string()
                .contains("has no value for key field CustomerAccount")
        );
        let mut absent = crm_account();
        absent.fields.remove("accountnumber");
        assert!(matches!(
            integration_key(&map, Side::Crm, &absent),
            Err(ApplyError::MissingKey { field, .. }) if field == "accountnumber"
        ));
        let empty = crm_account().with("accountnumber", text(""));
        assert!(integration_key(&map, Side::Crm, &empty).is_err());
    }

    #[test]
    fn global_maps_have_no_company_in_keys() {
        let map = currencies();
        let mut r = Record::new("Currencies").with("CurrencyCode", text("EUR"));
        r.company = Some("usmf".into());
        let key = integration_key(&map, Side::Erp, &r).unwrap();
        assert_eq!(key.as_str(), "EUR");
        assert_eq!(
            record_key(&map, Side::Erp, &key),
            RecordKey::new([("CurrencyCode", "EUR")])
        );
        assert_eq!(
            record_key(&map, Side::Crm, &key),
            RecordKey::new([("isocurrencycode", "EUR")])
        );
    }

    #[test]
    fn record_keys_address_each_side() {
        let map = customers();
        let key = IntegrationKey::from_parts(Some("usmf"), ["US-001"]);
        assert_eq!(
            record_key(&map, Side::Erp, &key),
            RecordKey::new([("dataAreaId", "usmf"), ("CustomerAccount", "US-001")])
        );
        assert_eq!(
            record_key(&map, Side::Crm, &key),
            RecordKey::new([("accountnumber", "US-001"), ("msdyn_company", "USMF")])
        );
    }

    fn two_part_map() -> TableMap {
        table_map(
            "addresses",
            ("Addresses", &["PartyNumber", "LocationId"], true),
            (
                "msdyn_addresses",
                &["msdyn_partynumber", "msdyn_locationid"],
                Some("msdyn_company"),
            ),
            vec![
                key_field("LocationId", "msdyn_locationid"),
                key_field("PartyNumber", "msdyn_partynumber"),
            ],
        )
    }

    #[test]
    fn keys_with_slashes_and_backslashes_round_trip() {
        let map = two_part_map();
        let mut erp = Record::new("Addresses")
            .with("PartyNumber", text("a/b\\c"))
            .with("LocationId", text("\\/x/"));
        erp.company = Some("dat".into());
        let key = integration_key(&map, Side::Erp, &erp).unwrap();
        let erp_key = record_key(&map, Side::Erp, &key);
        assert_eq!(
            erp_key,
            RecordKey::new([
                ("dataAreaId", "dat"),
                ("PartyNumber", "a/b\\c"),
                ("LocationId", "\\/x/"),
            ])
        );
        let crm_key = record_key(&map, Side::Crm, &key);
        let mut crm = Record::new("msdyn_addresses");
        for (f, v) in &crm_key.0[..2] {
            crm.fields.insert(f.as_str(), text(v));
        }
        crm.company = crm_key
            .get("msdyn_company")
            .map(str::to_owned)
            .map(Into::into);
        assert_eq!(integration_key(&map, Side::Crm, &crm).unwrap(), key);
    }

    #[test]
    fn a_transformed_key_is_compared_the_erp_way() {
        let map = table_map(
            "vendors",
            ("Vendors", &["VendorAccount"], false),
            ("msdyn_vendors", &["msdyn_vendoraccountnumber"], None),
            vec![FieldMapping {
                to_crm: vec![TransformStep::Prefix("V-".into())],
                to_erp: vec![TransformStep::StripPrefix("V-".into())],
                ..key_field("VendorAccount", "msdyn_vendoraccountnumber")
            }],
        );
        let erp = Record::new("Vendors").with("VendorAccount", text("1001"));
        let crm = Record::new("msdyn_vendors").with("msdyn_vendoraccountnumber", text("V-1001"));
        let key = integration_key(&map, Side::Erp, &erp).unwrap();
        assert_eq!(key.as_str(), "1001");
        assert_eq!(integration_key(&map, Side::Crm, &crm).unwrap(), key);
        assert_eq!(
            record_key(&map, Side::Crm, &key),
            RecordKey::new([("msdyn_vendoraccountnumber", "V-1001")])
        );
        let out = apply_map(&map, Side::Erp, &erp, &ResolvedLookups::new()).unwrap();
        assert_eq!(out.get("msdyn_vendoraccountnumber"), Some(&text("V-1001")));
    }

    #[test]
    fn a_parent_lookup_key_uses_the_referenced_alternate_key() {
        let map = table_map(
            "order-lines",
            (
                "SalesOrderLines",
                &["SalesOrderNumber", "LineCreationSequenceNumber"],
                true,
            ),
            (
                "salesorderdetails",
                &["salesorderid", "sequencenumber"],
                Some("msdyn_company"),
            ),
            vec![
                FieldMapping {
                    lookup: Some(LookupSpec {
                        maps: vec!["orders".into()],
                    }),
                    ..typed_field(
                        Some("SalesOrderNumber"),
                        ValueType::Text,
                        Some("salesorderid"),
                        ValueType::Lookup,
                        FieldDirection::Bidirectional,
                    )
                },
                typed_field(
                    Some("LineCreationSequenceNumber"),
                    ValueType::Integer,
                    Some("sequencenumber"),
                    ValueType::Integer,
                    FieldDirection::Bidirectional,
                ),
            ],
        );
        let mut erp = Record::new("SalesOrderLines")
            .with("SalesOrderNumber", text("SO-1"))
            .with("LineCreationSequenceNumber", Value::Integer(2));
        erp.company = Some("usmf".into());
        let order = |id: Option<&str>, key: Option<RecordKey>| {
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "salesorders".into(),
                id: id.map(str::to_owned),
                key,
            }))
        };
        let mut crm = Record::new("salesorderdetails")
            .with(
                "salesorderid",
                order(
                    None,
                    Some(RecordKey::new([("msdyn_salesordernumber", "SO-1")])),
                ),
            )
            .with("sequencenumber", Value::Integer(2));
        crm.company = Some("USMF".into());
        let key = integration_key(&map, Side::Erp, &erp).unwrap();
        assert_eq!(key.as_str(), "USMF/SO-1/2");
        assert_eq!(integration_key(&map, Side::Crm, &crm).unwrap(), key);
        let by_id = crm
            .clone()
            .with("salesorderid", order(Some("guid-1"), None));
        assert!(matches!(
            integration_key(&map, Side::Crm, &by_id),
            Err(ApplyError::BadValue { field, message, .. })
                if field == "salesorderid" && message.contains("carries only an id")
        ));
    }

    // ---- mapped fields ----------------------------------------------------------------------

    #[test]
    fn mapped_fields_cover_both_directions_sorted_without_duplicates() {
        let mut map = customers();
        map.fields
            .push(field(Some("Notes"), Some("name"), FieldDirection::CrmToErp));
        assert_eq!(
            mapped_fields(&map, Side::Crm),
            [
                "accountnumber",
                "address1_city",
                "creditlimit",
                "customertypecode",
                "description",
                "msdyn_creditlimitismandatory",
                "msdyn_notes",
                "name",
                "transactioncurrencyid",
            ]
        );
        assert_eq!(
            mapped_fields(&map, Side::Erp),
            [
                "AddressCity",
                "CreditLimit",
                "CreditLimitIsMandatory",
                "CustomerAccount",
                "Notes",
                "OrganizationName",
                "PartyType",
                "SalesCurrencyCode",
                "SalesMemo",
            ]
        );
    }

    // ---- apply_map --------------------------------------------------------------------------

    #[test]
    fn erp_to_crm_maps_transforms_constants_and_lookups() {
        let map = customers();
        let out = apply_map(
            &map,
            Side::Erp,
            &erp_customer(),
            &resolved(CURRENCY, usd_lookup()),
        )
        .unwrap();
        assert_eq!(out.entity, "accounts");
        assert_eq!(out.company.as_deref(), Some("usmf"));
        assert_eq!(out.id, None);
        let expected = Record::new("accounts")
            .with("accountnumber", text("US-001"))
            .with("name", text("Contoso"))
            .with("creditlimit", dec("1500.50"))
            .with("transactioncurrencyid", usd_lookup())
            .with("msdyn_creditlimitismandatory", Value::Boolean(true))
            .with("customertypecode", Value::Choice(3))
            .with("description", text("a memo tha"))
            .with("address1_city", text("Seattle"));
        assert_eq!(out.fields, expected.fields);
    }

    #[test]
    fn crm_to_erp_maps_back_and_writes_erp_constants() {
        let map = customers();
        let out = apply_map(
            &map,
            Side::Crm,
            &crm_account(),
            &resolved(CURRENCY, text("USD")),
        )
        .unwrap();
        assert_eq!(out.entity, "CustomersV3");
        assert_eq!(out.company.as_deref(), Some("USMF"));
        let expected = Record::new("CustomersV3")
            .with("CustomerAccount", text("US-001"))
            .with("OrganizationName", text("Contoso"))
            .with("CreditLimit", dec("1500.5"))
            .with("SalesCurrencyCode", text("USD"))
            .with("CreditLimitIsMandatory", Value::Enum("No".into()))
            .with("PartyType", Value::Enum("Organization".into()))
            .with("SalesMemo", text("hello"))
            .with("Notes", text("crm notes"));
        assert_eq!(out.fields, expected.fields);
    }

    #[test]
    fn a_value_outside_the_value_map_is_refused_with_the_allowed_values() {
        let map = customers();
        let record = erp_customer().with("CreditLimitIsMandatory", Value::Enum("Maybe".into()));
        let (field, message) = bad_value_message(apply_map(
            &map,
            Side::Erp,
            &record,
            &resolved(CURRENCY, usd_lookup()),
        ));
        assert_eq!(
            field,
            "CreditLimitIsMandatory = msdyn_creditlimitismandatory"
        );
        assert!(message.contains("'Maybe'"), "{message}");
        assert!(message.contains("allowed values: No, Yes"), "{message}");
    }

    #[test]
    fn value_maps_compare_enum_symbols_without_case() {
        let map = customers();
        let record = erp_customer().with("CreditLimitIsMandatory", Value::Enum("yes".into()));
        let out = apply_map(&map, Side::Erp, &record, &resolved(CURRENCY, usd_lookup())).unwrap();
        assert_eq!(
            out.get("msdyn_creditlimitismandatory"),
            Some(&Value::Boolean(true))
        );
    }

    #[test]
    fn null_passes_value_maps_and_steps_and_takes_the_default() {
        let map = customers();
        let record = erp_customer()
            .with("CreditLimitIsMandatory", Value::Null)
            .with("SalesMemo", Value::Null)
            .with("SalesCurrencyCode", Value::Null)
            .with("CreditLimit", Value::Null);
        let out = apply_map(&map, Side::Erp, &record, &ResolvedLookups::new()).unwrap();
        assert_eq!(out.get("msdyn_creditlimitismandatory"), Some(&Value::Null));
        assert_eq!(out.get("description"), Some(&text("(none)")));
        assert_eq!(out.get("transactioncurrencyid"), Some(&Value::Null));
        assert_eq!(out.get("creditlimit"), Some(&Value::Null));
    }

    #[test]
    fn empty_text_is_no_value_for_lookups_defaults_and_keys() {
        // F&O's empty fields and unset references are "", never null.
        let map = customers();
        let record = erp_customer()
            .with("SalesMemo", text(""))
            .with("SalesCurrencyCode", text(""));
        assert!(
            lookup_requests(&map, Side::Erp, &record).is_empty(),
            "an empty reference needs no lookup"
        );
        let out = apply_map(&map, Side::Erp, &record, &ResolvedLookups::new()).unwrap();
        assert_eq!(out.get("description"), Some(&text("(none)")));
        assert_eq!(out.get("transactioncurrencyid"), Some(&Value::Null));
        let no_key = erp_customer().with("CustomerAccount", text(""));
        assert!(matches!(
            apply_map(&map, Side::Erp, &no_key, &ResolvedLookups::new()),
            Err(ApplyError::MissingKey { field, side: Side::Erp, .. }) if field == "CustomerAccount"
        ));
        assert!(matches!(
            integration_key(&map, Side::Erp, &no_key),
            Err(ApplyError::MissingKey { .. })
        ));
    }

    #[test]
    fn empty_text_crosses_transform_steps_as_null() {
        let mut map = customers();
        let memo = map
            .fields
            .iter()
            .position(|f| f.erp.as_ref().is_some_and(|e| e.name == "SalesMemo"))
            .unwrap();
        map.fields[memo].to_crm = vec![
            TransformStep::Prefix("memo: ".into()),
            TransformStep::Convert(ValueType::Text),
        ];
        let fm = &map.fields[memo];
        assert_eq!(
            transform_value(&map, fm, Side::Erp, text("x")),
            Ok(text("memo: x"))
        );
        assert_eq!(
            transform_value(&map, fm, Side::Erp, text("")),
            Ok(Value::Null)
        );
        // A conversion to a number takes "" as no value rather than failing on it.
        map.fields[memo].to_crm = vec![TransformStep::Convert(ValueType::Integer)];
        let fm = &map.fields[memo];
        assert_eq!(
            transform_value(&map, fm, Side::Erp, text("")),
            Ok(Value::Null)
        );
        assert!(transform_value(&map, fm, Side::Erp, text("x")).is_err());
    }

    #[test]
    fn a_partial_record_writes_only_what_it_carries_plus_constants() {
        let map = customers();
        let mut partial = Record::new("accounts").with("name", text("Fabrikam"));
        partial.company = Some("USMF".into());
        let out = apply_map(&map, Side::Crm, &partial, &ResolvedLookups::new()).unwrap();
        let expected = Record::new("CustomersV3")
            .with("OrganizationName", text("Fabrikam"))
            .with("PartyType", Value::Enum("Organization".into()));
        assert_eq!(out.fields, expected.fields);
    }

    #[test]
    fn a_null_key_is_refused_when_applying() {
        let map = customers();
        let record = crm_account().with("accountnumber", Value::Null);
        assert!(matches!(
            apply_map(&map, Side::Crm, &record, &resolved(CURRENCY, text("USD"))),
            Err(ApplyError::MissingKey { field, side: Side::Crm, .. }) if field == "accountnumber"
        ));
    }

    #[test]
    fn key_fields_are_written_whatever_their_direction() {
        let mut map = customers();
        map.fields[0].direction = FieldDirection::ErpToCrm;
        let out = apply_map(
            &map,
            Side::Crm,
            &crm_account(),
            &resolved(CURRENCY, text("USD")),
        )
        .unwrap();
        assert_eq!(out.get("CustomerAccount"), Some(&text("US-001")));
    }

    #[test]
    fn an_unresolved_lookup_is_refused() {
        let map = customers();
        let (field, message) = bad_value_message(apply_map(
            &map,
            Side::Erp,
            &erp_customer(),
            &ResolvedLookups::new(),
        ));
        assert_eq!(field, "SalesCurrencyCode = transactioncurrencyid");
        assert!(message.contains("unresolved"), "{message}");
        let missing = ResolvedLookups::from_iter([(
            CURRENCY,
            LookupResolution::Missing {
                map: "currencies".into(),
                key: IntegrationKey::from_parts(None, ["USD"]),
            },
        )]);
        let (_, message) = bad_value_message(apply_map(&map, Side::Erp, &erp_customer(), &missing));
        assert!(
            message.contains("map currencies has no link for key USD"),
            "{message}"
        );
    }

    #[test]
    fn a_failed_conversion_names_field_value_and_type() {
        let mut map = customers();
        map.fields[2].erp.as_mut().unwrap().ty = ValueType::Text;
        map.fields[2].to_crm = vec![TransformStep::Convert(ValueType::Decimal)];
        let record = erp_customer().with("CreditLimit", text("12,5"));
        let (field, message) = bad_value_message(apply_map(
            &map,
            Side::Erp,
            &record,
            &resolved(CURRENCY, usd_lookup()),
        ));
        assert_eq!(field, "CreditLimit = creditlimit");
        assert_eq!(message, "cannot convert the text value '12,5' to decimal");
        let ok = erp_customer().with("CreditLimit", text(" 12.50 "));
        let out = apply_map(&map, Side::Erp, &ok, &resolved(CURRENCY, usd_lookup())).unwrap();
        assert_eq!(out.get("creditlimit"), Some(&dec("12.50")));
    }

    // ---- lookups ----------------------------------------------------------------------------

    #[test]
    fn lookups_from_erp_are_keys_per_candidate_map() {
        let map = customers();
        let currencies = currencies();
        let requests = lookup_requests_with(&map, Side::Erp, &erp_customer(), |name| {
            (name == "currencies").then_some(&currencies)
        });
        assert_eq!(
            requests,
            [LookupRequest {
                field_index: CURRENCY,
                maps: CandidateMaps::new(&["currencies".to_owned()]),
                target: keys(vec![IntegrationKey::from_parts(None, ["USD"])]),
            }]
        );
        // The fields located once (as the worker does) give the same requests; positions taken
        // of another record are not trusted.
        let record = erp_customer();
        let located = SideFieldsAt::new(&map, Side::Erp, &record);
        let find = |name: &str| (name == "currencies").then_some(&currencies);
        assert_eq!(
            lookup_requests_at(&map, Side::Erp, &record, Some(&located), find),
            requests
        );
        let mut other = erp_customer();
        other.fields.remove("SalesCurrencyCode");
        assert_eq!(
            lookup_requests_at(&map, Side::Erp, &other, Some(&located), find),
            lookup_requests_with(&map, Side::Erp, &other, find)
        );
        // Without the referenced map, the record's company is included.
        let requests = lookup_requests(&map, Side::Erp, &erp_customer());
        assert_eq!(
            requests[0].target,
            keys(vec![IntegrationKey::from_parts(Some("usmf"), ["USD"])])
        );
    }

    #[test]
    fn polymorphic_lookups_build_one_key_per_candidate() {
        let accounts = customers();
        let mut contacts = currencies();
        contacts.name = "contacts".into();
        let lines = table_map(
            "orders",
            ("SalesOrderHeaders", &["SalesOrderNumber"], true),
            (
                "salesorders",
                &["msdyn_salesordernumber"],
                Some("msdyn_company"),
            ),
            vec![
                key_field("SalesOrderNumber", "msdyn_salesordernumber"),
                FieldMapping {
                    lookup: Some(LookupSpec {
                        maps: vec!["customers-v3-accounts".into(), "contacts".into()],
                    }),
                    ..field(
                        Some("OrderingCustomer"),
                        Some("customerid"),
                        FieldDirection::Bidirectional,
                    )
                },
            ],
        );
        let mut order = Record::new("SalesOrderHeaders")
            .with("SalesOrderNumber", text("SO-1"))
            .with("OrderingCustomer", text("US-001"));
        order.company = Some("usmf".into());
        let requests = lookup_requests_with(&lines, Side::Erp, &order, |name| match name {
            "customers-v3-accounts" => Some(&accounts),
            "contacts" => Some(&contacts),
            _ => None,
        });
        assert_eq!(
            requests[0].target,
            keys(vec![
                IntegrationKey::from_parts(Some("USMF"), ["US-001"]),
                IntegrationKey::from_parts(None, ["US-001"]),
            ])
        );
        // A Dataverse reference by alternate key resolves through the candidate's key order.
        let mut crm_order = Record::new("salesorders").with(
            "customerid",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "accounts".into(),
                id: None,
                key: Some(RecordKey::new([("accountnumber", "US-001")])),
            })),
        );
        crm_order.company = Some("USMF".into());
        let requests = lookup_requests_with(&lines, Side::Crm, &crm_order, |name| match name {
            "customers-v3-accounts" => Some(&accounts),
            _ => None,
        });
        assert_eq!(
            requests[0].target,
            keys(vec![
                IntegrationKey::from_parts(Some("USMF"), ["US-001"]),
                IntegrationKey::from_parts(Some("USMF"), ["US-001"]),
            ])
        );
    }

    #[test]
    fn lookup_requests_come_in_map_order_whatever_the_field_names() {
        let currencies = currencies();
        let lookup = |erp: &str, crm: &str| FieldMapping {
            lookup: Some(LookupSpec {
                maps: vec!["currencies".into()],
            }),
            ..field(Some(erp), Some(crm), FieldDirection::Bidirectional)
        };
        // Map order Zeta, Alpha, Zeta again (a second mapping of the same source field),
        // Middle; field-name order Alpha, Middle, Zeta.
        let map = table_map(
            "lines",
            ("Lines", &["LineNumber"], false),
            ("lines", &["linenumber"], None),
            vec![
                key_field("LineNumber", "linenumber"),
                lookup("Zeta", "zetaid"),
                lookup("Alpha", "alphaid"),
                lookup("Zeta", "otherzetaid"),
                field(Some("Plain"), Some("plain"), FieldDirection::Bidirectional),
                lookup("Middle", "middleid"),
            ],
        );
        let record = Record::new("Lines")
            .with("Alpha", text("A"))
            .with("LineNumber", text("1"))
            .with("Middle", Value::Null)
            .with("Plain", text("P"))
            .with("Zeta", text("Z"));
        let requests = lookup_requests_with(&map, Side::Erp, &record, |_| Some(&currencies));
        let got: Vec<(usize, LookupTarget)> = requests
            .into_iter()
            .map(|r| (r.field_index, r.target))
            .collect();
        let key = |v: &str| keys(vec![IntegrationKey::from_parts(None, [v])]);
        assert_eq!(got, [(1, key("Z")), (2, key("A")), (3, key("Z"))]);
    }

    #[test]
    fn lookup_requests_borrow_their_candidate_names_from_the_map() {
        let map = customers();
        let requests = lookup_requests(&map, Side::Erp, &erp_customer());
        let spec = map.fields[CURRENCY]
            .lookup
            .as_ref()
            .map(|l| l.maps.as_slice());
        assert_eq!(Some(requests[0].maps.as_slice()), spec);
        assert!(std::ptr::eq(
            requests[0].maps.as_ptr(),
            spec.unwrap_or_default().as_ptr()
        ));
        let names: Vec<&String> = (&requests[0].maps).into_iter().collect();
        assert_eq!(names, ["currencies"]);
    }

    #[test]
    fn lookup_keys_read_as_a_slice_however_many_there_are() {
        let a = IntegrationKey::from_parts(None, ["A"]);
        let b = IntegrationKey::from_parts(None, ["B"]);
        let none = LookupKeys::from(Vec::new());
        let one = LookupKeys::from(vec![a.clone()]);
        let two = LookupKeys::from(vec![a.clone(), b.clone()]);
        assert!(none.is_empty());
        assert_eq!(one.as_slice(), std::slice::from_ref(&a));
        assert_eq!(one, LookupKeys::from(a.clone()));
        assert_eq!(two.as_slice(), [a.clone(), b.clone()]);
        assert_eq!(two, vec![a.clone(), b.clone()]);
        assert_ne!(one, two);
        assert_eq!(format!("{two:?}"), format!("{:?}", [a, b]));
        assert_eq!((&two).into_iter().count(), 2);
    }

    #[test]
    fn lookups_from_crm_are_ids_and_null_lookups_need_nothing() {
        let map = customers();
        let requests = lookup_requests(&map, Side::Crm, &crm_account());
        assert_eq!(
            requests,
            [LookupRequest {
                field_index: CURRENCY,
                maps: CandidateMaps::new(&["currencies".to_owned()]),
                target: LookupTarget::CrmId("c0ffee00-0000-0000-0000-000000000001".into()),
            }]
        );
        let by_key = crm_account().with("transactioncurrencyid", usd_lookup());
        let currencies = currencies();
        let requests = lookup_requests_with(&map, Side::Crm, &by_key, |_| Some(&currencies));
        assert_eq!(
            requests[0].target,
            keys(vec![IntegrationKey::from_parts(None, ["USD"])])
        );
        let null = crm_account().with("transactioncurrencyid", Value::Null);
        assert!(lookup_requests(&map, Side::Crm, &null).is_empty());
        let mut absent = crm_account();
        absent.fields.remove("transactioncurrencyid");
        assert!(lookup_requests(&map, Side::Crm, &absent).is_empty());
    }

    #[test]
    fn lookups_that_do_not_flow_from_the_source_are_not_requested() {
        let mut map = customers();
        map.fields[CURRENCY].direction = FieldDirection::ErpToCrm;
        assert!(lookup_requests(&map, Side::Crm, &crm_account()).is_empty());
        assert_eq!(lookup_requests(&map, Side::Erp, &erp_customer()).len(), 1);
    }

    // ---- steps and conversions --------------------------------------------------------------

    fn step(s: TransformStep, v: Value) -> Result<Value, String> {
        apply_step(&s, v)
    }

    #[test]
    fn text_steps_do_what_they_say() {
        use TransformStep as T;
        assert_eq!(step(T::Trim, text("  a b  ")), Ok(text("a b")));
        assert_eq!(step(T::Upper, text("straße")), Ok(text("STRASSE")));
        assert_eq!(step(T::Lower, text("ÀB")), Ok(text("àb")));
        assert_eq!(step(T::Truncate(3), text("héllo")), Ok(text("hél")));
        assert_eq!(step(T::Truncate(10), text("héllo")), Ok(text("héllo")));
        assert_eq!(step(T::Truncate(0), text("x")), Ok(text("")));
        assert_eq!(step(T::Prefix("C-".into()), text("1")), Ok(text("C-1")));
        assert_eq!(
            step(T::StripPrefix("C-".into()), text("C-1")),
            Ok(text("1"))
        );
        assert_eq!(
            step(T::StripPrefix("C-".into()), text("D-1")),
            Ok(text("D-1"))
        );
        let replace = T::Replace {
            from: "-".into(),
            to: "/".into(),
        };
        assert_eq!(step(replace, text("a-b-c")), Ok(text("a/b/c")));
        let empty = T::Replace {
            from: String::new(),
            to: "x".into(),
        };
        assert_eq!(step(empty, text("ab")), Ok(text("ab")));
        assert_eq!(
            step(T::Upper, Value::Enum("yes".into())),
            Ok(Value::Enum("YES".into()))
        );
        assert_eq!(step(T::Trim, Value::Null), Ok(Value::Null));
        let err = step(T::Upper, Value::Integer(5)).unwrap_err();
        assert!(
            err.contains("step upper applies to text") && err.contains("integer"),
            "{err}"
        );
    }

    #[test]
    fn steps_run_in_order() {
        let mut map = customers();
        map.fields[1].to_erp = vec![
            TransformStep::Trim,
            TransformStep::Upper,
            TransformStep::Replace {
                from: " ".into(),
                to: "_".into(),
            },
            TransformStep::Truncate(6),
        ];
        let record = crm_account().with("name", text("  big co ltd "));
        let out = apply_map(&map, Side::Crm, &record, &resolved(CURRENCY, text("USD"))).unwrap();
        assert_eq!(out.get("OrganizationName"), Some(&text("BIG_CO")));
    }

    #[test]
    fn conversions_between_supported_types() {
        use ValueType as T;
        let date = NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        let midnight = Utc
            .with_ymd_and_hms(2024, 2, 29, 0, 0, 0)
            .unwrap()
            .fixed_offset();
        let noon = DateTime::parse_from_rfc3339("2024-02-29T12:30:00+02:00").unwrap();
        let cases = [
            (text(" 42 "), T::Integer, Value::Integer(42)),
            (text("-7"), T::Choice, Value::Choice(-7)),
            (text("0.1"), T::Decimal, dec("0.1")),
            (
                text("79228162514264337593543950335"),
                T::Decimal,
                dec("79228162514264337593543950335"),
            ),
            (text("Yes"), T::Boolean, Value::Boolean(true)),
            (text("0"), T::Boolean, Value::Boolean(false)),
            (text("2024-02-29"), T::Date, Value::Date(date)),
            (
                text("2024-02-29T12:30:00+02:00"),
                T::DateTime,
                Value::DateTime(noon),
            ),
            (
                text("2024-02-29T00:00:00"),
                T::DateTime,
                Value::DateTime(midnight),
            ),
            (
                text("Organization"),
                T::Enum,
                Value::Enum("Organization".into()),
            ),
            (Value::Enum("Person".into()), T::Text, text("Person")),
            (Value::Enum("No".into()), T::Boolean, Value::Boolean(false)),
            (Value::Integer(5), T::Text, text("5")),
            (Value::Integer(5), T::Decimal, dec("5")),
            (Value::Integer(5), T::Choice, Value::Choice(5)),
            (
                Value::Choice(806380000),
                T::Integer,
                Value::Integer(806380000),
            ),
            (Value::Choice(3), T::Text, text("3")),
            (Value::Integer(1), T::Boolean, Value::Boolean(true)),
            (dec("12.000"), T::Integer, Value::Integer(12)),
            (dec("12.50"), T::Text, text("12.5")),
            (Value::Boolean(true), T::Integer, Value::Integer(1)),
            (Value::Boolean(false), T::Text, text("false")),
            (Value::Boolean(true), T::Enum, Value::Enum("Yes".into())),
            (Value::Date(date), T::Text, text("2024-02-29")),
            (Value::Date(date), T::DateTime, Value::DateTime(midnight)),
            (Value::DateTime(noon), T::Date, Value::Date(date)),
            (
                Value::DateTime(noon),
                T::Text,
                text("2024-02-29T12:30:00+02:00"),
            ),
            (Value::Null, T::Integer, Value::Null),
            (text("same"), T::Text, text("same")),
        ];
        for (input, ty, expected) in cases {
            assert_eq!(
                convert(input.clone(), ty),
                Ok(expected),
                "{input:?} -> {ty}"
            );
        }
    }

    #[test]
    fn conversions_that_cannot_succeed_say_why() {
        use ValueType as T;
        let cases = [
            (text("12.5"), T::Integer),
            (text("9223372036854775808"), T::Integer),
            (text("0.1e3"), T::Decimal),
            (text("1.0000000000000000000000000000001"), T::Decimal),
            (text("maybe"), T::Boolean),
            (text("2024-02-30"), T::Date),
            (text("yesterday"), T::DateTime),
            (text(""), T::Enum),
            (text("x"), T::Lookup),
            (dec("12.5"), T::Integer),
            (dec("100000000000000000000000"), T::Integer),
            (Value::Integer(2), T::Boolean),
            (Value::Enum("Maybe".into()), T::Boolean),
            (Value::Choice(1), T::Decimal),
            (Value::Boolean(true), T::Date),
        ];
        for (input, ty) in cases {
            let err = convert(input.clone(), ty).unwrap_err();
            assert!(
                err.contains(&format!("'{input}'")) && err.ends_with(&format!("to {ty}")),
                "{err}"
            );
        }
    }

    // ---- properties -------------------------------------------------------------------------

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<String>().prop_map(|s| Value::Text(s.into())),
            "[ -~]{0,12}".prop_map(|s: String| Value::Text(s.into())),
            any::<i64>().prop_map(Value::Integer),
            (any::<i64>(), 0u32..=28).prop_map(|(m, s)| Value::Decimal(Decimal::new(m, s))),
            any::<bool>().prop_map(Value::Boolean),
            (-1_000_000i32..1_000_000)
                .prop_filter_map("date", NaiveDate::from_num_days_from_ce_opt)
                .prop_map(Value::Date),
            (-10_000_000_000i64..10_000_000_000, -86_399i32..86_399).prop_filter_map(
                "datetime",
                |(secs, off)| {
                    let at = DateTime::from_timestamp(secs, 0)?;
                    Some(Value::DateTime(
                        at.with_timezone(&FixedOffset::east_opt(off)?),
                    ))
                }
            ),
            any::<i64>().prop_map(Value::Choice),
            "[A-Za-z]{0,10}".prop_map(|s: String| Value::Enum(s.into())),
            ("[a-z]{1,8}", proptest::option::of("[0-9a-f-]{1,12}")).prop_map(|(set, id)| {
                Value::Lookup(Arc::new(LookupRef {
                    entity_set: set,
                    id,
                    key: None,
                }))
            }),
        ]
    }

    fn any_step() -> impl Strategy<Value = TransformStep> {
        let ty = prop_oneof![
            Just(ValueType::Text),
            Just(ValueType::Integer),
            Just(ValueType::Decimal),
            Just(ValueType::Boolean),
            Just(ValueType::Date),
            Just(ValueType::DateTime),
            Just(ValueType::Choice),
            Just(ValueType::Enum),
            Just(ValueType::Lookup),
        ];
        prop_oneof![
            Just(TransformStep::Trim),
            Just(TransformStep::Upper),
            Just(TransformStep::Lower),
            (0usize..20).prop_map(TransformStep::Truncate),
            ".{0,3}".prop_map(TransformStep::Prefix),
            ".{0,3}".prop_map(TransformStep::StripPrefix),
            (".{0,2}", ".{0,2}").prop_map(|(from, to)| TransformStep::Replace { from, to }),
            ty.prop_map(TransformStep::Convert),
        ]
    }

    proptest! {
        #[test]
        fn value_mapped_fields_round_trip(
            symbols in proptest::collection::btree_set("[A-Z][a-z]{0,8}", 1..8),
            pick in any::<prop::sample::Index>(),
        ) {
            let pairs: Vec<(Value, Value)> = symbols
                .iter()
                .enumerate()
                .map(|(i, s)| (Value::Enum(s.as_str().into()), Value::Choice(806_380_000 + i as i64)))
                .collect();
            let original = pairs[pick.index(pairs.len())].0.clone();
            let map = table_map(
                "m",
                ("E", &["K"], false),
                ("es", &["k"], None),
                vec![
                    key_field("K", "k"),
                    FieldMapping {
                        value_map: Some(ValueMap { pairs }),
                        ..typed_field(Some("F"), ValueType::Enum, Some("f"), ValueType::Choice,
                            FieldDirection::Bidirectional)
                    },
                ],
            );
            let erp = Record::new("E").with("K", text("1")).with("F", original.clone());
            let crm = apply_map(&map, Side::Erp, &erp, &ResolvedLookups::new()).unwrap();
            prop_assert!(matches!(crm.get("f"), Some(Value::Choice(_))));
            let back = apply_map(&map, Side::Crm, &crm, &ResolvedLookups::new()).unwrap();
            prop_assert_eq!(back.get("F"), Some(&original));
        }

        #[test]
        fn transform_free_fields_round_trip(value in any_value()) {
            let map = table_map(
                "m",
                ("E", &["K"], false),
                ("es", &["k"], None),
                vec![
                    key_field("K", "k"),
                    field(Some("F"), Some("f"), FieldDirection::Bidirectional),
                ],
            );
            let erp = Record::new("E").with("K", text("1")).with("F", value.clone());
            let crm = apply_map(&map, Side::Erp, &erp, &ResolvedLookups::new()).unwrap();
            let back = apply_map(&map, Side::Crm, &crm, &ResolvedLookups::new()).unwrap();
            prop_assert_eq!(back.fields, erp.fields);
        }

        #[test]
        fn apply_map_never_panics(
            values in proptest::collection::vec(any_value(), 6),
            steps in proptest::collection::vec(any_step(), 0..5),
            from_erp in any::<bool>(),
        ) {
            let mut map = customers();
            map.fields[1].to_crm = steps.clone();
            map.fields[1].to_erp = steps;
            let source = if from_erp { Side::Erp } else { Side::Crm };
            let names = mapped_fields(&map, source);
            let mut record = Record::new("x");
            record.company = Some("usmf".into());
            for (name, value) in names.iter().zip(values) {
                record.fields.insert(*name, value);
            }
            let _ = integration_key(&map, source, &record);
            let _ = lookup_requests(&map, source, &record);
            let _ = apply_map(&map, source, &record, &resolved(CURRENCY, text("USD")));
            for ty in [ValueType::Integer, ValueType::Decimal, ValueType::DateTime] {
                for value in record.fields.values() {
                    let _ = convert(value.clone(), ty);
                }
            }
        }

        #[test]
        fn integration_and_record_keys_round_trip(
            company in "[a-zA-Z0-9]{1,4}",
            parts in proptest::collection::vec("[a-z/\\\\' ]{1,6}", 2),
        ) {
            let map = two_part_map();
            let mut erp = Record::new("Addresses")
                .with("PartyNumber", text(&parts[0]))
                .with("LocationId", text(&parts[1]));
            erp.company = Some(company.clone().into());
            let key = integration_key(&map, Side::Erp, &erp).unwrap();
            let erp_key = record_key(&map, Side::Erp, &key);
            let lower = company.to_lowercase();
            prop_assert_eq!(erp_key.get("dataAreaId"), Some(lower.as_str()));
            prop_assert_eq!(erp_key.get("PartyNumber"), Some(parts[0].as_str()));
            prop_assert_eq!(erp_key.get("LocationId"), Some(parts[1].as_str()));
            let crm_key = record_key(&map, Side::Crm, &key);
            let mut crm = Record::new("msdyn_addresses")
                .with("msdyn_partynumber", text(crm_key.get("msdyn_partynumber").unwrap()))
                .with("msdyn_locationid", text(crm_key.get("msdyn_locationid").unwrap()));
            crm.company = crm_key.get("msdyn_company").map(Into::into);
            prop_assert_eq!(integration_key(&map, Side::Crm, &crm).unwrap(), key);
        }
    }
}
