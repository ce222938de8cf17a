//! Screening: recognising, before it is queued, a change whose effect dualwrite already
//! recorded, so the receiver can answer it without queueing it.

use async_trait::async_trait;
use dualwrite_core::ChangeEvent;
use dualwrite_core::decision::SkipReason;

/// Tells whether a change needs processing at all. Implemented over the engine's decision and
/// the state store (`dualwrite serve` and the Lambda functions pass the engine's).
///
/// Contract: `Some(reason)` only when processing the event could do nothing but skip it for
/// `reason` (the echo of dualwrite's own write, a duplicate, a stale change) with nothing to
/// record, judged from stored state only; `None` whenever unsure, including on any error. A
/// `None` costs one queued event; a wrong `Some` would lose a change, so implementations must
/// never guess.
#[async_trait]
pub trait EventScreen: Send + Sync {
    /// Why `event` needs no processing, or `None` to queue it.
    async fn settled(&self, event: &ChangeEvent) -> Option<SkipReason>;
}

/// The screen that settles nothing: every accepted event is queued.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoScreen;

#[async_trait]
impl EventScreen for NoScreen {
    async fn settled(&self, _event: &ChangeEvent) -> Option<SkipReason> {
        None
    }
}
