//! The F&O connector: [`Connector`] over OData data entities.

use std::sync::Arc;

use async_trait::async_trait;
use dualwrite_core::Side;
use dualwrite_core::ports::{
    CallResult, Connector, ConnectorCall, ConnectorError, ConnectorErrorKind, Page, Query,
    RecordRef, UnfitRow, WriteCondition, WriteOutcome,
};
use dualwrite_core::record::{Record, RecordKey};
use reqwest::Method;
use tracing::info;

use super::FnoConfig;
use super::wire::{
    MODIFIED_FIELD, filter_text, keyset_after, keyset_order, parse_key, raw_key_of_row,
    record_body, record_from_row, render_key, written_of_body,
};
use crate::batch::{
    BatchPart, BatchRequest, batch_outcomes, build_changeset_batch, collect_results, for_call,
    read_batch_answer, send_parts,
};
use crate::http::{HttpResponse, ODataClient, ODataRequest, encode_path, encode_query};
use crate::odata::{parse_collection, parse_object, query_filter, raw_str};
use crate::schema::{EntitySchema, EntitySchemas};

/// Most operations of one `$batch` changeset.
pub const MAX_CHANGESET: usize = 5000;

/// A [`Connector`] for one F&O environment ([`Side::Erp`]).
#[derive(Debug)]
pub struct FnoConnector {
    config: FnoConfig,
    data: String,
    client: ODataClient,
}

impl FnoConnector {
    /// A connector for `config`.
    pub fn new(config: FnoConfig) -> Result<Self, ConnectorError> {
        let client = config.connection.client(Side::Erp)?;
        let data = format!("{}/data", config.connection.root());
        Ok(FnoConnector {
            config,
            data,
            client,
        })
    }

    /// The schemas this connector converts by.
    /// The OData root requests go to (`…/data`, no trailing slash).
    pub fn data_url(&self) -> &str {
        &self.data
    }

    pub fn schemas(&self) -> &Arc<EntitySchemas> {
        &self.config.connection.schemas
    }

    /// The counters of this connector.
    pub fn stats(&self) -> &Arc<crate::stats::ConnectorStats> {
        &self.config.connection.stats
    }

    fn schema(&self, entity: &str) -> Option<&EntitySchema> {
        self.config.connection.schemas.get(entity)
    }

    /// The record's key: the rendered id parsed back, or the key itself.
    fn key(&self, entity: &str, at: &RecordRef) -> Result<RecordKey, ConnectorError> {
        match at {
            RecordRef::Key(k) => Ok(k.clone()),
            RecordRef::Id(id) => parse_key(id).ok_or_else(|| {
                self.client.error(
                    entity,
                    ConnectorErrorKind::BadRequest,
                    format!("record id {id} is not an OData key (field='value',…)"),
                )
            }),
        }
    }

    /// The URL of the row of `entity` at `key`, for every request that addresses one row
    /// (GET, PATCH, DELETE): each key value as the literal of its declared type
    /// ([`render_key`]: `LineNumber=1`, not `'1'`), and `?cross-company=true`. F&O resolves a
    /// key in the caller's default company only unless asked across companies, so without it
    /// a PATCH or DELETE of another company's row by its full key (dataAreaId included) would
    /// answer 404; entities without a company ignore the option.
    fn row_url(&self, entity: &str, key: &RecordKey) -> Result<String, ConnectorError> {
        let rendered = render_key(self.schema(entity), key)
            .map_err(|e| self.client.error(entity, ConnectorErrorKind::BadRequest, e))?;
        Ok(format!(
            "{}/{entity}({})?cross-company=true",
            self.data,
            encode_path(&rendered)
        ))
    }

    /// `…/entity?cross-company=true&$filter=…&$orderby=…`: the query's filter and the
    /// key-order continuation, each optional.
    fn query_url(
        &self,
        entity: &str,
        filter: Option<&str>,
        after: Option<&str>,
        order: Option<&[String]>,
    ) -> String {
        let mut url = format!("{}/{entity}?cross-company=true", self.data);
        let text = match (filter, after) {
            (Some(f), Some(a)) => Some(format!("({f}) and ({a})")),
            (Some(f), None) => Some(f.to_string()),
            (None, Some(a)) => Some(a.to_string()),
            (None, None) => None,
        };
        if let Some(text) = text {
            url.push_str(&format!("&$filter={}", encode_query(&text)));
        }
        if let Some(order) = order {
            url.push_str(&format!("&$orderby={}", encode_query(&order.join(","))));
        }
        url
    }

    fn to_record(&self, entity: &str, body: &str) -> Result<Record, ConnectorError> {
        let row = parse_object(body).map_err(|e| self.client.bad_answer(entity, e))?;
        record_from_row(entity, self.schema(entity), &row).map_err(|e| self.client.unfit(entity, e))
    }

    fn body(
        &self,
        entity: &str,
        record: &Record,
        key: &RecordKey,
    ) -> Result<String, ConnectorError> {
        record_body(self.schema(entity), record, Some(key)).map_err(|e| {
            self.client.error(
                entity,
                ConnectorErrorKind::BadRequest,
                format!("cannot write the record: {e}"),
            )
        })
    }

    /// Fills the ETag and version of `outcome` from a write's answer: from the record it
    /// returned when it has a body, else from the `ETag` header. Gives the returned record's id,
    /// if any.
    fn read_written(
        &self,
        entity: &str,
        answer: &HttpResponse,
        outcome: &mut WriteOutcome,
    ) -> Result<Option<String>, ConnectorError> {
        if answer.body.trim().is_empty() {
            outcome.etag = answer.header("ETag").map(str::to_string);
            return Ok(None);
        }
        let written = written_of_body(self.schema(entity), &answer.body)
            .map_err(|e| self.client.bad_answer(entity, e))?;
        outcome.etag = written.etag;
        outcome.version = written.version;
        Ok(written.id)
    }

    /// The GET of one record, across companies.
    fn read_request(&self, entity: &str, key: &RecordKey) -> Result<ODataRequest, ConnectorError> {
        Ok(ODataRequest::new(Method::GET, self.row_url(entity, key)?))
    }

    /// What the answer to [`Self::read_request`] means: the record (its id the key when the
    /// schema names no key fields), `None` on 404, the error otherwise.
    fn read_answer(
        &self,
        entity: &str,
        key: &RecordKey,
        answer: &HttpResponse,
    ) -> Result<Option<Record>, ConnectorError> {
        match answer.status {
            404 => Ok(None),
            _ if answer.is_success() => {
                let mut record = self.to_record(entity, &answer.body)?;
                record.id = record.id.or_else(|| Some(key.to_string().into()));
                Ok(Some(record))
            }
            _ => Err(answer.to_error(Side::Erp, entity)),
        }
    }

    /// The request of `write` of `record` at `key`.
    fn write_request(
        &self,
        entity: &str,
        key: &RecordKey,
        record: &Record,
        write: &FnoWrite,
    ) -> Result<ODataRequest, ConnectorError> {
        let body = self.body(entity, record, key)?;
        Ok(match write {
            FnoWrite::Patch { if_match } => {
                ODataRequest::new(Method::PATCH, self.row_url(entity, key)?)
                    .header("If-Match", if_match.as_str())
                    .json(body)
            }
            FnoWrite::Post => ODataRequest::new(Method::POST, format!("{}/{entity}", self.data))
                .header("Prefer", "return=representation")
                .json(body),
        })
    }

    /// What the answer to [`Self::write_request`] means.
    fn write_answer(
        &self,
        entity: &str,
        key: &RecordKey,
        write: &FnoWrite,
        answer: &HttpResponse,
    ) -> Result<WriteOutcome, ConnectorError> {
        if !answer.is_success() {
            let mut error = answer.to_error(Side::Erp, entity);
            if *write == FnoWrite::Post && is_duplicate_key(&error) {
                // F&O answers a create of an existing key with 400, where Dataverse says 412:
                // someone created it first. Re-read and decide again, as on a 412.
                error.kind = ConnectorErrorKind::PreconditionFailed;
            }
            return Err(error);
        }
        let mut outcome = WriteOutcome {
            id: Some(key.to_string()),
            created: *write == FnoWrite::Post,
            ..WriteOutcome::default()
        };
        let returned = self.read_written(entity, answer, &mut outcome)?;
        if *write == FnoWrite::Post
            && let Some(id) = returned
        {
            outcome.id = Some(id);
        }
        Ok(outcome)
    }

    /// Sends `write` of `record` at `key` on its own.
    async fn write(
        &self,
        entity: &str,
        key: &RecordKey,
        record: &Record,
        write: &FnoWrite,
    ) -> Result<WriteOutcome, ConnectorError> {
        let request = self.write_request(entity, key, record, write)?;
        let answer = self.client.send(entity, request).await?;
        self.write_answer(entity, key, write, &answer)
    }

    /// The first request of `call` in a `$batch`, or the error that keeps it from being sent
    /// (a key or record that does not fit), which is its result.
    fn plan(&self, call: &ConnectorCall) -> Result<(FnoStep, BatchPart), ConnectorError> {
        match call {
            ConnectorCall::Read { entity, at } => {
                let key = self.key(entity, at)?;
                let part = BatchPart::Request(self.read_request(entity, &key)?.into());
                Ok((FnoStep::Read(key), part))
            }
            ConnectorCall::Upsert {
                entity,
                at,
                record,
                condition,
            } => {
                let key = self.key(entity, at)?;
                let Some(write) = FnoWrite::for_condition(condition) else {
                    // Read first, as the single call does: a record that cannot be written
                    // fails when its write is built, after the read.
                    let part = BatchPart::Request(self.read_request(entity, &key)?.into());
                    return Ok((FnoStep::ReadThenWrite(key), part));
                };
                let request = self.write_request(entity, &key, record, &write)?;
                Ok((
                    FnoStep::Write(key, write),
                    BatchPart::Changeset(request.into()),
                ))
            }
        }
    }
}

/// How F&O is written (it has no upsert).
#[derive(Debug, Clone, PartialEq, Eq)]
enum FnoWrite {
    /// PATCH the existing record on this `If-Match` (an ETag, or `*`: it must exist).
    Patch { if_match: String },
    /// POST a new record (400 "already exists" when it does).
    Post,
}

impl FnoWrite {
    /// The write a condition asks for; `None` for [`WriteCondition::None`], which needs to
    /// know first whether the record exists ([`FnoWrite::after_read`]).
    fn for_condition(condition: &WriteCondition) -> Option<FnoWrite> {
        match condition {
            WriteCondition::IfMatch(etag) => Some(FnoWrite::Patch {
                if_match: etag.clone(),
            }),
            WriteCondition::MustExist => Some(FnoWrite::Patch {
                if_match: "*".into(),
            }),
            WriteCondition::MustNotExist => Some(FnoWrite::Post),
            WriteCondition::None => None,
        }
    }

    /// The write of an unconditioned upsert, given the record as read: a PATCH on its ETag
    /// when it exists (a concurrent change then gives 412), a POST when it does not (a
    /// concurrent create gives the duplicate-key error).
    fn after_read(existing: Option<Record>) -> FnoWrite {
        match existing {
            Some(r) => FnoWrite::Patch {
                if_match: r.etag.unwrap_or_else(|| "*".to_string()),
            },
            None => FnoWrite::Post,
        }
    }
}

/// Where a call of [`FnoConnector::call_many`] stands after its first request.
#[derive(Debug)]
enum FnoStep {
    /// A read: its answer is the result.
    Read(RecordKey),
    /// A write: its answer is the result.
    Write(RecordKey, FnoWrite),
    /// An unconditioned upsert: the answer is the read deciding between PATCH and POST,
    /// sent in a second `$batch`.
    ReadThenWrite(RecordKey),
}

#[async_trait]
impl Connector for FnoConnector {
    fn side(&self) -> Side {
        Side::Erp
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        let key = self.key(entity, at)?;
        let answer = self
            .client
            .send(entity, self.read_request(entity, &key)?)
            .await?;
        self.read_answer(entity, &key, &answer)
    }

    /// Pages by key, not by the server's `$skip` links: F&O's `@odata.nextLink` continues
    /// with `$skip=N`, so a row deleted (or moved out of the filter) on an earlier page
    /// while the query runs shifts the rest down and one row is never read. The query is
    /// ordered by the key ([`keyset_order`]) and each next page asks for the rows after the
    /// last one read ([`keyset_after`]); the server's link only tells that there are more.
    /// An entity without a usable key (none declared, an enum key field) follows the
    /// server's link.
    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        let schema = self.schema(entity);
        let order = schema.and_then(keyset_order);
        let filter = query_filter(query.filter.as_ref(), MODIFIED_FIELD, query.modified_since)
            .map(|f| filter_text(schema, &f));
        let url = match &query.page_token {
            Some(next) => {
                if !next.starts_with(&self.data) {
                    return Err(self.client.error(
                        entity,
                        ConnectorErrorKind::BadRequest,
                        format!("page token {next} does not belong to {}", self.data),
                    ));
                }
                next.clone()
            }
            None => self.query_url(entity, filter.as_deref(), None, order.as_deref()),
        };
        let size = query
            .page_size
            .unwrap_or(self.config.connection.page_size)
            .clamp(1, 10_000);
        let request = ODataRequest::new(Method::GET, url)
            .header("Prefer", format!("odata.maxpagesize={size}"));
        let answer = self.client.send(entity, request).await?;
        if !answer.is_success() {
            return Err(answer.to_error(Side::Erp, entity));
        }
        let (rows, next) =
            parse_collection(&answer.body).map_err(|e| self.client.bad_answer(entity, e))?;
        let mut records = Vec::with_capacity(rows.len());
        let mut unfit = Vec::new();
        for row in &rows {
            match record_from_row(entity, schema, row) {
                Ok(record) => records.push(record),
                Err(problem) => unfit.push(UnfitRow {
                    id: schema
                        .and_then(|s| raw_key_of_row(s, row))
                        .map(|k| k.to_string()),
                    etag: row.get("@odata.etag").and_then(|r| raw_str(r)),
                    problem,
                }),
            }
        }
        let next = match (next, schema.zip(order.as_deref())) {
            (Some(server_next), Some((schema, order))) => Some(
                // After the last row of the page, whether it converted or not.
                rows.last()
                    .and_then(|last| raw_key_of_row(schema, last))
                    .and_then(|last| keyset_after(schema, order, &last))
                    .map_or(server_next, |after| {
                        self.query_url(entity, filter.as_deref(), Some(&after), Some(order))
                    }),
            ),
            (next, _) => next,
        };
        Ok(Page {
            records,
            next,
            unfit,
        })
    }

    /// F&O has no upsert: with no condition the record is read first and PATCHed with its
    /// ETag when it exists (a concurrent change then gives 412), POSTed when it does not (a
    /// concurrent create gives an error the error policy re-reads on).
    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        let key = self.key(entity, at)?;
        let write = match FnoWrite::for_condition(&condition) {
            Some(write) => write,
            None => FnoWrite::after_read(self.read(entity, &RecordRef::Key(key.clone())).await?),
        };
        self.write(entity, &key, record, &write).await
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        let key = self.key(entity, at)?;
        let answer = self
            .client
            .send(
                entity,
                ODataRequest::new(Method::DELETE, self.row_url(entity, &key)?),
            )
            .await?;
        if answer.is_success() || answer.status == 404 {
            Ok(())
        } else {
            Err(answer.to_error(Side::Erp, entity))
        }
    }

    /// Reads which records exist, then writes each chunk of at most [`MAX_CHANGESET`] in one
    /// atomic changeset (PATCH `If-Match: *` for existing records, POST for new ones).
    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_CHANGESET) {
            let mut requests = Vec::with_capacity(chunk.len());
            let mut keys = Vec::with_capacity(chunk.len());
            for (at, record) in chunk {
                let key = self.key(entity, at)?;
                let exists = self
                    .read(entity, &RecordRef::Key(key.clone()))
                    .await?
                    .is_some();
                let body = Some(self.body(entity, record, &key)?);
                requests.push(if exists {
                    BatchRequest {
                        method: "PATCH".into(),
                        url: self.row_url(entity, &key)?,
                        headers: vec![("If-Match".into(), "*".into())],
                        body,
                    }
                } else {
                    BatchRequest {
                        method: "POST".into(),
                        url: format!("{}/{entity}", self.data),
                        headers: vec![],
                        body,
                    }
                });
                keys.push(key);
            }
            let id = format!("{:016x}", rand::random::<u64>());
            let (content_type, body) = build_changeset_batch(&id, &requests);
            let answer = self
                .client
                .send(
                    entity,
                    ODataRequest::new(Method::POST, format!("{}/$batch", self.data))
                        .body(content_type, body),
                )
                .await?;
            // A failing changeset is answered by its failing part (inside a 200, or a 400 as
            // Dataverse does): that part's status and message are the failure.
            let parts = read_batch_answer(&self.client, entity, &answer)?;
            let outcomes = batch_outcomes(Side::Erp, entity, chunk.len(), &parts)?;
            results.extend(outcomes.into_iter().zip(keys).map(|(r, key)| {
                r.map(|mut o| {
                    o.id = Some(key.to_string());
                    o
                })
            }));
        }
        info!(
            side = "erp",
            entity,
            items = items.len(),
            "bulk upsert done"
        );
        Ok(results)
    }

    /// One `$batch` of at most `max_batch` calls at a time: reads as top-level GETs, each
    /// write in a changeset of its own, with `Prefer: odata.continue-on-error`. An
    /// unconditioned upsert reads the record in that `$batch` and is written in a second one
    /// (PATCH on the ETag read, or POST), as [`FnoConnector::upsert`] does in two requests.
    async fn call_many(&self, calls: Vec<ConnectorCall>) -> Vec<CallResult> {
        let mut results: Vec<Option<CallResult>> = vec![None; calls.len()];
        let mut first = Vec::with_capacity(calls.len());
        let mut parts = Vec::with_capacity(calls.len());
        for (i, call) in calls.iter().enumerate() {
            match self.plan(call) {
                Ok((step, part)) => {
                    first.push((i, step));
                    parts.push(part);
                }
                Err(e) => results[i] = Some(call.failed(e)),
            }
        }
        let url = format!("{}/$batch", self.data);
        let max = self.config.connection.max_batch;
        let answers = send_parts(&self.client, &url, &parts, max).await;
        let mut second = Vec::new();
        for ((i, step), answer) in first.into_iter().zip(answers) {
            let call = &calls[i];
            let entity = call.entity();
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    results[i] = Some(call.failed(for_call(&e, entity)));
                    continue;
                }
            };
            results[i] = match step {
                FnoStep::Read(key) => {
                    Some(CallResult::Read(self.read_answer(entity, &key, &answer)))
                }
                FnoStep::Write(key, write) => Some(CallResult::Upsert(
                    self.write_answer(entity, &key, &write, &answer),
                )),
                FnoStep::ReadThenWrite(key) => match self.read_answer(entity, &key, &answer) {
                    Ok(existing) => {
                        second.push((i, key, FnoWrite::after_read(existing)));
                        None
                    }
                    Err(e) => Some(CallResult::Upsert(Err(e))),
                },
            };
        }
        if !second.is_empty() {
            let mut writes = Vec::with_capacity(second.len());
            let mut parts = Vec::with_capacity(second.len());
            for (i, key, write) in second {
                let ConnectorCall::Upsert { entity, record, .. } = &calls[i] else {
                    continue;
                };
                match self.write_request(entity, &key, record, &write) {
                    Ok(request) => {
                        parts.push(BatchPart::Changeset(request.into()));
                        writes.push((i, key, write));
                    }
                    Err(e) => results[i] = Some(CallResult::Upsert(Err(e))),
                }
            }
            let answers = send_parts(&self.client, &url, &parts, max).await;
            for ((i, key, write), answer) in writes.into_iter().zip(answers) {
                let entity = calls[i].entity();
                results[i] = Some(CallResult::Upsert(match answer {
                    Ok(a) => self.write_answer(entity, &key, &write, &a),
                    Err(e) => Err(for_call(&e, entity)),
                }));
            }
        }
        collect_results(Side::Erp, &calls, results)
    }
}

/// True for F&O's answer to a create of a record whose key exists already: an Infolog saying
/// "The record already exists", in the message or its inner error, with 400 — or with 500, as
/// F&O answers some failed writes inside a changeset (retrying the create would only fail
/// again: re-reading is what helps).
fn is_duplicate_key(error: &ConnectorError) -> bool {
    matches!(error.status, Some(400 | 500)) && error.message.contains("already exists")
}
