//! The Dataverse connector: [`Connector`] over the Web API v9.2.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use dualwrite_core::Side;
use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorError, ConnectorErrorKind, Page, Query,
    RecordRef, WriteCondition, WriteOutcome,
};
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::ValueType;
use reqwest::Method;
use tracing::{info, warn};

use super::DataverseConfig;
use super::wire::{
    company_in_key, id_from_entity_url, is_guid, lookup_value_column, record_body, record_from_row,
    render_key,
};
use crate::batch::{
    BatchPart, BatchRequest, batch_outcomes, build_changeset_batch, collect_results, for_call,
    read_batch_answer, send_parts,
};
use crate::http::{
    HttpResponse, ODataClient, ODataRequest, encode_path, encode_query, server_message,
};
use crate::odata::{RawObject, json_string, parse_collection, parse_object, query_filter, raw_str};
use crate::schema::EntitySchema;

/// Most targets of one `UpsertMultiple` call or `$batch`.
pub const MAX_BULK: usize = 1000;

/// Most row ids of key lookups kept ([`DataverseConnector::key_lookup_id`]); the cache starts
/// over when full (≈ 20 MB at most).
const MAX_KEY_LOOKUP_IDS: usize = 100_000;

/// True for the error of an address whose key names, through a lookup column, a row that does
/// not exist (a line of an order that is not in Dataverse): no request was sent, and no row
/// can have that key.
fn parent_missing(error: &ConnectorError) -> bool {
    error.kind == ConnectorErrorKind::NotFound && error.status.is_none()
}

/// Company codes ↔ `cdm_companies` row ids, read once and re-read on a miss.
#[derive(Debug, Default)]
struct Companies {
    id_by_code: HashMap<String, String>,
    code_by_id: HashMap<String, String>,
}

/// A [`Connector`] for one Dataverse environment ([`Side::Crm`]).
#[derive(Debug)]
pub struct DataverseConnector {
    config: DataverseConfig,
    base: String,
    client: ODataClient,
    companies: Mutex<Option<Companies>>,
    /// Row ids of the records that lookup columns of alternate keys point at, by the target's
    /// address (`salesorders(msdyn_salesordernumber='SO-1',_msdyn_company_value=<guid>)`): a
    /// row's id never changes, so each is read once ([`Self::key_lookup_id`]).
    key_lookup_ids: Mutex<HashMap<String, String>>,
    /// Set once Dataverse says UpsertMultiple is unavailable for a table
    /// ([`upsert_multiple_unsupported`]): bulk upserts then go as `$batch` changesets.
    pub(super) upsert_multiple_refused: AtomicBool,
}

impl DataverseConnector {
    /// A connector for `config`.
    pub fn new(config: DataverseConfig) -> Result<Self, ConnectorError> {
        let client = config.connection.client(Side::Crm)?;
        let base = config.connection.root().to_string();
        Ok(DataverseConnector {
            config,
            base,
            client,
            companies: Mutex::new(None),
            key_lookup_ids: Mutex::new(HashMap::new()),
            upsert_multiple_refused: AtomicBool::new(false),
        })
    }

    /// The Web API root requests go to (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The counters of this connector.
    pub fn stats(&self) -> &std::sync::Arc<crate::stats::ConnectorStats> {
        &self.config.connection.stats
    }

    fn schema(&self, entity: &str) -> Option<&EntitySchema> {
        self.config.connection.schemas.get(entity)
    }

    /// Reads every company row into the cache.
    async fn load_companies(&self) -> Result<(), ConnectorError> {
        let set = &self.config.company_set;
        let (code_f, id_f) = (
            &self.config.company_code_field,
            &self.config.company_id_field,
        );
        let mut url = format!("{}/{set}?$select={id_f},{code_f}", self.base);
        let mut companies = Companies::default();
        loop {
            let answer = self
                .client
                .send(set, ODataRequest::new(Method::GET, &url))
                .await?;
            if !answer.is_success() {
                return Err(answer.to_error(Side::Crm, set));
            }
            let (rows, next) =
                parse_collection(&answer.body).map_err(|e| self.client.bad_answer(set, e))?;
            for row in rows {
                if let (Some(id), Some(code)) = (
                    row.get(id_f.as_str()).and_then(|r| raw_str(r)),
                    row.get(code_f.as_str()).and_then(|r| raw_str(r)),
                ) {
                    companies
                        .id_by_code
                        .insert(code.to_uppercase(), id.to_lowercase());
                    companies.code_by_id.insert(id.to_lowercase(), code);
                }
            }
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        *self.companies.lock().unwrap_or_else(|e| e.into_inner()) = Some(companies);
        Ok(())
    }

    fn cached_company_id(&self, code: &str) -> Option<String> {
        let guard = self.companies.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .and_then(|c| c.id_by_code.get(&code.to_uppercase()).cloned())
    }

    fn cached_company_code(&self, id: &str) -> Option<String> {
        let guard = self.companies.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .and_then(|c| c.code_by_id.get(&id.to_lowercase()).cloned())
    }

    /// The `cdm_companies` row id of company `code`.
    async fn company_id(&self, entity: &str, code: &str) -> Result<String, ConnectorError> {
        if let Some(id) = self.cached_company_id(code) {
            return Ok(id);
        }
        self.load_companies().await?;
        self.cached_company_id(code).ok_or_else(|| {
            self.client.error(
                entity,
                ConnectorErrorKind::BadRequest,
                format!(
                    "company {code} has no row in {}: create the legal entity in Dataverse first",
                    self.config.company_set
                ),
            )
        })
    }

    /// Makes sure every company GUID of `rows` is in the cache (one re-read on a miss).
    async fn know_companies(&self, entity: &str, rows: &[RawObject]) -> Result<(), ConnectorError> {
        let Some(field) = self.schema(entity).and_then(|s| s.company_field.clone()) else {
            return Ok(());
        };
        let column = format!("_{field}_value");
        let missing = rows
            .iter()
            .filter_map(|r| r.get(&column).and_then(|v| raw_str(v)))
            .any(|id| self.cached_company_code(&id).is_none());
        if missing {
            self.load_companies().await
        } else {
            Ok(())
        }
    }

    fn to_record(&self, entity: &str, row: &RawObject) -> Result<Record, ConnectorError> {
        record_from_row(entity, self.schema(entity), row, &|id| {
            self.cached_company_code(id)
        })
        .map_err(|e| self.client.unfit(entity, e))
    }

    async fn rows_to_records(
        &self,
        entity: &str,
        rows: &[RawObject],
    ) -> Result<Vec<Record>, ConnectorError> {
        self.know_companies(entity, rows).await?;
        rows.iter().map(|r| self.to_record(entity, r)).collect()
    }

    /// `accounts(<guid>)` or `accounts(accountnumber='A1',_msdyn_company_value=<guid>)`.
    ///
    /// A lookup column in the key is addressed by the row id it holds, as the Web API wants
    /// it (`_salesorderid_value=<guid>`): a key value that is not a GUID is the natural key of
    /// the row the lookup points at (the sales order number of a sales order line's key),
    /// whose id is read once ([`Self::key_lookup_id`]). When that row does not exist, no row
    /// keyed by it can: the error is [`parent_missing`] (a read answers `None` for it).
    async fn address(&self, entity: &str, at: &RecordRef) -> Result<String, ConnectorError> {
        match at {
            RecordRef::Id(id) => Ok(format!("{entity}({})", encode_path(id))),
            RecordRef::Key(key) => {
                let schema = self.schema(entity);
                let company = match company_in_key(schema, key) {
                    Some(code) => Some(self.company_id(entity, code).await?),
                    None => None,
                };
                let key = self
                    .with_lookup_ids(entity, schema, key, company.as_deref())
                    .await?;
                let rendered = render_key(schema, &key, company.as_deref())
                    .map_err(|e| self.client.error(entity, ConnectorErrorKind::BadRequest, e))?;
                Ok(format!("{entity}({})", encode_path(&rendered)))
            }
        }
    }

    /// `key` with each lookup column other than the company as `_<column>_value` = row id.
    async fn with_lookup_ids<'k>(
        &self,
        entity: &str,
        schema: Option<&EntitySchema>,
        key: &'k RecordKey,
        company_guid: Option<&str>,
    ) -> Result<Cow<'k, RecordKey>, ConnectorError> {
        let Some(schema) = schema else {
            return Ok(Cow::Borrowed(key));
        };
        let is_lookup = |field: &str| {
            Some(field) != schema.company_field.as_deref()
                && schema.type_of(field) == Some(ValueType::Lookup)
        };
        if !key.0.iter().any(|(field, _)| is_lookup(field)) {
            return Ok(Cow::Borrowed(key));
        }
        let company_code = company_in_key(Some(schema), key);
        let mut pairs = key.0.clone();
        for (field, value) in &mut pairs {
            if !is_lookup(field) {
                continue;
            }
            let id = if is_guid(value) {
                value.to_lowercase()
            } else {
                self.key_lookup_id(entity, schema, field, value, company_code, company_guid)
                    .await?
            };
            *value = id;
            *field = lookup_value_column(field);
        }
        Ok(Cow::Owned(RecordKey(pairs)))
    }

    /// The row id of the record lookup column `field` of `schema`'s key points at, given that
    /// record's natural key `value` (and the company of the key, when the target is per
    /// company): from the cache, else read by the target's alternate key.
    async fn key_lookup_id(
        &self,
        entity: &str,
        schema: &EntitySchema,
        field: &str,
        value: &str,
        company_code: Option<&str>,
        company_guid: Option<&str>,
    ) -> Result<String, ConnectorError> {
        let unfit = |message: String| {
            self.client
                .error(entity, ConnectorErrorKind::BadRequest, message)
        };
        let target = schema
            .lookup_targets
            .get(field)
            .and_then(|set| self.schema(set))
            .ok_or_else(|| {
                unfit(format!(
                    "key column {field} is a lookup to a table no enabled map names: its value \
                     {value:?} cannot be turned into a row id"
                ))
            })?;
        let (Some(target_key), Some(primary_id)) = (
            (target.key.len() == 1).then(|| target.key[0].clone()),
            target.primary_id.as_deref(),
        ) else {
            return Err(unfit(format!(
                "key column {field} points at {}, whose key is not one column: {value:?} \
                 cannot name one of its rows",
                target.entity
            )));
        };
        let mut target_pairs = vec![(target_key, value.to_owned())];
        if let (Some(company_field), Some(code)) = (target.company_field.as_ref(), company_code) {
            target_pairs.push((company_field.clone(), code.to_owned()));
        }
        let rendered =
            render_key(Some(target), &RecordKey(target_pairs), company_guid).map_err(unfit)?;
        let address = format!("{}({rendered})", target.entity);
        let cached = self
            .key_lookup_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&address)
            .cloned();
        if let Some(id) = cached {
            return Ok(id);
        }
        let url = format!(
            "{}/{}({})?$select={primary_id}",
            self.base,
            target.entity,
            encode_path(&rendered)
        );
        let answer = self
            .client
            .send(&target.entity, ODataRequest::new(Method::GET, url))
            .await?;
        if answer.status == 404 {
            return Err(self.client.error(
                entity,
                ConnectorErrorKind::NotFound,
                format!("{address} does not exist, so no {entity} row keyed by it can"),
            ));
        }
        if !answer.is_success() {
            return Err(answer.to_error(Side::Crm, &target.entity));
        }
        let row =
            parse_object(&answer.body).map_err(|e| self.client.bad_answer(&target.entity, e))?;
        let id = row
            .get(primary_id)
            .and_then(|r| raw_str(r))
            .filter(|id| is_guid(id))
            .map(|id| id.to_lowercase())
            .ok_or_else(|| {
                self.client
                    .bad_answer(&target.entity, format!("{primary_id} missing from the row"))
            })?;
        let mut cache = self
            .key_lookup_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_KEY_LOOKUP_IDS {
            cache.clear();
        }
        cache.insert(address, id.clone());
        Ok(id)
    }

    fn company_bind(&self, record: &Record) -> Option<String> {
        record.company.as_ref().map(|code| {
            format!(
                "/{}({}='{}')",
                self.config.company_set,
                self.config.company_code_field,
                code.replace('\'', "''")
            )
        })
    }

    fn body(
        &self,
        entity: &str,
        record: &Record,
        extra: &[(String, String)],
    ) -> Result<String, ConnectorError> {
        record_body(
            self.schema(entity),
            record,
            self.company_bind(record),
            extra,
        )
        .map_err(|e| {
            self.client.error(
                entity,
                ConnectorErrorKind::BadRequest,
                format!("cannot write the record: {e}"),
            )
        })
    }

    /// The outcome of a write answered with or without a representation.
    async fn outcome(
        &self,
        entity: &str,
        answer: &HttpResponse,
    ) -> Result<WriteOutcome, ConnectorError> {
        let mut outcome = WriteOutcome {
            created: answer.status == 201,
            ..WriteOutcome::default()
        };
        if !answer.body.trim().is_empty() {
            let row = parse_object(&answer.body).map_err(|e| self.client.bad_answer(entity, e))?;
            let record = self
                .rows_to_records(entity, std::slice::from_ref(&row))
                .await?
                .remove(0);
            outcome.id = record.id.map(Into::into);
            outcome.etag = record.etag;
            outcome.version = record.version;
        }
        if outcome.id.is_none() {
            outcome.id = answer.header("OData-EntityId").and_then(id_from_entity_url);
        }
        if outcome.etag.is_none() {
            outcome.etag = answer.header("ETag").map(str::to_string);
        }
        Ok(outcome)
    }

    /// The GET of one record.
    async fn read_request(
        &self,
        entity: &str,
        at: &RecordRef,
    ) -> Result<ODataRequest, ConnectorError> {
        let url = format!("{}/{}", self.base, self.address(entity, at).await?);
        Ok(ODataRequest::new(Method::GET, url))
    }

    /// What the answer to [`Self::read_request`] means: the record, `None` on 404, the error
    /// otherwise.
    async fn read_answer(
        &self,
        entity: &str,
        answer: &HttpResponse,
    ) -> Result<Option<Record>, ConnectorError> {
        match answer.status {
            404 => Ok(None),
            _ if answer.is_success() => {
                let row =
                    parse_object(&answer.body).map_err(|e| self.client.bad_answer(entity, e))?;
                Ok(self
                    .rows_to_records(entity, std::slice::from_ref(&row))
                    .await?
                    .pop())
            }
            _ => Err(answer.to_error(Side::Crm, entity)),
        }
    }

    /// The PATCH of an upsert (`Prefer: return=representation`, the condition's headers).
    async fn upsert_request(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: &WriteCondition,
    ) -> Result<ODataRequest, ConnectorError> {
        let url = format!("{}/{}", self.base, self.address(entity, at).await?);
        let body = self.body(entity, record, &[])?;
        let request = ODataRequest::new(Method::PATCH, url)
            .header("Prefer", "return=representation")
            .json(body);
        Ok(condition_headers(request, condition))
    }

    /// What the answer to [`Self::upsert_request`] means.
    async fn upsert_answer(
        &self,
        entity: &str,
        answer: &HttpResponse,
    ) -> Result<WriteOutcome, ConnectorError> {
        if !answer.is_success() {
            return Err(answer.to_error(Side::Crm, entity));
        }
        self.outcome(entity, answer).await
    }

    /// The request of `call` in a `$batch`, or the error that keeps it from being sent (an
    /// address or record that does not fit), which is its result.
    async fn plan(&self, call: &ConnectorCall) -> Result<BatchPart, ConnectorError> {
        Ok(match call {
            ConnectorCall::Read { entity, at } => {
                BatchPart::Request(self.read_request(entity, at).await?.into())
            }
            ConnectorCall::Upsert {
                entity,
                at,
                record,
                condition,
            } => BatchPart::Changeset(
                self.upsert_request(entity, at, record, condition)
                    .await?
                    .into(),
            ),
        })
    }

    async fn upsert_multiple(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Option<Vec<Result<WriteOutcome, ConnectorError>>>, ConnectorError> {
        let schema = self.schema(entity);
        let logical = schema
            .and_then(|s| s.logical_name.clone())
            .unwrap_or_else(|| entity.trim_end_matches('s').to_string());
        let mut targets = Vec::with_capacity(items.len());
        for (at, record) in items {
            let mut extra = vec![
                (
                    "@odata.type".to_string(),
                    json_string(&format!("Microsoft.Dynamics.CRM.{logical}")),
                ),
                (
                    "@odata.id".to_string(),
                    json_string(&self.address(entity, at).await?),
                ),
            ];
            if let (RecordRef::Id(id), Some(pid)) = (at, schema.and_then(|s| s.primary_id.clone()))
            {
                extra.push((pid, json_string(id)));
            }
            targets.push(self.body(entity, record, &extra)?);
        }
        let body = format!("{{\"Targets\":[{}]}}", targets.join(","));
        let url = format!(
            "{}/{entity}/Microsoft.Dynamics.CRM.UpsertMultiple",
            self.base
        );
        let answer = self
            .client
            .send(entity, ODataRequest::new(Method::POST, url).json(body))
            .await?;
        if !answer.is_success() {
            if upsert_multiple_unsupported(answer.status, &answer.body) {
                warn!(
                    side = "crm",
                    entity,
                    status = answer.status,
                    "UpsertMultiple refused, using $batch"
                );
                self.upsert_multiple_refused.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            return Err(answer.to_error(Side::Crm, entity));
        }
        // Dataverse answers 204 No Content: no ids, no ETags (Microsoft's reference: "The
        // UpsertMultiple action returns 204 NoContent. The UpsertMultipleResponse complex type
        // is not returned"). The rows are read back, in one `$batch` of GETs, so every item's
        // outcome carries the id (rows created by key get theirs there), ETag and version, as
        // the `$batch` path's do.
        let reads = items
            .iter()
            .map(|(at, _)| ConnectorCall::Read {
                entity: entity.to_string(),
                at: at.clone(),
            })
            .collect();
        let read_back = self.call_many(reads).await;
        Ok(Some(
            items
                .iter()
                .zip(read_back)
                .map(|((at, _), read)| match read {
                    CallResult::Read(Ok(Some(row))) => Ok(WriteOutcome {
                        id: row.id.map(Into::into),
                        etag: row.etag,
                        version: row.version,
                        created: false,
                    }),
                    // Written (the call succeeded) but not read back: an item addressed by its
                    // id is still known; one addressed by key is an error of its own, so the
                    // caller retries it (an upsert by key is idempotent).
                    other => match at {
                        RecordRef::Id(id) => Ok(WriteOutcome {
                            id: Some(id.clone()),
                            ..WriteOutcome::default()
                        }),
                        RecordRef::Key(_) => Err(match other {
                            CallResult::Read(Err(e)) | CallResult::Upsert(Err(e)) => e,
                            _ => self.client.error(
                                entity,
                                ConnectorErrorKind::Transient,
                                "UpsertMultiple succeeded but the record was not found when read back"
                                    .to_string(),
                            ),
                        }),
                    },
                })
                .collect(),
        ))
    }

    async fn batch_upsert(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        let mut requests = Vec::with_capacity(items.len());
        for (at, record) in items {
            requests.push(BatchRequest {
                method: "PATCH".into(),
                url: format!("{}/{}", self.base, self.address(entity, at).await?),
                headers: vec![],
                body: Some(self.body(entity, record, &[])?),
            });
        }
        let id = format!("{:016x}", rand::random::<u64>());
        let (content_type, body) = build_changeset_batch(&id, &requests);
        let url = format!("{}/$batch", self.base);
        let answer = self
            .client
            .send(
                entity,
                ODataRequest::new(Method::POST, url).body(content_type, body),
            )
            .await?;
        // Sent without `odata.continue-on-error`: a failing changeset stops the batch, which
        // then answers 400 with the failing part inside; that part's status is the failure.
        let parts = read_batch_answer(&self.client, entity, &answer)?;
        batch_outcomes(Side::Crm, entity, items.len(), &parts)
    }
}

/// True when an answer to `UpsertMultiple` says the message itself is not available for the
/// table (so every later call would be refused too and `$batch` is the way), false for a
/// failure of the call's items, which the error policy classifies like any write's.
///
/// Refusals: 405 and 501 (the method or action does not exist here); 404 or 400 whose message
/// says so — "The 'UpsertMultiple' method does not support entities of type 'x'" (Dataverse's
/// wording for a table without the message), "Resource not found for the segment
/// 'Microsoft.Dynamics.CRM.UpsertMultiple'" (the Web API's for an unknown action), or a message
/// naming UpsertMultiple that says it is not supported, not found or does not exist for the
/// entity — and a 404 with no message at all. An item's failure ("UpsertMultiple failed at
/// Targets[3]…", a missing lookup target, a duplicate key) is none of these: it must not
/// disable the message for the life of the connector.
pub(super) fn upsert_multiple_unsupported(status: u16, body: &str) -> bool {
    let message = server_message(body).unwrap_or_default().to_lowercase();
    let says_unavailable = || {
        if message.contains("targets[") {
            return false;
        }
        if message.contains("does not support entities of type")
            || message.contains("resource not found for the segment")
        {
            return true;
        }
        message.contains("upsertmultiple")
            && [
                "is not supported",
                "not supported for",
                "not found for",
                "does not exist for",
                "doesn't exist for",
                "could not find",
            ]
            .iter()
            .any(|phrase| message.contains(phrase))
    };
    match status {
        405 | 501 => true,
        404 => message.is_empty() || says_unavailable(),
        400 => says_unavailable(),
        _ => false,
    }
}

fn condition_headers(request: ODataRequest, condition: &WriteCondition) -> ODataRequest {
    match condition {
        WriteCondition::None => request,
        WriteCondition::IfMatch(etag) => request.header("If-Match", etag.clone()),
        WriteCondition::MustExist => request.header("If-Match", "*"),
        WriteCondition::MustNotExist => request.header("If-None-Match", "*"),
    }
}

#[async_trait]
impl Connector for DataverseConnector {
    fn side(&self) -> Side {
        Side::Crm
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        let request = match self.read_request(entity, at).await {
            Err(e) if parent_missing(&e) => return Ok(None),
            other => other?,
        };
        let answer = self.client.send(entity, request).await?;
        self.read_answer(entity, &answer).await
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        let url = match &query.page_token {
            Some(next) => {
                if !next.starts_with(&self.base) {
                    return Err(self.client.error(
                        entity,
                        ConnectorErrorKind::BadRequest,
                        format!("page token {next} does not belong to {}", self.base),
                    ));
                }
                next.clone()
            }
            None => match query_filter(query.filter.as_ref(), "modifiedon", query.modified_since) {
                Some(f) => format!(
                    "{}/{entity}?$filter={}",
                    self.base,
                    encode_query(&f.to_odata())
                ),
                None => format!("{}/{entity}", self.base),
            },
        };
        let size = query
            .page_size
            .unwrap_or(self.config.connection.page_size)
            .clamp(1, 5000);
        let request = ODataRequest::new(Method::GET, url)
            .header("Prefer", format!("odata.maxpagesize={size}"));
        let answer = self.client.send(entity, request).await?;
        if !answer.is_success() {
            return Err(answer.to_error(Side::Crm, entity));
        }
        let (rows, next) =
            parse_collection(&answer.body).map_err(|e| self.client.bad_answer(entity, e))?;
        self.know_companies(entity, &rows).await?;
        let primary_id = self.schema(entity).and_then(|s| s.primary_id.clone());
        let mut records = Vec::with_capacity(rows.len());
        let mut unfit = Vec::new();
        for row in &rows {
            match self.to_record(entity, row) {
                Ok(record) => records.push(record),
                Err(e) => unfit.push(dualwrite_core::ports::UnfitRow {
                    id: primary_id
                        .as_deref()
                        .and_then(|p| row.get(p))
                        .and_then(|r| raw_str(r)),
                    etag: row.get("@odata.etag").and_then(|r| raw_str(r)),
                    problem: e.message,
                }),
            }
        }
        Ok(Page {
            records,
            next,
            unfit,
        })
    }

    /// Change tracking (`Prefer: odata.track-changes`), reading the primary id column only:
    /// the first read pages through the table's ids for the deltaLink it ends with; following
    /// a deltaLink gives the rows changed since (ignored: the incremental query reads them
    /// whole) and a `$deletedEntity` entry per row deleted since.
    async fn deletions(
        &self,
        entity: &str,
        from: Option<&str>,
    ) -> Result<Option<dualwrite_core::ports::DeletionsPage>, ConnectorError> {
        let url = match from {
            Some(link) => {
                if !link.starts_with(&self.base) {
                    return Err(self.client.error(
                        entity,
                        ConnectorErrorKind::BadRequest,
                        format!(
                            "change-tracking link {link} does not belong to {}",
                            self.base
                        ),
                    ));
                }
                link.to_owned()
            }
            None => {
                let Some(primary_id) = self.schema(entity).and_then(|s| s.primary_id.clone())
                else {
                    return Ok(None);
                };
                format!("{}/{entity}?$select={primary_id}", self.base)
            }
        };
        let request = ODataRequest::new(Method::GET, url).header(
            "Prefer",
            format!(
                "odata.track-changes,odata.maxpagesize={}",
                self.config.connection.page_size.clamp(1, 5000)
            ),
        );
        let answer = self.client.send(entity, request).await?;
        if !answer.is_success() {
            return Err(answer.to_error(Side::Crm, entity));
        }
        // A table without change tracking enabled answers as a plain query: no tracking.
        let tracked = answer
            .header("preference-applied")
            .is_some_and(|p| p.split(',').any(|v| v.trim() == "odata.track-changes"));
        if !tracked {
            tracing::info!(
                entity,
                "change tracking is not enabled on this table: its deletes are not caught up"
            );
            return Ok(None);
        }
        super::wire::deletions_page(&answer.body)
            .map(Some)
            .map_err(|e| self.client.bad_answer(entity, e))
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        let request = self.upsert_request(entity, at, record, &condition).await?;
        let answer = self.client.send(entity, request).await?;
        self.upsert_answer(entity, &answer).await
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        let url = format!("{}/{}", self.base, self.address(entity, at).await?);
        let answer = self
            .client
            .send(entity, ODataRequest::new(Method::DELETE, url))
            .await?;
        if answer.is_success() || answer.status == 404 {
            Ok(())
        } else {
            Err(answer.to_error(Side::Crm, entity))
        }
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_BULK) {
            if !self.upsert_multiple_refused.load(Ordering::Relaxed)
                && let Some(done) = self.upsert_multiple(entity, chunk).await?
            {
                results.extend(done);
                continue;
            }
            results.extend(self.batch_upsert(entity, chunk).await?);
        }
        info!(
            side = "crm",
            entity,
            items = items.len(),
            "bulk upsert done"
        );
        Ok(results)
    }

    /// One `$batch` of at most `max_batch` calls at a time: reads as top-level GETs, each
    /// upsert (a PATCH, conditions as in [`DataverseConnector::upsert`]) in a changeset of its
    /// own, with `Prefer: odata.continue-on-error`.
    async fn call_many(&self, calls: Vec<ConnectorCall>) -> Vec<CallResult> {
        let mut results: Vec<Option<CallResult>> = vec![None; calls.len()];
        let mut sent = Vec::with_capacity(calls.len());
        let mut parts = Vec::with_capacity(calls.len());
        for (i, call) in calls.iter().enumerate() {
            match self.plan(call).await {
                Ok(part) => {
                    sent.push(i);
                    parts.push(part);
                }
                Err(e) if parent_missing(&e) && matches!(call, ConnectorCall::Read { .. }) => {
                    results[i] = Some(CallResult::Read(Ok(None)));
                }
                Err(e) => results[i] = Some(call.failed(e)),
            }
        }
        let url = format!("{}/$batch", self.base);
        let max = self.config.connection.max_batch;
        let answers = send_parts(&self.client, &url, &parts, max).await;
        for (i, answer) in sent.into_iter().zip(answers) {
            let call = &calls[i];
            let entity = call.entity();
            results[i] = Some(match (call, answer) {
                (_, Err(e)) => call.failed(for_call(&e, entity)),
                (ConnectorCall::Read { .. }, Ok(a)) => {
                    CallResult::Read(self.read_answer(entity, &a).await)
                }
                (ConnectorCall::Upsert { .. }, Ok(a)) => {
                    CallResult::Upsert(self.upsert_answer(entity, &a).await)
                }
            });
        }
        collect_results(Side::Crm, &calls, results)
    }
}
