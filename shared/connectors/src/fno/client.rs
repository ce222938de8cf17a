//! The F&O connector: [`Connector`] over OData data entities.

use std::sync::Arc;

use async_trait::async_trait;
use dualwrite_core::Side;
use dualwrite_core::ports::{
    Connector, ConnectorError, ConnectorErrorKind, Page, Query, RecordRef, WriteCondition,
    WriteOutcome,
};
use dualwrite_core::record::{Record, RecordKey};
use reqwest::Method;
use tracing::info;

use super::FnoConfig;
use super::wire::{MODIFIED_FIELD, filter_text, parse_key, record_body, record_from_row};
use crate::batch::{BatchRequest, build_changeset_batch, parse_batch_response};
use crate::http::{HttpResponse, ODataClient, ODataRequest, encode_path, encode_query};
use crate::odata::{parse_collection, parse_object, query_filter};
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

    fn entity_url(&self, entity: &str, key: &RecordKey) -> String {
        format!("{}/{entity}({})", self.data, encode_path(&key.to_string()))
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
        record_body(record, Some(key)).map_err(|e| {
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
        let written = self.to_record(entity, &answer.body)?;
        outcome.etag = written.etag;
        outcome.version = written.version;
        Ok(written.id.map(Into::into))
    }

    async fn patch(
        &self,
        entity: &str,
        key: &RecordKey,
        record: &Record,
        if_match: &str,
    ) -> Result<WriteOutcome, ConnectorError> {
        let request = ODataRequest::new(Method::PATCH, self.entity_url(entity, key))
            .header("If-Match", if_match)
            .json(self.body(entity, record, key)?);
        let answer = self.client.send(entity, request).await?;
        if !answer.is_success() {
            return Err(answer.to_error(Side::Erp, entity));
        }
        let mut outcome = WriteOutcome {
            id: Some(key.to_string()),
            ..WriteOutcome::default()
        };
        self.read_written(entity, &answer, &mut outcome)?;
        Ok(outcome)
    }

    async fn post(
        &self,
        entity: &str,
        key: &RecordKey,
        record: &Record,
    ) -> Result<WriteOutcome, ConnectorError> {
        let request = ODataRequest::new(Method::POST, format!("{}/{entity}", self.data))
            .header("Prefer", "return=representation")
            .json(self.body(entity, record, key)?);
        let answer = self.client.send(entity, request).await?;
        if !answer.is_success() {
            let mut error = answer.to_error(Side::Erp, entity);
            if is_duplicate_key(&error) {
                // F&O answers a create of an existing key with 400, where Dataverse says 412:
                // someone created it first. Re-read and decide again, as on a 412.
                error.kind = ConnectorErrorKind::PreconditionFailed;
            }
            return Err(error);
        }
        let mut outcome = WriteOutcome {
            id: Some(key.to_string()),
            created: true,
            ..WriteOutcome::default()
        };
        if let Some(id) = self.read_written(entity, &answer, &mut outcome)? {
            outcome.id = Some(id);
        }
        Ok(outcome)
    }
}

#[async_trait]
impl Connector for FnoConnector {
    fn side(&self) -> Side {
        Side::Erp
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        let key = self.key(entity, at)?;
        let url = format!("{}?cross-company=true", self.entity_url(entity, &key));
        let answer = self
            .client
            .send(entity, ODataRequest::new(Method::GET, url))
            .await?;
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

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
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
            None => {
                let mut url = format!("{}/{entity}?cross-company=true", self.data);
                let filter =
                    query_filter(query.filter.as_ref(), MODIFIED_FIELD, query.modified_since);
                if let Some(f) = filter {
                    let text = filter_text(self.schema(entity), &f);
                    url.push_str(&format!("&$filter={}", encode_query(&text)));
                }
                url
            }
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
        let schema = self.schema(entity);
        let records = rows
            .iter()
            .map(|row| {
                record_from_row(entity, schema, row).map_err(|e| self.client.unfit(entity, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page { records, next })
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
        match condition {
            WriteCondition::IfMatch(etag) => self.patch(entity, &key, record, &etag).await,
            WriteCondition::MustExist => self.patch(entity, &key, record, "*").await,
            WriteCondition::MustNotExist => self.post(entity, &key, record).await,
            WriteCondition::None => match self.read(entity, &RecordRef::Key(key.clone())).await? {
                Some(existing) => {
                    let etag = existing.etag.unwrap_or_else(|| "*".to_string());
                    self.patch(entity, &key, record, &etag).await
                }
                None => self.post(entity, &key, record).await,
            },
        }
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        let key = self.key(entity, at)?;
        let answer = self
            .client
            .send(
                entity,
                ODataRequest::new(Method::DELETE, self.entity_url(entity, &key)),
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
                        url: self.entity_url(entity, &key),
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
            if !answer.is_success() {
                return Err(answer.to_error(Side::Erp, entity));
            }
            let content_type = answer
                .header("Content-Type")
                .unwrap_or_default()
                .to_string();
            let parts = parse_batch_response(&content_type, &answer.body)
                .map_err(|e| self.client.bad_answer(entity, e))?;
            let outcomes =
                crate::dataverse::batch_outcomes(Side::Erp, entity, chunk.len(), &parts)?;
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
}

/// True for F&O's answer to a create of a record whose key exists already: 400 with an
/// Infolog saying "The record already exists".
fn is_duplicate_key(error: &ConnectorError) -> bool {
    error.status == Some(400) && error.message.contains("already exists")
}
