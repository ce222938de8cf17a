//! `MemoryQueue`: a FIFO work queue in memory with ordering groups, visibility timeouts,
//! delayed retries and a dead-letter list, as [`WorkQueue`] requires.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dualwrite_core::ports::{
    Clock, DeadLetter, Delivery, QueueDepth, QueueError, QueueMessage, RetryOutcome, WorkQueue,
};

use super::lock;

#[derive(Debug, Clone)]
enum State {
    /// Deliverable from `at` on (now, or later after a retry delay).
    Ready { at: DateTime<Utc> },
    /// Delivered; redelivered when `until` passes without an ack.
    InFlight {
        receipt: String,
        until: DateTime<Utc>,
    },
}

#[derive(Debug)]
struct Entry {
    message: QueueMessage,
    attempt: u32,
    state: State,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Messages in send order.
    entries: Vec<Entry>,
    dead: Vec<DeadLetter>,
    next_receipt: u64,
}

/// A [`WorkQueue`] in memory; time comes from the injected clock (a `ManualClock` makes retry
/// delays and visibility timeouts deterministic).
pub struct MemoryQueue {
    clock: Arc<dyn Clock>,
    max_attempts: u32,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("max_attempts", &self.max_attempts)
            .field("inner", &self.inner)
            .finish()
    }
}

/// The dead letter's error when its last delivery timed out (after the error of the retry
/// before it, if any).
const TIMED_OUT: &str = "visibility timeout expired without ack";

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl MemoryQueue {
    /// A queue that dead-letters a message after `max_attempts` deliveries.
    pub fn new(clock: Arc<dyn Clock>, max_attempts: u32) -> Self {
        MemoryQueue {
            clock,
            max_attempts: max_attempts.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Messages not yet acked or dead-lettered (ready, delayed or in flight).
    pub fn len(&self) -> usize {
        lock(&self.inner).entries.len()
    }

    /// True when every message was acked or dead-lettered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl WorkQueue for MemoryQueue {
    async fn send(&self, messages: Vec<QueueMessage>) -> Result<(), QueueError> {
        let now = self.clock.now();
        let mut inner = lock(&self.inner);
        inner
            .entries
            .extend(messages.into_iter().map(|message| Entry {
                message,
                attempt: 0,
                state: State::Ready { at: now },
                last_error: None,
            }));
        Ok(())
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, QueueError> {
        let now = self.clock.now();
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let mut seen_groups = HashSet::new();
        let mut out = Vec::new();
        let mut index = 0;
        while index < inner.entries.len() && out.len() < max {
            let entry = &inner.entries[index];
            // Only the head of each group may be delivered (per-group order).
            if !seen_groups.insert(entry.message.group_id.clone()) {
                index += 1;
                continue;
            }
            let due = match &entry.state {
                State::Ready { at } => *at <= now,
                State::InFlight { until, .. } => *until <= now,
            };
            if !due {
                index += 1;
                continue;
            }
            if entry.attempt >= self.max_attempts {
                // Redelivery after a lost worker would exceed the attempts: dead-letter it.
                let entry = inner.entries.remove(index);
                let last_error = match entry.last_error {
                    Some(error) => format!("{error}; {TIMED_OUT}"),
                    None => TIMED_OUT.to_owned(),
                };
                // The group moves on: its next message may be delivered in this same call.
                seen_groups.remove(&entry.message.group_id);
                inner.dead.push(DeadLetter {
                    message: entry.message,
                    attempts: entry.attempt,
                    last_error,
                });
                index = 0;
                continue;
            }
            inner.next_receipt += 1;
            let receipt = format!("r{}", inner.next_receipt);
            let entry = &mut inner.entries[index];
            entry.attempt += 1;
            entry.state = State::InFlight {
                receipt: receipt.clone(),
                until: after(now, visibility),
            };
            out.push(Delivery {
                receipt,
                message: entry.message.clone(),
                attempt: entry.attempt,
            });
            index += 1;
        }
        Ok(out)
    }

    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        let mut inner = lock(&self.inner);
        let pos = inner
            .entries
            .iter()
            .position(|e| matches!(&e.state, State::InFlight { receipt: r, .. } if r == receipt))
            .ok_or_else(|| QueueError::UnknownReceipt(receipt.to_string()))?;
        inner.entries.remove(pos);
        Ok(())
    }

    async fn retry(
        &self,
        receipt: &str,
        delay: Duration,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        let now = self.clock.now();
        let mut inner = lock(&self.inner);
        let pos = inner
            .entries
            .iter()
            .position(|e| matches!(&e.state, State::InFlight { receipt: r, .. } if r == receipt))
            .ok_or_else(|| QueueError::UnknownReceipt(receipt.to_string()))?;
        if inner.entries[pos].attempt >= self.max_attempts {
            let entry = inner.entries.remove(pos);
            inner.dead.push(DeadLetter {
                message: entry.message,
                attempts: entry.attempt,
                last_error: error.to_string(),
            });
            return Ok(RetryOutcome::DeadLettered);
        }
        let entry = &mut inner.entries[pos];
        entry.state = State::Ready {
            at: after(now, delay),
        };
        entry.last_error = Some(error.to_string());
        Ok(RetryOutcome::Requeued)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(lock(&self.inner).dead.iter().take(limit).cloned().collect())
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = self.clock.now();
        let inner = lock(&self.inner);
        let mut depth = QueueDepth {
            dead: inner.dead.len() as u64,
            ..QueueDepth::default()
        };
        for e in &inner.entries {
            match &e.state {
                State::Ready { at } if *at <= now => depth.ready += 1,
                State::Ready { .. } => depth.delayed += 1,
                // A delivery whose visibility timeout passed is the next receive's again.
                State::InFlight { until, .. } if *until <= now => depth.ready += 1,
                State::InFlight { .. } => depth.in_flight += 1,
            }
        }
        Ok(depth)
    }

    /// Moves the oldest dead letters to the end of `entries` (send order, so each lands at the
    /// end of its group), under one lock: both or neither.
    async fn redrive(&self, limit: usize) -> Result<u64, QueueError> {
        let now = self.clock.now();
        let mut inner = lock(&self.inner);
        let n = limit.min(inner.dead.len());
        let moved: Vec<DeadLetter> = inner.dead.drain(..n).collect();
        inner.entries.extend(moved.into_iter().map(|dead| Entry {
            message: dead.message,
            attempt: 0,
            state: State::Ready { at: now },
            last_error: None,
        }));
        Ok(n as u64)
    }
}
