//! The in-memory index of a [`LogQueue`](crate::LogQueue): every live message and dead letter,
//! where each one's body lies on disk, and the log bytes appended but not yet taken by the
//! writer thread. No I/O here: the queue calls it under its lock, the writer takes the bytes.
//!
//! # Message states
//!
//! Messages are numbered by `seq` in send order. Each ordering group is a chain of live
//! messages (the group map holds its tail, each message its successor); only a group's *head*
//! is ever delivered, so only a head is ever in any state but *waiting*:
//!
//! | state | where | deliverable |
//! |---|---|---|
//! | waiting | behind its group's head | no |
//! | ready | `ready` (by seq) | yes, lowest seq first, once its `Sent` record is synced |
//! | in flight | `in_flight` (by deadline, seq) | again once the deadline passed |
//! | delayed | `delayed` (by visible-at, seq) | once visible-at passed |
//!
//! Expired deliveries and elapsed delays move to `ready` at the start of each `receive`
//! (deliveries on their last attempt go to the dead letters instead). A delivery's receipt
//! `<seq>.<attempt>` stays valid until the message is delivered again, retried, acked or
//! dead-lettered — also after its visibility expired, as on SQS and in `SqliteQueue`.
//!
//! # Segment accounting
//!
//! Each live message and dead letter has a *home*: the segment holding the last record that
//! carries its body (`Sent`, `Carried` or `DeadLettered`). A segment counts the items homed in
//! it; segments are deleted oldest first once their count is zero, and compaction re-homes the
//! oldest segment's items in the head segment (see [`crate::writer`]). Deleting oldest first is
//! what makes it safe to forget a segment: the records that ended its messages (acks, dead
//! letters) are all in newer segments, still there when the older one is read again.
//!
//! A redriven dead letter is released from its home like an acked message, and its new
//! message is homed where its `Sent` record goes. The `Redriven` record that ends the dead
//! letter comes after every copy of its `DeadLettered` record (compaction copies dead letters
//! only while they are dead), so deleting oldest first forgets those copies before it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use dualwrite_core::ports::{QueueDepth, QueueError, QueueMessage, RetryOutcome};

use crate::record::{self, Body, CarriedState, DecodeError, Record};
use crate::segment::HEADER_LEN;

/// The last error of a dead letter whose final delivery timed out.
const EXPIRED: &str = "visibility timeout expired without ack";

/// A deadline in the past for every clock: a delivery the previous run made (its worker died
/// with that run) counts as expired.
const LONG_AGO: i64 = i64::MIN;

/// Where a live message stands (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Ready,
    InFlight { until: i64 },
    Delayed { until: i64 },
}

#[derive(Debug)]
struct Entry {
    message: Arc<QueueMessage>,
    /// Deliveries so far.
    attempt: u32,
    state: State,
    /// The receipt of delivery `attempt` may still ack or retry it.
    receipt_valid: bool,
    /// The error of the last `retry`.
    last_error: Option<String>,
    /// The next message of its group.
    next: Option<u64>,
    /// The segment holding its body, and that record's length.
    home: u64,
    record_bytes: u64,
}

#[derive(Debug)]
struct DeadEntry {
    seq: u64,
    message: Arc<QueueMessage>,
    attempts: u32,
    last_error: String,
    home: u64,
    record_bytes: u64,
}

/// An item a segment holds the body of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Homed {
    /// A live message, by seq.
    Message(u64),
    /// A dead letter, by death number.
    Dead(u64),
}

/// What the index knows of one segment file.
#[derive(Debug)]
pub(crate) struct SegmentUse {
    pub(crate) number: u64,
    /// Bytes appended to it (header included), counting those not written yet.
    pub(crate) bytes: u64,
    /// Items homed in it, and the bytes of their records.
    live: u64,
    live_bytes: u64,
    /// Items that were homed in it, in order; stale entries are skipped when compacting.
    homed: Vec<Homed>,
    /// How far compaction has looked through `homed`.
    scanned: usize,
}

impl SegmentUse {
    fn new(number: u64, bytes: u64) -> Self {
        SegmentUse {
            number,
            bytes,
            live: 0,
            live_bytes: 0,
            homed: Vec::new(),
            scanned: 0,
        }
    }
}

/// A delivery decided under the lock; the message is copied out of its `Arc` after.
#[derive(Debug)]
pub(crate) struct Handout {
    pub(crate) receipt: String,
    pub(crate) message: Arc<QueueMessage>,
    pub(crate) attempt: u32,
}

/// A dead letter as listed.
#[derive(Debug)]
pub(crate) struct DeadHandout {
    pub(crate) message: Arc<QueueMessage>,
    pub(crate) attempts: u32,
    pub(crate) last_error: String,
}

/// An item compaction is about to copy: its body is encoded outside the lock.
#[derive(Debug)]
pub(crate) struct Candidate {
    pub(crate) item: Homed,
    pub(crate) message: Arc<QueueMessage>,
}

/// What the writer takes from the index for one batch.
#[derive(Debug)]
pub(crate) struct Taken {
    /// Framed records to append.
    pub(crate) bytes: Vec<u8>,
    /// The segment they go to.
    pub(crate) segment: u64,
    /// Messages below this seq are durable once `bytes` is synced.
    pub(crate) seq_end: u64,
    /// After writing `bytes`: seal `segment` and create this one (number, next seq).
    pub(crate) rotate_to: Option<(u64, u64)>,
    /// Segments to delete once `bytes` is synced, oldest first.
    pub(crate) delete: Vec<u64>,
}

/// Counters for [`crate::QueueStats`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IndexCounts {
    pub(crate) segments: usize,
    pub(crate) log_bytes: u64,
    pub(crate) live_bytes: u64,
    pub(crate) messages: usize,
    pub(crate) dead: usize,
}

/// The index. See the module docs.
#[derive(Debug)]
pub(crate) struct Index {
    max_attempts: u32,
    segment_bytes: u64,
    messages: BTreeMap<u64, Entry>,
    /// Each group with live messages, and its last one.
    groups: HashMap<String, u64>,
    ready: BTreeSet<u64>,
    in_flight: BTreeSet<(i64, u64)>,
    delayed: BTreeSet<(i64, u64)>,
    /// Dead letters by death number (the order they died in), and their seqs.
    dead: BTreeMap<u64, DeadEntry>,
    dead_seqs: HashMap<u64, u64>,
    next_seq: u64,
    next_death: u64,
    /// Messages below this seq have their `Sent` record synced: only they are delivered.
    durable_end: u64,
    /// Oldest first; the last one is the head, the only one appended to.
    segments: VecDeque<SegmentUse>,
    /// Framed records appended since the writer last took them.
    log: Vec<u8>,
    total_bytes: u64,
    live_bytes: u64,
}

/// `<seq>.<attempt>`: unique per delivery, because a message's attempt grows with each one.
fn receipt(seq: u64, attempt: u32) -> String {
    format!("{seq}.{attempt}")
}

/// The seq and attempt a receipt names.
pub(crate) fn parse_receipt(receipt: &str) -> Option<(u64, u32)> {
    let (seq, attempt) = receipt.split_once('.')?;
    Some((seq.parse().ok()?, attempt.parse().ok()?))
}

fn unknown(seq: u64, attempt: u32) -> QueueError {
    QueueError::UnknownReceipt(receipt(seq, attempt))
}

/// The JSON of a message's event, as its records store it.
pub(crate) fn event_json(message: &QueueMessage) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(&message.event)
        .map_err(|e| QueueError::Unavailable(format!("encoding a message's event: {e}")))
}

fn body<'a>(message: &'a QueueMessage, event_json: &'a [u8]) -> Body<'a> {
    Body {
        group: &message.group_id,
        dedup: &message.dedup_id,
        event_json,
    }
}

fn decode_message(body: &Body<'_>) -> Result<QueueMessage, DecodeError> {
    let event = serde_json::from_slice(body.event_json)
        .map_err(|e| DecodeError(format!("a message whose event cannot be read back: {e}")))?;
    Ok(QueueMessage {
        group_id: body.group.to_owned(),
        dedup_id: body.dedup.to_owned(),
        event,
    })
}

impl Index {
    /// An empty index; [`Index::replay`] then [`Index::finish_replay`] fill it from the files.
    pub(crate) fn new(max_attempts: u32, segment_bytes: u64) -> Self {
        Index {
            max_attempts,
            segment_bytes,
            messages: BTreeMap::new(),
            groups: HashMap::new(),
            ready: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            delayed: BTreeSet::new(),
            dead: BTreeMap::new(),
            dead_seqs: HashMap::new(),
            next_seq: 1,
            next_death: 1,
            durable_end: 1,
            segments: VecDeque::new(),
            log: Vec::new(),
            total_bytes: 0,
            live_bytes: 0,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Replay
    // -----------------------------------------------------------------------------------------

    /// Applies one record read back from segment `segment` (in log order).
    pub(crate) fn replay(
        &mut self,
        record: Record<'_>,
        segment: u64,
        frame_bytes: u64,
    ) -> Result<(), DecodeError> {
        self.next_seq = self.next_seq.max(record.seq().saturating_add(1));
        match record {
            Record::Sent { seq, body } => {
                let message = Arc::new(decode_message(&body)?);
                self.messages
                    .insert(seq, Entry::new(message, segment, frame_bytes));
            }
            Record::Delivered { seq, attempt } => {
                if let Some(e) = self.messages.get_mut(&seq) {
                    e.attempt = attempt;
                    e.state = State::InFlight { until: LONG_AGO };
                }
            }
            Record::Acked { seq } => {
                self.messages.remove(&seq);
            }
            Record::Retried {
                seq,
                attempt,
                visible_at_ms,
                error,
            } => {
                if let Some(e) = self.messages.get_mut(&seq) {
                    e.attempt = attempt;
                    e.state = State::Delayed {
                        until: visible_at_ms,
                    };
                    e.last_error = Some(error.to_owned());
                }
            }
            Record::DeadLettered {
                seq,
                death,
                attempts,
                error,
                body,
            } => {
                self.messages.remove(&seq);
                let message = Arc::new(decode_message(&body)?);
                if let Some(earlier) = self.dead_seqs.insert(seq, death) {
                    // The same dead letter again (compaction copied it): the later copy wins.
                    self.dead.remove(&earlier);
                }
                self.dead.insert(
                    death,
                    DeadEntry {
                        seq,
                        message,
                        attempts,
                        last_error: error.to_owned(),
                        home: segment,
                        record_bytes: frame_bytes,
                    },
                );
                self.next_death = self.next_death.max(death.saturating_add(1));
            }
            Record::Carried {
                seq,
                attempt,
                state,
                last_error,
                body,
            } => {
                // The body is decoded only when the message is not known yet (its `Sent` is
                // in a segment that was deleted after the copy was made).
                let e = match self.messages.entry(seq) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        let message = Arc::new(decode_message(&body)?);
                        v.insert(Entry::new(message, segment, frame_bytes))
                    }
                };
                e.attempt = attempt;
                e.state = match state {
                    CarriedState::Ready => State::Waiting,
                    CarriedState::Delivered => State::InFlight { until: LONG_AGO },
                    CarriedState::Delayed { until_ms } => State::Delayed { until: until_ms },
                };
                e.last_error = last_error.map(str::to_owned);
                e.home = segment;
                e.record_bytes = frame_bytes;
            }
            Record::Redriven { death, .. } => {
                // Its new message was replayed just before (its `Sent` record). The dead
                // letter may be unknown: its segment was deleted after this record was written.
                if let Some(dead) = self.dead.remove(&death) {
                    self.dead_seqs.remove(&dead.seq);
                }
                self.next_death = self.next_death.max(death.saturating_add(1));
            }
        }
        Ok(())
    }

    /// Builds the groups, the state sets and the segment accounting once every record was
    /// replayed. `segments` are the files' numbers and lengths, oldest first (at least one);
    /// `header_next_seq` is the newest segment header's next seq.
    pub(crate) fn finish_replay(&mut self, segments: &[(u64, u64)], header_next_seq: u64) {
        self.next_seq = self.next_seq.max(header_next_seq);
        self.durable_end = self.next_seq;
        let seqs: Vec<u64> = self.messages.keys().copied().collect();
        for seq in seqs {
            let Some(entry) = self.messages.get_mut(&seq) else {
                continue;
            };
            entry.receipt_valid = false;
            let group = entry.message.group_id.clone();
            match self.groups.insert(group, seq) {
                Some(previous_tail) => {
                    if entry.state != State::Waiting {
                        tracing::warn!(
                            seq,
                            "a queued message behind its group's head was recorded as delivered \
                             or delayed; it waits for its turn again"
                        );
                        entry.state = State::Waiting;
                    }
                    if let Some(prev) = self.messages.get_mut(&previous_tail) {
                        prev.next = Some(seq);
                    }
                }
                None => match entry.state {
                    State::Waiting | State::Ready => {
                        entry.state = State::Ready;
                        self.ready.insert(seq);
                    }
                    State::InFlight { until } => {
                        self.in_flight.insert((until, seq));
                    }
                    State::Delayed { until } => {
                        self.delayed.insert((until, seq));
                    }
                },
            }
        }
        self.segments = segments
            .iter()
            .map(|&(number, bytes)| SegmentUse::new(number, bytes))
            .collect();
        self.total_bytes = segments.iter().map(|s| s.1).sum();
        let homes: Vec<(u64, u64, Homed)> = self
            .messages
            .iter()
            .map(|(seq, e)| (e.home, e.record_bytes, Homed::Message(*seq)))
            .chain(
                self.dead
                    .iter()
                    .map(|(death, d)| (d.home, d.record_bytes, Homed::Dead(*death))),
            )
            .collect();
        for (home, bytes, item) in homes {
            self.add_home(home, bytes, item);
        }
    }

    // -----------------------------------------------------------------------------------------
    // The port's operations
    // -----------------------------------------------------------------------------------------

    /// Appends a `Sent` record for `message` and queues it at the end of its group. Returns its
    /// seq: it is delivered once the writer synced past it.
    pub(crate) fn send(&mut self, message: QueueMessage, event_json: &[u8]) -> u64 {
        self.enqueue(Arc::new(message), event_json)
    }

    /// [`Index::send`] of a message already shared (a dead letter sent again).
    fn enqueue(&mut self, message: Arc<QueueMessage>, event_json: &[u8]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let bytes = self.append(&Record::Sent {
            seq,
            body: body(&message, event_json),
        });
        let home = self.head_number();
        self.add_home(home, bytes, Homed::Message(seq));
        let mut entry = Entry::new(message, home, bytes);
        match self.groups.get_mut(&entry.message.group_id) {
            Some(tail) => {
                let previous = std::mem::replace(tail, seq);
                if let Some(prev) = self.messages.get_mut(&previous) {
                    prev.next = Some(seq);
                }
            }
            None => {
                self.groups.insert(entry.message.group_id.clone(), seq);
                entry.state = State::Ready;
                self.ready.insert(seq);
            }
        }
        self.messages.insert(seq, entry);
        seq
    }

    /// Moves expired deliveries and elapsed delays to `ready` (or to the dead letters), then
    /// hands out up to `max` ready, durable group heads, lowest seq first, in flight until
    /// `until`.
    pub(crate) fn receive(
        &mut self,
        now: i64,
        until: i64,
        max: usize,
    ) -> Result<Vec<Handout>, QueueError> {
        self.expire(now)?;
        let mut out = Vec::with_capacity(max.min(self.ready.len()));
        while out.len() < max {
            let Some(&seq) = self.ready.first() else {
                break;
            };
            if seq >= self.durable_end {
                // Not synced yet (and every later seq neither): a crash could still undo its
                // send, so it is not handed to anyone.
                break;
            }
            self.ready.pop_first();
            let Some(entry) = self.messages.get_mut(&seq) else {
                continue;
            };
            entry.attempt = entry.attempt.saturating_add(1);
            entry.state = State::InFlight { until };
            entry.receipt_valid = true;
            let attempt = entry.attempt;
            let message = entry.message.clone();
            self.in_flight.insert((until, seq));
            self.append(&Record::Delivered { seq, attempt });
            out.push(Handout {
                receipt: receipt(seq, attempt),
                message,
                attempt,
            });
        }
        Ok(out)
    }

    fn expire(&mut self, now: i64) -> Result<(), QueueError> {
        while let Some(&(until, seq)) = self.in_flight.first() {
            if until > now {
                break;
            }
            let Some(entry) = self.messages.get_mut(&seq) else {
                self.in_flight.pop_first();
                continue;
            };
            if entry.attempt >= self.max_attempts {
                // A delivery that timed out counts as an attempt: a message that keeps
                // killing its worker must not hold its group for ever.
                let error = match &entry.last_error {
                    Some(last) => format!("{last}; {EXPIRED}"),
                    None => EXPIRED.to_owned(),
                };
                self.dead_letter(seq, error)?;
            } else {
                self.in_flight.pop_first();
                entry.state = State::Ready;
                self.ready.insert(seq);
            }
        }
        while let Some(&(until, seq)) = self.delayed.first() {
            if until > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(entry) = self.messages.get_mut(&seq) {
                entry.state = State::Ready;
                self.ready.insert(seq);
            }
        }
        Ok(())
    }

    /// The entry a receipt names, if the receipt is still the current one.
    fn current(&mut self, seq: u64, attempt: u32) -> Result<&mut Entry, QueueError> {
        self.messages
            .get_mut(&seq)
            .filter(|e| e.receipt_valid && e.attempt == attempt)
            .ok_or_else(|| unknown(seq, attempt))
    }

    /// Takes a head out of whichever set its state puts it in.
    fn leave_state(&mut self, seq: u64) {
        let Some(entry) = self.messages.get_mut(&seq) else {
            return;
        };
        match std::mem::replace(&mut entry.state, State::Waiting) {
            State::Waiting => {}
            State::Ready => {
                self.ready.remove(&seq);
            }
            State::InFlight { until } => {
                self.in_flight.remove(&(until, seq));
            }
            State::Delayed { until } => {
                self.delayed.remove(&(until, seq));
            }
        }
    }

    /// Acks the delivery `seq`.`attempt`: the message is gone and its group moves on. Returns
    /// the message, for the caller to free outside the lock.
    /// True when `attempt` is a message's last: a delivery of it that does not report back
    /// dead-letters the message.
    pub(crate) fn is_last_attempt(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    pub(crate) fn ack(&mut self, seq: u64, attempt: u32) -> Result<Arc<QueueMessage>, QueueError> {
        self.current(seq, attempt)?;
        self.leave_state(seq);
        let message = self.remove_head(seq);
        self.append(&Record::Acked { seq });
        message.ok_or_else(|| unknown(seq, attempt))
    }

    /// `retry` of delivery `seq`.`attempt`: delayed until `visible_at`, or dead-lettered when
    /// its attempts are used up.
    pub(crate) fn retry(
        &mut self,
        seq: u64,
        attempt: u32,
        visible_at: i64,
        error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        let max_attempts = self.max_attempts;
        let entry = self.current(seq, attempt)?;
        if entry.attempt >= max_attempts {
            self.dead_letter(seq, error.to_owned())?;
            return Ok(RetryOutcome::DeadLettered);
        }
        self.leave_state(seq);
        if let Some(entry) = self.messages.get_mut(&seq) {
            entry.state = State::Delayed { until: visible_at };
            entry.receipt_valid = false;
            entry.last_error = Some(error.to_owned());
        }
        self.delayed.insert((visible_at, seq));
        self.append(&Record::Retried {
            seq,
            attempt,
            visible_at_ms: visible_at,
            error,
        });
        Ok(RetryOutcome::Requeued)
    }

    /// Moves head `seq` to the dead letters with `error`; its group moves on.
    fn dead_letter(&mut self, seq: u64, error: String) -> Result<(), QueueError> {
        let Some(entry) = self.messages.get(&seq) else {
            return Ok(());
        };
        // Encoded before anything changes: a failure leaves the index as it was.
        let event_json = event_json(&entry.message)?;
        let message = entry.message.clone();
        let attempts = entry.attempt;
        self.leave_state(seq);
        self.remove_head(seq);
        let death = self.next_death;
        self.next_death += 1;
        let bytes = self.append(&Record::DeadLettered {
            seq,
            death,
            attempts,
            error: &error,
            body: body(&message, &event_json),
        });
        let home = self.head_number();
        self.add_home(home, bytes, Homed::Dead(death));
        self.dead_seqs.insert(seq, death);
        self.dead.insert(
            death,
            DeadEntry {
                seq,
                message,
                attempts,
                last_error: error,
                home,
                record_bytes: bytes,
            },
        );
        Ok(())
    }

    /// Up to `limit` dead letters, oldest death first, with their messages: `redrive` encodes
    /// their events outside the lock, then passes each to [`Index::redrive`].
    pub(crate) fn redrive_candidates(&self, limit: usize) -> Vec<(u64, Arc<QueueMessage>)> {
        self.dead
            .iter()
            .take(limit)
            .map(|(death, d)| (*death, d.message.clone()))
            .collect()
    }

    /// Sends dead letter `death` again (`event_json` is its event's JSON): a new message at the
    /// end of its group, attempt count 0, delivered once synced like any send. Appends its
    /// `Sent` record and right after it the `Redriven` record that ends the dead letter, and
    /// releases the dead letter's home. False when `death` is no longer a dead letter (another
    /// redrive took it meanwhile).
    pub(crate) fn redrive(&mut self, death: u64, event_json: &[u8]) -> bool {
        let Some(dead) = self.dead.remove(&death) else {
            return false;
        };
        self.dead_seqs.remove(&dead.seq);
        self.release_home(dead.home, dead.record_bytes);
        let seq = self.enqueue(dead.message, event_json);
        self.append(&Record::Redriven { seq, death });
        true
    }

    /// Removes head `seq` (out of every state set already) and lets its group move on.
    fn remove_head(&mut self, seq: u64) -> Option<Arc<QueueMessage>> {
        let entry = self.messages.remove(&seq)?;
        self.release_home(entry.home, entry.record_bytes);
        match entry.next {
            Some(next) => {
                if let Some(n) = self.messages.get_mut(&next) {
                    n.state = State::Ready;
                    self.ready.insert(next);
                }
            }
            None => {
                self.groups.remove(&entry.message.group_id);
            }
        }
        Some(entry.message)
    }

    /// Counts by state, as `SqliteQueue::depth` counts them: `ready` is every
    /// message neither in flight nor delayed at `now`, waiting ones included.
    pub(crate) fn depth(&self, now: i64) -> QueueDepth {
        let after_now = (now.saturating_add(1), 0);
        let in_flight = self.in_flight.range(after_now..).count() as u64;
        let delayed = self.delayed.range(after_now..).count() as u64;
        QueueDepth {
            ready: (self.messages.len() as u64).saturating_sub(in_flight + delayed),
            in_flight,
            delayed,
            dead: self.dead.len() as u64,
        }
    }

    /// Up to `limit` live messages in send order.
    pub(crate) fn pending(&self, limit: usize) -> Vec<Arc<QueueMessage>> {
        self.messages
            .values()
            .take(limit)
            .map(|e| e.message.clone())
            .collect()
    }

    /// Up to `limit` dead letters, oldest death first.
    pub(crate) fn dead_letters(&self, limit: usize) -> Vec<DeadHandout> {
        self.dead
            .values()
            .take(limit)
            .map(|d| DeadHandout {
                message: d.message.clone(),
                attempts: d.attempts,
                last_error: d.last_error.clone(),
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // The log and the segments
    // -----------------------------------------------------------------------------------------

    /// The seq the next message gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes appended and not yet taken by the writer.
    pub(crate) fn unwritten(&self) -> usize {
        self.log.len()
    }

    pub(crate) fn counts(&self) -> IndexCounts {
        IndexCounts {
            segments: self.segments.len(),
            log_bytes: self.total_bytes,
            live_bytes: self.live_bytes,
            messages: self.messages.len(),
            dead: self.dead.len(),
        }
    }

    fn head_number(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.number)
    }

    fn append(&mut self, record: &Record<'_>) -> u64 {
        let bytes = record::append(&mut self.log, record);
        if let Some(head) = self.segments.back_mut() {
            head.bytes += bytes;
        }
        self.total_bytes += bytes;
        bytes
    }

    fn segment_mut(&mut self, number: u64) -> Option<&mut SegmentUse> {
        let i = self
            .segments
            .binary_search_by_key(&number, |s| s.number)
            .ok()?;
        self.segments.get_mut(i)
    }

    fn add_home(&mut self, number: u64, bytes: u64, item: Homed) {
        if let Some(s) = self.segment_mut(number) {
            s.live += 1;
            s.live_bytes += bytes;
            s.homed.push(item);
            self.live_bytes += bytes;
        }
    }

    fn release_home(&mut self, number: u64, bytes: u64) {
        if let Some(s) = self.segment_mut(number) {
            s.live = s.live.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(bytes);
            self.live_bytes = self.live_bytes.saturating_sub(bytes);
        }
    }

    /// Whether the oldest segment should be compacted: it still holds live items, and the
    /// bytes no live item needs (garbage) exceed both the live bytes and two segments. Copying
    /// the oldest segment's live items then frees at least as much as it writes, so the log
    /// stays within about twice the live data plus a few segments, whatever pins it.
    pub(crate) fn compaction_due(&self) -> bool {
        if self.segments.len() < 2 {
            return false;
        }
        let Some(oldest) = self.segments.front() else {
            return false;
        };
        let garbage = self.total_bytes.saturating_sub(self.live_bytes);
        oldest.live > 0 && garbage > self.live_bytes.max(2 * self.segment_bytes)
    }

    /// Up to `budget` bytes' worth of the oldest segment's live items, for the writer to encode
    /// outside the lock and pass to [`Index::carry`].
    pub(crate) fn compaction_candidates(&mut self, budget: u64) -> Vec<Candidate> {
        let mut out = Vec::new();
        if !self.compaction_due() {
            return out;
        }
        let Some(oldest) = self.segments.front() else {
            return out;
        };
        let number = oldest.number;
        let mut scanned = oldest.scanned;
        let mut bytes = 0;
        while bytes < budget {
            let Some(&item) = self.segments.front().and_then(|s| s.homed.get(scanned)) else {
                break;
            };
            scanned += 1;
            match item {
                Homed::Message(seq) => {
                    if let Some(e) = self.messages.get(&seq).filter(|e| e.home == number) {
                        bytes += e.record_bytes;
                        out.push(Candidate {
                            item,
                            message: e.message.clone(),
                        });
                    }
                }
                Homed::Dead(death) => {
                    if let Some(d) = self.dead.get(&death).filter(|d| d.home == number) {
                        bytes += d.record_bytes;
                        out.push(Candidate {
                            item,
                            message: d.message.clone(),
                        });
                    }
                }
            }
        }
        if let Some(oldest) = self.segments.front_mut() {
            oldest.scanned = scanned;
        }
        out
    }

    /// Appends a copy of each candidate (with its body's JSON) that still lives in the oldest
    /// segment to the head and re-homes it there. Returns how many were copied.
    pub(crate) fn carry(&mut self, encoded: &[(Homed, Vec<u8>)]) -> u64 {
        if self.segments.len() < 2 {
            return 0;
        }
        let Some(oldest) = self.segments.front().map(|s| s.number) else {
            return 0;
        };
        let head = self.head_number();
        let mut carried = 0;
        for (item, event_json) in encoded {
            let (old_bytes, bytes) = match *item {
                Homed::Message(seq) => {
                    let Some(e) = self.messages.get_mut(&seq).filter(|e| e.home == oldest) else {
                        continue;
                    };
                    let record = Record::Carried {
                        seq,
                        attempt: e.attempt,
                        state: match e.state {
                            State::Waiting | State::Ready => CarriedState::Ready,
                            State::InFlight { .. } => CarriedState::Delivered,
                            State::Delayed { until } => CarriedState::Delayed { until_ms: until },
                        },
                        last_error: e.last_error.as_deref(),
                        body: body(&e.message, event_json),
                    };
                    let bytes = record::append(&mut self.log, &record);
                    let old_bytes = std::mem::replace(&mut e.record_bytes, bytes);
                    e.home = head;
                    (old_bytes, bytes)
                }
                Homed::Dead(death) => {
                    let Some(d) = self.dead.get_mut(&death).filter(|d| d.home == oldest) else {
                        continue;
                    };
                    let record = Record::DeadLettered {
                        seq: d.seq,
                        death,
                        attempts: d.attempts,
                        error: &d.last_error,
                        body: body(&d.message, event_json),
                    };
                    let bytes = record::append(&mut self.log, &record);
                    let old_bytes = std::mem::replace(&mut d.record_bytes, bytes);
                    d.home = head;
                    (old_bytes, bytes)
                }
            };
            if let Some(h) = self.segments.back_mut() {
                h.bytes += bytes;
            }
            self.total_bytes += bytes;
            self.release_home(oldest, old_bytes);
            self.add_home(head, bytes, *item);
            carried += 1;
        }
        carried
    }

    /// Hands the appended bytes to the writer (leaving `spare`, emptied, to append to next),
    /// with the segments that become deletable once they are synced and whether the head
    /// rotates after them.
    pub(crate) fn take(&mut self, mut spare: Vec<u8>) -> Taken {
        let mut delete = Vec::new();
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.live == 0) {
            if let Some(s) = self.segments.pop_front() {
                self.total_bytes = self.total_bytes.saturating_sub(s.bytes);
                delete.push(s.number);
            }
        }
        spare.clear();
        let bytes = std::mem::replace(&mut self.log, spare);
        let segment = self.head_number();
        let mut rotate_to = None;
        if self
            .segments
            .back()
            .is_some_and(|h| h.bytes >= self.segment_bytes)
        {
            let number = segment + 1;
            self.segments.push_back(SegmentUse::new(number, HEADER_LEN));
            self.total_bytes += HEADER_LEN;
            rotate_to = Some((number, self.next_seq));
        }
        Taken {
            bytes,
            segment,
            seq_end: self.next_seq,
            rotate_to,
            delete,
        }
    }

    /// Messages below `seq_end` are synced: they may be delivered.
    pub(crate) fn synced(&mut self, seq_end: u64) {
        self.durable_end = self.durable_end.max(seq_end);
    }
}

impl Entry {
    fn new(message: Arc<QueueMessage>, home: u64, record_bytes: u64) -> Self {
        Entry {
            message,
            attempt: 0,
            state: State::Waiting,
            receipt_valid: false,
            last_error: None,
            next: None,
            home,
            record_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use dualwrite_core::{ChangeEvent, Operation, Record as Row, Side};

    use super::*;

    fn message(id: &str, group: &str) -> QueueMessage {
        let mut record = Row::new("accounts");
        record.id = Some(group.into());
        QueueMessage::for_event(ChangeEvent {
            event_id: id.to_owned(),
            source: Side::Crm,
            operation: Operation::Upsert,
            record,
            partial: false,
            received_at: chrono::DateTime::UNIX_EPOCH,
            correlation_id: None,
            depth: None,
        })
    }

    fn index() -> Index {
        let mut index = Index::new(3, 1 << 20);
        index.finish_replay(&[(0, HEADER_LEN)], 1);
        index
    }

    fn send(index: &mut Index, id: &str, group: &str) -> u64 {
        let m = message(id, group);
        let json = event_json(&m).unwrap();
        index.send(m, &json)
    }

    /// Replays everything `index` appended into a fresh index.
    fn replayed(index: &Index) -> Index {
        let mut fresh = Index::new(index.max_attempts, index.segment_bytes);
        let mut at = 0;
        while let Some((payload, next)) = record::read_frame(&index.log, at).unwrap() {
            let bytes = (next - at) as u64;
            fresh
                .replay(record::decode(payload).unwrap(), 0, bytes)
                .unwrap();
            at = next;
        }
        fresh.finish_replay(&[(0, HEADER_LEN + index.log.len() as u64)], 1);
        fresh
    }

    #[test]
    fn nothing_is_delivered_before_its_send_is_synced() {
        let mut index = index();
        send(&mut index, "a1", "A");
        assert!(index.receive(0, 10, 10).unwrap().is_empty());
        let taken = index.take(Vec::new());
        index.synced(taken.seq_end);
        assert_eq!(index.receive(0, 10, 10).unwrap().len(), 1);
    }

    #[test]
    fn live_bytes_follow_sends_acks_and_dead_letters() {
        let mut index = index();
        let a = send(&mut index, "a1", "A");
        send(&mut index, "b1", "B");
        index.synced(u64::MAX);
        let live_after_sends = index.live_bytes;
        assert_eq!(index.segments[0].live, 2);
        let d = index.receive(0, 10, 10).unwrap();
        assert_eq!(d.len(), 2);
        index.ack(a, 1).unwrap();
        assert_eq!(index.segments[0].live, 1);
        assert!(index.live_bytes < live_after_sends);
        // b1 times out on attempts 1..3 and is dead-lettered: a dead letter is homed too.
        for now in [10, 20, 30] {
            index.receive(now, now + 10, 10).unwrap();
        }
        assert_eq!(index.dead.len(), 1);
        assert_eq!(index.messages.len(), 0);
        assert_eq!(index.segments[0].live, 1, "the dead letter");
    }

    #[test]
    fn replaying_the_log_rebuilds_groups_states_and_dead_letters() {
        let mut index = index();
        send(&mut index, "a1", "A");
        send(&mut index, "a2", "A");
        send(&mut index, "b1", "B");
        send(&mut index, "c1", "C");
        index.synced(u64::MAX);
        let d = index.receive(0, 100, 10).unwrap();
        let ids: Vec<_> = d
            .iter()
            .map(|h| h.message.event.event_id.as_str())
            .collect();
        assert_eq!(ids, ["a1", "b1", "c1"]);
        let (b, _) = parse_receipt(&d[1].receipt).unwrap();
        let (c, _) = parse_receipt(&d[2].receipt).unwrap();
        index.retry(b, 1, 5_000, "throttled").unwrap();
        index.ack(c, 1).unwrap();

        let mut again = replayed(&index);
        let depth = again.depth(0);
        assert_eq!(
            (depth.ready, depth.in_flight, depth.delayed, depth.dead),
            (2, 0, 1, 0),
            "a1 in flight at the crash counts as expired; a2 waits; b1 delayed"
        );
        let d = again.receive(0, 100, 10).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].message.event.event_id, "a1");
        assert_eq!(d[0].attempt, 2);
        again.ack(1, 2).unwrap();
        let d = again.receive(5_000, 6_000, 10).unwrap();
        let ids: Vec<_> = d
            .iter()
            .map(|h| h.message.event.event_id.as_str())
            .collect();
        assert_eq!(ids, ["a2", "b1"], "b1's delay is over");
        assert_eq!((d[0].attempt, d[1].attempt), (1, 2));
    }

    #[test]
    fn a_dead_segment_is_deleted_only_after_every_older_one() {
        // Segment 1 holds the ack of b1, sent in segment 0; segment 0 still holds a1, live.
        // Deleting 1 first would bring b1 back, unacked, at the next open.
        let mut index = Index::new(5, 1);
        index.finish_replay(&[(0, HEADER_LEN)], 1);
        let a = send(&mut index, "a1", "A");
        let b = send(&mut index, "b1", "B");
        index.synced(u64::MAX);
        index.receive(0, 100, 10).unwrap();
        assert_eq!(index.take(Vec::new()).rotate_to.map(|r| r.0), Some(1));
        let c = send(&mut index, "c1", "C");
        index.ack(b, 1).unwrap();
        assert_eq!(index.take(Vec::new()).rotate_to.map(|r| r.0), Some(2));
        index.synced(u64::MAX);
        index.receive(0, 100, 10).unwrap();
        index.ack(c, 1).unwrap();
        let taken = index.take(Vec::new());
        assert!(
            taken.delete.is_empty(),
            "segment 1 is dead, segment 0 is not"
        );
        index.ack(a, 1).unwrap();
        let taken = index.take(Vec::new());
        assert_eq!(taken.delete, [0, 1, 2]);
    }

    #[test]
    fn a_carried_message_keeps_its_state_and_its_old_copy_is_garbage() {
        let mut index = Index::new(5, 1);
        index.finish_replay(&[(0, HEADER_LEN)], 1);
        let a = send(&mut index, "a1", "A");
        index.synced(u64::MAX);
        index.receive(0, 100, 1).unwrap();
        index.retry(a, 1, 10_000, "later").unwrap();
        // Rotate twice (segment size 1 byte) and make garbage so compaction is due.
        let first = index.take(Vec::new());
        assert_eq!(first.rotate_to.map(|r| r.0), Some(1));
        for i in 0..5 {
            let s = send(&mut index, &format!("x{i}"), "X");
            index.synced(u64::MAX);
            index.receive(0, 100, 1).unwrap();
            index.ack(s, 1).unwrap();
        }
        index.take(Vec::new());
        assert!(index.compaction_due());
        let candidates = index.compaction_candidates(u64::MAX);
        assert_eq!(candidates.len(), 1);
        let encoded: Vec<_> = candidates
            .iter()
            .map(|c| (c.item, event_json(&c.message).unwrap()))
            .collect();
        assert_eq!(index.carry(&encoded), 1);
        let taken = index.take(Vec::new());
        assert_eq!(
            taken.delete,
            [0, 1],
            "the oldest segment holds nothing live any more, nor does the next"
        );
        assert_eq!(index.messages[&a].home, 2);
        let depth = index.depth(0);
        assert_eq!(depth.delayed, 1);
        // Replaying only what the head received: the carried copy alone restores the state.
        let mut head_only = Index::new(5, 1);
        let mut at = 0;
        while let Some((payload, next)) = record::read_frame(&taken.bytes, at).unwrap() {
            let r = record::decode(payload).unwrap();
            head_only.replay(r, 2, (next - at) as u64).unwrap();
            at = next;
        }
        head_only.finish_replay(&[(2, HEADER_LEN + taken.bytes.len() as u64)], 7);
        assert_eq!(head_only.depth(0).delayed, 1);
        let d = head_only.receive(10_000, 20_000, 1).unwrap();
        assert_eq!(d[0].message.event.event_id, "a1");
        assert_eq!(d[0].attempt, 2);
        assert_eq!(head_only.next_seq, 7);
    }

    /// An index with one segment of `segment_bytes` that dead-letters on the first delivery.
    fn one_attempt(segment_bytes: u64) -> Index {
        let mut index = Index::new(1, segment_bytes);
        index.finish_replay(&[(0, HEADER_LEN)], 1);
        index
    }

    /// Delivers `seq` (the only deliverable message) and retries it: a dead letter.
    fn kill(index: &mut Index, seq: u64) {
        let d = index.receive(0, 100, 10).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(parse_receipt(&d[0].receipt), Some((seq, 1)));
        assert_eq!(
            index.retry(seq, 1, 0, "F&O unavailable").unwrap(),
            RetryOutcome::DeadLettered
        );
    }

    /// Redrives up to `limit` dead letters as `LogQueue::redrive` does; returns how many moved.
    fn redrive(index: &mut Index, limit: usize) -> usize {
        let candidates = index.redrive_candidates(limit);
        candidates
            .iter()
            .filter(|(death, message)| index.redrive(*death, &event_json(message).unwrap()))
            .count()
    }

    /// A fresh index replaying the frames of `log` (one segment, numbered 0).
    fn replayed_log(log: &[u8], max_attempts: u32) -> Index {
        let mut fresh = Index::new(max_attempts, 1 << 20);
        let mut at = 0;
        while let Some((payload, next)) = record::read_frame(log, at).unwrap() {
            fresh
                .replay(record::decode(payload).unwrap(), 0, (next - at) as u64)
                .unwrap();
            at = next;
        }
        fresh.finish_replay(&[(0, HEADER_LEN + log.len() as u64)], 1);
        fresh
    }

    fn event_ids(handouts: &[Handout]) -> Vec<&str> {
        handouts
            .iter()
            .map(|h| h.message.event.event_id.as_str())
            .collect()
    }

    #[test]
    fn a_redriven_dead_letter_goes_behind_its_group_and_its_home_is_released() {
        let mut index = one_attempt(1 << 20);
        let mut log = Vec::new();
        let a1 = send(&mut index, "a1", "A");
        let taken = index.take(Vec::new());
        index.synced(taken.seq_end);
        log.extend(taken.bytes);
        kill(&mut index, a1);
        let a2 = send(&mut index, "a2", "A");
        let taken = index.take(Vec::new());
        index.synced(taken.seq_end);
        log.extend(taken.bytes);
        assert_eq!(index.segments[0].live, 2, "a2 and the dead letter");
        let live_bytes = index.live_bytes;
        let dead_bytes = index.dead.values().map(|d| d.record_bytes).sum::<u64>();

        assert_eq!(redrive(&mut index, 10), 1);
        assert_eq!(redrive(&mut index, 10), 0, "moved once");
        assert!(index.dead.is_empty() && index.dead_seqs.is_empty());
        let again = *index.messages.keys().next_back().unwrap();
        assert!(again > a2, "a new message, sent after a2");
        assert_eq!(index.segments[0].live, 2, "a2 and the redriven a1");
        assert_eq!(
            index.live_bytes,
            live_bytes - dead_bytes + index.messages[&again].record_bytes,
            "the dead letter's record is garbage now"
        );
        let depth = index.depth(0);
        assert_eq!((depth.ready, depth.dead), (2, 0));

        // a2 first; the redriven a1 after it, once its send is synced, as a first attempt.
        assert_eq!(event_ids(&index.receive(0, 100, 10).unwrap()), ["a2"]);
        index.ack(a2, 1).unwrap();
        assert!(
            index.receive(0, 100, 10).unwrap().is_empty(),
            "not synced yet"
        );
        let taken = index.take(Vec::new());
        index.synced(taken.seq_end);
        log.extend(taken.bytes);
        let d = index.receive(0, 100, 10).unwrap();
        assert_eq!(event_ids(&d), ["a1"]);
        assert_eq!(d[0].attempt, 1);
        assert_eq!(*d[0].message, message("a1", "A"), "as it was sent");

        // Replayed from the log: the same, and the dead letter stays gone.
        let mut replayed = replayed_log(&log, 1);
        assert!(replayed.dead.is_empty());
        assert_eq!(replayed.depth(0).ready, 1);
        let d = replayed.receive(0, 100, 10).unwrap();
        assert_eq!(event_ids(&d), ["a1"]);
        assert_eq!(parse_receipt(&d[0].receipt), Some((again, 1)));
    }

    #[test]
    fn a_redrive_torn_before_its_redriven_record_leaves_the_message_queued_and_dead() {
        let mut index = one_attempt(1 << 20);
        let b1 = send(&mut index, "b1", "B");
        index.synced(u64::MAX);
        kill(&mut index, b1);
        assert_eq!(redrive(&mut index, 1), 1);
        let log = index.take(Vec::new()).bytes;
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some((payload, next)) = record::read_frame(&log, at).unwrap() {
            frames.push((at, record::decode(payload).unwrap()));
            at = next;
        }
        let kinds: Vec<_> = frames
            .iter()
            .map(|(_, r)| std::mem::discriminant(r))
            .collect();
        let (redriven_at, redriven) = frames.last().unwrap();
        assert!(
            matches!(redriven, Record::Redriven { .. }),
            "{:?}",
            frames.last()
        );
        assert!(
            matches!(frames[frames.len() - 2].1, Record::Sent { .. }),
            "right after its Sent: {kinds:?}"
        );

        // The batch cut before its last record: sent again and still dead, never neither.
        let torn = replayed_log(&log[..*redriven_at], 1);
        assert_eq!(torn.dead.len(), 1);
        assert_eq!(torn.messages.len(), 1);
        let whole = replayed_log(&log, 1);
        assert_eq!((whole.dead.len(), whole.messages.len()), (0, 1));
    }

    #[test]
    fn compaction_does_not_copy_a_dead_letter_redriven_after_it_was_picked() {
        let mut index = one_attempt(1);
        let d = send(&mut index, "d1", "D");
        index.synced(u64::MAX);
        kill(&mut index, d);
        // Rotate (1-byte segments) and make garbage so that compaction is due.
        assert_eq!(index.take(Vec::new()).rotate_to.map(|r| r.0), Some(1));
        for i in 0..5 {
            let s = send(&mut index, &format!("x{i}"), "X");
            index.synced(u64::MAX);
            index.receive(0, 100, 1).unwrap();
            index.ack(s, 1).unwrap();
        }
        index.take(Vec::new());
        assert!(index.compaction_due());
        let candidates = index.compaction_candidates(u64::MAX);
        assert_eq!(candidates.len(), 1);
        assert!(matches!(candidates[0].item, Homed::Dead(_)));
        let encoded: Vec<_> = candidates
            .iter()
            .map(|c| (c.item, event_json(&c.message).unwrap()))
            .collect();
        // Redriven while the writer encodes the copy outside the lock.
        assert_eq!(redrive(&mut index, 10), 1);
        assert_eq!(
            index.carry(&encoded),
            0,
            "no copy of a redriven dead letter"
        );
        let taken = index.take(Vec::new());
        assert_eq!(
            taken.delete,
            [0, 1],
            "the dead letter's segment homes nothing"
        );
        let mut frames = 0;
        let mut at = 0;
        while let Some((payload, next)) = record::read_frame(&taken.bytes, at).unwrap() {
            assert!(
                !matches!(
                    record::decode(payload).unwrap(),
                    Record::DeadLettered { .. }
                ),
                "nothing may bring the dead letter back"
            );
            frames += 1;
            at = next;
        }
        assert_eq!(frames, 2, "the redrive's Sent and Redriven");
    }
}
