//! The catch-up scheduler: on a cron schedule, reads what changed on each enabled map's source
//! tables since the last poll and ingests it, so a missed webhook is made up for. Watermarks
//! are kept in the map's `MapState`.
//!
//! Each poll reads from `overlap` before the watermark (`Query.modified_since`): a row is
//! stamped when its transaction starts and visible when it commits, so a long transaction can
//! commit behind a watermark taken from shorter, later ones. Rows read again get the same
//! event id and are dropped as duplicates.
//!
//! Deletes are not in a query's answer: where the system has change tracking (Dataverse:
//! `Prefer: odata.track-changes`, a deltaLink kept per map side), each poll also reads the
//! rows deleted since the last one and ingests a delete for each, so a missed delete webhook
//! is made up for too. F&O's OData has no change tracking: a missed F&O delete is not.
//!
//! A row that does not convert (a value that does not fit its declared type) does not stop
//! the poll: it is queued as a change to read again by id, and the worker logs it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dualwrite_core::map::TableMap;
use dualwrite_core::ports::{
    ConnectorErrorKind, ErrorClass, ErrorRecord, MapState, MapStatus, Query, StoreOp,
};
use dualwrite_core::{ChangeEvent, Operation, Side};
use dualwrite_engine::ingest;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::CatchUp;
use crate::runtime::{CatchUpStats, Shared};

/// Rows per page of a catch-up read.
const PAGE_SIZE: usize = 500;

/// Runs [`catch_up`] at every time of `schedule` until `stop` turns true.
pub(crate) async fn run_scheduler(
    shared: Arc<Shared>,
    schedule: CatchUp,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let Some(next) = schedule.schedule.upcoming(Utc).next() else {
            info!(expression = %schedule.expression, "catch-up schedule has no further times");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        // A shutdown does not wait for a long poll (a first, full read; a throttled system):
        // stopped between two of its steps, the poll has committed no watermark, so the next
        // start reads the same rows again, whose events are duplicates by their ids.
        tokio::select! {
            result = catch_up(&shared, schedule.overlap) => match result {
                Ok(n) => info!(changes = n, "catch-up poll done"),
                Err(e) => warn!(error = %e, "catch-up poll incomplete; the next run tries again"),
            },
            () = stopped(&mut stop) => {
                info!("catch-up poll stopped by the shutdown; the next start polls again");
                return;
            }
        }
    }
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// One catch-up poll over every enabled map and each side its changes flow from, reading from
/// `overlap` before each side's watermark. Returns the number of changes ingested.
///
/// Polled changes get a deterministic event id (side, entity, id, version and ETag), so
/// polling the same change twice is a duplicate the engine ignores, and a change already
/// delivered by a webhook is an echo of applied data.
///
/// A map side that cannot be polled (a connector, store or queue failure, a row that does not
/// convert) keeps its watermark and does not stop the others: every other map side is polled
/// and its watermark advanced.
///
/// # Errors
/// The map sides that failed, as text, once every map was tried.
pub(crate) async fn catch_up(shared: &Shared, overlap: Duration) -> Result<usize, String> {
    let stats = &shared.catch_up_stats;
    CatchUpStats::add(&stats.polls, 1);
    let result = catch_up_maps(shared, overlap).await;
    if result.is_err() {
        CatchUpStats::add(&stats.incomplete, 1);
    }
    let ended = u64::try_from(Utc::now().timestamp_millis()).unwrap_or_default();
    stats
        .last_poll_ended_ms
        .store(ended, std::sync::atomic::Ordering::Relaxed);
    result
}

async fn catch_up_maps(shared: &Shared, overlap: Duration) -> Result<usize, String> {
    let mut total = 0;
    let mut failures = Vec::new();
    let now = Utc::now();
    for map in shared.engine.maps() {
        let state = match shared.store.as_ref().map_state_of(&map.name).await {
            Ok(state) => state,
            Err(e) => {
                failures.push(format!("map {}: {e}", map.name));
                continue;
            }
        };
        let mut state = state.unwrap_or(MapState {
            map: map.name.clone(),
            status: MapStatus::Running,
            crm_watermark: None,
            erp_watermark: None,
            crm_deletions: None,
            erp_deletions: None,
            updated_at: now,
        });
        if state.status == MapStatus::Paused {
            continue;
        }
        for side in [Side::Crm, Side::Erp] {
            if !map.direction.flows_from(side) {
                continue;
            }
            let watermark = match side {
                Side::Crm => state.crm_watermark,
                Side::Erp => state.erp_watermark,
            };
            match poll_side(shared, map, side, watermark, overlap, now).await {
                Ok((changes, newest)) => {
                    total += changes;
                    match side {
                        Side::Crm => state.crm_watermark = newest,
                        Side::Erp => state.erp_watermark = newest,
                    }
                }
                Err(e) => {
                    warn!(map = %map.name, side = %side, error = %e, "catch-up of a map side failed; its watermark stays");
                    failures.push(format!("map {} ({side}): {e}", map.name));
                    continue;
                }
            }
            let cursor = match side {
                Side::Crm => state.crm_deletions.clone(),
                Side::Erp => state.erp_deletions.clone(),
            };
            match poll_deletions(shared, map, side, cursor, now).await {
                Ok((changes, cursor)) => {
                    total += changes;
                    match side {
                        Side::Crm => state.crm_deletions = cursor,
                        Side::Erp => state.erp_deletions = cursor,
                    }
                }
                Err(e) => {
                    warn!(map = %map.name, side = %side, error = %e, "reading deletions of a map side failed; its cursor stays");
                    failures.push(format!("map {} ({side}) deletions: {e}", map.name));
                }
            }
        }
        state.updated_at = now;
        if let Err(e) = shared
            .store
            .commit_ops(vec![StoreOp::PutMapState(state)])
            .await
        {
            failures.push(format!("map {}: {e}", map.name));
        }
    }
    if failures.is_empty() {
        Ok(total)
    } else {
        Err(format!(
            "{} map side(s) not polled ({total} changes ingested from the others): {}",
            failures.len(),
            failures.join("; ")
        ))
    }
}

/// Reads one side of `map` from `overlap` before `watermark` and ingests every row. Returns
/// the changes ingested and the side's new watermark (the newest version read, never older
/// than `watermark`).
async fn poll_side(
    shared: &Shared,
    map: &TableMap,
    side: Side,
    watermark: Option<DateTime<Utc>>,
    overlap: Duration,
    now: DateTime<Utc>,
) -> Result<(usize, Option<DateTime<Utc>>), String> {
    let (connector, entity) = match side {
        Side::Crm => (&shared.crm_polls, map.crm.entity_set.as_str()),
        Side::Erp => (&shared.erp_polls, map.erp.entity.as_str()),
    };
    let since = watermark.map(|w| {
        chrono::Duration::from_std(overlap)
            .ok()
            .and_then(|o| w.checked_sub_signed(o))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    });
    let mut newest = watermark;
    let mut total = 0;
    let mut query = Query {
        modified_since: since,
        page_size: Some(PAGE_SIZE),
        ..Query::default()
    };
    loop {
        let page = connector
            .query(entity, &query)
            .await
            .map_err(|e| e.to_string())?;
        let stats = &shared.catch_up_stats;
        CatchUpStats::add(&stats.rows_read, page.records.len() + page.unfit.len());
        CatchUpStats::add(&stats.unfit_rows, page.unfit.len());
        // A row without its key cannot be read again: it is logged in the error log (where
        // `dualwrite status` shows it) and the rows after it are read on.
        let (keyed, keyless): (Vec<_>, Vec<_>) =
            page.unfit.into_iter().partition(|u| u.id.is_some());
        if !keyless.is_empty() {
            let ops: Vec<StoreOp> = keyless
                .iter()
                .map(|row| {
                    warn!(map = %map.name, side = %side, entity, problem = %row.problem, "a polled row without its key cannot be read");
                    StoreOp::RecordError(ErrorRecord {
                        at: now,
                        map: Some(map.name.clone()),
                        key: None,
                        event_id: None,
                        class: ErrorClass::NeedsAttention,
                        message: format!(
                            "catch-up of {entity} ({side}): a row without its key cannot be read: {}",
                            row.problem
                        ),
                        event: None,
                    })
                })
                .collect();
            for chunk in ops.chunks(100) {
                shared
                    .store
                    .commit_ops(chunk.to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut events: Vec<ChangeEvent> = page
            .records
            .into_iter()
            .map(|record| {
                if let Some(v) = record.version {
                    newest =
                        Some(newest.map_or(v.modified_on, |n: DateTime<Utc>| n.max(v.modified_on)));
                }
                polled_event(side, record, now)
            })
            .collect();
        // A row that does not convert is ingested as a change to read again by id (a partial
        // event): the worker's read fails the same way and logs it in the error log, named by
        // map and record, where `dualwrite errors retry` replays it once the row or the map is
        // fixed. The rows after it are read on.
        for row in keyed {
            warn!(map = %map.name, side = %side, entity, id = row.id.as_deref().unwrap_or_default(), problem = %row.problem, "a polled row does not fit the table maps; queued to be read again by id");
            events.push(unfit_event(side, entity, row, now));
        }
        let queued = ingest(shared.inbound.as_ref(), events)
            .await
            .map_err(|e| e.to_string())?;
        CatchUpStats::add(&shared.catch_up_stats.changes_queued, queued);
        total += queued;
        match page.next {
            Some(next) => query.page_token = Some(next),
            None => break,
        }
    }
    Ok((total, newest))
}

/// Reads the rows of one side of `map` deleted since `cursor` through the system's change
/// tracking and ingests a delete for each. Returns the deletes ingested and the cursor the
/// next poll starts from: `None` where the system has no change tracking. Without a cursor,
/// the read only establishes one (a first poll cannot know what was deleted before it).
async fn poll_deletions(
    shared: &Shared,
    map: &TableMap,
    side: Side,
    cursor: Option<String>,
    now: DateTime<Utc>,
) -> Result<(usize, Option<String>), String> {
    let (connector, entity) = match side {
        Side::Crm => (&shared.crm_polls, map.crm.entity_set.as_str()),
        Side::Erp => (&shared.erp_polls, map.erp.entity.as_str()),
    };
    // The cursor this read starts from names its deletes (with the row): the same read
    // repeated (a poll cut short before its cursor was committed) gives the same ids, while a
    // row deleted again later (created again under the same id) is a delete of its own.
    let started_from = cursor.clone().unwrap_or_default();
    let mut from = cursor;
    let mut total = 0;
    loop {
        let answer = connector.deletions(entity, from.as_deref()).await;
        let page = match answer {
            Ok(Some(page)) => page,
            Ok(None) => return Ok((total, None)),
            // A cursor the system no longer takes (Dataverse change-tracking tokens expire,
            // after 7 days by default): start a new one at the next poll. Deletes made since
            // the last poll that read them cannot be known any more; say so.
            Err(e)
                if from.is_some()
                    && matches!(
                        e.kind,
                        ConnectorErrorKind::BadRequest | ConnectorErrorKind::NotFound
                    ) =>
            {
                warn!(map = %map.name, side = %side, error = %e, "change-tracking cursor refused; a new one is started at the next poll, and deletes made since the last poll may not be caught up");
                return Ok((total, None));
            }
            Err(e) => return Err(e.to_string()),
        };
        CatchUpStats::add(&shared.catch_up_stats.deletes_read, page.deleted.len());
        let events: Vec<ChangeEvent> = page
            .deleted
            .into_iter()
            .map(|id| deleted_event(side, entity, id, &started_from, now))
            .collect();
        let queued = ingest(shared.inbound.as_ref(), events)
            .await
            .map_err(|e| e.to_string())?;
        CatchUpStats::add(&shared.catch_up_stats.changes_queued, queued);
        total += queued;
        match (page.next, page.cursor) {
            (Some(next), _) => from = Some(next),
            (None, Some(cursor)) => return Ok((total, Some(cursor))),
            (None, None) => return Err("change tracking ended without a cursor".into()),
        }
    }
}

/// The delete of row `id` of `entity` found by the change-tracking read that started `from`;
/// its id is the same however often that read is repeated.
fn deleted_event(
    side: Side,
    entity: &str,
    id: String,
    from: &str,
    now: DateTime<Utc>,
) -> ChangeEvent {
    let digest =
        xxhash_rust::xxh3::xxh3_128(format!("{side}:{entity}:{id}:deleted:{from}").as_bytes());
    let mut record = dualwrite_core::Record::new(entity);
    record.id = Some(id.into());
    ChangeEvent {
        event_id: format!("poll-delete:{digest:032x}"),
        source: side,
        operation: Operation::Delete,
        record,
        partial: false,
        received_at: now,
        correlation_id: None,
        depth: None,
    }
}

/// A change to `row`, which did not convert, to be read again by id; its id is the same for
/// the same row version.
fn unfit_event(
    side: Side,
    entity: &str,
    row: dualwrite_core::ports::UnfitRow,
    now: DateTime<Utc>,
) -> ChangeEvent {
    let id = row.id.unwrap_or_default();
    let identity = format!(
        "{side}:{entity}:{id}:unfit:{}",
        row.etag.as_deref().unwrap_or_default()
    );
    let digest = xxhash_rust::xxh3::xxh3_128(identity.as_bytes());
    let mut record = dualwrite_core::Record::new(entity);
    record.id = Some(id.into());
    record.etag = row.etag;
    ChangeEvent {
        event_id: format!("poll:{digest:032x}"),
        source: side,
        operation: Operation::Upsert,
        record,
        partial: true,
        received_at: now,
        correlation_id: None,
        depth: None,
    }
}

fn polled_event(side: Side, record: dualwrite_core::Record, now: DateTime<Utc>) -> ChangeEvent {
    let version = record
        .version
        .map(|v| format!("{}#{}", v.modified_on.to_rfc3339(), v.sequence))
        .unwrap_or_default();
    // The ETag tells apart two changes stamped alike (F&O's ModifiedDateTime has no sequence,
    // and some entities have none at all), which would otherwise share an id and the second be
    // dropped as a duplicate of the first.
    let identity = format!(
        "{side}:{}:{}:{version}:{}",
        record.entity,
        record.id.as_deref().unwrap_or_default(),
        record.etag.as_deref().unwrap_or_default()
    );
    let digest = xxhash_rust::xxh3::xxh3_128(identity.as_bytes());
    ChangeEvent {
        event_id: format!("poll:{digest:032x}"),
        source: side,
        operation: Operation::Upsert,
        record,
        partial: false,
        received_at: now,
        correlation_id: None,
        depth: None,
    }
}

/// Small adapters so the scheduler names the store's trait methods without importing traits
/// that clash with the queue's.
trait StoreExt {
    async fn map_state_of(
        &self,
        map: &str,
    ) -> Result<Option<MapState>, dualwrite_core::ports::StoreError>;
    async fn commit_ops(&self, ops: Vec<StoreOp>) -> Result<(), dualwrite_core::ports::StoreError>;
}

impl StoreExt for dualwrite_sqlite::SqliteStore {
    async fn map_state_of(
        &self,
        map: &str,
    ) -> Result<Option<MapState>, dualwrite_core::ports::StoreError> {
        dualwrite_core::ports::JournalStore::map_state(self, map).await
    }

    async fn commit_ops(&self, ops: Vec<StoreOp>) -> Result<(), dualwrite_core::ports::StoreError> {
        dualwrite_core::ports::LinkStore::commit(self, ops).await
    }
}
