//! Sending permanently failed changes again once their cause is fixed.
//!
//! A change that fails for good (a 400, 403 or 404 from the other side, an unmappable record)
//! is logged with the event itself ([`ErrorRecord::event`]) and completed, so that it does not
//! block its record's later changes. [`failed_events`] gives back those events under fresh ids
//! (the old ones are completed: the idempotency check would take a replay under them for a
//! duplicate), ready to be queued. Replaying is safe whatever happened since: a replayed change
//! older than what was applied since is dropped as stale, one already applied is an echo.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use dualwrite_core::ChangeEvent;
use dualwrite_core::ports::{ErrorRecord, JournalStore, StoreError};

/// What [`failed_events`] found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Replay {
    /// The failed changes, oldest first, each under a fresh id (`<original>~retry-<ms>`).
    pub events: Vec<ChangeEvent>,
    /// Ids asked for that no error record names.
    pub unknown: Vec<String>,
    /// Ids whose error records do not keep the event (logged before events were kept, or not
    /// tied to one event): their records' next change syncs them (a catch-up poll reads only
    /// what changed since shortly before its watermark, which may already be past them).
    pub without_event: Vec<String>,
}

/// The id suffix of a replayed event.
const RETRY_MARK: &str = "~retry-";

/// The events of the error log's records named by `event_ids` (all records keeping an event
/// when `event_ids` is empty), each once, under fresh ids stamped with `now`.
///
/// # Errors
/// The store's, when the error log cannot be read.
pub async fn failed_events(
    journal: &dyn JournalStore,
    event_ids: &[String],
    now: DateTime<Utc>,
) -> Result<Replay, StoreError> {
    let records = journal.errors(usize::MAX).await?;
    let wanted: BTreeSet<&str> = event_ids.iter().map(String::as_str).collect();
    let mut replay = Replay::default();
    let mut seen = BTreeSet::new();
    let mut without = BTreeSet::new();
    // Newest first in the log; the replay goes oldest first, in the order the changes came.
    for record in records.iter().rev() {
        let Some(id) = record.event_id.as_deref() else {
            continue;
        };
        if !wanted.is_empty() && !wanted.contains(id) {
            continue;
        }
        match &record.event {
            Some(event) if seen.insert(id.to_string()) => {
                replay.events.push(retried(event, now));
            }
            Some(_) => {}
            None => {
                without.insert(id.to_string());
            }
        }
    }
    replay.without_event = without
        .into_iter()
        .filter(|id| !seen.contains(id))
        .collect();
    let logged: BTreeSet<&str> = records
        .iter()
        .filter_map(|r: &ErrorRecord| r.event_id.as_deref())
        .collect();
    replay.unknown = event_ids
        .iter()
        .filter(|id| !logged.contains(id.as_str()))
        .cloned()
        .collect();
    Ok(replay)
}

/// `event` under a fresh id: the original id (without an earlier retry's mark) and the time.
fn retried(event: &ChangeEvent, now: DateTime<Utc>) -> ChangeEvent {
    let original = event
        .event_id
        .split_once(RETRY_MARK)
        .map_or(event.event_id.as_str(), |(id, _)| id);
    let mut again = event.clone();
    again.event_id = format!("{original}{RETRY_MARK}{}", now.timestamp_millis());
    again
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use dualwrite_core::ports::{ErrorClass, LinkStore, StoreOp};
    use dualwrite_core::{Operation, Record, Side};

    use super::*;
    use crate::memory::MemoryStore;

    fn event(id: &str) -> ChangeEvent {
        ChangeEvent {
            event_id: id.into(),
            source: Side::Crm,
            operation: Operation::Upsert,
            record: Record {
                id: Some("a1".into()),
                ..Record::new("accounts")
            },
            partial: false,
            received_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            correlation_id: None,
            depth: None,
        }
    }

    fn error(id: Option<&str>, secs: i64, event: Option<ChangeEvent>) -> StoreOp {
        StoreOp::RecordError(ErrorRecord {
            at: Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap(),
            map: Some("customers-v3-accounts".into()),
            key: None,
            event_id: id.map(str::to_string),
            class: ErrorClass::Permanent,
            message: "refused".into(),
            event,
        })
    }

    #[tokio::test]
    async fn failed_events_come_back_once_each_under_fresh_ids_oldest_first() {
        let store = MemoryStore::new();
        store
            .commit(vec![
                error(Some("e1"), 1, Some(event("e1"))),
                // One event failing under two maps has two records: it is sent once.
                error(Some("e1"), 2, Some(event("e1"))),
                error(Some("e2~retry-5"), 3, Some(event("e2~retry-5"))),
                error(Some("old"), 4, None),
                error(None, 5, None),
            ])
            .await
            .unwrap();
        let now = Utc.timestamp_millis_opt(1_700_000_100_000).unwrap();

        let all = failed_events(&store, &[], now).await.unwrap();
        let ids: Vec<&str> = all.events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            ids,
            ["e1~retry-1700000100000", "e2~retry-1700000100000"],
            "oldest first, an earlier retry's mark replaced"
        );
        assert_eq!(all.events[0].record, event("e1").record);
        assert_eq!(all.without_event, ["old"]);
        assert!(all.unknown.is_empty());

        let some = failed_events(&store, &["e1".into(), "nope".into(), "old".into()], now)
            .await
            .unwrap();
        assert_eq!(some.events.len(), 1);
        assert_eq!(some.unknown, ["nope"]);
        assert_eq!(some.without_event, ["old"]);
    }
}
