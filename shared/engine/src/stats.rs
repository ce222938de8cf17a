//! Engine metrics as typed counters: what the CLI prints and the Lambda functions emit.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters, shared by every task of one engine.
#[derive(Debug, Default)]
pub struct EngineStats {
    events: AtomicU64,
    duplicates: AtomicU64,
    writes: AtomicU64,
    deletes: AtomicU64,
    echoes_suppressed: AtomicU64,
    stale_dropped: AtomicU64,
    skipped: AtomicU64,
    conflicts: AtomicU64,
    parked: AtomicU64,
    unparked: AtomicU64,
    errors: AtomicU64,
    redecisions: AtomicU64,
    dependencies_synced: AtomicU64,
    screened: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StatsSnapshot {
    /// Events handed to `process` (duplicates included).
    pub events: u64,
    /// Events already processed before (idempotency).
    pub duplicates: u64,
    /// Records written to a connector (upserts, deactivations).
    pub writes: u64,
    /// Records deleted through a connector.
    pub deletes: u64,
    /// Changes that only reflected dualwrite's own writes (or already applied data).
    pub echoes_suppressed: u64,
    /// Changes older than the data already applied.
    pub stale_dropped: u64,
    /// Other skips: filtered out, direction not synced, already in sync, no link.
    pub skipped: u64,
    /// Conflicts detected (any policy).
    pub conflicts: u64,
    /// Changes parked for a dependency or an open conflict.
    pub parked: u64,
    /// Parked changes released for processing.
    pub unparked: u64,
    /// Errors logged for a person (permanent connector errors, unmappable records).
    pub errors: u64,
    /// Decisions taken again after a 412 or a concurrent link update.
    pub redecisions: u64,
    /// Referenced records synced on the spot to resolve a lookup.
    pub dependencies_synced: u64,
    /// Changes recognised on arrival as settled (echo, duplicate, stale: also counted there)
    /// and answered without being queued ([`crate::Engine::settled`]).
    pub screened: u64,
}

/// One counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    Events,
    Duplicates,
    Writes,
    Deletes,
    EchoesSuppressed,
    StaleDropped,
    Skipped,
    Conflicts,
    Parked,
    Unparked,
    Errors,
    Redecisions,
    DependenciesSynced,
    Screened,
}

impl EngineStats {
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        let c = match counter {
            Counter::Events => &self.events,
            Counter::Duplicates => &self.duplicates,
            Counter::Writes => &self.writes,
            Counter::Deletes => &self.deletes,
            Counter::EchoesSuppressed => &self.echoes_suppressed,
            Counter::StaleDropped => &self.stale_dropped,
            Counter::Skipped => &self.skipped,
            Counter::Conflicts => &self.conflicts,
            Counter::Parked => &self.parked,
            Counter::Unparked => &self.unparked,
            Counter::Errors => &self.errors,
            Counter::Redecisions => &self.redecisions,
            Counter::DependenciesSynced => &self.dependencies_synced,
            Counter::Screened => &self.screened,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            events: g(&self.events),
            duplicates: g(&self.duplicates),
            writes: g(&self.writes),
            deletes: g(&self.deletes),
            echoes_suppressed: g(&self.echoes_suppressed),
            stale_dropped: g(&self.stale_dropped),
            skipped: g(&self.skipped),
            conflicts: g(&self.conflicts),
            parked: g(&self.parked),
            unparked: g(&self.unparked),
            errors: g(&self.errors),
            redecisions: g(&self.redecisions),
            dependencies_synced: g(&self.dependencies_synced),
            screened: g(&self.screened),
        }
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "events {} (duplicates {}), writes {}, deletes {}, echoes suppressed {}, stale dropped {}, skipped {}, conflicts {}, parked {} (released {}), errors {}, re-decisions {}, dependencies synced {}, settled on arrival {}",
            self.events,
            self.duplicates,
            self.writes,
            self.deletes,
            self.echoes_suppressed,
            self.stale_dropped,
            self.skipped,
            self.conflicts,
            self.parked,
            self.unparked,
            self.errors,
            self.redecisions,
            self.dependencies_synced,
            self.screened
        )
    }
}
