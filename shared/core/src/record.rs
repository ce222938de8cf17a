//! Records, their keys, their company and their source version.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::fields::Fields;
use crate::value::Value;

/// Which system a record, event or write belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Dynamics 365 Dataverse (customer engagement).
    Crm,
    /// Dynamics 365 Finance & Operations (or Business Central).
    Erp,
}

impl Side {
    /// The other system.
    pub fn other(self) -> Side {
        match self {
            Side::Crm => Side::Erp,
            Side::Erp => Side::Crm,
        }
    }

    /// `crm` or `erp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Crm => "crm",
            Side::Erp => "erp",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The version a source system gave a record when it last changed.
///
/// Ordered by `modified_on`, then `sequence` (Dataverse `versionnumber`, F&O business-event
/// `ControlNumber`, or 0 when the source has none). A change whose version is lower than the
/// version last applied for that record is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceVersion {
    /// `modifiedon` (Dataverse) or `ModifiedDateTime` / event time (F&O), in UTC.
    pub modified_on: DateTime<Utc>,
    /// A tie-breaker that grows with each change of the record, 0 when unknown.
    pub sequence: i64,
}

impl SourceVersion {
    /// Strictly older than `other`: an earlier time, or the same time and a lower sequence
    /// when both know theirs. The same time with a sequence unknown on either side is a tie
    /// (a webhook image carries no `versionnumber`, the Web API's row does).
    pub fn is_older_than(&self, other: &SourceVersion) -> bool {
        self.modified_on < other.modified_on
            || (self.modified_on == other.modified_on
                && self.sequence != 0
                && other.sequence != 0
                && self.sequence < other.sequence)
    }

    /// Neither older nor newer than `other` (see [`SourceVersion::is_older_than`]).
    pub fn ties_with(&self, other: &SourceVersion) -> bool {
        !self.is_older_than(other) && !other.is_older_than(self)
    }
}

/// A record's key as field/value pairs, in the order the map declares them.
///
/// Rendered as `field='value',field2='value2'`, the OData key syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct RecordKey(pub Vec<(String, String)>);

impl RecordKey {
    /// A key from `(field, value)` pairs.
    pub fn new<I, F, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (F, V)>,
        F: Into<String>,
        V: Into<String>,
    {
        RecordKey(
            pairs
                .into_iter()
                .map(|(f, v)| (f.into(), v.into()))
                .collect(),
        )
    }

    /// The value of one key field.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (field, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{field}='{}'", value.replace('\'', "''"))?;
        }
        Ok(())
    }
}

/// The identity of one synced record pair within a map, the same from either side.
///
/// Key fields of a bidirectional map are bidirectional, so the CRM and ERP records of one pair
/// carry the same key values; the integration key is those values (company first, upper-cased),
/// in the map's key order. It names the link in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IntegrationKey(pub SmolStr);

impl IntegrationKey {
    /// Builds the canonical key from the company (if the map is company-specific) and the key
    /// values in map order. `/` and `\` in values are escaped so distinct keys never collide.
    ///
    /// The key is written into a reused per-thread buffer and kept inline when short (the
    /// usual `USMF/US-001`), so building one allocates nothing.
    pub fn from_parts<'a>(
        company: Option<&str>,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut out = KEY_BUFFER.take();
        out.clear();
        let mut first = true;
        if let Some(c) = company {
            if c.is_ascii() && !has_separator(c) {
                // The usual company code (`usmf`): upper-cased in place, nothing to escape.
                let start = out.len();
                out.push_str(c);
                out[start..].make_ascii_uppercase();
            } else {
                // Upper-cased char by char: the same text as `c.to_uppercase()`, no temporary.
                for upper in c.chars().flat_map(char::to_uppercase) {
                    push_escaped_char(&mut out, upper);
                }
            }
            first = false;
        }
        for v in values {
            if !first {
                out.push('/');
            }
            first = false;
            push_escaped(&mut out, v);
        }
        let key = IntegrationKey(SmolStr::new(&out));
        KEY_BUFFER.set(out);
        key
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

thread_local! {
    /// [`IntegrationKey::from_parts`]' buffer, kept between calls.
    static KEY_BUFFER: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

fn push_escaped(out: &mut String, v: &str) {
    if !has_separator(v) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        push_escaped_char(out, c);
    }
}

/// True when `v` holds a `/` or `\\` (a byte scan: both are ASCII, so never part of another
/// character).
fn has_separator(v: &str) -> bool {
    v.bytes().any(|b| b == b'/' || b == b'\\')
}

fn push_escaped_char(out: &mut String, c: char) {
    if c == '/' || c == '\\' {
        out.push('\\');
    }
    out.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_by_sequence_when_both_know_one() {
        let t = |ms| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        let v = |ms, sequence| SourceVersion {
            modified_on: t(ms),
            sequence,
        };
        assert!(v(1, 9).is_older_than(&v(2, 1)));
        assert!(v(1, 1).is_older_than(&v(1, 2)));
        assert!(!v(1, 2).is_older_than(&v(1, 1)));
        // A webhook image without `versionnumber` (0) ties with the Web API's row.
        assert!(!v(1, 0).is_older_than(&v(1, 7)));
        assert!(v(1, 0).ties_with(&v(1, 7)));
        assert!(v(1, 3).ties_with(&v(1, 3)));
        assert!(!v(1, 3).ties_with(&v(1, 4)));
        assert!(!v(1, 0).ties_with(&v(2, 0)));
    }

    #[test]
    fn empty_parts_keep_their_place() {
        let a = IntegrationKey::from_parts(None, ["", "a"]);
        let b = IntegrationKey::from_parts(None, ["a"]);
        assert_ne!(a, b);
        assert_eq!(a.as_str(), "/a");
    }

    #[test]
    fn the_company_is_upper_cased_and_escaped_like_values() {
        let a = IntegrationKey::from_parts(Some("straße/1"), ["x"]);
        assert_eq!(a.as_str(), "STRASSE\\/1/x");
        let ascii = IntegrationKey::from_parts(Some("us\\mf/1"), ["x"]);
        assert_eq!(ascii.as_str(), "US\\\\MF\\/1/x");
        assert_eq!(
            IntegrationKey::from_parts(Some("usMf"), ["x"]).as_str(),
            "USMF/x"
        );
    }

    #[test]
    fn separators_in_values_are_escaped() {
        let a = IntegrationKey::from_parts(Some("usmf"), ["a/b"]);
        let b = IntegrationKey::from_parts(Some("usmf"), ["a", "b"]);
        assert_ne!(a, b);
        assert_eq!(a.as_str(), "USMF/a\\/b");
    }
}

impl fmt::Display for IntegrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One row of one side: its entity, identity, company, fields and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Dataverse entity set (`accounts`) or F&O data entity (`CustomersV3`).
    pub entity: SmolStr,
    /// The source's identity of the row: Dataverse primary id (GUID); for F&O the rendered
    /// OData key (`dataAreaId='usmf',CustomerAccount='US-001'`, see [`RecordKey`]).
    pub id: Option<SmolStr>,
    /// Legal entity: F&O `dataAreaId`, Dataverse `cdm_companycode` of the owning company.
    pub company: Option<SmolStr>,
    /// Field values by field name (Dataverse logical name / F&O OData field name).
    pub fields: Fields,
    /// When and in which order the source last changed it.
    pub version: Option<SourceVersion>,
    /// The source's concurrency token (`W/"468026"`), for `If-Match` writes.
    pub etag: Option<String>,
}

impl Record {
    /// An empty record of `entity`.
    pub fn new(entity: impl Into<SmolStr>) -> Self {
        Record {
            entity: entity.into(),
            id: None,
            company: None,
            fields: Fields::new(),
            version: None,
            etag: None,
        }
    }

    /// Sets a field (builder style).
    pub fn with(mut self, field: impl Into<SmolStr>, value: Value) -> Self {
        self.fields.insert(field, value);
        self
    }

    /// A field's value, `None` when the record does not carry the field.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.fields.get(field)
    }
}
