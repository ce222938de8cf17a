//! Ingest and the worker loop: events into the queue, deliveries through the engine, acks and
//! retries out.

use dualwrite_core::ChangeEvent;
use dualwrite_core::ports::{Delivery, QueueError, QueueMessage, RetryOutcome, WorkQueue};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::engine::Engine;

/// Sends `events` to the work queue, one ordering group per source record. Returns how many
/// were sent.
///
/// # Errors
/// The queue's error; no event is known to be accepted then, so the caller resends all.
pub async fn ingest(queue: &dyn WorkQueue, events: Vec<ChangeEvent>) -> Result<usize, QueueError> {
    let count = events.len();
    if count > 0 {
        queue
            .send(events.into_iter().map(QueueMessage::for_event).collect())
            .await?;
    }
    Ok(count)
}

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    /// Processed (or a duplicate) and acked.
    Acked,
    /// Handed back to the queue for a later attempt.
    Retried(RetryOutcome),
}

/// Processes one delivery: ack on success (after sending released parked events), retry with
/// the error's delay otherwise.
///
/// # Errors
/// The queue's error (the message is then redelivered after its visibility timeout).
pub async fn handle_delivery(
    queue: &dyn WorkQueue,
    engine: &Engine,
    delivery: Delivery,
) -> Result<DeliveryResult, QueueError> {
    let event = &delivery.message.event;
    match engine.process_attempt(event, delivery.attempt).await {
        Ok(outcome) => {
            // Released events go out before the ack; if that fails they stay parked and the
            // next sweep releases them (the event itself is complete).
            if let Err(e) = engine.release(queue, outcome.released).await {
                warn!(event_id = %event.event_id, error = %e, "released parked events will go out with the next sweep");
            }
            queue.ack(&delivery.receipt).await?;
            Ok(DeliveryResult::Acked)
        }
        Err(e) => {
            warn!(event_id = %event.event_id, attempt = delivery.attempt, error = %e, "event will be retried");
            let outcome = queue
                .retry(&delivery.receipt, e.retry_after(), &e.to_string())
                .await?;
            Ok(DeliveryResult::Retried(outcome))
        }
    }
}

/// Counts of one [`drain`] or [`run_worker`] run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainReport {
    /// Deliveries processed.
    pub deliveries: u64,
    /// Of which acked.
    pub acked: u64,
    /// Of which handed back for retry.
    pub retried: u64,
    /// Of which moved to the dead-letter queue.
    pub dead_lettered: u64,
}

impl DrainReport {
    fn count(&mut self, result: DeliveryResult) {
        self.deliveries += 1;
        match result {
            DeliveryResult::Acked => self.acked += 1,
            DeliveryResult::Retried(RetryOutcome::Requeued) => self.retried += 1,
            DeliveryResult::Retried(RetryOutcome::DeadLettered) => self.dead_lettered += 1,
        }
    }
}

/// Processes deliveries until the queue has nothing deliverable now (delayed retries stay).
/// Used by tests, `dualwrite bench engine` and one-shot local runs.
///
/// # Errors
/// The queue's error.
pub async fn drain(queue: &dyn WorkQueue, engine: &Engine) -> Result<DrainReport, QueueError> {
    let mut report = DrainReport::default();
    loop {
        let deliveries = queue
            .receive(engine.config().batch_size, engine.config().lease)
            .await?;
        if deliveries.is_empty() {
            // Nothing deliverable: release parked events whose dependency is there now (an
            // interrupted release, a resolved conflict) and go on if that queued any.
            if sweep(queue, engine).await == 0 {
                return Ok(report);
            }
            continue;
        }
        for delivery in deliveries {
            report.count(handle_delivery(queue, engine, delivery).await?);
        }
    }
}

/// How often an idle worker sweeps the parked events.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs [`Engine::sweep_parked`], logging (not failing on) its error: the next sweep retries.
async fn sweep(queue: &dyn WorkQueue, engine: &Engine) -> usize {
    match engine.sweep_parked(queue).await {
        Ok(n) => {
            if n > 0 {
                info!(released = n, "parked events released by the sweep");
            }
            n
        }
        Err(e) => {
            warn!(error = %e, "sweeping parked events failed; the next sweep retries");
            0
        }
    }
}

/// The worker loop: receive, process, ack or retry, until `shutdown` turns true (or its sender
/// is dropped). Shutdown is graceful: the batch in hand is finished, then the loop stops.
///
/// # Errors
/// The queue's error (after which the caller may restart the loop).
pub async fn run_worker(
    queue: &dyn WorkQueue,
    engine: &Engine,
    mut shutdown: watch::Receiver<bool>,
) -> Result<DrainReport, QueueError> {
    let mut report = DrainReport::default();
    sweep(queue, engine).await;
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let deliveries = queue
            .receive(engine.config().batch_size, engine.config().lease)
            .await?;
        if deliveries.is_empty() {
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = tokio::time::Instant::now();
                if sweep(queue, engine).await > 0 {
                    continue;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(engine.config().idle_poll) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            continue;
        }
        for delivery in deliveries {
            report.count(handle_delivery(queue, engine, delivery).await?);
        }
    }
    info!(
        deliveries = report.deliveries,
        acked = report.acked,
        retried = report.retried,
        "worker stopped"
    );
    Ok(report)
}
