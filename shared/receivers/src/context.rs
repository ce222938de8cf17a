//! Reading a serialized RemoteExecutionContext: JSON accessors with precise errors, WCF dates,
//! `[{key,value}]` dictionaries and typed attribute values (EntityReference, OptionSetValue,
//! Money), and what every context carries (message, entity, head fields).

use std::sync::Arc;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use std::collections::BTreeMap;

use dualwrite_core::hash::hash_fields;
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
        // An entry without its value is refused rather than read as null: a null attribute
        // clears the field on the other side, so it must be one Dataverse actually sent.
        let value = entry
            .get("value")
            .ok_or_else(|| PayloadError::Missing(format!("{}.value", item_path(i))))?;
        out.push((key, value));
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
/// stays exact. Exponent forms (`1.5E3`) are accepted too. A number a decimal cannot hold
/// exactly (more than 28 significant digits, or beyond its range) is `None`, never rounded.
pub(crate) fn decimal_of(n: &Number) -> Option<Decimal> {
    let text = n.to_string();
    match text.split_once(['e', 'E']) {
        None => Decimal::from_str_exact(&text).ok(),
        Some((mantissa, _)) => {
            Decimal::from_str_exact(mantissa).ok()?;
            Decimal::from_scientific(&text).ok()
        }
    }
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
///
/// An empty or all-zero `Id` is no id (a reference built from key attributes carries
/// `Guid.Empty`); a reference left with neither an id nor a key names no record and is refused,
/// as is a key attribute whose value is null: read as they came they would become a lookup of
/// nothing, or of the text `null`, and the engine would wait for (or link) a record that does
/// not exist.
pub(crate) fn entity_reference(
    obj: &Obj<'_>,
    path: &str,
    coverage: &Coverage,
) -> Result<LookupRef, PayloadError> {
    let logical = req_str(obj, "LogicalName", path)?;
    let id = opt_str(obj, "Id", path)?
        .filter(|id| !is_absent_guid(id))
        .map(str::to_string);
    let keys = kv_list(obj, "KeyAttributes", path)?;
    if let Some((k, _)) = keys.iter().find(|(_, v)| matches!(v, Json::Null)) {
        return Err(PayloadError::BadValue {
            field: format!("{}.{k}", at(path, "KeyAttributes")),
            value: "null".into(),
            expected: "a key value (text or a number)",
        });
    }
    if id.is_none() && keys.is_empty() {
        return Err(PayloadError::UnidentifiedReference {
            field: path.to_string(),
        });
    }
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
            Some("OptionSetValue") => Value::Choice(option_value(obj, &path())?),
            Some("Money") => Value::Decimal(money_value(obj, &path())?),
            None if obj.contains_key("LogicalName") && obj.contains_key("Id") => {
                Value::Lookup(Arc::new(entity_reference(obj, &path(), coverage)?))
            }
            _ => Value::Text(v.to_string().into()),
        },
    })
}

/// The `Value` number of an OptionSetValue or Money; absent, null or not a number is refused.
fn typed_number<'a>(obj: &'a Obj<'_>, path: &str) -> Result<&'a Number, PayloadError> {
    match obj.get("Value") {
        Some(Json::Number(n)) => Ok(n),
        None => Err(PayloadError::Missing(at(path, "Value"))),
        Some(_) => Err(PayloadError::WrongType {
            field: at(path, "Value"),
            expected: "a number",
        }),
    }
}

/// The `Value` of an OptionSetValue: Dataverse option values are 32-bit whole numbers. Any
/// other number is refused (400 naming the attribute), never rounded or read as option 0: a
/// wrong choice would be written to F&O as if the user had picked it.
fn option_value(obj: &Obj<'_>, path: &str) -> Result<i64, PayloadError> {
    let n = typed_number(obj, path)?;
    match n.as_i64().map(i32::try_from) {
        Some(Ok(v)) => Ok(i64::from(v)),
        _ => Err(PayloadError::BadValue {
            field: at(path, "Value"),
            value: n.to_string(),
            expected: "an option value (a whole number within 32 bits)",
        }),
    }
}

/// The `Value` of a Money, exact; a number no [`Decimal`] holds (beyond 28 digits or
/// ±7.9·10²⁸) is refused rather than rounded.
fn money_value(obj: &Obj<'_>, path: &str) -> Result<Decimal, PayloadError> {
    let n = typed_number(obj, path)?;
    decimal_of(n).ok_or_else(|| PayloadError::BadValue {
        field: at(path, "Value"),
        value: n.to_string(),
        expected: "an amount of at most 28 significant digits",
    })
}

/// True for an id that stands for "none": empty, or the all-zero GUID in any of its spellings
/// (`00000000-0000-0000-0000-000000000000`, in braces or parentheses, or without hyphens).
/// Dataverse sends it as the `OperationId` of a synchronous step (no system job runs it) and
/// as the `Id` of a reference given by key attributes.
pub(crate) fn is_absent_guid(id: &str) -> bool {
    let id = id.trim();
    let bare = id
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .or_else(|| id.strip_prefix('(').and_then(|s| s.strip_suffix(')')))
        .unwrap_or(id);
    bare.bytes().all(|b| b == b'0' || b == b'-')
        && (bare.is_empty() || bare.bytes().filter(|b| *b == b'0').count() == 32)
}

/// The `RowVersion` of an Entity or EntityReference when it carries one (text, or a number).
/// It is only an ingredient of a fallback event id, so another type is ignored rather than
/// refused: refusing would veto the user's save when the step is synchronous.
pub(crate) fn row_version(obj: &Obj<'_>) -> Option<String> {
    match obj.get("RowVersion")? {
        Json::String(s) if !s.trim().is_empty() => Some(s.to_string()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
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

/// The typed attributes of an Entity (`Attributes` list), in payload order. A string of a
/// column `declared` as text stays the text it is, even when it looks like a WCF date
/// (`/Date(0)/` typed by a user into a name).
pub(crate) fn entity_attributes(
    entity: &Obj<'_>,
    path: &str,
    coverage: &Coverage,
    declared: &BTreeMap<String, ValueType>,
) -> Result<Vec<(SmolStr, Value)>, PayloadError> {
    kv_list(entity, "Attributes", path)?
        .into_iter()
        .map(|(k, v)| {
            if let Json::String(text) = v
                && text.starts_with("/Date(")
                && declared.get(k) == Some(&ValueType::Text)
            {
                return Ok((SmolStr::from(k), Value::Text(text.as_ref().into())));
            }
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

/// The input parameter `name` holding an Entity (F&O data events carry the row before the
/// change as `PreImage` there), and its path; `None` when the context has no such parameter.
pub(crate) fn input_entity<'a>(
    ctx: &'a Obj<'a>,
    name: &str,
) -> Result<Option<(String, &'a Obj<'a>)>, PayloadError> {
    let params = kv_list(ctx, "InputParameters", "")?;
    let Some((i, value)) = params
        .iter()
        .enumerate()
        .find(|(_, (k, _))| *k == name)
        .map(|(i, (_, v))| (i, *v))
    else {
        return Ok(None);
    };
    let path = format!("InputParameters[{i}].value");
    match value {
        Json::Null => Ok(None),
        Json::Object(o) => Ok(Some((path, o))),
        _ => Err(PayloadError::WrongType {
            field: path,
            expected: "an Entity object",
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
    pub(crate) message: String,
    pub(crate) depth: Option<u32>,
    pub(crate) correlation_id: Option<String>,
    /// `OperationId`, `None` when absent or the empty GUID (a synchronous step).
    pub(crate) operation_id: Option<String>,
    /// `RequestId`, `None` when absent or the empty GUID.
    pub(crate) request_id: Option<String>,
    pub(crate) created_on: Option<DateTime<FixedOffset>>,
}

impl ContextHead {
    pub(crate) fn read(ctx: &Obj<'_>) -> Result<Self, PayloadError> {
        let id = |field| -> Result<Option<String>, PayloadError> {
            Ok(opt_str(ctx, field, "")?
                .filter(|id| !is_absent_guid(id))
                .map(str::to_string))
        };
        let depth = match opt_i64(ctx, "Depth", "")? {
            None => None,
            Some(d) => Some(u32::try_from(d).map_err(|_| PayloadError::BadValue {
                field: "Depth".into(),
                value: d.to_string(),
                expected: "an execution depth (a whole number from 0)",
            })?),
        };
        Ok(ContextHead {
            message: req_str(ctx, "MessageName", "")?.to_string(),
            depth,
            correlation_id: opt_str(ctx, "CorrelationId", "")?.map(str::to_string),
            operation_id: id("OperationId")?,
            request_id: id("RequestId")?,
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
                depth: self.depth,
            },
        }))
    }

    /// The id of the change this context reports: `OperationId` (the system job of an
    /// asynchronous step), else `RequestId`, else one derived from the notification itself.
    ///
    /// A synchronous step has no system job: its `OperationId` is the empty GUID, and so may
    /// its `RequestId` be. Taken as ids, every event of such a step would share one and all but
    /// the first be dropped as duplicates for the whole idempotency window; they count as
    /// absent. The derived id must be the same for a redelivery of one notification and differ
    /// between two changes, also two changes of one record within one correlation (a plug-in
    /// updating the record it reacts to, a Create followed by an Update): it is made of the
    /// correlation id, the message, the record, the modification time (`modifiedon`, else
    /// `OperationCreatedOn`: a Delete has no `modifiedon`), the depth, the row version when the
    /// payload has one, and a hash of the values the payload carries (which tells apart two
    /// updates of one record within the same second, `modifiedon` having whole seconds).
    /// Absent parts are `-`.
    pub(crate) fn event_id(
        &self,
        record: &Record,
        modified: Option<DateTime<FixedOffset>>,
        row_version: Option<&str>,
    ) -> String {
        if let Some(id) = self.operation_id.as_ref().or(self.request_id.as_ref()) {
            return id.clone();
        }
        let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
        // The stable, pinned field hash (no per-process seed), so another process or a
        // restart derives the same id for a redelivery.
        let values = hash_fields(record, record.fields.keys().map(SmolStr::as_str)).0;
        format!(
            "{}:{}:{}:{}:{}:{}:{:016x}",
            self.correlation_id.as_deref().unwrap_or("-"),
            self.message,
            record.id.as_deref().unwrap_or("-"),
            or_dash(modified.map(|t| t.to_utc().to_rfc3339())),
            or_dash(self.depth.map(|d| d.to_string())),
            row_version.unwrap_or("-"),
            // 64 bits of the 128 keep the id short; they only tell apart changes that agree
            // on everything before them.
            values as u64,
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
    use std::str::FromStr;

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

    /// Regression: an OptionSetValue whose `Value` was not a whole number became option 0.
    #[test]
    fn option_values_that_are_not_32_bit_whole_numbers_are_refused() {
        let option = |value: serde_json::Value| {
            typed(
                &json!({"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": value}),
                "Attributes.customertypecode",
            )
        };
        assert_eq!(
            option(json!(-2_147_483_648)),
            Ok(Value::Choice(-2_147_483_648))
        );
        assert_eq!(
            option(json!(2_147_483_647)),
            Ok(Value::Choice(2_147_483_647))
        );
        for (bad, shown) in [
            (json!(1.5), "1.5"),
            (json!(2_147_483_648_i64), "2147483648"),
            (json!(-2_147_483_649_i64), "-2147483649"),
            (
                json!(18_446_744_073_709_551_615_u64),
                "18446744073709551615",
            ),
        ] {
            let err = option(bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "field \"Attributes.customertypecode.Value\": {shown} is not an option value (a whole number within 32 bits)"
                )
            );
        }
        assert_eq!(
            option(json!("3")),
            Err(PayloadError::WrongType {
                field: "Attributes.customertypecode.Value".into(),
                expected: "a number"
            })
        );
        assert_eq!(
            typed(&json!({"__type": "OptionSetValue:x"}), "o"),
            Err(PayloadError::Missing("o.Value".into()))
        );
    }

    #[test]
    fn money_no_decimal_holds_is_refused_not_rounded() {
        let err = typed(
            &json!({"__type": "Money:x", "Value": 1e40}),
            "Attributes.creditlimit",
        )
        .unwrap_err();
        assert!(
            matches!(&err, PayloadError::BadValue { field, .. } if field == "Attributes.creditlimit.Value"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("at most 28 significant digits"),
            "{err}"
        );
        // Too many digits, or too small to be anything but zero: refused, not rounded.
        for text in [
            "123456789.123456789123456789123",
            "0.0000000000000000000000000000001",
            "1.2345678901234567890123456789012e3",
        ] {
            let body = format!(r#"{{"__type": "Money:x", "Value": {text}}}"#);
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                matches!(typed(&value, "m"), Err(PayloadError::BadValue { .. })),
                "{text}"
            );
        }
        let exact: serde_json::Value = serde_json::from_str(
            r#"{"__type": "Money:x", "Value": 1234567890123456.789012345678}"#,
        )
        .unwrap();
        assert_eq!(
            typed(&exact, "m"),
            Ok(Value::Decimal(
                Decimal::from_str("1234567890123456.789012345678").unwrap()
            ))
        );
        assert_eq!(
            typed(&json!({"__type": "Money:x", "Value": null}), "m"),
            Err(PayloadError::WrongType {
                field: "m.Value".into(),
                expected: "a number"
            })
        );
    }

    #[test]
    fn entity_references_must_name_a_record() {
        let reference = |id: serde_json::Value, keys: serde_json::Value| {
            typed(
                &json!({"__type": "EntityReference:x", "LogicalName": "transactioncurrency",
                        "Id": id, "KeyAttributes": keys}),
                "Attributes.transactioncurrencyid",
            )
        };
        let unnamed = Err(PayloadError::UnidentifiedReference {
            field: "Attributes.transactioncurrencyid".into(),
        });
        assert_eq!(reference(json!(null), json!([])), unnamed);
        assert_eq!(
            reference(json!("00000000-0000-0000-0000-000000000000"), json!([])),
            unnamed
        );
        // A reference by key carries the empty GUID as its id: the key is what names it.
        let by_key = reference(
            json!("00000000-0000-0000-0000-000000000000"),
            json!([{"key": "isocurrencycode", "value": "USD"}]),
        );
        assert_eq!(
            by_key,
            Ok(Value::Lookup(Arc::new(LookupRef {
                entity_set: "transactioncurrency".into(),
                id: None,
                key: Some(RecordKey::new([("isocurrencycode", "USD")])),
            })))
        );
        assert_eq!(
            reference(
                json!(null),
                json!([{"key": "isocurrencycode", "value": null}])
            )
            .unwrap_err()
            .to_string(),
            "field \"Attributes.transactioncurrencyid.KeyAttributes.isocurrencycode\": null is not a key value (text or a number)"
        );
    }

    #[test]
    fn a_dictionary_entry_without_its_value_is_refused_not_read_as_null() {
        let cov = Coverage::default();
        let body = r#"{"Attributes":[{"key":"name","value":"A"},{"key":"creditlimit"}]}"#;
        let Json::Object(entity) = crate::json::from_slice(body.as_bytes()).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            entity_attributes(&entity, "Target", &cov, &BTreeMap::new()),
            Err(PayloadError::Missing("Target.Attributes[1].value".into()))
        );
    }

    #[test]
    fn empty_guids_in_every_spelling_are_absent_and_real_ones_are_not() {
        for absent in [
            "",
            " ",
            "00000000-0000-0000-0000-000000000000",
            "{00000000-0000-0000-0000-000000000000}",
            "(00000000-0000-0000-0000-000000000000)",
            "00000000000000000000000000000000",
        ] {
            assert!(is_absent_guid(absent), "{absent:?}");
        }
        for id in [
            "4af10637-4ea2-e711-8122-000d3aa2331c",
            "{4AF10637-4EA2-E711-8122-000D3AA2331C}",
            "00000000-0000-0000-0000-000000000001",
            "0",
            "req-1",
        ] {
            assert!(!is_absent_guid(id), "{id:?}");
        }
    }

    #[test]
    fn a_negative_depth_is_refused() {
        let ctx = Obj::from_entries(vec![
            ("MessageName", Json::String("Update".into())),
            ("Depth", crate::json::from_slice(b"-1").unwrap()),
        ]);
        assert_eq!(
            ContextHead::read(&ctx).err().map(|e| e.to_string()),
            Some("field \"Depth\": -1 is not an execution depth (a whole number from 0)".into())
        );
    }
}
