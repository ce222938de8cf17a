//! Applying a table map: keys, mapped field sets, lookups to resolve, and the transform of a
//! source record into the fields to write on the other side.
//!
//! STUB: signatures agreed between the map language and the engine; bodies are being written.

use std::collections::HashMap;

use crate::map::TableMap;
use crate::record::{IntegrationKey, Record, RecordKey, Side};
use crate::value::Value;

/// Why a record could not be mapped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// A key field is missing or null: the record cannot be linked.
    #[error("map {map}: {side} record {record} has no value for key field {field}")]
    MissingKey { map: String, side: Side, record: String, field: String },
    /// A value does not fit the field (wrong type, not in the value map, failed conversion).
    #[error("map {map}, field {field}: {message}")]
    BadValue { map: String, field: String, message: String },
}

/// A lookup the engine must resolve (through the store's links) before [`apply_map`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LookupRequest {
    /// Index of the field mapping in `map.fields`.
    pub field_index: usize,
    /// Candidate maps, in order (several for a polymorphic lookup).
    pub maps: Vec<String>,
    /// What to find: from F&O, the integration key the referenced map's link must have; from
    /// Dataverse, the referenced row's id.
    pub target: LookupTarget,
}

/// The identity a lookup searches for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LookupTarget {
    /// Find the link whose integration key is this (value came from F&O). The key includes
    /// the record's company when the referenced map is company-specific; the engine tries each
    /// candidate map with the key built for it, so one key per candidate map, in order.
    Keys(Vec<IntegrationKey>),
    /// Find the link whose Dataverse id is this (value came from Dataverse).
    CrmId(String),
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

/// Resolutions by field index.
pub type ResolvedLookups = HashMap<usize, LookupResolution>;

/// The integration key of a record of `side`.
pub fn integration_key(map: &TableMap, side: Side, record: &Record) -> Result<IntegrationKey, ApplyError> {
    let _ = (map, side, record);
    unimplemented!("being written")
}

/// How to address the record of `side` with integration key `key` (alternate key incl.
/// company for Dataverse: `accountnumber='A1',msdyn_company=...`; `dataAreaId` + natural key for F&O).
pub fn record_key(map: &TableMap, side: Side, key: &IntegrationKey) -> RecordKey {
    let _ = (map, side, key);
    unimplemented!("being written")
}

/// The fields of `side` that the map reads or writes (what [`crate::hash`] hashes).
pub fn mapped_fields(map: &TableMap, side: Side) -> Vec<&str> {
    let _ = (map, side);
    unimplemented!("being written")
}

/// The lookups to resolve before mapping `record` (from `source`) to the other side.
pub fn lookup_requests(map: &TableMap, source: Side, record: &Record) -> Vec<LookupRequest> {
    let _ = (map, source, record);
    unimplemented!("being written")
}

/// Maps a record of `source` to the fields to write on the other side: fields flowing from
/// `source`, transformed; constants for the target; resolved lookups. Includes the target's
/// key fields and company.
pub fn apply_map(
    map: &TableMap,
    source: Side,
    record: &Record,
    lookups: &ResolvedLookups,
) -> Result<Record, ApplyError> {
    let _ = (map, source, record, lookups);
    unimplemented!("being written")
}
