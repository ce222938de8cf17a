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
    /// The Dataverse execution depth of the step that raised the event (`Depth`: 1 for a
    /// change made directly by a user or an API call, more for one made by a plug-in, flow or
    /// workflow reacting to another change), kept with the correlation id for diagnosing
    /// loops. Nothing decides on it. `None` for sources without one (business events, polls)
    /// and for events queued before the field existed, which is why it has a serde default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourceVersion;
    use chrono::TimeZone;

    fn event(depth: Option<u32>) -> ChangeEvent {
        let mut record = Record::new("accounts");
        record.id = Some("3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b".into());
        record.version = Some(SourceVersion {
            modified_on: Utc.with_ymd_and_hms(2024, 5, 1, 11, 0, 0).unwrap(),
            sequence: 0,
        });
        ChangeEvent {
            event_id: "c1d2e3f4-1aa2-ee11-be37-000d3a8e5c2b".into(),
            source: Side::Crm,
            operation: Operation::Upsert,
            record,
            partial: false,
            received_at: Utc.with_ymd_and_hms(2024, 5, 1, 11, 0, 1).unwrap(),
            correlation_id: Some("5a6b7c8d-0e1f-4a2b-9c3d-4e5f6a7b8c9d".into()),
            depth,
        }
    }

    #[test]
    fn depth_survives_a_serde_round_trip() {
        let sent = event(Some(2));
        let json = serde_json::to_value(&sent).unwrap();
        assert_eq!(json["depth"], serde_json::json!(2));
        let back: ChangeEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, sent);
    }

    #[test]
    fn an_event_queued_before_depth_existed_still_decodes() {
        // Serialised the way versions without `depth` wrote events to the queue.
        let queued = r#"{"event_id":"c1d2e3f4-1aa2-ee11-be37-000d3a8e5c2b","source":"crm",
            "operation":"upsert","record":{"entity":"accounts",
            "id":"3f2e1d0c-1aa2-ee11-be37-000d3a8e5c2b","company":null,"fields":{},
            "version":{"modified_on":"2024-05-01T11:00:00Z","sequence":0},"etag":null},
            "partial":false,"received_at":"2024-05-01T11:00:01Z",
            "correlation_id":"5a6b7c8d-0e1f-4a2b-9c3d-4e5f6a7b8c9d"}"#;
        let decoded: ChangeEvent = serde_json::from_str(queued).unwrap();
        assert_eq!(decoded, event(None));
        // And an event without a depth is written the old way, for a rollback to read.
        let written = serde_json::to_value(event(None)).unwrap();
        assert!(written.get("depth").is_none(), "{written}");
    }
}
