//! `MemoryConnector`: one side's tables in memory, behaving like Dataverse or F&O where the
//! engine can tell: versions that grow on every write, ETags and `If-Match`, upsert by id or
//! by key, and the change events the system would emit. Tests use it to simulate user edits,
//! count dualwrite's writes and feed back the echoes of dualwrite's own writes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dualwrite_core::map::apply::ERP_COMPANY_FIELD;
use dualwrite_core::ports::{
    Clock, Connector, ConnectorError, ConnectorErrorKind, Page, Query, RecordRef, WriteCondition,
    WriteOutcome,
};
use dualwrite_core::{ChangeEvent, Operation, Record, RecordKey, Side, SourceVersion, Value};

use super::lock;

/// What a logged write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Upsert,
    Delete,
}

/// One write dualwrite made through the [`Connector`] API.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteLogEntry {
    pub entity: String,
    /// Id of the record written.
    pub id: String,
    pub kind: WriteKind,
    /// The fields sent (empty for a delete).
    pub record: Record,
}

#[derive(Debug, Default)]
struct Inner {
    /// entity → id → record.
    tables: BTreeMap<String, BTreeMap<String, Record>>,
    sequence: i64,
    writes: Vec<WriteLogEntry>,
    echoes: Vec<ChangeEvent>,
    failures: VecDeque<ConnectorErrorKind>,
    /// Reads made through the [`Connector`] API (API calls a real system would count).
    reads: usize,
}

/// A system of one side, in memory. Safe for concurrent use.
pub struct MemoryConnector {
    side: Side,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConnector")
            .field("side", &self.side)
            .field("inner", &self.inner)
            .finish()
    }
}

/// Who changed a record: decides whether the change is logged as dualwrite's write and
/// queued as an echo, or handed back as a user's change event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Actor {
    Dualwrite,
    User,
}

fn matches_key(record: &Record, key: &RecordKey) -> bool {
    key.0.iter().all(|(field, value)| {
        if field == ERP_COMPANY_FIELD && !record.fields.contains_key(field.as_str()) {
            return record
                .company
                .as_deref()
                .is_some_and(|c| c.eq_ignore_ascii_case(value));
        }
        // Both systems find a record by its key without case.
        match record.get(field) {
            Some(Value::Lookup(l)) => l
                .key
                .as_ref()
                .is_some_and(|k| k.0.iter().any(|(_, v)| v.eq_ignore_ascii_case(value))),
            Some(v) => v.to_string().eq_ignore_ascii_case(value),
            None => false,
        }
    })
}

impl MemoryConnector {
    /// An empty system of `side`; versions take their time from `clock`.
    pub fn new(side: Side, clock: Arc<dyn Clock>) -> Self {
        MemoryConnector {
            side,
            clock,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn error(&self, entity: &str, kind: ConnectorErrorKind, message: String) -> ConnectorError {
        let status = match kind {
            ConnectorErrorKind::Unauthorized => 401,
            ConnectorErrorKind::Forbidden => 403,
            ConnectorErrorKind::NotFound => 404,
            ConnectorErrorKind::BadRequest => 400,
            ConnectorErrorKind::PreconditionFailed => 412,
            ConnectorErrorKind::Throttled { .. } => 429,
            ConnectorErrorKind::Transient => 503,
        };
        ConnectorError {
            side: self.side,
            entity: entity.to_string(),
            kind,
            status: Some(status),
            message,
        }
    }

    fn find_id(inner: &Inner, entity: &str, at: &RecordRef) -> Option<String> {
        let table = inner.tables.get(entity)?;
        match at {
            RecordRef::Id(id) => table.keys().find(|k| k.eq_ignore_ascii_case(id)).cloned(),
            RecordRef::Key(key) => table
                .iter()
                .find(|(_, r)| matches_key(r, key))
                .map(|(id, _)| id.clone()),
        }
    }

    fn new_id(&self, sequence: i64, at: &RecordRef) -> String {
        match (at, self.side) {
            (RecordRef::Id(id), _) => id.clone(),
            // F&O: the id is the rendered natural key.
            (RecordRef::Key(key), Side::Erp) => key.to_string(),
            // Dataverse: a GUID-like id.
            (RecordRef::Key(_), Side::Crm) => {
                format!("{sequence:08x}-0000-4000-8000-{sequence:012x}")
            }
        }
    }

    /// Applies a change and returns (the event describing it, whether it created the record).
    fn change(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: &WriteCondition,
        actor: Actor,
    ) -> Result<(ChangeEvent, WriteOutcome), ConnectorError> {
        let now = self.clock.now();
        let mut inner = lock(&self.inner);
        if actor == Actor::Dualwrite
            && let Some(kind) = inner.failures.pop_front()
        {
            return Err(self.error(entity, kind, "injected failure".into()));
        }
        let existing_id = Self::find_id(&inner, entity, at);
        let existing = existing_id
            .as_ref()
            .and_then(|id| inner.tables.get(entity).and_then(|t| t.get(id)))
            .cloned();
        let failed = match (condition, &existing) {
            (WriteCondition::None, _) => None,
            (WriteCondition::IfMatch(etag), Some(r)) if r.etag.as_ref() == Some(etag) => None,
            (WriteCondition::IfMatch(etag), _) => {
                Some(format!("the record no longer has ETag {etag}"))
            }
            (WriteCondition::MustExist, None) => Some("the record does not exist".to_string()),
            (WriteCondition::MustNotExist, Some(_)) => {
                Some("the record exists already".to_string())
            }
            _ => None,
        };
        if let Some(message) = failed {
            return Err(self.error(entity, ConnectorErrorKind::PreconditionFailed, message));
        }
        inner.sequence += 1;
        let sequence = inner.sequence;
        let created = existing.is_none();
        let mut stored = existing.unwrap_or_else(|| {
            let mut r = Record::new(entity);
            r.id = Some(self.new_id(sequence, at).into());
            if let RecordRef::Key(key) = at {
                for (field, value) in &key.0 {
                    if field == ERP_COMPANY_FIELD {
                        r.company = Some(value.clone().into());
                    } else {
                        r.fields
                            .insert(field.as_str(), Value::Text(value.as_str().into()));
                    }
                }
            }
            r
        });
        for (name, value) in &record.fields {
            stored.fields.insert(name.clone(), value.clone());
        }
        if record.company.is_some() && stored.company.is_none() {
            stored.company.clone_from(&record.company);
        }
        stored.version = Some(SourceVersion {
            modified_on: now,
            sequence,
        });
        stored.etag = Some(format!("W/\"{sequence}\""));
        let id = stored.id.clone().unwrap_or_default();
        inner
            .tables
            .entry(entity.to_string())
            .or_default()
            .insert(id.clone().into(), stored.clone());
        let event = self.event(sequence, Operation::Upsert, stored.clone(), now);
        if actor == Actor::Dualwrite {
            inner.writes.push(WriteLogEntry {
                entity: entity.to_string(),
                id: id.clone().into(),
                kind: WriteKind::Upsert,
                record: record.clone(),
            });
            inner.echoes.push(event.clone());
        }
        let outcome = WriteOutcome {
            id: Some(id.into()),
            etag: stored.etag.clone(),
            version: stored.version,
            created,
        };
        Ok((event, outcome))
    }

    fn remove(
        &self,
        entity: &str,
        at: &RecordRef,
        actor: Actor,
    ) -> Result<Option<ChangeEvent>, ConnectorError> {
        let now = self.clock.now();
        let mut inner = lock(&self.inner);
        if actor == Actor::Dualwrite
            && let Some(kind) = inner.failures.pop_front()
        {
            return Err(self.error(entity, kind, "injected failure".into()));
        }
        let Some(id) = Self::find_id(&inner, entity, at) else {
            return Ok(None);
        };
        inner.tables.get_mut(entity).and_then(|t| t.remove(&id));
        inner.sequence += 1;
        let sequence = inner.sequence;
        let mut gone = Record::new(entity);
        gone.id = Some(id.clone().into());
        gone.version = Some(SourceVersion {
            modified_on: now,
            sequence,
        });
        let event = self.event(sequence, Operation::Delete, gone.clone(), now);
        if actor == Actor::Dualwrite {
            inner.writes.push(WriteLogEntry {
                entity: entity.to_string(),
                id,
                kind: WriteKind::Delete,
                record: Record::new(entity),
            });
            inner.echoes.push(event.clone());
        }
        Ok(Some(event))
    }

    fn event(
        &self,
        sequence: i64,
        operation: Operation,
        record: Record,
        now: chrono::DateTime<chrono::Utc>,
    ) -> ChangeEvent {
        ChangeEvent {
            event_id: format!("{}-{sequence}", self.side),
            source: self.side,
            operation,
            record,
            partial: false,
            received_at: now,
            correlation_id: None,
            depth: None,
        }
    }

    /// A user creates or edits a record: `fields` are set (the record is created when nothing
    /// is found at `at`). Returns the event the system would emit (full record, not partial).
    /// Not logged as a dualwrite write and not queued as an echo.
    pub fn edit(
        &self,
        entity: &str,
        at: &RecordRef,
        fields: impl IntoIterator<Item = (String, Value)>,
    ) -> ChangeEvent {
        let mut record = Record::new(entity);
        record.fields.extend(fields);
        match self.change(entity, at, &record, &WriteCondition::None, Actor::User) {
            Ok((event, _)) => event,
            // Unreachable: user edits have no condition and skip injected failures.
            Err(e) => panic!("user edit of {entity} failed: {e}"),
        }
    }

    /// A user deletes a record; returns the delete event, `None` when nothing was there.
    pub fn delete_by_user(&self, entity: &str, at: &RecordRef) -> Option<ChangeEvent> {
        self.remove(entity, at, Actor::User).ok().flatten()
    }

    /// The stored record, if any.
    pub fn record(&self, entity: &str, at: &RecordRef) -> Option<Record> {
        let inner = lock(&self.inner);
        let id = Self::find_id(&inner, entity, at)?;
        inner.tables.get(entity).and_then(|t| t.get(&id)).cloned()
    }

    /// Every record of `entity`, by id.
    pub fn records(&self, entity: &str) -> Vec<Record> {
        lock(&self.inner)
            .tables
            .get(entity)
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every write dualwrite made, in order.
    pub fn writes(&self) -> Vec<WriteLogEntry> {
        lock(&self.inner).writes.clone()
    }

    /// How many writes dualwrite made.
    pub fn write_count(&self) -> usize {
        lock(&self.inner).writes.len()
    }

    /// How many reads dualwrite made through the [`Connector`] API.
    pub fn read_count(&self) -> usize {
        lock(&self.inner).reads
    }

    /// Takes the change events caused by dualwrite's own writes (what the system's webhooks
    /// would send back), oldest first.
    pub fn take_echoes(&self) -> Vec<ChangeEvent> {
        std::mem::take(&mut lock(&self.inner).echoes)
    }

    /// Makes the next write (upsert or delete through the [`Connector`] API) fail with `kind`.
    /// Several calls queue several failures.
    pub fn fail_next(&self, kind: ConnectorErrorKind) {
        lock(&self.inner).failures.push_back(kind);
    }
}

#[async_trait]
impl Connector for MemoryConnector {
    fn side(&self) -> Side {
        self.side
    }

    async fn read(&self, entity: &str, at: &RecordRef) -> Result<Option<Record>, ConnectorError> {
        lock(&self.inner).reads += 1;
        Ok(self.record(entity, at))
    }

    async fn query(&self, entity: &str, query: &Query) -> Result<Page, ConnectorError> {
        let offset: usize = match &query.page_token {
            Some(t) => t.parse().map_err(|_| {
                self.error(
                    entity,
                    ConnectorErrorKind::BadRequest,
                    format!("page token {t:?} is not one this connector issued"),
                )
            })?,
            None => 0,
        };
        let matching: Vec<Record> = self
            .records(entity)
            .into_iter()
            .filter(|r| query.filter.as_ref().is_none_or(|f| f.matches(r)))
            .filter(|r| {
                query
                    .modified_since
                    .is_none_or(|s| r.version.is_some_and(|v| v.modified_on >= s))
            })
            .collect();
        let size = query.page_size.unwrap_or(matching.len().max(1)).max(1);
        let records: Vec<Record> = matching.iter().skip(offset).take(size).cloned().collect();
        let next = (offset + size < matching.len()).then(|| (offset + size).to_string());
        Ok(Page {
            records,
            next,
            unfit: Vec::new(),
        })
    }

    async fn upsert(
        &self,
        entity: &str,
        at: &RecordRef,
        record: &Record,
        condition: WriteCondition,
    ) -> Result<WriteOutcome, ConnectorError> {
        self.change(entity, at, record, &condition, Actor::Dualwrite)
            .map(|(_, outcome)| outcome)
    }

    async fn delete(&self, entity: &str, at: &RecordRef) -> Result<(), ConnectorError> {
        self.remove(entity, at, Actor::Dualwrite).map(|_| ())
    }

    async fn upsert_batch(
        &self,
        entity: &str,
        items: &[(RecordRef, Record)],
    ) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
        Ok(items
            .iter()
            .map(|(at, record)| {
                self.change(entity, at, record, &WriteCondition::None, Actor::Dualwrite)
                    .map(|(_, o)| o)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use chrono::DateTime;

    fn key(v: &str) -> RecordRef {
        RecordRef::Key(RecordKey::new([("accountnumber", v)]))
    }

    #[tokio::test]
    async fn versions_grow_and_if_match_guards_writes() {
        let c = MemoryConnector::new(Side::Crm, Arc::new(ManualClock::new(DateTime::UNIX_EPOCH)));
        let ev = c.edit(
            "accounts",
            &key("A1"),
            [("name".to_string(), Value::Text("A".into()))],
        );
        let first = ev.record.clone();
        assert!(first.id.is_some());
        assert_eq!(first.get("accountnumber"), Some(&Value::Text("A1".into())));
        let out = c
            .upsert(
                "accounts",
                &key("A1"),
                &Record::new("accounts").with("name", Value::Text("B".into())),
                WriteCondition::IfMatch(first.etag.clone().unwrap_or_default()),
            )
            .await
            .unwrap();
        assert!(!out.created);
        assert!(out.version > first.version);
        let stale = c
            .upsert(
                "accounts",
                &key("A1"),
                &Record::new("accounts"),
                WriteCondition::IfMatch(first.etag.unwrap_or_default()),
            )
            .await
            .unwrap_err();
        assert_eq!(stale.kind, ConnectorErrorKind::PreconditionFailed);
        assert_eq!(c.write_count(), 1);
        assert_eq!(c.take_echoes().len(), 1);
        assert!(c.take_echoes().is_empty());
    }

    #[tokio::test]
    async fn erp_ids_are_rendered_keys() {
        let c = MemoryConnector::new(Side::Erp, Arc::new(ManualClock::new(DateTime::UNIX_EPOCH)));
        let at = RecordRef::Key(RecordKey::new([
            ("dataAreaId", "usmf"),
            ("CustomerAccount", "C1"),
        ]));
        let out = c
            .upsert(
                "CustomersV3",
                &at,
                &Record::new("CustomersV3"),
                WriteCondition::MustNotExist,
            )
            .await
            .unwrap();
        assert_eq!(
            out.id.as_deref(),
            Some("dataAreaId='usmf',CustomerAccount='C1'")
        );
        assert!(
            c.read("CustomersV3", &at)
                .await
                .unwrap()
                .is_some_and(|r| r.company.as_deref() == Some("usmf"))
        );
    }
    #[tokio::test]
    async fn the_default_call_many_answers_each_call_in_order_as_its_single_call() {
        use dualwrite_core::ports::{CallResult, ConnectorCall};
        let c = MemoryConnector::new(Side::Crm, Arc::new(ManualClock::new(DateTime::UNIX_EPOCH)));
        let existing = c
            .edit(
                "accounts",
                &key("A1"),
                [("name".to_string(), Value::Text("A".into()))],
            )
            .record;
        let results = c
            .call_many(vec![
                ConnectorCall::Read {
                    entity: "accounts".into(),
                    at: key("A1"),
                },
                ConnectorCall::Upsert {
                    entity: "accounts".into(),
                    at: key("A1"),
                    record: Record::new("accounts"),
                    condition: WriteCondition::MustNotExist,
                },
                ConnectorCall::Upsert {
                    entity: "accounts".into(),
                    at: key("A2"),
                    record: Record::new("accounts"),
                    condition: WriteCondition::MustNotExist,
                },
                ConnectorCall::Read {
                    entity: "accounts".into(),
                    at: key("A3"),
                },
            ])
            .await;
        assert_eq!(results.len(), 4);
        assert_eq!(results[0], CallResult::Read(Ok(Some(existing))));
        assert!(matches!(
            &results[1],
            CallResult::Upsert(Err(e)) if e.kind == ConnectorErrorKind::PreconditionFailed
        ));
        assert!(matches!(&results[2], CallResult::Upsert(Ok(out)) if out.created));
        assert_eq!(results[3], CallResult::Read(Ok(None)));
    }
}
