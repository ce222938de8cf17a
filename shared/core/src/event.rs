//! Change events: what a webhook, data event or poll tells the engine about one record.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::record::{Record, Side};

/// What happened to the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Created or updated (sources do not always tell which; the engine upserts either way).
    Upsert,
    /// Deleted at the source.
    Delete,
}

/// One change of one record on one side, as accepted from a source.
///
/// Events are delivered at least once and possibly out of order; `event_id` makes redelivery
/// harmless and `record.version` makes reordering harmless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The source's id for this change (Dataverse `OperationId`/`RequestId`, F&O `EventId`, or
    /// a hash of record + version for polled changes). Same change, same id.
    pub event_id: String,
    /// The system the change happened in.
    pub source: Side,
    /// What happened.
    pub operation: Operation,
    /// The record as the source sent it: all fields, or only the changed ones (`partial`).
    pub record: Record,
    /// True when `record` carries only changed fields: the worker reads the full record.
    pub partial: bool,
    /// When dualwrite accepted the event (for latency and ordering diagnostics).
    pub received_at: DateTime<Utc>,
    /// The source's correlation id (Dataverse `CorrelationId`), kept for tracing.
    pub correlation_id: Option<String>,
}

impl ChangeEvent {
    /// The queue's ordering group: one group per source record (`crm:accounts:<guid>`,
    /// `erp:CustomersV3:dataAreaId='usmf',CustomerAccount='US-001'`), so that changes of one
    /// record are applied in the order they were accepted. Receivers always set `record.id`;
    /// an event without one falls back to its own group (no ordering against anything).
    pub fn group_id(&self) -> String {
        let identity = self.record.id.as_deref().unwrap_or(&self.event_id);
        format!("{}:{}:{}", self.source, self.record.entity, identity)
    }
}
