//! Reading a serialized RemoteExecutionContext: JSON accessors with precise errors, WCF dates,
//! `[{key,value}]` dictionaries and typed attribute values (EntityReference, OptionSetValue,
//! Money), and what every context carries (message, entity, head fields).

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use std::collections::BTreeMap;

use dualwrite_core::map::apply::convert;
use dualwrite_core::{
    ChangeEvent, Fields, LookupRef, Operation, Record, RecordKey, Side, SmolStr, Value, ValueType,
};
use rust_decimal::Decimal;
use serde_json::Number;

use crate::config::Coverage;
use crate::error::PayloadError;
pub(crate) use crate::json::{Json, Obj};
use crate::receive::{Accepted, Parsed};
use crate::request::WebhookRequest;

/// `path.field`, or `field` at the top level.
pub(crate) fn at(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Parses the body as a JSON object (borrowing from it).
pub(crate) fn parse_object(body: &[u8]) -> Result<Obj<'_>, PayloadError> {
    match crate::json::from_slice(body) {
        Ok(Json::Object(o)) => Ok(o),
        Ok(_) => Err(PayloadError::WrongType {
            field: "(body)".into(),
            expected: "a JSON object",
        }),
        Err(e) => Err(PayloadError::NotJson(e.to_string())),
    }
}

/// A required string field.
pub(crate) fn req_str<'a>(
    obj: &'a Obj<'_>,
    field: &str,
    path: &str,
) -> Result<&'a str, PayloadError> {
    opt_str(obj, field, path)?.ok_or_else(|| PayloadError::Missing(at(path, field)))
}

/// An optional string field: absent or `null` is `None`, another type is an error.
pub(crate) fn opt_str<'a>(
    obj: &'a Obj<'_>,
    field: &str,
    path: &str,
) -> Result<Option<&'a str>, PayloadError> {
    match obj.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(PayloadError::WrongType {
            field: at(path, field),
            expected: "a string",
        }),
    }
}

/// An optional whole-number field.
pub(crate) fn opt_i64(obj: &Obj<'_>, field: &str, path: &str) -> Result<Option<i64>, PayloadError> {
    match obj.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
        Some(_) => Err(PayloadError::WrongType {
            field: at(path, field),
            expected: "a number",
        }),
    }
}

/// A WCF-serialized dictionary `[{"key":…,"value":…}]`; absent or `null` is empty.
pub(crate) fn kv_list<'a>(
    obj: &'a Obj<'_>,
    field: &str,
    path: &str,
) -> Result<Vec<(&'a str, &'a Json<'a>)>, PayloadError> {
    let here = at(path, field);
    let items = match obj.get(field) {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(items)) => items,
        Some(_) => {
            return Err(PayloadError::WrongType {
                field: here,
                expected: "a list of {key, value}",
            });
        }
    };
    let mut out = Vec::with_capacity(items.len());
    // Item paths are spelled out only for an error: building one per item costs an allocation
    // on every attribute of every payload.
    let item_path = |i: usize| format!("{here}[{i}]");
    for (i, item) in items.iter().enumerate() {
        let Json::Object(entry) = item else {
            return Err(PayloadError::WrongType {
                field: item_path(i),
                expected: "{key, value}",
            });
        };
        let key = match entry.get("key") {
            Some(Json::String(k)) => k.as_ref(),
            _ => req_str(entry, "key", &item_path(i))?,
        };
        out.push((key, entry.get("value").unwrap_or(&Json::Null)));
    }
    Ok(out)
}

/// An optional WCF date field.
pub(crate) fn opt_wcf_date(
    obj: &Obj<'_>,
    field: &str,
    path: &str,
) -> Result<Option<DateTime<FixedOffset>>, PayloadError> {
    match opt_str(obj, field, path)? {
        None => Ok(None),
        Some(s) => parse_wcf_date(s)
            .map(Some)
            .ok_or_else(|| PayloadError::BadDate {
                field: at(path, field),
                value: s.into(),
            }),
    }
}

/// Parses a WCF JSON date `/Date(1506409448000-0700)/`: milliseconds since the Unix epoch
/// (the instant, in UTC) and optionally the zone offset the sender was in. Without an offset
/// the result is in UTC.
pub fn parse_wcf_date(text: &str) -> Option<DateTime<FixedOffset>> {
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    // The millisecond count may itself be negative: the offset sign is searched after it.
    let digits_from = usize::from(inner.starts_with('-'));
    let split = inner[digits_from..]
        .find(['+', '-'])
        .map_or(inner.len(), |i| i + digits_from);
    let (millis, offset) = inner.split_at(split);
    let millis: i64 = millis.parse().ok()?;
    let offset = if offset.is_empty() {
        FixedOffset::east_opt(0)?
    } else {
        let (sign, hhmm) = offset.split_at(1);
        if hhmm.len() != 4 || !hhmm.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let hours: i32 = hhmm[..2].parse().ok()?;
        let minutes: i32 = hhmm[2..].parse().ok()?;
        let seconds = hours * 3600 + minutes * 60;
        FixedOffset::east_opt(if sign == "-" { -seconds } else { seconds })?
    };
    let utc = Utc.timestamp_millis_opt(millis).single()?;
    Some(utc.with_timezone(&offset))
}

/// A JSON number as an exact decimal.
///
/// The workspace enables serde_json's `arbitrary_precision`, so a number keeps the text it was
/// sent with and converts to [`Decimal`] without passing through a float: `1234567890123.4567`
/// stays exact. Exponent forms (`1.5E3`) are accepted too.
pub(crate) fn decimal_of(n: &Number) -> Option<Decimal> {
    let text = n.to_string();
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .ok()
}

/// The `__type` of a typed value without its contract namespace (`EntityReference`).
fn type_name<'a>(obj: &'a Obj<'_>) -> Option<&'a str> {
    obj.get("__type")?
        .as_str()
        .map(|t| t.split(':').next().unwrap_or(t))
}

/// A JSON value as text for a key (`'USMF'`, `42`).
fn key_text(v: &Json<'_>) -> String {
    match v {
        Json::String(s) => s.to_string(),
        other => other.to_string(),
    }
}

/// An EntityReference as a lookup: the entity set resolved through `coverage` when a map
/// names the table, else the logical name; `KeyAttributes` become the lookup's key.
pub(crate) fn entity_reference(
    obj: &Obj<'_>,
    path: &str,
    coverage: &Coverage,
) -> Result<LookupRef, PayloadError> {
    let logical = req_str(obj, "LogicalName", path)?;
    let id = opt_str(obj, "Id", path)?.map(str::to_string);
    let keys = kv_list(obj, "KeyAttributes", path)?;
    let key =
        (!keys.is_empty()).then(|| RecordKey::new(keys.iter().map(|(k, v)| (*k, key_text(v)))));
    let entity_set = coverage.entity_set(logical).unwrap_or(logical).to_string();
    Ok(LookupRef {
        entity_set,
        id,
        key,
    })
}

/// One attribute value, typed. Unknown typed values (e.g. `OptionSetValueCollection`,
/// `AliasedValue`) are kept as their JSON text so nothing is lost; maps do not use them.
pub(crate) fn typed_value(
    v: &Json<'_>,
    path: &str,
    coverage: &Coverage,
) -> Result<Value, PayloadError> {
    typed_value_at(v, &|| path.to_owned(), coverage)
}

/// [`typed_value`] with the value's path spelled out only when needed (an error, or a typed
/// object whose own errors name it).
pub(crate) fn typed_value_at(
    v: &Json<'_>,
    path: &dyn Fn() -> String,
    coverage: &Coverage,
) -> Result<Value, PayloadError> {
    Ok(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => decimal_of(n).map_or_else(|| Value::Text(n.to_string().into()), Value::Decimal),
        },
        Json::String(s) if !s.starts_with("/Date(") => Value::Text(s.as_ref().into()),
        Json::String(s) => match parse_wcf_date(s) {
            Some(t) => Value::DateTime(t),
            None => {
                return Err(PayloadError::BadDate {
                    field: path(),
                    value: s.to_string(),
                });
            }
        },
        Json::Array(_) => Value::Text(v.to_string().into()),
        Json::Object(obj) => match type_name(obj) {
            Some("EntityReference") => {
                Value::Lookup(Arc::new(entity_reference(obj, &path(), coverage)?))
            }
            Some("OptionSetValue") => Value::Choice(number_value(obj, &path())?.0),
            Some("Money") => Value::Decimal(number_value(obj, &path())?.1),
            None if obj.contains_key("LogicalName") && obj.contains_key("Id") => {
                Value::Lookup(Arc::new(entity_reference(obj, &path(), coverage)?))
            }
            _ => Value::Text(v.to_string().into()),
        },
    })
}

/// The `Value` of an OptionSetValue/Money: as integer (for choices) and as decimal.
fn number_value(obj: &Obj<'_>, path: &str) -> Result<(i64, Decimal), PayloadError> {
    let wrong = || PayloadError::WrongType {
        field: at(path, "Value"),
        expected: "a number",
    };
    match obj.get("Value") {
        Some(Json::Number(n)) => {
            let d = decimal_of(n).ok_or_else(wrong)?;
            Ok((n.as_i64().unwrap_or_default(), d))
        }
        None => Err(PayloadError::Missing(at(path, "Value"))),
        Some(_) => Err(wrong()),
    }
}

/// Converts each value of `fields` to the type the maps declare for its field (`types`), as the
/// connectors type what they read: a payload types values by their JSON shape alone, so a
/// whole-number decimal arrives as an integer and an F&O enum symbol as text, and such values
/// would hash differently from the same row read through a connector, which hides echoes.
///
/// Returns `false` when some value does not convert (an F&O enum sent as its virtual-entity
/// option value, a date in a form the conversion does not read): that value is kept as sent
/// and the caller marks the event partial, so the worker reads the record through the
/// connector instead of trusting the payload.
pub(crate) fn conform_to_declared_types(
    fields: &mut Fields,
    types: &BTreeMap<String, ValueType>,
) -> bool {
    let mut all_typed = true;
    for (name, value) in fields.iter_mut() {
        let Some(&ty) = types.get(name.as_str()) else {
            continue;
        };
        // Lookups arrive as references already; the engine completes their keys.
        if ty == ValueType::Lookup || value.value_type().is_none_or(|t| t == ty) {
            continue;
        }
        match convert(value.clone(), ty) {
            Ok(typed) => *value = typed,
            Err(_) => all_typed = false,
        }
    }
    all_typed
}

/// The typed attributes of an Entity (`Attributes` list), in payload order.
pub(crate) fn entity_attributes(
    entity: &Obj<'_>,
    path: &str,
    coverage: &Coverage,
) -> Result<Vec<(SmolStr, Value)>, PayloadError> {
    kv_list(entity, "Attributes", path)?
        .into_iter()
        .map(|(k, v)| {
            let value_path = || format!("{}.{k}", at(path, "Attributes"));
            Ok((SmolStr::from(k), typed_value_at(v, &value_path, coverage)?))
        })
        .collect()
}

/// The entity objects of an image list (`PreEntityImages`/`PostEntityImages`).
pub(crate) fn images<'a>(
    ctx: &'a Obj<'a>,
    field: &str,
) -> Result<Vec<(String, &'a Obj<'a>)>, PayloadError> {
    kv_list(ctx, field, "")?
        .into_iter()
        .enumerate()
        .map(|(i, (_, v))| {
            let path = format!("{field}[{i}].value");
            match v {
                Json::Object(o) => Ok((path, o)),
                _ => Err(PayloadError::WrongType {
                    field: path,
                    expected: "an Entity object",
                }),
            }
        })
        .collect()
}

/// The `Target` input parameter and its path.
pub(crate) fn target<'a>(ctx: &'a Obj<'a>) -> Result<(String, &'a Obj<'a>), PayloadError> {
    if !ctx.contains_key("InputParameters") {
        return Err(PayloadError::Missing("InputParameters".into()));
    }
    let params = kv_list(ctx, "InputParameters", "")?;
    let (i, value) = params
        .iter()
        .enumerate()
        .find(|(_, (k, _))| *k == "Target")
        .map(|(i, (_, v))| (i, *v))
        .ok_or(PayloadError::NoTarget)?;
    let path = format!("InputParameters[{i}].value");
    match value {
        Json::Object(o) => Ok((path, o)),
        _ => Err(PayloadError::WrongType {
            field: path,
            expected: "an Entity or EntityReference",
        }),
    }
}

/// True when the Target is an EntityReference (Delete) rather than an Entity.
pub(crate) fn is_reference(obj: &Obj<'_>) -> bool {
    match type_name(obj) {
        Some(t) => t == "EntityReference",
        None => !obj.contains_key("Attributes"),
    }
}

/// The context fields every RemoteExecutionContext carries (Dataverse and F&O data events).
pub(crate) struct ContextHead {
    pub(crate) depth: Option<i64>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) operation_id: Option<String>,
    pub(crate) request_id: Option<String>,
    pub(crate) created_on: Option<DateTime<FixedOffset>>,
}

impl ContextHead {
    pub(crate) fn read(ctx: &Obj<'_>) -> Result<Self, PayloadError> {
        Ok(ContextHead {
            depth: opt_i64(ctx, "Depth", "")?,
            correlation_id: opt_str(ctx, "CorrelationId", "")?.map(str::to_string),
            operation_id: opt_str(ctx, "OperationId", "")?.map(str::to_string),
            request_id: opt_str(ctx, "RequestId", "")?.map(str::to_string),
            created_on: opt_wcf_date(ctx, "OperationCreatedOn", "")?,
        })
    }

    /// The accepted change: `record` changed by `operation` on `source`, with this context's
    /// correlation id and depth.
    pub(crate) fn accept(
        self,
        event_id: String,
        source: Side,
        operation: Operation,
        record: Record,
        partial: bool,
        now: DateTime<Utc>,
    ) -> Parsed {
        Parsed::Event(Box::new(Accepted {
            event: ChangeEvent {
                event_id,
                source,
                operation,
                record,
                partial,
                received_at: now,
                correlation_id: self.correlation_id,
            },
            depth: self.depth,
        }))
    }

    /// `OperationId`, else `RequestId`, else correlation id + record id + modified time.
    pub(crate) fn event_id(
        &self,
        record_id: &str,
        modified: Option<DateTime<FixedOffset>>,
    ) -> String {
        if let Some(id) = self.operation_id.as_ref().or(self.request_id.as_ref()) {
            return id.clone();
        }
        let modified = modified
            .map(|t| t.to_utc().to_rfc3339())
            .unwrap_or_default();
        format!(
            "{}:{record_id}:{modified}",
            self.correlation_id.as_deref().unwrap_or("-")
        )
    }
}

/// The messages of one kind of context and the operation each stands for.
pub(crate) struct Messages {
    /// Messages of a create or an update.
    pub(crate) upsert: &'static [&'static str],
    /// The message of a delete.
    pub(crate) delete: &'static str,
    /// Every message, listed for [`PayloadError::UnsupportedMessage`].
    pub(crate) expected: &'static str,
}

/// Reads `MessageName` and `PrimaryEntityName`, checks the `x-ms-dynamics-*` headers against
/// them and maps the message to an operation; any other message is
/// [`PayloadError::UnsupportedMessage`].
pub(crate) fn read_message<'a>(
    req: &WebhookRequest,
    ctx: &'a Obj<'_>,
    messages: &Messages,
) -> Result<(Operation, &'a str), PayloadError> {
    let message = req_str(ctx, "MessageName", "")?;
    let entity_name = req_str(ctx, "PrimaryEntityName", "")?;
    check_headers(req, message, entity_name)?;
    let operation = if messages.upsert.contains(&message) {
        Operation::Upsert
    } else if message == messages.delete {
        Operation::Delete
    } else {
        return Err(PayloadError::UnsupportedMessage {
            found: message.into(),
            expected: messages.expected,
        });
    };
    Ok((operation, entity_name))
}

/// Checks `x-ms-dynamics-entity-name` and `x-ms-dynamics-request-name` against the body.
fn check_headers(
    req: &WebhookRequest,
    message: &str,
    entity_name: &str,
) -> Result<(), PayloadError> {
    let checks = [
        (
            "x-ms-dynamics-entity-name",
            "PrimaryEntityName",
            entity_name,
        ),
        ("x-ms-dynamics-request-name", "MessageName", message),
    ];
    for (header, field, body_value) in checks {
        if let Some(value) = req.header(header)
            && !value.trim().eq_ignore_ascii_case(body_value)
        {
            return Err(PayloadError::HeaderMismatch {
                header,
                header_value: value.into(),
                field,
                body_value: body_value.into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SourceKind;
    use serde_json::json;

    const MESSAGES: Messages = Messages {
        upsert: &["Create", "Update"],
        delete: "Delete",
        expected: "Create, Update, Delete",
    };

    fn context(message: &str) -> Obj<'_> {
        Obj::from_entries(vec![
            ("MessageName", Json::String(message.into())),
            ("PrimaryEntityName", Json::String("account".into())),
        ])
    }

    /// `value` typed as a payload attribute at path `path`.
    fn typed(value: &serde_json::Value, path: &str) -> Result<Value, PayloadError> {
        let text = value.to_string();
        let json = crate::json::from_slice(text.as_bytes()).unwrap();
        typed_value(&json, path, &Coverage::default())
    }

    #[test]
    fn messages_map_to_operations_and_others_are_refused() {
        let req = WebhookRequest::new(SourceKind::Dataverse, Vec::new());
        let ctx = context("Update");
        assert_eq!(
            read_message(&req, &ctx, &MESSAGES).unwrap(),
            (Operation::Upsert, "account")
        );
        let ctx = context("Delete");
        assert_eq!(
            read_message(&req, &ctx, &MESSAGES).unwrap().0,
            Operation::Delete
        );
        let ctx = context("Assign");
        assert!(matches!(
            read_message(&req, &ctx, &MESSAGES),
            Err(PayloadError::UnsupportedMessage { found, expected })
                if found == "Assign" && expected == "Create, Update, Delete"
        ));
        let req = req.with_header("x-ms-dynamics-entity-name", "contact");
        let ctx = context("Update");
        assert!(matches!(
            read_message(&req, &ctx, &MESSAGES),
            Err(PayloadError::HeaderMismatch { .. })
        ));
    }

    #[test]
    fn wcf_dates_with_and_without_offset() {
        let utc = parse_wcf_date("/Date(1506384247000)/").unwrap();
        assert_eq!(utc.to_rfc3339(), "2017-09-26T00:04:07+00:00");
        let local = parse_wcf_date("/Date(1506409448000-0700)/").unwrap();
        assert_eq!(local.to_rfc3339(), "2017-09-26T00:04:08-07:00");
        assert_eq!(local.timestamp_millis(), 1_506_409_448_000);
        let east = parse_wcf_date("/Date(0+0530)/").unwrap();
        assert_eq!(east.to_rfc3339(), "1970-01-01T05:30:00+05:30");
        let before_epoch = parse_wcf_date("/Date(-1000-0100)/").unwrap();
        assert_eq!(before_epoch.timestamp(), -1);
        assert_eq!(before_epoch.offset().local_minus_utc(), -3600);
    }

    #[test]
    fn malformed_wcf_dates_are_refused() {
        for bad in [
            "/Date()/",
            "/Date(12a)/",
            "/Date(1-07)/",
            "Date(1)",
            "/Date(1+07000)/",
        ] {
            assert_eq!(parse_wcf_date(bad), None, "{bad}");
        }
        let err = typed(&json!("/Date(x)/"), "Attributes.modifiedon");
        assert!(matches!(err, Err(PayloadError::BadDate { .. })));
    }

    #[test]
    fn typed_values() {
        let v = |j: serde_json::Value| typed(&j, "x").unwrap();
        assert_eq!(v(json!(null)), Value::Null);
        assert_eq!(v(json!(true)), Value::Boolean(true));
        assert_eq!(v(json!(42)), Value::Integer(42));
        assert_eq!(
            v(json!(0.1)),
            Value::Decimal(Decimal::from_str("0.1").unwrap())
        );
        assert_eq!(v(json!("text")), Value::Text("text".into()));
        assert_eq!(
            v(
                json!({"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 3})
            ),
            Value::Choice(3)
        );
        assert_eq!(
            v(
                json!({"__type": "Money:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 1234567.8912})
            ),
            Value::Decimal(Decimal::from_str("1234567.8912").unwrap())
        );
        let money = typed(&json!({"__type": "Money:x", "Value": "12"}), "m");
        assert_eq!(
            money,
            Err(PayloadError::WrongType {
                field: "m.Value".into(),
                expected: "a number"
            })
        );
    }

    #[test]
    fn money_beyond_float_precision_stays_exact() {
        let cov = Coverage::default();
        // Dataverse Money's largest value: 19 significant digits, more than an f64 holds.
        let body = r#"{"__type":"Money:http://schemas.microsoft.com/xrm/2011/Contracts","Value":922337203685477.5807}"#;
        let json = crate::json::from_slice(body.as_bytes()).unwrap();
        assert_eq!(
            typed_value(&json, "m", &cov),
            Ok(Value::Decimal(
                Decimal::from_str("922337203685477.5807").unwrap()
            ))
        );
    }
}
