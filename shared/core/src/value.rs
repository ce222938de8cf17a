//! Typed field values: what a Dataverse column or an F&O data-entity field holds.
//!
//! Money and quantities are exact decimals ([`rust_decimal::Decimal`]), never floats.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, NaiveDate};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::record::RecordKey;

/// One field value, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    /// No value (Dataverse `null`, an F&O field left empty by the source).
    Null,
    /// Text of any length.
    Text(SmolStr),
    /// A whole number (Dataverse Whole Number, F&O Int/Int64).
    Integer(i64),
    /// An exact decimal: money, quantities, rates.
    Decimal(Decimal),
    /// Two-option / NoYes value.
    Boolean(bool),
    /// A date without time (F&O `Date`, Dataverse DateOnly).
    Date(NaiveDate),
    /// A point in time with its zone offset.
    DateTime(DateTime<FixedOffset>),
    /// A Dataverse option-set (choice) value, e.g. `806380000`.
    Choice(i64),
    /// An F&O enum symbol, e.g. `Yes`, `Organization` (sent as `Microsoft.Dynamics.DataEntities.NoYes'Yes'`).
    Enum(SmolStr),
    /// A reference to another Dataverse row (lookup column).
    Lookup(Arc<LookupRef>),
}

/// A reference to a Dataverse row: by primary id, by alternate key, or both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LookupRef {
    /// Entity set of the referenced table, e.g. `transactioncurrencies`.
    pub entity_set: String,
    /// Primary id (GUID) of the referenced row, when known.
    pub id: Option<String>,
    /// Alternate key of the referenced row (written as `@odata.bind` to `set(key='v')`).
    pub key: Option<RecordKey>,
}

/// The type of a field, as a table map declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Text,
    Integer,
    Decimal,
    Boolean,
    Date,
    DateTime,
    Choice,
    Enum,
    Lookup,
}

impl Value {
    /// The type of this value, or `None` for [`Value::Null`] (which fits every type).
    pub fn value_type(&self) -> Option<ValueType> {
        Some(match self {
            Value::Null => return None,
            Value::Text(_) => ValueType::Text,
            Value::Integer(_) => ValueType::Integer,
            Value::Decimal(_) => ValueType::Decimal,
            Value::Boolean(_) => ValueType::Boolean,
            Value::Date(_) => ValueType::Date,
            Value::DateTime(_) => ValueType::DateTime,
            Value::Choice(_) => ValueType::Choice,
            Value::Enum(_) => ValueType::Enum,
            Value::Lookup(_) => ValueType::Lookup,
        })
    }

    /// True for [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// True when the value says "no value": null, or empty text. Neither system keeps empty
    /// text as a value of its own — Dataverse saves "" as null; F&O has no null text, its
    /// empty fields (and unset references and keys) are "" — so wherever the engine asks
    /// whether a field has a value (lookups, keys, defaults, value maps, hashes), "" is null.
    pub fn is_empty(&self) -> bool {
        match self {
            Value::Null => true,
            Value::Text(s) => s.is_empty(),
            _ => false,
        }
    }

    /// The text, for a [`Value::Text`] or [`Value::Enum`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) | Value::Enum(s) => Some(s),
            _ => None,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ValueType::Text => "text",
            ValueType::Integer => "integer",
            ValueType::Decimal => "decimal",
            ValueType::Boolean => "boolean",
            ValueType::Date => "date",
            ValueType::DateTime => "datetime",
            ValueType::Choice => "choice",
            ValueType::Enum => "enum",
            ValueType::Lookup => "lookup",
        };
        f.write_str(name)
    }
}

/// Human-readable rendering used in error messages, conflict logs and key strings.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Text(s) | Value::Enum(s) => f.write_str(s),
            Value::Integer(i) | Value::Choice(i) => write!(f, "{i}"),
            Value::Decimal(d) => write!(f, "{}", d.normalize()),
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Date(d) => write!(f, "{d}"),
            Value::DateTime(t) => write!(f, "{}", t.to_rfc3339()),
            Value::Lookup(l) => match (&l.id, &l.key) {
                (Some(id), _) => write!(f, "{}({id})", l.entity_set),
                (None, Some(key)) => write!(f, "{}({key})", l.entity_set),
                (None, None) => write!(f, "{}(?)", l.entity_set),
            },
        }
    }
}
