//! Dataverse webhooks: a RemoteExecutionContext (Create/Update/Delete) into a change event.

use crate::json::Json;
use chrono::{DateTime, Utc};
use dualwrite_core::{Fields, Operation, Record, Side, SmolStr, SourceVersion, Value};

use crate::config::{Coverage, CrmCoverage};
use crate::context::{
    ContextHead, Messages, Obj, conform_to_declared_types, entity_attributes, images, is_reference,
    kv_list, opt_str, parse_object, read_message, req_str, row_version, target,
};
use crate::error::PayloadError;
use crate::receive::Parsed;
use crate::request::WebhookRequest;

/// Header Dataverse adds when the body would exceed 256 KB: images and InputParameters are
/// then removed from the body.
pub const MSG_SIZE_EXCEEDED_HEADER: &str = "x-ms-dynamics-msg-size-exceeded";

/// The messages of a Dataverse webhook and the operation each stands for.
const DATAVERSE_MESSAGES: Messages = Messages {
    upsert: &["Create", "Update"],
    delete: "Delete",
    expected: "Create, Update, Delete",
};

/// Parses a Dataverse webhook call into a change event (pure: no I/O).
///
/// - Create/Update: the Target's attributes, overlaid with every post image. The event is
///   complete (`partial: false`) only when it carries every column the maps read from the table
///   and the owning company (by code, or by id for the worker to resolve through the company's
///   link); otherwise the worker reads the record. When the steps' post images are registered
///   with all columns ([`Coverage::with_complete_post_images`]), an event with a post image
///   takes its values from the image alone (the Target's are a subset of them) and a column the
///   image lacks is null (Dataverse leaves null columns out of images). Values are
///   converted to the types the maps declare, as the connector types what it reads; an event
///   with a value that does not convert is partial too.
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
    let (operation, entity_name) = read_message(req, &ctx, &DATAVERSE_MESSAGES)?;
    let primary_id = req_str(&ctx, "PrimaryEntityId", "")?;
    let head = ContextHead::read(&ctx)?;
    let Some(cov) = coverage.crm(entity_name) else {
        return Ok(Parsed::Ignored {
            entity: entity_name.into(),
        });
    };

    let mut record = Record::new(&cov.entity_set);
    record.id = Some(primary_id.to_string().into());
    // The Target's RowVersion, when the payload has one: part of a fallback event id.
    let mut target_row_version = None;
    let partial = if req.header(MSG_SIZE_EXCEEDED_HEADER).is_some() {
        operation == Operation::Upsert
    } else {
        let (target_path, target) = target(&ctx)?;
        target_row_version = row_version(target);
        let mut sources: Vec<(String, &Obj)> = Vec::new();
        // With post images registered with all columns, an image holds every column of the
        // row as written (null ones left out): the Target's values, a subset, are not needed.
        let mut complete_image = false;
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
            let post_images = images(&ctx, "PostEntityImages")?;
            complete_image = coverage.complete_post_images() && !post_images.is_empty();
            if !complete_image {
                sources.push((target_path, target));
            }
            sources.extend(post_images);
        }
        // Collected first and sorted once (a later entry wins), rather than inserted one by
        // one into the sorted fields.
        let mut raw = Vec::new();
        if complete_image {
            // The post image is registered with all columns: a column it lacks is null. The
            // nulls go first, so any value sent for the column wins.
            raw.extend(
                cov.needed
                    .iter()
                    .filter(|name| Some(*name) != cov.company_field.as_ref())
                    .map(|name| (SmolStr::from(name.as_str()), Value::Null)),
            );
        }
        for (path, entity) in &sources {
            raw.extend(entity_attributes(entity, path, coverage, &cov.types)?);
        }
        let mut fields: Fields = raw.into_iter().collect();
        let typed = conform_to_declared_types(&mut fields, &cov.types);
        let company = company_of(cov, &sources)?;
        record.company = company.code().map(Into::into);
        // A delete carries no values: only identity and company matter, and its version is
        // the time of the delete (`OperationCreatedOn`), not the pre image's `modifiedon`.
        if operation == Operation::Upsert {
            record.fields = fields;
        }
        let missing = cov
            .needed
            .iter()
            .find(|f| !record.fields.contains_key(f.as_str()));
        let partial = operation == Operation::Upsert
            && (company == Company::Unknown || !typed || missing.is_some());
        if partial {
            tracing::debug!(
                entity = %entity_name,
                id = %primary_id,
                company_known = company != Company::Unknown,
                typed,
                missing = missing.map_or("", |f| f.as_str()),
                "partial event: the worker reads the record"
            );
        }
        partial
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
    // `versionnumber` (the row's version, when an image carries it) else the Target's
    // RowVersion tells apart two changes within one correlation and second.
    let version = (sequence != 0)
        .then(|| sequence.to_string())
        .or(target_row_version);
    let event_id = head.event_id(&record, modified, version.as_deref());
    Ok(head.accept(event_id, Side::Crm, operation, record, partial, now))
}

/// What the payload says of the owning company.
#[derive(Debug, PartialEq, Eq)]
enum Company {
    /// The table is global or the company column is empty.
    None,
    /// The company code (`cdm_companycode`).
    Code(String),
    /// The column refers to the company by GUID only: the worker resolves it through the
    /// company's link, else reads the row.
    ById,
    /// The column is absent: the worker reads the row.
    Unknown,
}

impl Company {
    fn code(&self) -> Option<&str> {
        match self {
            Company::Code(c) => Some(c),
            Company::None | Company::ById | Company::Unknown => None,
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
    if let Some(code) = by_key.or(by_name) {
        return Ok(Company::Code(code.to_string()));
    }
    // By id only: the column's lookup value carries the id and the worker finds the code
    // through the company's link (or reads the row when the company is not linked).
    Ok(match opt_str(reference, "Id", column)? {
        Some(id) if !id.is_empty() => Company::ById,
        _ => Company::Unknown,
    })
}
