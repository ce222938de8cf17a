//! F&O JSON ↔ [`Record`]: `dataAreaId` as the company, the rendered OData key as the record
//! id, `ModifiedDateTime` as the version, and enum literals in `$filter`.

use chrono::{DateTime, Utc};
use dualwrite_core::map::filter::{Filter, Literal};
use dualwrite_core::record::{Record, RecordKey, SourceVersion};
use dualwrite_core::value::{Value, ValueType};

use crate::odata::{
    DateStyle, RawObject, json_string, object_text, raw_str, value_from_json, value_to_json,
};
use crate::schema::EntitySchema;
use serde_json::value::RawValue;

/// The company field of every company-specific data entity.
pub const DATA_AREA_ID: &str = "dataAreaId";

/// The enum type whose symbols are `Yes`/`No`.
const NO_YES: &str = "Microsoft.Dynamics.DataEntities.NoYes";

/// The version field of data entities that have one.
pub const MODIFIED_FIELD: &str = "ModifiedDateTime";

/// Renders `filter` as F&O `$filter` text: core's [`Filter::to_odata`], except that a `Yes` or
/// `No` compared with a field the schema types as an enum is written as F&O's enum literal
/// `Microsoft.Dynamics.DataEntities.NoYes'Yes'`. Other enum types are named by the map itself
/// with an enum literal (`PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Person'`),
/// written as it is; the maps refuse a plain text compared with another enum field, which F&O
/// would refuse.
///
/// Only that difference is F&O's: such literals are swapped for unique placeholder texts,
/// core renders the filter, and the placeholders are replaced by the enum literals.
pub fn filter_text(schema: Option<&EntitySchema>, filter: &Filter) -> String {
    let plain = filter.to_odata();
    // A placeholder prefix that occurs nowhere in the filter's own text.
    let mut mark = String::from("~enum~");
    while plain.contains(&mark) {
        mark.push('~');
    }
    let mut symbols = Vec::new();
    let marked = mark_no_yes(schema, filter, &mark, &mut symbols);
    if symbols.is_empty() {
        return plain;
    }
    let mut text = marked.to_odata();
    for (i, symbol) in symbols.iter().enumerate() {
        let placeholder = Literal::Text(format!("{mark}{i}{mark}")).to_string();
        text = text.replacen(&placeholder, &format!("{NO_YES}'{symbol}'"), 1);
    }
    text
}

/// `filter` with each NoYes literal of an enum field replaced by placeholder text number `i`
/// (`<mark>i<mark>`); the symbols are pushed to `symbols` in that order.
fn mark_no_yes(
    schema: Option<&EntitySchema>,
    filter: &Filter,
    mark: &str,
    symbols: &mut Vec<String>,
) -> Filter {
    let mut child = |f: &Filter| Box::new(mark_no_yes(schema, f, mark, symbols));
    match filter {
        Filter::And(a, b) => {
            let a = child(a);
            Filter::And(a, child(b))
        }
        Filter::Or(a, b) => {
            let a = child(a);
            Filter::Or(a, child(b))
        }
        Filter::Not(a) => Filter::Not(child(a)),
        Filter::Compare {
            field,
            op,
            value: Literal::Text(symbol),
        } if schema.and_then(|s| s.type_of(field)) == Some(ValueType::Enum)
            && (symbol == "Yes" || symbol == "No") =>
        {
            let placeholder = format!("{mark}{}{mark}", symbols.len());
            symbols.push(symbol.clone());
            Filter::Compare {
                field: field.clone(),
                op: *op,
                value: Literal::Text(placeholder),
            }
        }
        other => other.clone(),
    }
}

/// The value of key field `field`, whose text is `text`, as the type the table maps declare
/// for it: a [`RecordKey`] holds every value as text, but OData writes an integer key
/// unquoted, an enum key as an enum literal, and a body carries each with its JSON type.
/// Undeclared fields, `dataAreaId` and text fields are text.
///
/// # Errors
/// The field, its declared type and the text when the text is not a value of that type.
pub fn key_value(schema: Option<&EntitySchema>, field: &str, text: &str) -> Result<Value, String> {
    let ty = schema.and_then(|s| s.type_of(field));
    let wrong = |what: &str| {
        format!(
            "key field {field} is declared {what} in the table maps, but its value {text:?} is not one"
        )
    };
    Ok(match ty {
        Some(ValueType::Integer | ValueType::Choice) => {
            Value::Integer(text.trim().parse().map_err(|_| wrong("a whole number"))?)
        }
        Some(ValueType::Decimal) => Value::Decimal(
            crate::odata::decimal_from_text(text.trim()).ok_or_else(|| wrong("a decimal"))?,
        ),
        Some(ValueType::Boolean) => match text.trim() {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            _ => return Err(wrong("a boolean (true or false)")),
        },
        Some(ValueType::Enum) => Value::Enum(text.into()),
        _ => Value::Text(text.into()),
    })
}

/// The OData literal of key field `field` with value `text` in a URL: text quoted (quotes
/// doubled), numbers and booleans unquoted, a `Yes`/`No` enum as
/// `Microsoft.Dynamics.DataEntities.NoYes'Yes'`. A quoted literal for an integer key is
/// refused by F&O's OData ("not a valid value of type Edm.Int32"), so the declared type decides.
///
/// # Errors
/// When the value does not fit the declared type, or is an enum symbol other than `Yes`/`No`:
/// the table maps do not name other enum types, and the literal needs the type's name.
fn key_literal(schema: Option<&EntitySchema>, field: &str, text: &str) -> Result<String, String> {
    Ok(match key_value(schema, field, text)? {
        Value::Integer(i) => i.to_string(),
        Value::Decimal(d) => d.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Enum(symbol) if symbol.as_str() == "Yes" || symbol.as_str() == "No" => {
            format!("{NO_YES}'{symbol}'")
        }
        Value::Enum(symbol) => {
            return Err(format!(
                "key field {field} is an F&O enum whose enum type the table maps do not name, so \
                 its key literal Microsoft.Dynamics.DataEntities.<EnumType>'{symbol}' cannot be \
                 written; only NoYes keys (Yes/No) can be addressed"
            ));
        }
        _ => format!("'{}'", text.replace('\'', "''")),
    })
}

/// Renders `key` for a URL (`dataAreaId='usmf',SalesOrderNumber='SO-1',LineNumber=1`), each
/// value as the literal of its declared type ([`key_literal`]). Not percent-encoded.
///
/// The record id stays [`RecordKey`]'s own text (every value quoted): it names the record in
/// links, and [`parse_key`] reads it back; only the URL needs the typed literals.
///
/// # Errors
/// The first key value that does not fit its declared type.
pub fn render_key(schema: Option<&EntitySchema>, key: &RecordKey) -> Result<String, String> {
    let mut parts = Vec::with_capacity(key.0.len());
    for (field, value) in &key.0 {
        parts.push(format!("{field}={}", key_literal(schema, field, value)?));
    }
    Ok(parts.join(","))
}

/// The fields a query of `schema`'s entity is ordered by so that it can be paged by key
/// (`dataAreaId` first for a per-company entity, then the natural key); `None` when the
/// entity cannot be paged that way: no key declared, or a key field that is an enum (its
/// order on the server is the enum's value, not its symbol's).
pub fn keyset_order(schema: &EntitySchema) -> Option<Vec<String>> {
    if schema.key.is_empty()
        || schema
            .key
            .iter()
            .any(|f| schema.type_of(f) == Some(ValueType::Enum))
    {
        return None;
    }
    let mut order = Vec::with_capacity(schema.key.len() + 1);
    if schema.company_specific {
        order.push(DATA_AREA_ID.to_string());
    }
    order.extend(schema.key.iter().cloned());
    Some(order)
}

/// The `$filter` text that selects the rows after `last` in key order ([`keyset_order`]):
/// `k1 gt v1 or (k1 eq v1 and k2 gt v2) or …`, each value the literal of its declared type.
/// `None` when `last` does not hold every key field in that order.
pub fn keyset_after(schema: &EntitySchema, order: &[String], last: &RecordKey) -> Option<String> {
    if last.0.len() != order.len() || last.0.iter().zip(order).any(|((f, _), o)| f != o) {
        return None;
    }
    let literals = last
        .0
        .iter()
        .map(|(field, value)| key_literal(Some(schema), field, value).ok())
        .collect::<Option<Vec<_>>>()?;
    let mut alternatives = Vec::with_capacity(order.len());
    for i in 0..order.len() {
        let mut terms: Vec<String> = (0..i)
            .map(|j| format!("{} eq {}", order[j], literals[j]))
            .collect();
        terms.push(format!("{} gt {}", order[i], literals[i]));
        alternatives.push(format!("({})", terms.join(" and ")));
    }
    Some(alternatives.join(" or "))
}

/// Parses a rendered key (`dataAreaId='usmf',CustomerAccount='US-001'`) back into pairs;
/// `None` when it is not in that form.
pub fn parse_key(text: &str) -> Option<RecordKey> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (field, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if matches!(chars.peek(), Some((_, '\''))) {
                        value.push('\'');
                        chars.next();
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            (value, &quoted[end?..])
        } else {
            let cut = after.find(',').unwrap_or(after.len());
            (after[..cut].trim().to_string(), &after[cut..])
        };
        pairs.push((field.trim().to_string(), value));
        let remaining = remaining.trim_start();
        if remaining.is_empty() {
            break;
        }
        rest = remaining.strip_prefix(',')?.trim_start();
    }
    Some(RecordKey(pairs))
}

/// The record key of a row: `dataAreaId` first for company-specific entities, then the
/// schema's key fields. `None` when a key field is missing.
pub fn key_of_row(schema: &EntitySchema, record: &Record) -> Option<RecordKey> {
    let mut pairs = Vec::new();
    if schema.company_specific {
        pairs.push((
            DATA_AREA_ID.to_string(),
            record.company.as_deref()?.to_string(),
        ));
    }
    for field in &schema.key {
        let value = record
            .fields
            .get(field.as_str())
            .filter(|v| !v.is_empty())?;
        pairs.push((field.clone(), value.to_string()));
    }
    Some(RecordKey(pairs))
}

/// The key of a row as [`key_of_row`] gives it for the row's record, read from the raw row
/// (for a row that does not convert): `None` when a key field is missing or not a plain value.
pub fn raw_key_of_row(schema: &EntitySchema, row: &RawObject) -> Option<RecordKey> {
    // Each value as `key_of_row` gives it: through its declared type, then as text.
    let text = |field: &str| -> Option<String> {
        let raw = row.get(field)?;
        let t = raw_str(raw).or_else(|| {
            let t = raw.get();
            (t.starts_with(|c: char| c == '-' || c.is_ascii_digit()) || t == "true" || t == "false")
                .then(|| t.to_string())
        })?;
        Some(key_value(Some(schema), field, &t).map_or(t, |v| v.to_string()))
    };
    let mut pairs = Vec::new();
    if schema.company_specific {
        pairs.push((DATA_AREA_ID.to_string(), text(DATA_AREA_ID)?));
    }
    for field in &schema.key {
        pairs.push((field.clone(), text(field).filter(|v| !v.is_empty())?));
    }
    Some(RecordKey(pairs))
}

/// Converts one row to a [`Record`] of `entity`: company from `dataAreaId`, id the rendered
/// key (when the schema names the key), version from `ModifiedDateTime` when the entity has
/// it (otherwise none: the ETag is the only change marker), ETag from `@odata.etag`.
pub fn record_from_row(
    entity: &str,
    schema: Option<&EntitySchema>,
    row: &RawObject,
) -> Result<Record, String> {
    let mut record = Record::new(entity);
    record.etag = row.get("@odata.etag").and_then(|r| raw_str(r));
    record.company = row
        .get(DATA_AREA_ID)
        .and_then(|r| raw_str(r))
        .map(Into::into);
    if let Some(modified) = row.get(MODIFIED_FIELD).and_then(|r| raw_str(r)) {
        let at = DateTime::parse_from_rfc3339(&modified).map_err(|e| {
            format!("field ModifiedDateTime: {modified:?} is not an ISO 8601 date-time: {e}")
        })?;
        record.version = Some(SourceVersion {
            modified_on: at.with_timezone(&Utc),
            sequence: 0,
        });
    }
    // Collected, then sorted once: inserting 50-odd fields one by one into the sorted fields
    // moves the tail of the vector each time.
    let mut fields = Vec::with_capacity(row.len());
    for (name, raw) in row {
        if name.contains('@') || name == DATA_AREA_ID {
            continue;
        }
        let ty = schema.and_then(|s| s.type_of(name));
        let value = value_from_json(raw, ty).map_err(|e| format!("field {name}: {e}"))?;
        fields.push((name.as_str(), value));
    }
    record.fields = fields.into_iter().collect();
    record.id = schema
        .and_then(|s| key_of_row(s, &record))
        .map(|k| k.to_string())
        .map(Into::into);
    Ok(record)
}

/// What a write's answer tells of the written row: its ETag, version and rendered key (id).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Written {
    /// `@odata.etag`.
    pub etag: Option<String>,
    /// From `ModifiedDateTime`, when the entity has it.
    pub version: Option<SourceVersion>,
    /// The rendered key, when the schema names the key and the row holds it.
    pub id: Option<String>,
}

/// Reads [`Written`] from the row a POST or PATCH answered with, converting only the ETag,
/// `ModifiedDateTime`, `dataAreaId` and the key fields (the row's other fields are what was
/// just written): the same values as [`record_from_row`] gives them.
pub fn written_of_body(schema: Option<&EntitySchema>, body: &str) -> Result<Written, String> {
    // Names and values borrowed from the body; a name with an escape (none in OData payloads)
    // cannot be borrowed, and such a row is read the long way.
    let Ok(row) = serde_json::from_str::<std::collections::HashMap<&str, &RawValue>>(body) else {
        let record = record_from_row("", schema, &crate::odata::parse_object(body)?)?;
        return Ok(Written {
            etag: record.etag,
            version: record.version,
            id: record.id.map(Into::into),
        });
    };
    let mut written = Written {
        etag: row.get("@odata.etag").and_then(|r| raw_str(r)),
        ..Written::default()
    };
    if let Some(modified) = row.get(MODIFIED_FIELD).and_then(|r| raw_str(r)) {
        let at = DateTime::parse_from_rfc3339(&modified).map_err(|e| {
            format!("field ModifiedDateTime: {modified:?} is not an ISO 8601 date-time: {e}")
        })?;
        written.version = Some(SourceVersion {
            modified_on: at.with_timezone(&Utc),
            sequence: 0,
        });
    }
    let Some(schema) = schema else {
        return Ok(written);
    };
    let mut key = Record::new("");
    key.company = row
        .get(DATA_AREA_ID)
        .and_then(|r| raw_str(r))
        .map(Into::into);
    for field in &schema.key {
        if let Some(raw) = row.get(field.as_str()) {
            let value = value_from_json(raw, schema.type_of(field))
                .map_err(|e| format!("field {field}: {e}"))?;
            key.fields.insert(field.as_str(), value);
        }
    }
    written.id = key_of_row(schema, &key).map(|k| k.to_string());
    Ok(written)
}

/// The JSON body of a POST or PATCH: the record's fields (dates as `…T00:00:00Z`, enums as
/// their symbol), the key fields of `key` that the record lacks (each with the JSON type the
/// maps declare for it, [`key_value`]), and `dataAreaId`. A null in a
/// field `schema` declares text is sent as "": F&O has no null text (its string properties do
/// not take null), and "" is how it spells an empty field.
pub fn record_body(
    schema: Option<&EntitySchema>,
    record: &Record,
    key: Option<&RecordKey>,
) -> Result<String, String> {
    let mut pairs = Vec::new();
    for (name, value) in &record.fields {
        if name == DATA_AREA_ID {
            continue;
        }
        if let Value::Lookup(l) = value {
            return Err(format!(
                "field {name}: F&O fields hold natural keys, not Dataverse lookups ({l:?})"
            ));
        }
        if value.is_null()
            && schema.is_some_and(|s| s.fields.get(name.as_str()) == Some(&ValueType::Text))
        {
            pairs.push((name.to_string(), "\"\"".to_owned()));
            continue;
        }
        pairs.push((
            name.to_string(),
            value_to_json(value, DateStyle::Midnight).map_err(|e| format!("field {name}: {e}"))?,
        ));
    }
    let mut company = record.company.clone();
    for (field, value) in key.map(|k| k.0.as_slice()).unwrap_or_default() {
        if field == DATA_AREA_ID {
            company = company.or_else(|| Some(value.clone().into()));
        } else if !record.fields.contains_key(field.as_str()) {
            // With its declared JSON type: F&O refuses "1" for an integer field.
            let typed = key_value(schema, field, value)?;
            pairs.push((
                field.clone(),
                value_to_json(&typed, DateStyle::Midnight)
                    .map_err(|e| format!("field {field}: {e}"))?,
            ));
        }
    }
    if let Some(c) = company {
        pairs.push((DATA_AREA_ID.to_string(), json_string(&c)));
    }
    Ok(object_text(&pairs))
}
