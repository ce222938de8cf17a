//! The catch-up scheduler: on a cron schedule, reads what changed on each enabled map's source
//! tables since the last poll (`Query.modified_since` = the map's watermark) and ingests it,
//! so a missed webhook is made up for. Watermarks are kept in the map's `MapState`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use dualwrite_core::ports::{MapState, MapStatus, Query, StoreOp};
use dualwrite_core::{ChangeEvent, Operation, Side};
use dualwrite_engine::ingest;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::CatchUp;
use crate::runtime::Shared;

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
        match catch_up(&shared).await {
            Ok(n) => info!(changes = n, "catch-up poll done"),
            Err(e) => warn!(error = %e, "catch-up poll failed; the next run tries again"),
        }
    }
}

/// One catch-up poll over every enabled map and each side its changes flow from. Returns the
/// number of changes ingested.
///
/// Polled changes get a deterministic event id (side, entity, id and version), so polling the
/// same change twice is a duplicate the engine ignores, and a change already delivered by a
/// webhook is an echo of applied data.
///
/// # Errors
/// The first connector, store or queue failure, as text (watermarks of maps done before it
/// are kept).
pub(crate) async fn catch_up(shared: &Shared) -> Result<usize, String> {
    let mut total = 0;
    let now = Utc::now();
    for map in shared.engine.maps() {
        let state = shared
            .store
            .as_ref()
            .map_state_of(&map.name)
            .await
            .map_err(|e| e.to_string())?;
        let mut state = state.unwrap_or(MapState {
            map: map.name.clone(),
            status: MapStatus::Running,
            crm_watermark: None,
            erp_watermark: None,
            updated_at: now,
        });
        if state.status == MapStatus::Paused {
            continue;
        }
        for side in [Side::Crm, Side::Erp] {
            if !map.direction.flows_from(side) {
                continue;
            }
            let (connector, entity) = match side {
                Side::Crm => (&shared.crm, map.crm.entity_set.as_str()),
                Side::Erp => (&shared.erp, map.erp.entity.as_str()),
            };
            let watermark = match side {
                Side::Crm => state.crm_watermark,
                Side::Erp => state.erp_watermark,
            };
            let mut newest = watermark;
            let mut query = Query {
                modified_since: watermark,
                page_size: Some(PAGE_SIZE),
                ..Query::default()
            };
            loop {
                let page = connector
                    .query(entity, &query)
                    .await
                    .map_err(|e| format!("map {}: {e}", map.name))?;
                let events: Vec<ChangeEvent> =
                    page.records
                        .into_iter()
                        .map(|record| {
                            if let Some(v) = record.version {
                                newest = Some(newest.map_or(v.modified_on, |n: DateTime<Utc>| {
                                    n.max(v.modified_on)
                                }));
                            }
                            polled_event(side, record, now)
                        })
                        .collect();
                total += ingest(shared.inbound.as_ref(), events)
                    .await
                    .map_err(|e| e.to_string())?;
                match page.next {
                    Some(next) => query.page_token = Some(next),
                    None => break,
                }
            }
            match side {
                Side::Crm => state.crm_watermark = newest,
                Side::Erp => state.erp_watermark = newest,
            }
        }
        state.updated_at = now;
        shared
            .store
            .commit_ops(vec![StoreOp::PutMapState(state)])
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(total)
}

fn polled_event(side: Side, record: dualwrite_core::Record, now: DateTime<Utc>) -> ChangeEvent {
    let version = record
        .version
        .map(|v| format!("{}#{}", v.modified_on.to_rfc3339(), v.sequence))
        .unwrap_or_default();
    let identity = format!(
        "{side}:{}:{}:{version}",
        record.entity,
        record.id.as_deref().unwrap_or_default()
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
