//! Builders of events, messages and queues shared by the tests.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use dualwrite_core::ports::{Delivery, QueueMessage};
use dualwrite_core::{ChangeEvent, Operation, Record, Side, SourceVersion, Value};
use dualwrite_logqueue::{ManualClock, QueueConfig};

/// A fixed instant tests start from.
pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
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

/// Like [`message`], with about 3 KB of fields (the size of a real account change).
pub fn big_message(event_id: &str, record_id: &str) -> QueueMessage {
    let mut m = message(event_id, record_id);
    for i in 0..30 {
        m.event.record.fields.insert(
            format!("field_{i:02}"),
            Value::Text(format!("value {i} of {event_id}, {}", "x".repeat(40)).into()),
        );
    }
    m
}

/// The event ids of `deliveries`, in order.
pub fn ids(deliveries: &[Delivery]) -> Vec<&str> {
    deliveries
        .iter()
        .map(|d| d.message.event.event_id.as_str())
        .collect()
}

/// The event ids of `messages`, in order.
pub fn message_ids(messages: &[QueueMessage]) -> Vec<String> {
    messages.iter().map(|m| m.event.event_id.clone()).collect()
}

/// A queue config with a manual clock.
pub fn config(clock: &Arc<ManualClock>, max_attempts: u32) -> QueueConfig {
    QueueConfig {
        max_attempts,
        clock: clock.clone(),
        ..QueueConfig::default()
    }
}

/// The segment files of a queue directory, by name, sorted.
pub fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}
