//! Counters of what a connector did: calls, retries, throttles, token refreshes.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by a connector, its token provider and its retrying wrapper
/// (`Arc<ConnectorStats>`). Every outcome is counted, so tests and metrics can observe them.
#[derive(Debug, Default)]
pub struct ConnectorStats {
    requests: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    token_refreshes: AtomicU64,
    token_fetches: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// HTTP requests sent (each attempt counts).
    pub requests: u64,
    /// Requests answered with a non-success status or not answered at all, counting each
    /// failing part of a `$batch` as one request (a 429 or 412 inside a `$batch` is counted
    /// as it would be on its own; the `$batch` envelope itself only when it failed as a whole).
    pub failures: u64,
    /// Calls repeated by [`crate::RetryingConnector`].
    pub retries: u64,
    /// 429/503-with-`Retry-After` answers seen by [`crate::RetryingConnector`].
    pub throttled: u64,
    /// Tokens invalidated after a 401 and fetched again.
    pub token_refreshes: u64,
    /// Tokens fetched from the token endpoint.
    pub token_fetches: u64,
}

impl ConnectorStats {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn throttle(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn token_refresh(&self) {
        self.token_refreshes.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn token_fetch(&self) {
        self.token_fetches.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            token_refreshes: self.token_refreshes.load(Ordering::Relaxed),
            token_fetches: self.token_fetches.load(Ordering::Relaxed),
        }
    }
}
