//! Dataverse JSON ↔ [`Record`]: primary id, `@odata.etag`, version (`modifiedon` +
//! `versionnumber`), the company lookup, `_x_value` lookup columns, `@odata.bind` writes, and
//! alternate-key rendering.

use chrono::{DateTime, Utc};
use dualwrite_core::record::{Record, RecordKey, SourceVersion};
use dualwrite_core::value::{LookupRef, Value, ValueType};
use std::sync::Arc;

use crate::odata::{
    DateStyle, RawObject, decimal_from_text, json_string, object_text, raw_str, value_from_json,
    value_to_json,
};
use crate::schema::EntitySchema;

/// The Web API name of a lookup column's value: `transactioncurrencyid` →
/// `_transactioncurrencyid_value`.
pub fn lookup_value_column(field: &str) -> String {
    format!("_{field}_value")
}

/// Renders an alternate key for a URL: `accountnumber='A1',_msdyn_company_value=<guid>`.
///
/// The pair naming the schema's company field carries a company code; it is written as the
/// company lookup's value column with `company_guid`, the `cdm_companies` row id of that code
/// (the caller resolves it). Integer and choice key fields are written unquoted, text quoted
/// with quotes doubled. Returns the pair that could not be rendered as the error.
pub fn render_key(
    schema: Option<&EntitySchema>,
    key: &RecordKey,
    company_guid: Option<&str>,
) -> Result<String, String> {
    let company_field = schema.and_then(|s| s.company_field.as_deref());
    let mut parts = Vec::with_capacity(key.0.len());
    for (field, value) in &key.0 {
        if Some(field.as_str()) == company_field {
            let guid = company_guid
                .ok_or_else(|| format!("no company row is known for {field}='{value}'"))?;
            parts.push(format!("{}={guid}", lookup_value_column(field)));
            continue;
        }
        let unquoted = field.starts_with('_') && field.ends_with("_value")
            || matches!(
                schema.and_then(|s| s.type_of(field)),
                Some(ValueType::Integer | ValueType::Choice)
            );
        if unquoted {
            parts.push(format!("{field}={value}"));
        } else {
            parts.push(format!("{field}='{}'", value.replace('\'', "''")));
        }
    }
    Ok(parts.join(","))
}

/// True for a GUID in its usual 8-4-4-4-12 hexadecimal form.
pub fn is_guid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The company code in `key`, when the key names the schema's company field.
pub fn company_in_key<'a>(schema: Option<&EntitySchema>, key: &'a RecordKey) -> Option<&'a str> {
    schema
        .and_then(|s| s.company_field.as_deref())
        .and_then(|f| key.get(f))
}

/// The id inside an `OData-EntityId` header or an `@odata.id`: `…/accounts(<guid>)` → guid.
pub fn id_from_entity_url(url: &str) -> Option<String> {
    let open = url.rfind('(')?;
    let close = url[open..].find(')')? + open;
    Some(url[open + 1..close].to_string())
}

fn version_of(row: &RawObject) -> Result<Option<SourceVersion>, String> {
    let Some(modified) = row.get("modifiedon").and_then(|r| raw_str(r)) else {
        return Ok(None);
    };
    let modified_on = DateTime::parse_from_rfc3339(&modified)
        .map_err(|e| format!("modifiedon {modified:?} is not an ISO 8601 date-time: {e}"))?
        .with_timezone(&Utc);
    let sequence = row
        .get("versionnumber")
        .and_then(|r| {
            let text = raw_str(r).unwrap_or_else(|| r.get().to_string());
            decimal_from_text(&text).and_then(|d| i64::try_from(d).ok())
        })
        .unwrap_or(0);
    Ok(Some(SourceVersion {
        modified_on,
        sequence,
    }))
}

/// Converts one row to a [`Record`] of `entity`.
///
/// `company_code` turns the company lookup's GUID into its `cdm_companycode`. Annotations
/// (`name@odata.…`) are dropped; `_x_value` columns become [`Value::Lookup`] of field `x`
/// pointing at the entity set the schema names (an empty entity set when no map names the
/// column). Errors name the field and what is wrong.
pub fn record_from_row(
    entity: &str,
    schema: Option<&EntitySchema>,
    row: &RawObject,
    company_code: &dyn Fn(&str) -> Option<String>,
) -> Result<Record, String> {
    let mut record = Record::new(entity);
    let primary_id = schema.and_then(|s| s.primary_id.as_deref());
    let company_field = schema.and_then(|s| s.company_field.as_deref());
    record.etag = row.get("@odata.etag").and_then(|r| raw_str(r));
    record.version = version_of(row)?;
    if let Some(pid) = primary_id {
        record.id = row.get(pid).and_then(|r| raw_str(r)).map(Into::into);
    }
    for (name, raw) in row {
        if name.contains('@') || Some(name.as_str()) == primary_id {
            continue;
        }
        if let Some(field) = name
            .strip_prefix('_')
            .and_then(|n| n.strip_suffix("_value"))
        {
            let guid = raw_str(raw);
            if Some(field) == company_field {
                if let Some(guid) = guid {
                    let code = company_code(&guid).ok_or_else(|| {
                        format!(
                            "field {field}: company row {guid} is not in {entity}'s company table"
                        )
                    })?;
                    record.company = Some(code.into());
                }
                continue;
            }
            let value = match guid {
                None => Value::Null,
                Some(id) => Value::Lookup(Arc::new(LookupRef {
                    entity_set: schema
                        .and_then(|s| s.lookup_targets.get(field))
                        .cloned()
                        .unwrap_or_default(),
                    id: Some(id),
                    key: None,
                })),
            };
            record.fields.insert(field.to_string(), value);
            continue;
        }
        let ty = schema.and_then(|s| s.type_of(name));
        let value = value_from_json(raw, ty).map_err(|e| format!("field {name}: {e}"))?;
        record.fields.insert(name.as_str(), value);
    }
    Ok(record)
}

/// The body of a PATCH or bulk target for `record`: field values, lookups and the company as
/// `@odata.bind` (`"transactioncurrencyid@odata.bind":"/transactioncurrencies(<guid>)"`,
/// `"msdyn_company@odata.bind":"/cdm_companies(cdm_companycode='USMF')"`), plus `extra`
/// entries (`@odata.type`, `@odata.id`) given as JSON text.
pub fn record_body(
    schema: Option<&EntitySchema>,
    record: &Record,
    company_bind: Option<String>,
    extra: &[(String, String)],
) -> Result<String, String> {
    let mut pairs: Vec<(String, String)> = extra.to_vec();
    let company_field = schema.and_then(|s| s.company_field.as_deref());
    for (name, value) in &record.fields {
        if Some(name.as_str()) == company_field {
            continue;
        }
        let declared = schema.and_then(|s| s.type_of(name));
        match value {
            Value::Lookup(l) => {
                let target = match (&l.id, &l.key) {
                    (Some(id), _) => format!("/{}({id})", l.entity_set),
                    (None, Some(key)) => format!("/{}({key})", l.entity_set),
                    (None, None) => {
                        return Err(format!(
                            "field {name}: lookup to {} has neither id nor key",
                            l.entity_set
                        ));
                    }
                };
                pairs.push((format!("{name}@odata.bind"), json_string(&target)));
            }
            Value::Null if declared == Some(ValueType::Lookup) => {
                pairs.push((format!("{name}@odata.bind"), "null".into()));
            }
            other => {
                let json = value_to_json(other, DateStyle::DateOnly)
                    .map_err(|e| format!("field {name}: {e}"))?;
                pairs.push((name.as_str().into(), json));
            }
        }
    }
    if let (Some(field), Some(bind)) = (company_field, company_bind) {
        pairs.push((format!("{field}@odata.bind"), json_string(&bind)));
    }
    Ok(object_text(&pairs))
}

/// A change-tracking answer: the ids of its `$deletedEntity` entries, its nextLink and its
/// deltaLink. Changed rows in it are skipped.
pub(crate) fn deletions_page(body: &str) -> Result<dualwrite_core::ports::DeletionsPage, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        value: Vec<serde_json::Map<String, serde_json::Value>>,
        #[serde(rename = "@odata.nextLink")]
        next: Option<String>,
        #[serde(rename = "@odata.deltaLink")]
        delta: Option<String>,
    }
    let a: Answer = serde_json::from_str(body)
        .map_err(|e| format!("the body is not a change-tracking answer: {e}"))?;
    let mut deleted = Vec::new();
    for (i, entry) in a.value.iter().enumerate() {
        let is_deletion = entry
            .get("@odata.context")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|c| c.ends_with("/$deletedEntity"));
        if !is_deletion {
            continue;
        }
        match entry.get("id").and_then(serde_json::Value::as_str) {
            Some(id) => deleted.push(id.to_owned()),
            None => return Err(format!("value[{i}] is a $deletedEntity without an id")),
        }
    }
    if a.next.is_none() && a.delta.is_none() {
        return Err("the answer has neither @odata.nextLink nor @odata.deltaLink".into());
    }
    Ok(dualwrite_core::ports::DeletionsPage {
        deleted,
        next: a.next,
        cursor: a.delta,
    })
}
