//! Finance & Operations: data events (RemoteExecutionContext with `OnExternal*` messages on
//! `mserp_` virtual entities) and business events (JSON envelope) into change events.

use std::collections::BTreeMap;

use crate::json::Json;
use chrono::{DateTime, FixedOffset, Utc};
use dualwrite_core::{
    ChangeEvent, Fields, Operation, Record, RecordKey, Side, SmolStr, SourceVersion, Value,
    ValueType,
};

use crate::config::{BusinessEventRoute, Coverage, ErpCoverage};
use crate::context::{
    ContextHead, Messages, Obj, conform_to_declared_types, entity_attributes, images, input_entity,
    is_reference, kv_list, opt_i64, opt_str, opt_wcf_date, parse_object, read_message, req_str,
    row_version, target, typed_value,
};
use crate::error::PayloadError;
use crate::receive::{Accepted, Parsed};
use crate::request::WebhookRequest;

/// Parses an F&O call: a business event when the body has `BusinessEventId`, a data event
/// when it has `MessageName` (pure: no I/O).
pub fn parse_fno(
    req: &WebhookRequest,
    coverage: &Coverage,
    routes: &BTreeMap<String, BusinessEventRoute>,
    now: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    let body = parse_object(&req.body)?;
    if body.contains_key("BusinessEventId") {
        business_event(&body, coverage, routes, now)
    } else if body.contains_key("MessageName") {
        data_event(req, &body, coverage, now)
    } else {
        Err(PayloadError::UnknownFnoPayload)
    }
}

/// The messages of an F&O data event and the operation each stands for.
const DATA_EVENT_MESSAGES: Messages = Messages {
    upsert: &["OnExternalCreated", "OnExternalUpdated"],
    delete: "OnExternalDeleted",
    expected: "OnExternalCreated, OnExternalUpdated, OnExternalDeleted",
};

/// Parses an F&O data event (pure: no I/O).
///
/// The context names a virtual entity (`mserp_customersv3`), mapped back to the F&O entity
/// through `coverage`; field names (`mserp_customeraccount`) are mapped back to the names the
/// maps use (`CustomerAccount`), unknown ones are kept as sent. Values come from the pre
/// images, then the Target, then the post images (later wins). F&O drops null date-times from
/// data events and sends every other field: a date-time the maps read and the event lacks is
/// null; an event that lacks any other field the maps read is `partial` and the worker reads
/// the record. Values are converted to the types the
/// maps declare (see `conform_to_declared_types`); an event with a value that does not convert
/// is `partial` too. The company is `dataAreaId`
/// (lower-cased, as F&O returns it) and the record id is the rendered key
/// `dataAreaId='usmf',CustomerAccount='US-001'`.
pub fn parse_data_event(
    req: &WebhookRequest,
    coverage: &Coverage,
    now: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    let ctx = parse_object(&req.body)?;
    data_event(req, &ctx, coverage, now)
}

fn data_event(
    req: &WebhookRequest,
    ctx: &Obj,
    coverage: &Coverage,
    now: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    let (operation, entity_name) = read_message(req, ctx, &DATA_EVENT_MESSAGES)?;
    let head = ContextHead::read(ctx)?;
    let Some(cov) = coverage.erp(entity_name) else {
        return Ok(Parsed::Ignored {
            entity: entity_name.into(),
        });
    };

    let (target_path, target) = target(ctx)?;
    let mut raw: Vec<(SmolStr, Value)> = Vec::new();
    // The row before the change: F&O sends it as the `PreImage` input parameter (the
    // reference: "entity fields in InputParameters Target and PreImage"); an entity image
    // registered the Dataverse way is read too. Later sources override earlier ones.
    if let Some((path, image)) = input_entity(ctx, "PreImage")? {
        raw.extend(entity_attributes(image, &path, coverage, &cov.types)?);
    }
    for (path, image) in images(ctx, "PreEntityImages")? {
        raw.extend(entity_attributes(image, &path, coverage, &cov.types)?);
    }
    if is_reference(target) {
        // A delete's Target is an EntityReference: its KeyAttributes carry the natural key.
        let keys_path = format!("{target_path}.KeyAttributes");
        for (k, v) in kv_list(target, "KeyAttributes", &target_path)? {
            raw.push((
                SmolStr::from(k),
                typed_value(v, &format!("{keys_path}.{k}"), coverage)?,
            ));
        }
    } else {
        raw.extend(entity_attributes(
            target,
            &target_path,
            coverage,
            &cov.types,
        )?);
    }
    for (path, image) in images(ctx, "PostEntityImages")? {
        raw.extend(entity_attributes(image, &path, coverage, &cov.types)?);
    }
    let mut fields: Fields = raw
        .into_iter()
        .map(|(k, v)| (real_name(cov, &k), v))
        .collect();
    let typed = conform_to_declared_types(&mut fields, &cov.types);

    let looked_in = "Target, its KeyAttributes and the entity images";
    let (company, key) = erp_key(cov, |f| non_null_text(fields.get(f)), looked_in)?;
    let mut record = Record::new(&cov.entity);
    record.id = Some(key.to_string().into());
    record.company = company.map(Into::into);
    // F&O drops null date-times from data events (its other fields always hold a value), so
    // a date-time the maps read and the event lacks is null; any other missing field means
    // the event does not carry the whole row.
    if operation == Operation::Upsert {
        for name in &cov.needed {
            let is_datetime = matches!(
                cov.types.get(name),
                Some(ValueType::Date | ValueType::DateTime)
            );
            if is_datetime && !fields.contains_key(name.as_str()) {
                fields.insert(name.as_str(), Value::Null);
            }
        }
    }
    let missing = cov.needed.iter().find(|f| !fields.contains_key(f.as_str()));
    let partial = operation == Operation::Upsert && (!typed || missing.is_some());
    if partial {
        tracing::debug!(
            entity = %entity_name,
            typed,
            missing = missing.map_or("", |f| f.as_str()),
            "partial event: the worker reads the record"
        );
    }
    let modified = match fields
        .get("ModifiedDateTime")
        .or_else(|| fields.get("modifiedon"))
    {
        Some(Value::DateTime(t)) if operation == Operation::Upsert => Some(*t),
        _ => head.created_on,
    };
    record.version = modified.map(|t| SourceVersion {
        modified_on: t.to_utc(),
        sequence: 0,
    });
    if operation == Operation::Upsert {
        record.fields = fields;
    }
    // Same rule as Dataverse webhooks (the context has the same shape): an empty-GUID
    // OperationId/RequestId is no id, and the fallback is derived from the notification.
    let event_id = head.event_id(&record, modified, row_version(target).as_deref());
    Ok(head.accept(event_id, Side::Erp, operation, record, partial, now))
}

/// Parses an F&O business event (pure: no I/O).
///
/// The envelope carries no record: `BusinessEventId` is routed to an entity through `routes`,
/// the key is read from the envelope fields the route names, the company from
/// `BusinessEventLegalEntity`; the event is always `partial` and the worker reads the record
/// by key. `ControlNumber` (increasing, with gaps) is the version's sequence, `EventId` the
/// event id, `EventTimeIso8601` (else `EventTime`) the version's time. Events without a route,
/// or routed to an entity no enabled map covers, are ignored.
pub fn parse_business_event(
    body: &[u8],
    coverage: &Coverage,
    routes: &BTreeMap<String, BusinessEventRoute>,
    now: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    business_event(&parse_object(body)?, coverage, routes, now)
}

fn business_event(
    env: &Obj,
    coverage: &Coverage,
    routes: &BTreeMap<String, BusinessEventRoute>,
    now: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    let business_event_id = req_str(env, "BusinessEventId", "")?;
    let event_id = req_str(env, "EventId", "")?;
    let control_number = opt_i64(env, "ControlNumber", "")?
        .ok_or_else(|| PayloadError::Missing("ControlNumber".into()))?;
    let time = event_time(env)?;
    let legal_entity = opt_str(env, "BusinessEventLegalEntity", "")?;
    let Some(route) = routes.get(business_event_id) else {
        return Ok(Parsed::Ignored {
            entity: business_event_id.into(),
        });
    };
    let Some(cov) = coverage.erp(&route.entity) else {
        return Ok(Parsed::Ignored {
            entity: route.entity.clone(),
        });
    };

    let mut fields = Fields::new();
    let mut pairs = Vec::new();
    if cov.company_specific {
        let company =
            legal_entity
                .filter(|c| !c.is_empty())
                .ok_or_else(|| PayloadError::MissingKey {
                    entity: cov.entity.clone(),
                    field: "dataAreaId".into(),
                    looked_in: "envelope field \"BusinessEventLegalEntity\"".into(),
                })?;
        pairs.push(("dataAreaId".to_string(), company.to_ascii_lowercase()));
    }
    for (key_field, envelope_field) in &route.key {
        let value = match env.get(envelope_field) {
            Some(Json::String(s)) if !s.is_empty() => s.to_string(),
            Some(Json::Number(n)) => n.to_string(),
            _ => {
                return Err(PayloadError::MissingKey {
                    entity: cov.entity.clone(),
                    field: key_field.clone(),
                    looked_in: format!("envelope field \"{envelope_field}\""),
                });
            }
        };
        pairs.push((key_field.clone(), value));
    }
    for (field, value) in &pairs {
        fields.insert(field.as_str(), Value::Text(value.as_str().into()));
    }
    let key = RecordKey(pairs);
    let mut record = Record::new(&cov.entity);
    record.id = Some(key.to_string().into());
    record.company = key.get("dataAreaId").map(Into::into);
    record.fields = fields;
    record.version = Some(SourceVersion {
        modified_on: time.to_utc(),
        sequence: control_number,
    });
    Ok(Parsed::Event(Box::new(Accepted {
        event: ChangeEvent {
            event_id: event_id.into(),
            source: Side::Erp,
            operation: Operation::Upsert,
            record,
            partial: true,
            received_at: now,
            correlation_id: None,
            depth: None,
        },
    })))
}

/// `EventTimeIso8601` when present (sub-millisecond precision), else the WCF `EventTime`.
fn event_time(env: &Obj) -> Result<DateTime<FixedOffset>, PayloadError> {
    if let Some(iso) = opt_str(env, "EventTimeIso8601", "")? {
        return DateTime::parse_from_rfc3339(iso).map_err(|_| PayloadError::BadIsoDate {
            field: "EventTimeIso8601".into(),
            value: iso.into(),
        });
    }
    opt_wcf_date(env, "EventTime", "")?.ok_or_else(|| PayloadError::Missing("EventTime".into()))
}

/// The name the maps use for a payload field: `mserp_customeraccount` → `CustomerAccount`.
fn real_name(cov: &ErpCoverage, sent: &str) -> SmolStr {
    let bare = sent
        .strip_prefix("mserp_")
        .unwrap_or(sent)
        .to_ascii_lowercase();
    cov.field_names
        .get(&bare)
        .map_or_else(|| sent.into(), |name| name.as_str().into())
}

/// A field's value as key text, `None` when absent, null or "" (F&O's empty).
fn non_null_text(v: Option<&Value>) -> Option<String> {
    v.filter(|v| !v.is_empty()).map(Value::to_string)
}

/// The company and rendered key of an F&O record: `dataAreaId` first (lower-cased) when the
/// entity is company-specific, then the key fields in key order.
fn erp_key(
    cov: &ErpCoverage,
    value_of: impl Fn(&str) -> Option<String>,
    looked_in: &str,
) -> Result<(Option<String>, RecordKey), PayloadError> {
    let missing = |field: &str| PayloadError::MissingKey {
        entity: cov.entity.clone(),
        field: field.into(),
        looked_in: looked_in.into(),
    };
    let mut pairs = Vec::new();
    let mut company = None;
    if cov.company_specific {
        let c = value_of("dataAreaId")
            .ok_or_else(|| missing("dataAreaId"))?
            .to_ascii_lowercase();
        pairs.push(("dataAreaId".to_string(), c.clone()));
        company = Some(c);
    }
    for field in &cov.key {
        pairs.push((
            field.clone(),
            value_of(field).ok_or_else(|| missing(field))?,
        ));
    }
    Ok((company, RecordKey(pairs)))
}
