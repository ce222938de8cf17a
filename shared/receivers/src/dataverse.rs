//! Dataverse webhooks: a RemoteExecutionContext (Create/Update/Delete) into a change event.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, Utc};
use dualwrite_core::{ChangeEvent, Operation, Record, Side, SourceVersion, Value};
use serde_json::Value as Json;

use crate::config::{Coverage, CrmCoverage};
use crate::context::{
    Obj, entity_attributes, images, is_reference, kv_list, opt_i64, opt_str, opt_wcf_date,
    parse_object, req_str, target,
};
use crate::error::PayloadError;
use crate::receive::{Accepted, Parsed};
use crate::request::WebhookRequest;

/// Header Dataverse adds when the body would exceed 256 KB: images and InputParameters are
/// then removed from the body.
pub const MSG_SIZE_EXCEEDED_HEADER: &str = "x-ms-dynamics-msg-size-exceeded";

/// Parses a Dataverse webhook call into a change event (pure: no I/O).
///
/// - Create/Update: the Target's attributes, overlaid with every post image. The event is
///   complete (`partial: false`) only when it carries every column the maps read from the table
///   and the owning company is known; otherwise the worker reads the record.
/// - Delete: the Target is an EntityReference; the company comes from a pre image if any.
/// - With `x-ms-dynamics-msg-size-exceeded` the body has no Target or images: a partial event
///   naming `PrimaryEntityName`/`PrimaryEntityId` is built and the worker reads the record.
/// - `x-ms-dynamics-entity-name` / `-request-name`, when present, must agree with the body.
pub fn parse_dataverse(
    req: &WebhookRequest,
    coverage: &Coverage,
    now: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    let ctx = parse_object(&req.body)?;
    let message = req_str(&ctx, "MessageName", "")?;
    let entity_name = req_str(&ctx, "PrimaryEntityName", "")?;
    check_headers(req, message, entity_name)?;
    let operation = match message {
        "Create" | "Update" => Operation::Upsert,
        "Delete" => Operation::Delete,
        other => {
            return Err(PayloadError::UnsupportedMessage {
                found: other.into(),
                expected: "Create, Update, Delete",
            });
        }
    };
    let primary_id = req_str(&ctx, "PrimaryEntityId", "")?;
    let head = ContextHead::read(&ctx)?;
    let Some(cov) = coverage.crm(entity_name) else {
        return Ok(Parsed::Ignored {
            entity: entity_name.into(),
        });
    };

    let mut record = Record::new(&cov.entity_set);
    record.id = Some(primary_id.to_string());
    let partial = if req.header(MSG_SIZE_EXCEEDED_HEADER).is_some() {
        operation == Operation::Upsert
    } else {
        let (target_path, target) = target(&ctx)?;
        let mut sources: Vec<(String, &Obj)> = Vec::new();
        if operation == Operation::Delete {
            if !is_reference(target) {
                return Err(PayloadError::WrongType {
                    field: target_path,
                    expected: "an EntityReference (the Target of a Delete)",
                });
            }
            sources.extend(images(&ctx, "PreEntityImages")?);
        } else {
            if is_reference(target) {
                return Err(PayloadError::WrongType {
                    field: target_path,
                    expected: "an Entity with Attributes (the Target of a Create/Update)",
                });
            }
            sources.push((target_path, target));
            sources.extend(images(&ctx, "PostEntityImages")?);
        }
        let mut fields = BTreeMap::new();
        for (path, entity) in &sources {
            fields.extend(entity_attributes(entity, path, coverage)?);
        }
        let company = company_of(cov, &sources)?;
        record.company = company.code().map(str::to_string);
        // A delete carries no values: only identity and company matter, and its version is
        // the time of the delete (`OperationCreatedOn`), not the pre image's `modifiedon`.
        if operation == Operation::Upsert {
            record.fields = fields;
        }
        operation == Operation::Upsert
            && (company == Company::Unknown
                || !cov.needed.iter().all(|f| record.fields.contains_key(f)))
    };

    let modified = match record.get("modifiedon") {
        Some(Value::DateTime(t)) => Some(*t),
        _ => head.created_on,
    };
    let sequence = match record.get("versionnumber") {
        Some(Value::Integer(n)) => *n,
        _ => 0,
    };
    record.version = modified.map(|t| SourceVersion {
        modified_on: t.to_utc(),
        sequence,
    });
    let event_id = head.event_id(primary_id, modified);
    Ok(Parsed::Event(Box::new(Accepted {
        event: ChangeEvent {
            event_id,
            source: Side::Crm,
            operation,
            record,
            partial,
            received_at: now,
            correlation_id: head.correlation_id,
        },
        depth: head.depth,
    })))
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
    pub(crate) fn read(ctx: &Obj) -> Result<Self, PayloadError> {
        Ok(ContextHead {
            depth: opt_i64(ctx, "Depth", "")?,
            correlation_id: opt_str(ctx, "CorrelationId", "")?.map(str::to_string),
            operation_id: opt_str(ctx, "OperationId", "")?.map(str::to_string),
            request_id: opt_str(ctx, "RequestId", "")?.map(str::to_string),
            created_on: opt_wcf_date(ctx, "OperationCreatedOn", "")?,
        })
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

/// Checks `x-ms-dynamics-entity-name` and `x-ms-dynamics-request-name` against the body.
pub(crate) fn check_headers(
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

/// What the payload says of the owning company.
#[derive(Debug, PartialEq, Eq)]
enum Company {
    /// The table is global or the company column is empty.
    None,
    /// The company code (`cdm_companycode`).
    Code(String),
    /// The column is absent or refers to the company by GUID only: the worker reads it.
    Unknown,
}

impl Company {
    fn code(&self) -> Option<&str> {
        match self {
            Company::Code(c) => Some(c),
            Company::None | Company::Unknown => None,
        }
    }
}

/// The company of a record from its company lookup column (last source wins): the
/// `cdm_companycode` key attribute, else the reference's `Name`.
fn company_of(cov: &CrmCoverage, sources: &[(String, &Obj)]) -> Result<Company, PayloadError> {
    let Some(column) = &cov.company_field else {
        return Ok(Company::None);
    };
    let mut raw: Option<&Json> = None;
    for (path, entity) in sources {
        for (k, v) in kv_list(entity, "Attributes", path)? {
            if k == column {
                raw = Some(v);
            }
        }
    }
    let reference = match raw {
        None => return Ok(Company::Unknown),
        Some(Json::Null) => return Ok(Company::None),
        Some(Json::Object(o)) => o,
        Some(_) => return Ok(Company::Unknown),
    };
    let keys = kv_list(reference, "KeyAttributes", column)?;
    let by_key = keys
        .iter()
        .find(|(k, _)| *k == "cdm_companycode")
        .and_then(|(_, v)| v.as_str())
        .filter(|c| !c.is_empty());
    let by_name = opt_str(reference, "Name", column)?.filter(|c| !c.is_empty());
    Ok(by_key
        .or(by_name)
        .map_or(Company::Unknown, |c| Company::Code(c.to_string())))
}
