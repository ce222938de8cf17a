//! Counters of what a connector did: requests, their outcomes by kind, retries, token
//! refreshes.

use std::sync::atomic::{AtomicU64, Ordering};

use dualwrite_core::ports::ConnectorErrorKind;

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
    not_found: AtomicU64,
    precondition_failed: AtomicU64,
    transient: AtomicU64,
    refused: AtomicU64,
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
    /// Of `failures`: 429, and 503 with `Retry-After` (service protection).
    pub throttled: u64,
    /// Of `failures`: 404 (for a read, the record is absent: an answer, not an error).
    pub not_found: u64,
    /// Of `failures`: 412 (the ETag moved, or the record exists already): decided again.
    pub precondition_failed: u64,
    /// Of `failures`: 5xx, timeouts and dropped connections.
    pub transient: u64,
    /// Of `failures`: the request refused as sent (400, 401 after the token was fetched
    /// again, 403, other 4xx): permanent, the server's message kept.
    pub refused: u64,
    /// Tokens invalidated after a 401 and fetched again.
    pub token_refreshes: u64,
    /// Tokens fetched from the token endpoint.
    pub token_fetches: u64,
}

impl ConnectorStats {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    /// A request (or a `$batch` part) that failed with an error of `kind`.
    pub(crate) fn failure(&self, kind: &ConnectorErrorKind) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let class = match kind {
            ConnectorErrorKind::Throttled { .. } => &self.throttled,
            ConnectorErrorKind::NotFound => &self.not_found,
            ConnectorErrorKind::PreconditionFailed => &self.precondition_failed,
            ConnectorErrorKind::Transient => &self.transient,
            ConnectorErrorKind::Unauthorized
            | ConnectorErrorKind::Forbidden
            | ConnectorErrorKind::BadRequest => &self.refused,
        };
        class.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
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
            not_found: self.not_found.load(Ordering::Relaxed),
            precondition_failed: self.precondition_failed.load(Ordering::Relaxed),
            transient: self.transient.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}
