//! The one place that decides what an error means: retry later, re-read, or stop and tell a
//! person. Connectors, workers and Lambda handlers all ask here.

use std::time::Duration;

use crate::ports::{ConnectorError, ConnectorErrorKind, ErrorClass};

/// What to do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Refresh the access token and try once more (401).
    RefreshTokenOnce,
    /// Read the record again and decide again (412).
    RereadAndRedecide,
    /// Wait at least this long, then retry (429/503 `Retry-After`, 5xx backoff).
    RetryAfter(Duration),
    /// Do not retry: the request will not succeed as it is (400/403/404).
    Permanent,
}

/// Backoff settings for transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub base: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Attempts after which a transient failure is treated as permanent.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(60),
            max_attempts: 8,
        }
    }
}

impl Backoff {
    /// Exponential delay for `attempt` (1-based) with "full jitter": a uniformly random delay
    /// between half and all of `base * 2^(attempt-1)`, capped at `max`. `jitter` is a number in
    /// [0, 1) supplied by the caller so this stays deterministic under test.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Classifies a connector failure on attempt `attempt` (1-based).
pub fn disposition(
    error: &ConnectorError,
    attempt: u32,
    backoff: &Backoff,
    jitter: f64,
) -> Disposition {
    match &error.kind {
        ConnectorErrorKind::Unauthorized if attempt <= 1 => Disposition::RefreshTokenOnce,
        ConnectorErrorKind::Unauthorized => Disposition::Permanent,
        ConnectorErrorKind::Forbidden
        | ConnectorErrorKind::NotFound
        | ConnectorErrorKind::BadRequest => Disposition::Permanent,
        ConnectorErrorKind::PreconditionFailed => Disposition::RereadAndRedecide,
        ConnectorErrorKind::Throttled { retry_after_ms } if attempt < backoff.max_attempts => {
            Disposition::RetryAfter(
                Duration::from_millis(*retry_after_ms).max(backoff.delay(attempt, jitter)),
            )
        }
        ConnectorErrorKind::Transient if attempt < backoff.max_attempts => {
            Disposition::RetryAfter(backoff.delay(attempt, jitter))
        }
        ConnectorErrorKind::Throttled { .. } | ConnectorErrorKind::Transient => {
            Disposition::Permanent
        }
    }
}

/// How a failure is logged for operators.
pub fn error_class(error: &ConnectorError) -> ErrorClass {
    match error.kind {
        ConnectorErrorKind::Throttled { .. } | ConnectorErrorKind::Transient => {
            ErrorClass::Retryable
        }
        ConnectorErrorKind::PreconditionFailed => ErrorClass::Retryable,
        ConnectorErrorKind::Unauthorized | ConnectorErrorKind::Forbidden => {
            ErrorClass::NeedsAttention
        }
        ConnectorErrorKind::NotFound | ConnectorErrorKind::BadRequest => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Side;

    fn err(kind: ConnectorErrorKind) -> ConnectorError {
        ConnectorError {
            side: Side::Crm,
            entity: "accounts".into(),
            kind,
            status: None,
            message: "x".into(),
        }
    }

    #[test]
    fn throttling_waits_at_least_retry_after() {
        let b = Backoff::default();
        let d = disposition(
            &err(ConnectorErrorKind::Throttled {
                retry_after_ms: 5_000,
            }),
            1,
            &b,
            0.0,
        );
        assert_eq!(d, Disposition::RetryAfter(Duration::from_secs(5)));
    }

    #[test]
    fn unauthorized_refreshes_once_then_gives_up() {
        let b = Backoff::default();
        assert_eq!(
            disposition(&err(ConnectorErrorKind::Unauthorized), 1, &b, 0.5),
            Disposition::RefreshTokenOnce
        );
        assert_eq!(
            disposition(&err(ConnectorErrorKind::Unauthorized), 2, &b, 0.5),
            Disposition::Permanent
        );
    }

    #[test]
    fn transient_backoff_grows_and_is_bounded() {
        let b = Backoff::default();
        let d1 = b.delay(1, 1.0);
        let d3 = b.delay(3, 1.0);
        assert!(d3 > d1);
        assert!(b.delay(30, 1.0) <= b.max);
        assert_eq!(
            disposition(&err(ConnectorErrorKind::Transient), b.max_attempts, &b, 0.0),
            Disposition::Permanent
        );
    }

    #[test]
    fn client_errors_are_permanent() {
        let b = Backoff::default();
        for k in [
            ConnectorErrorKind::BadRequest,
            ConnectorErrorKind::Forbidden,
            ConnectorErrorKind::NotFound,
        ] {
            assert_eq!(disposition(&err(k), 1, &b, 0.0), Disposition::Permanent);
        }
        assert_eq!(
            disposition(&err(ConnectorErrorKind::PreconditionFailed), 1, &b, 0.0),
            Disposition::RereadAndRedecide
        );
    }
}
