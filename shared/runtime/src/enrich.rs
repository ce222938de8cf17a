//! Fills in the alternate key of Dataverse key lookups before events are queued.
//!
//! A map whose integration key includes a lookup column (`salesorderdetails` keyed by
//! `salesorderid` + `sequencenumber`) needs the referenced row's alternate key to build the
//! link key, but Dataverse webhooks carry an `EntityReference` with the id only. The engine
//! refuses such a change ("the key lookup carries only an id"). This queue wrapper reads the
//! referenced row by id and adds its alternate key to the lookup, then sends the event on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualwrite_core::map::TableMap;
use dualwrite_core::map::apply::{integration_key, record_key};
use dualwrite_core::ports::{
    Connector, ConnectorError, DeadLetter, Delivery, Page, Query, QueueDepth, QueueError,
    QueueMessage, RecordRef, RetryOutcome, WorkQueue, WriteCondition, WriteOutcome,
};
use dualwrite_core::{Record, Side, Value};
use tracing::warn;

/// A [`WorkQueue`] that completes Dataverse key lookups of sent events, then forwards
/// everything to `inner`.
pub(crate) struct KeyLookupQueue {
    pub inner: Arc<dyn WorkQueue>,
    pub crm: Arc<dyn Connector>,
    pub maps: Vec<TableMap>,
}

impl std::fmt::Debug for KeyLookupQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLookupQueue").finish_non_exhaustive()
    }
}

impl KeyLookupQueue {
    async fn complete(&self, message: &mut QueueMessage) {
        if message.event.source == Side::Crm {
            complete_record(&self.maps, self.crm.as_ref(), &mut message.event.record).await;
        }
    }
}

/// Adds the referenced row's alternate key to every key lookup of `record` (a Dataverse row)
/// that carries only an id.
pub(crate) async fn complete_record(maps: &[TableMap], crm: &dyn Connector, record: &mut Record) {
    for map in maps.iter().filter(|m| m.crm.entity_set == record.entity) {
        for fm in map.fields.iter().filter(|f| f.lookup.is_some()) {
            let Some(field) = &fm.crm else { continue };
            if !map.crm.key.contains(&field.name) {
                continue;
            }
            let Some(Value::Lookup(reference)) = record.fields.get(&field.name) else {
                continue;
            };
            let (Some(id), None) = (reference.id.clone(), &reference.key) else {
                continue;
            };
            let Some(target) = fm.lookup.as_ref().and_then(|l| {
                l.maps.iter().find_map(|name| {
                    maps.iter()
                        .find(|m| &m.name == name && m.crm.entity_set == reference.entity_set)
                })
            }) else {
                continue;
            };
            match crm.read(&target.crm.entity_set, &RecordRef::Id(id)).await {
                Ok(Some(row)) => match integration_key(target, Side::Crm, &row) {
                    Ok(key) => {
                        if let Some(Value::Lookup(r)) = record.fields.get_mut(&field.name) {
                            r.key = Some(record_key(target, Side::Crm, &key));
                        }
                    }
                    Err(e) => {
                        warn!(map = %map.name, field = %field.name, error = %e, "key lookup not completed")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    warn!(map = %map.name, field = %field.name, error = %e, "key lookup not completed: read failed")
                }
            }
        }
    }
}

/// A Dataverse [`Connector`] whose reads complete key lookups (see the module doc), so the
/// engine's own reads of partial events carry them too.
pub(crate) struct KeyLookupConnector {
    pub inner: Arc<dyn Connector>,
    pub maps: Vec<TableMap>,
}

impl std::fmt::Debug for KeyLookupConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLookupConnector").finish_non_exhaustive()
    }
}

#[async_trait]
impl Connector for KeyLookupConnector {
    fn side(&self) -> Side {
        self.inner.side()
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        let mut record = self.inner.read(entity, at).await?;
        if let Some(r) = record.as_mut() {
            complete_record(&self.maps, self.inner.as_ref(), r).await;
        }
        Ok(record)
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        let mut page = self.inner.query(entity, query).await?;
        for r in &mut page.records {
            complete_record(&self.maps, self.inner.as_ref(), r).await;
        }
        Ok(page)
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        self.inner.upsert(entity, at, record, condition).await
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        self.inner.delete(entity, at).await
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        self.inner.upsert_batch(entity, items).await
    }
}

#[async_trait]
impl WorkQueue for KeyLookupQueue {
    async fn send(&self, mut messages: Vec<QueueMessage>) -> Result<(), QueueError> {
        for m in &mut messages {
            self.complete(m).await;
        }
        self.inner.send(messages).await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.inner.receive(max, visibility).await
    }

    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        self.inner.ack(receipt).await
    }

    async fn retry(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        self.inner.retry(receipt, delay, error).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.inner.dead_letters(limit).await
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        self.inner.depth().await
    }
}
