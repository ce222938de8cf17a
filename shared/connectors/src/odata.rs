//! OData JSON shared by both connectors: typed values ↔ JSON text (numbers kept as their
//! exact text, never through `f64`), the filter of a query (rendered by core's
//! [`Filter::to_odata`]), and response-body parsing.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use dualwrite_core::map::filter::{CompareOp, Filter, Literal};
use dualwrite_core::value::{Value, ValueType};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

/// One JSON object with its values still as raw JSON text.
pub type RawObject = BTreeMap<String, Box<RawValue>>;

/// How a date without time is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateStyle {
    /// `2026-05-01` (Dataverse Date Only columns).
    DateOnly,
    /// `2026-05-01T12:00:00Z` (F&O `Date` fields are `Edm.DateTimeOffset` at noon UTC in
    /// exports; any time of day is read back as the same date).
    Midnight,
}

#[derive(Deserialize)]
struct Collection {
    value: Vec<RawObject>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
}

/// Parses one entity body.
pub fn parse_object(body: &str) -> Result<RawObject, String> {
    serde_json::from_str(body).map_err(|e| format!("the body is not a JSON object: {e}"))
}

/// Parses a collection body: its rows and `@odata.nextLink`.
pub fn parse_collection(body: &str) -> Result<(Vec<RawObject>, Option<String>), String> {
    let c: Collection = serde_json::from_str(body)
        .map_err(|e| format!("the body is not an OData collection: {e}"))?;
    Ok((c.value, c.next_link))
}

/// A JSON string's content, `None` when `raw` is not a string.
pub fn raw_str(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

fn is_number(text: &str) -> bool {
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

/// Parses JSON number text exactly (`12.50`, `-3`, `1.5E+3`).
pub fn decimal_from_text(text: &str) -> Option<Decimal> {
    Decimal::from_str(text)
        .ok()
        .or_else(|| Decimal::from_scientific(text).ok())
}

fn integer_from_text(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().or_else(|| {
        decimal_from_text(text)
            .filter(|d| d.fract().is_zero())
            .and_then(|d| i64::try_from(d).ok())
    })
}

fn date_from_text(text: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .or_else(|| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.date_naive())
        })
}

/// Converts one JSON value to a [`Value`] of type `ty`; by its JSON shape when `ty` is
/// `None` (string → text, integer → integer, other number → exact decimal, bool → boolean,
/// null → null). Errors describe the mismatch (`expected a decimal, got "abc"`).
pub fn value_from_json(raw: &RawValue, ty: Option<ValueType>) -> Result<Value, String> {
    let text = raw.get().trim();
    if text == "null" {
        return Ok(Value::Null);
    }
    let string = raw_str(raw);
    let mismatch = |what: &str| format!("expected {what}, got {text}");
    let value = match ty {
        None => {
            if let Some(s) = string {
                Value::Text(s.into())
            } else if text == "true" || text == "false" {
                Value::Boolean(text == "true")
            } else if is_number(text) {
                match text.parse::<i64>() {
                    Ok(i) => Value::Integer(i),
                    Err(_) => {
                        Value::Decimal(decimal_from_text(text).ok_or_else(|| mismatch("a number"))?)
                    }
                }
            } else {
                // Objects and arrays are kept as their JSON text.
                Value::Text(text.to_string().into())
            }
        }
        Some(ValueType::Text) => match string {
            Some(s) => Value::Text(s.into()),
            None if is_number(text) || text == "true" || text == "false" => {
                Value::Text(text.to_string().into())
            }
            None => return Err(mismatch("text")),
        },
        Some(ValueType::Integer) => {
            Value::Integer(integer_from_text(text).ok_or_else(|| mismatch("a whole number"))?)
        }
        Some(ValueType::Choice) => Value::Choice(
            integer_from_text(text).ok_or_else(|| mismatch("a choice value (integer)"))?,
        ),
        Some(ValueType::Decimal) => {
            let source = string.as_deref().unwrap_or(text);
            Value::Decimal(decimal_from_text(source).ok_or_else(|| mismatch("a decimal number"))?)
        }
        Some(ValueType::Boolean) => match text {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            _ => return Err(mismatch("true or false")),
        },
        Some(ValueType::Date) => Value::Date(
            string
                .as_deref()
                .and_then(date_from_text)
                .ok_or_else(|| mismatch("a date"))?,
        ),
        Some(ValueType::DateTime) => Value::DateTime(
            string
                .as_deref()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .ok_or_else(|| mismatch("an ISO 8601 date-time"))?,
        ),
        Some(ValueType::Enum) => match string {
            Some(s) => Value::Enum(s.into()),
            None => return Err(mismatch("an enum symbol (string)")),
        },
        Some(ValueType::Lookup) => {
            return Err(format!(
                "lookups are read from `_<field>_value` columns, got {text}"
            ));
        }
    };
    Ok(value)
}

/// A JSON string literal, escaped as `serde_json` writes it (`\"`, `\\`, `\b`, `\f`, `\n`,
/// `\r`, `\t`, other control characters as `\u00xx`; everything else as is). Written
/// directly: every field of every write goes through here.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    let mut plain = 0;
    for (i, b) in text.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[plain..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&text[plain..]);
    out.push('"');
    out
}

/// The JSON text of a value (lookups excepted: they become `@odata.bind` entries, which the
/// connector writes). Decimals are written as JSON numbers with all their digits.
pub fn value_to_json(value: &Value, dates: DateStyle) -> Result<String, String> {
    Ok(match value {
        Value::Null => "null".to_string(),
        Value::Text(s) | Value::Enum(s) => json_string(s),
        Value::Integer(i) | Value::Choice(i) => i.to_string(),
        Value::Decimal(d) => d.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Date(d) => match dates {
            DateStyle::DateOnly => json_string(&d.format("%Y-%m-%d").to_string()),
            DateStyle::Midnight => json_string(&format!("{}T00:00:00Z", d.format("%Y-%m-%d"))),
        },
        Value::DateTime(t) => json_string(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        Value::Lookup(l) => {
            return Err(format!(
                "lookup {value} must be written as {}@odata.bind",
                l.entity_set
            ));
        }
    })
}

/// A JSON object from `(name, JSON text)` pairs, in order.
pub fn object_text(pairs: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (name, json)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(name));
        out.push(':');
        out.push_str(json);
    }
    out.push('}');
    out
}

/// The filter of a query: the map's `filter` and, for incremental reads, `field ge since`
/// (`modifiedon` / `ModifiedDateTime`), joined by `and`. Rendered by
/// [`Filter::to_odata`]; `None` when there is nothing to filter on.
pub fn query_filter(
    filter: Option<&Filter>,
    field: &str,
    since: Option<DateTime<Utc>>,
) -> Option<Filter> {
    let modified = since.map(|t| Filter::Compare {
        field: field.to_string(),
        op: CompareOp::Ge,
        value: Literal::DateTime(t.fixed_offset()),
    });
    match (filter.cloned(), modified) {
        (Some(f), Some(m)) => Some(Filter::And(Box::new(f), Box::new(m))),
        (f, m) => f.or(m),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        let mut samples: Vec<String> = vec![
            String::new(),
            "plain".into(),
            "quote \" backslash \\ slash / nl \n cr \r tab \t".into(),
            "\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f}".into(),
            "é € 😀 \u{2028}".into(),
        ];
        samples.extend((0u8..=0x7f).map(|b| format!("a{}b", char::from(b))));
        for text in samples {
            assert_eq!(
                super::json_string(&text),
                serde_json::Value::String(text.clone()).to_string(),
                "{text:?}"
            );
        }
    }

    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn money_is_read_exactly_from_the_number_text() {
        let v =
            value_from_json(&raw("12345678901234.123456789"), Some(ValueType::Decimal)).unwrap();
        assert_eq!(
            v,
            Value::Decimal(Decimal::from_str("12345678901234.123456789").unwrap())
        );
        // 0.1 + 0.2 style values survive unchanged.
        let v = value_from_json(&raw("0.30000000000000004441"), None).unwrap();
        assert_eq!(
            v,
            Value::Decimal(Decimal::from_str("0.30000000000000004441").unwrap())
        );
        assert_eq!(
            value_from_json(&raw("1.5E+3"), Some(ValueType::Decimal)).unwrap(),
            Value::Decimal(Decimal::from(1500))
        );
    }

    #[test]
    fn money_is_written_with_all_digits() {
        let d = Decimal::from_str("1000.10").unwrap();
        assert_eq!(
            value_to_json(&Value::Decimal(d), DateStyle::DateOnly).unwrap(),
            "1000.10"
        );
        let d = Decimal::from_str("-0.0000000001").unwrap();
        assert_eq!(
            value_to_json(&Value::Decimal(d), DateStyle::DateOnly).unwrap(),
            "-0.0000000001"
        );
    }

    #[test]
    fn shapes_decide_the_type_of_unknown_fields() {
        assert_eq!(
            value_from_json(&raw("\"A1\""), None).unwrap(),
            Value::Text("A1".into())
        );
        assert_eq!(
            value_from_json(&raw("42"), None).unwrap(),
            Value::Integer(42)
        );
        assert_eq!(
            value_from_json(&raw("true"), None).unwrap(),
            Value::Boolean(true)
        );
        assert_eq!(
            value_from_json(&raw("null"), Some(ValueType::Decimal)).unwrap(),
            Value::Null
        );
    }

    #[test]
    fn declared_types_are_applied() {
        assert_eq!(
            value_from_json(&raw("806380000"), Some(ValueType::Choice)).unwrap(),
            Value::Choice(806380000)
        );
        assert_eq!(
            value_from_json(&raw("\"Yes\""), Some(ValueType::Enum)).unwrap(),
            Value::Enum("Yes".into())
        );
        assert_eq!(
            value_from_json(&raw("\"2026-05-01\""), Some(ValueType::Date)).unwrap(),
            Value::Date(NaiveDate::from_ymd_opt(2026, 5, 1).unwrap())
        );
        assert_eq!(
            value_from_json(&raw("\"2026-05-01T12:00:00Z\""), Some(ValueType::Date)).unwrap(),
            Value::Date(NaiveDate::from_ymd_opt(2026, 5, 1).unwrap())
        );
        let t = value_from_json(
            &raw("\"2022-12-30T13:51:15.2942742Z\""),
            Some(ValueType::DateTime),
        )
        .unwrap();
        assert_eq!(
            value_to_json(&t, DateStyle::DateOnly).unwrap(),
            "\"2022-12-30T13:51:15.294274200Z\""
        );
        let err = value_from_json(&raw("\"abc\""), Some(ValueType::Decimal)).unwrap_err();
        assert_eq!(err, "expected a decimal number, got \"abc\"");
        assert!(value_from_json(&raw("\"x\""), Some(ValueType::Boolean)).is_err());
    }

    #[test]
    fn dates_are_written_in_each_style() {
        let d = Value::Date(NaiveDate::from_ymd_opt(2026, 5, 1).unwrap());
        assert_eq!(
            value_to_json(&d, DateStyle::DateOnly).unwrap(),
            "\"2026-05-01\""
        );
        assert_eq!(
            value_to_json(&d, DateStyle::Midnight).unwrap(),
            "\"2026-05-01T00:00:00Z\""
        );
    }

    #[test]
    fn the_incremental_bound_is_anded_to_the_map_filter() {
        let map_filter =
            dualwrite_core::map::filter::parse_filter("a eq 'O''Neil' or b ge 1.50").unwrap();
        let since = DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let f = query_filter(Some(&map_filter), "modifiedon", Some(since)).unwrap();
        assert_eq!(
            f.to_odata(),
            "(a eq 'O''Neil' or b ge 1.50) and modifiedon ge 2026-05-01T00:00:00Z"
        );
        assert_eq!(
            query_filter(None, "modifiedon", Some(since))
                .unwrap()
                .to_odata(),
            "modifiedon ge 2026-05-01T00:00:00Z"
        );
        assert_eq!(
            query_filter(Some(&map_filter), "modifiedon", None),
            Some(map_filter)
        );
        assert_eq!(query_filter(None, "modifiedon", None), None);
    }

    #[test]
    fn collections_keep_next_link_verbatim() {
        let body = r#"{"value":[{"a":1.10}],"@odata.nextLink":"https://x/api/data/v9.2/accounts?$skiptoken=%3Ccookie%20pagenumber=%222%22/%3E"}"#;
        let (rows, next) = parse_collection(body).unwrap();
        assert_eq!(rows[0]["a"].get(), "1.10");
        assert_eq!(
            next.as_deref(),
            Some("https://x/api/data/v9.2/accounts?$skiptoken=%3Ccookie%20pagenumber=%222%22/%3E")
        );
    }
}
