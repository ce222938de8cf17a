//! Builders of links, events and messages shared by the tests.

use chrono::{DateTime, Utc};
use dualwrite_core::ports::{Link, QueueMessage, SideState};
use dualwrite_core::{ChangeEvent, IntegrationKey, Operation, Record, Side, SourceVersion};

/// A fixed instant tests start from.
pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

/// A link of `map`/`key` with the given side ids and revision 0 (as a writer builds it).
pub fn link(map: &str, key: &str, crm_id: Option<&str>, erp_id: Option<&str>) -> Link {
    Link {
        map: map.to_owned().into(),
        key: IntegrationKey(key.to_owned().into()),
        crm_id: crm_id.map(Into::into),
        erp_id: erp_id.map(Into::into),
        crm: SideState::default(),
        erp: SideState::default(),
        revision: 0,
        open_conflict: None,
        pending: None,
        provisional: false,
        updated_at: t0(),
    }
}

/// A CRM upsert event of entity `entity`, row `record_id`, with a version whose sequence is
/// `sequence`.
pub fn event(event_id: &str, entity: &str, record_id: &str, sequence: i64) -> ChangeEvent {
    let mut record = Record::new(entity);
    record.id = Some(record_id.to_owned().into());
    record.version = Some(SourceVersion {
        modified_on: t0(),
        sequence,
    });
    ChangeEvent {
        event_id: event_id.to_owned(),
        source: Side::Crm,
        operation: Operation::Upsert,
        record,
        partial: false,
        received_at: t0(),
        correlation_id: None,
        depth: None,
    }
}

/// A queue message for event `event_id` of row `record_id` (its group is the row).
pub fn message(event_id: &str, record_id: &str) -> QueueMessage {
    QueueMessage::for_event(event(event_id, "accounts", record_id, 0))
}
