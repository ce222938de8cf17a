//! Records: what one entry of a segment says, how it is encoded and how it is framed on disk.
//!
//! # Frame
//!
//! ```text
//! +----------------+----------------+---------------------------+
//! | length: u32 LE | crc32c: u32 LE | payload (`length` bytes)  |
//! +----------------+----------------+---------------------------+
//! ```
//!
//! The checksum is CRC-32C over the four length bytes followed by the payload, so a torn or
//! garbled length is caught as surely as a torn payload. A frame is *bad* when its header is
//! incomplete, its length is 0, larger than [`MAX_PAYLOAD`] or runs past the end of the file,
//! or its checksum does not match; recovery cuts the last segment at its first bad frame (see
//! [`crate::segment`]).
//!
//! # Payload
//!
//! One kind byte, then the kind's fields in order: integers little-endian, strings and byte
//! strings as a `u32` length and the bytes. A message *body* is its group id, its dedup id and
//! the JSON of its [`ChangeEvent`](dualwrite_core::ChangeEvent) (the event as `serde_json`
//! writes it; the group and dedup ids stand beside it instead of inside it).
//!
//! | kind | record | fields |
//! |---|---|---|
//! | 1 | `Sent` | seq u64, body |
//! | 2 | `Delivered` | seq u64, attempt u32 |
//! | 3 | `Acked` | seq u64 |
//! | 4 | `Retried` | seq u64, attempt u32, visible_at_ms i64, error str |
//! | 5 | `DeadLettered` | seq u64, death u64, attempts u32, error str, body |
//! | 6 | `Carried` | seq u64, attempt u32, state u8 (+ until_ms i64 when delayed), last_error (u8 0/1 + str), body |
//! | 7 | `Redriven` | seq u64, death u64 (segment format 2 on) |
//!
//! Kinds are never renumbered and fields never reordered; a new need gets a new kind. A
//! payload that passed its checksum but cannot be decoded was written by a newer version (or
//! this one is broken): opening then fails instead of guessing. A new kind also raises the
//! segment format version ([`crate::segment::FORMAT_VERSION`]) and is only ever written to
//! segments of that version, so that an older build refuses such a segment as newer (and says
//! to upgrade) instead of taking the record it cannot read for damage.

use std::fmt;

/// Bytes before a record's payload: its length and its checksum.
pub const FRAME_HEADER: usize = 8;

/// The largest payload a frame may carry. Far above any real change event (receivers cap
/// webhook bodies well below it); a length above it can only be a torn or garbled header.
pub const MAX_PAYLOAD: usize = 256 << 20;

const SENT: u8 = 1;
const DELIVERED: u8 = 2;
const ACKED: u8 = 3;
const RETRIED: u8 = 4;
const DEAD_LETTERED: u8 = 5;
const CARRIED: u8 = 6;
const REDRIVEN: u8 = 7;

/// A message as stored: its ordering group, dedup id and the JSON of its change event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Body<'a> {
    pub(crate) group: &'a str,
    pub(crate) dedup: &'a str,
    pub(crate) event_json: &'a [u8],
}

/// Where a live message stood when compaction copied it (see [`Record::Carried`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CarriedState {
    /// Deliverable, or waiting behind an earlier message of its group.
    Ready,
    /// In flight: after a restart it is treated as a delivery whose visibility expired.
    Delivered,
    /// Delayed by `retry` until this instant (ms since the epoch).
    Delayed { until_ms: i64 },
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// A message was accepted. Its `seq` is its identity for every later record.
    Sent { seq: u64, body: Body<'a> },
    /// The message was delivered for the `attempt`-th time. Written without waiting for a
    /// sync, so after a power loss the count may be short by the last deliveries.
    Delivered { seq: u64, attempt: u32 },
    /// The message was acked: it is gone. Written without waiting for a sync.
    Acked { seq: u64 },
    /// `retry`: delivery `attempt` failed with `error`; visible again at `visible_at_ms`.
    Retried {
        seq: u64,
        attempt: u32,
        visible_at_ms: i64,
        error: &'a str,
    },
    /// The message moved to the dead letters after `attempts` deliveries. Self-contained (it
    /// holds the body), so the dead letter outlives the segment the message was sent in.
    /// `death` numbers dead letters in the order they died.
    DeadLettered {
        seq: u64,
        death: u64,
        attempts: u32,
        error: &'a str,
        body: Body<'a>,
    },
    /// Compaction copied a live message out of an old segment: everything known about it at
    /// that instant. Replaces whatever earlier records said.
    Carried {
        seq: u64,
        attempt: u32,
        state: CarriedState,
        last_error: Option<&'a str>,
        body: Body<'a>,
    },
    /// `redrive`: dead letter `death` was sent again as message `seq`. Always appended right
    /// after that message's `Sent` record, in the same batch: a torn batch can keep the `Sent`
    /// without this record (the message is then queued and still dead: a second redrive sends
    /// it again, which idempotency makes harmless), never this record without the `Sent`.
    Redriven { seq: u64, death: u64 },
}

impl Record<'_> {
    /// The message sequence the record is about.
    pub(crate) fn seq(&self) -> u64 {
        match self {
            Record::Sent { seq, .. }
            | Record::Delivered { seq, .. }
            | Record::Acked { seq }
            | Record::Retried { seq, .. }
            | Record::DeadLettered { seq, .. }
            | Record::Carried { seq, .. }
            | Record::Redriven { seq, .. } => *seq,
        }
    }
}

/// Appends `record`, framed, to `buf`; returns the frame's length in bytes.
pub(crate) fn append(buf: &mut Vec<u8>, record: &Record<'_>) -> u64 {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER]);
    encode(buf, record);
    let payload = buf.len() - start - FRAME_HEADER;
    // Senders refuse larger messages before they get here (see `check_size`).
    let length = u32::try_from(payload).unwrap_or(u32::MAX).to_le_bytes();
    buf[start..start + 4].copy_from_slice(&length);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&length), &buf[start + FRAME_HEADER..]);
    buf[start + 4..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
    (buf.len() - start) as u64
}

fn encode(buf: &mut Vec<u8>, record: &Record<'_>) {
    match record {
        Record::Sent { seq, body } => {
            buf.push(SENT);
            put_u64(buf, *seq);
            put_body(buf, body);
        }
        Record::Delivered { seq, attempt } => {
            buf.push(DELIVERED);
            put_u64(buf, *seq);
            put_u32(buf, *attempt);
        }
        Record::Acked { seq } => {
            buf.push(ACKED);
            put_u64(buf, *seq);
        }
        Record::Retried {
            seq,
            attempt,
            visible_at_ms,
            error,
        } => {
            buf.push(RETRIED);
            put_u64(buf, *seq);
            put_u32(buf, *attempt);
            buf.extend_from_slice(&visible_at_ms.to_le_bytes());
            put_bytes(buf, error.as_bytes());
        }
        Record::DeadLettered {
            seq,
            death,
            attempts,
            error,
            body,
        } => {
            buf.push(DEAD_LETTERED);
            put_u64(buf, *seq);
            put_u64(buf, *death);
            put_u32(buf, *attempts);
            put_bytes(buf, error.as_bytes());
            put_body(buf, body);
        }
        Record::Carried {
            seq,
            attempt,
            state,
            last_error,
            body,
        } => {
            buf.push(CARRIED);
            put_u64(buf, *seq);
            put_u32(buf, *attempt);
            match state {
                CarriedState::Ready => buf.push(0),
                CarriedState::Delivered => buf.push(1),
                CarriedState::Delayed { until_ms } => {
                    buf.push(2);
                    buf.extend_from_slice(&until_ms.to_le_bytes());
                }
            }
            match last_error {
                None => buf.push(0),
                Some(error) => {
                    buf.push(1);
                    put_bytes(buf, error.as_bytes());
                }
            }
            put_body(buf, body);
        }
        Record::Redriven { seq, death } => {
            buf.push(REDRIVEN);
            put_u64(buf, *seq);
            put_u64(buf, *death);
        }
    }
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(buf, u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    buf.extend_from_slice(bytes);
}

fn put_body(buf: &mut Vec<u8>, body: &Body<'_>) {
    put_bytes(buf, body.group.as_bytes());
    put_bytes(buf, body.dedup.as_bytes());
    put_bytes(buf, body.event_json);
}

/// Why bytes are not a valid frame (the place where recovery cuts a torn tail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadFrame {
    /// Fewer than [`FRAME_HEADER`] bytes left.
    ShortHeader,
    /// A length of 0 or above [`MAX_PAYLOAD`].
    BadLength,
    /// The length runs past the end of the file.
    ShortPayload,
    /// The checksum does not match.
    Checksum,
}

impl fmt::Display for BadFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadFrame::ShortHeader => "an incomplete record header",
            BadFrame::BadLength => "an impossible record length",
            BadFrame::ShortPayload => "a record cut short",
            BadFrame::Checksum => "a record whose checksum does not match",
        })
    }
}

/// The frame starting at `data[at..]`: `Ok(None)` exactly at the end, else its payload and the
/// offset just after it.
pub(crate) fn read_frame(data: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, BadFrame> {
    let rest = &data[at.min(data.len())..];
    if rest.is_empty() {
        return Ok(None);
    }
    if rest.len() < FRAME_HEADER {
        return Err(BadFrame::ShortHeader);
    }
    let length_bytes = [rest[0], rest[1], rest[2], rest[3]];
    let length = u32::from_le_bytes(length_bytes) as usize;
    if length == 0 || length > MAX_PAYLOAD {
        return Err(BadFrame::BadLength);
    }
    if rest.len() - FRAME_HEADER < length {
        return Err(BadFrame::ShortPayload);
    }
    let stored = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let payload = &rest[FRAME_HEADER..FRAME_HEADER + length];
    if crc32c::crc32c_append(crc32c::crc32c(&length_bytes), payload) != stored {
        return Err(BadFrame::Checksum);
    }
    Ok(Some((payload, at + FRAME_HEADER + length)))
}

/// A payload whose checksum is right but whose content this version cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decodes one payload.
pub(crate) fn decode(payload: &[u8]) -> Result<Record<'_>, DecodeError> {
    let mut r = Reader { rest: payload };
    let kind = r.u8()?;
    let record = match kind {
        SENT => Record::Sent {
            seq: r.u64()?,
            body: r.body()?,
        },
        DELIVERED => Record::Delivered {
            seq: r.u64()?,
            attempt: r.u32()?,
        },
        ACKED => Record::Acked { seq: r.u64()? },
        RETRIED => Record::Retried {
            seq: r.u64()?,
            attempt: r.u32()?,
            visible_at_ms: r.i64()?,
            error: r.str()?,
        },
        DEAD_LETTERED => Record::DeadLettered {
            seq: r.u64()?,
            death: r.u64()?,
            attempts: r.u32()?,
            error: r.str()?,
            body: r.body()?,
        },
        CARRIED => Record::Carried {
            seq: r.u64()?,
            attempt: r.u32()?,
            state: match r.u8()? {
                0 => CarriedState::Ready,
                1 => CarriedState::Delivered,
                2 => CarriedState::Delayed { until_ms: r.i64()? },
                other => {
                    return Err(DecodeError(format!(
                        "a carried message with unknown state {other}"
                    )));
                }
            },
            last_error: match r.u8()? {
                0 => None,
                _ => Some(r.str()?),
            },
            body: r.body()?,
        },
        REDRIVEN => Record::Redriven {
            seq: r.u64()?,
            death: r.u64()?,
        },
        other => return Err(DecodeError(format!("unknown record kind {other}"))),
    };
    if !r.rest.is_empty() {
        return Err(DecodeError(format!(
            "{} unexpected bytes after a record of kind {kind}",
            r.rest.len()
        )));
    }
    Ok(record)
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError("a record shorter than its fields".to_owned()));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| DecodeError("a text field that is not UTF-8".to_owned()))
    }

    fn body(&mut self) -> Result<Body<'a>, DecodeError> {
        Ok(Body {
            group: self.str()?,
            dedup: self.str()?,
            event_json: self.bytes()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body<'static> {
        Body {
            group: "crm:accounts:1",
            dedup: "e1",
            event_json: br#"{"event_id":"e1"}"#,
        }
    }

    fn every_kind() -> Vec<Record<'static>> {
        vec![
            Record::Sent {
                seq: 1,
                body: body(),
            },
            Record::Delivered { seq: 2, attempt: 3 },
            Record::Acked { seq: u64::MAX },
            Record::Retried {
                seq: 4,
                attempt: 1,
                visible_at_ms: -5,
                error: "F&O throttled",
            },
            Record::DeadLettered {
                seq: 6,
                death: 7,
                attempts: 8,
                error: "bad data",
                body: body(),
            },
            Record::Carried {
                seq: 9,
                attempt: 0,
                state: CarriedState::Ready,
                last_error: None,
                body: body(),
            },
            Record::Carried {
                seq: 10,
                attempt: 2,
                state: CarriedState::Delivered,
                last_error: Some("x"),
                body: body(),
            },
            Record::Carried {
                seq: 11,
                attempt: 1,
                state: CarriedState::Delayed { until_ms: 1234 },
                last_error: Some(""),
                body: body(),
            },
            Record::Redriven { seq: 12, death: 7 },
        ]
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let mut buf = Vec::new();
        let records = every_kind();
        for r in &records {
            let before = buf.len();
            assert_eq!(append(&mut buf, r), (buf.len() - before) as u64);
        }
        let mut at = 0;
        let mut read = Vec::new();
        while let Some((payload, next)) = read_frame(&buf, at).unwrap() {
            read.push(decode(payload).unwrap());
            at = next;
        }
        assert_eq!(read, records);
    }

    #[test]
    fn every_cut_and_every_flipped_bit_of_a_frame_is_bad() {
        let mut buf = Vec::new();
        append(&mut buf, &every_kind()[4]);
        for cut in 1..buf.len() {
            assert!(read_frame(&buf[..cut], 0).is_err(), "cut at {cut}");
        }
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(read_frame(&bad, 0).is_err(), "bit {bit} of byte {byte}");
            }
        }
        assert_eq!(read_frame(&[0; 16], 0), Err(BadFrame::BadLength));
    }

    #[test]
    fn an_unknown_kind_or_trailing_bytes_do_not_decode() {
        assert!(decode(&[99]).is_err());
        let mut buf = Vec::new();
        append(&mut buf, &Record::Acked { seq: 1 });
        let mut payload = buf[FRAME_HEADER..].to_vec();
        payload.push(0);
        assert!(decode(&payload).is_err());
        assert!(decode(&payload[..4]).is_err());
    }

    #[test]
    fn a_redriven_record_is_kind_7_then_its_seq_and_death() {
        // Pinned: segments of format 2 hold it, and every later build must read them.
        let mut buf = Vec::new();
        append(&mut buf, &Record::Redriven { seq: 1, death: 2 });
        assert_eq!(
            buf[FRAME_HEADER..],
            [7, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
