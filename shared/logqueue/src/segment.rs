//! Segment files: their names, their header, how a new one is created and how an existing one
//! is read back (and its torn tail cut) on open.
//!
//! # Layout of the queue directory
//!
//! ```text
//! <dir>/LOCK                        held (flock) by the one process that has the queue open
//! <dir>/00000000000000000007.seg    segment 7 (sealed)
//! <dir>/00000000000000000008.seg    segment 8 (the head: the only one appended to)
//! ```
//!
//! A segment is named by its number, zero-padded to 20 digits so that names sort like numbers.
//! Numbers grow by one at each rotation and segments are only ever deleted oldest first, so the
//! files of a directory are always a run of consecutive numbers.
//!
//! # Header
//!
//! Every segment starts with [`HEADER_LEN`] bytes:
//!
//! ```text
//! magic "DWLQSEG\0" (8) | format version u32 LE (4) | segment number u64 LE (8)
//! | next message seq at creation u64 LE (8) | crc32c of the 28 bytes before it (4)
//! ```
//!
//! The next seq keeps message numbers growing across restarts even when every segment holding
//! a message has been deleted. The format version says which record kinds the segment may hold
//! (see [`crate::record`]): 1 the first six, 2 also `Redriven`. This build reads both and
//! creates version 2; opening a queue whose newest segment is older seals it (`seal`) and
//! starts a new one, so a record kind newer than a segment's version is never written into it
//! (an older build then refuses the newer segment as newer, not as damaged).
//!
//! A new segment is written under a temporary name, synced, renamed into place and the
//! directory synced, so a `.seg` file always has a whole header; a leftover `.seg.tmp` (a crash
//! during creation) holds nothing and is removed on open.
//!
//! # Torn tails
//!
//! Only the head segment is ever written to, and a segment is cut to its last record and
//! synced before the next one is created, so only the newest segment can end in a partly
//! written batch. The newest segment also ends in zeros: the writer fills the file with zeros
//! ahead of its records (so that a sync writes data into blocks the file already has, without
//! a journal commit for a new file size; see [`crate::writer`]). Opening reads its frames up to
//! the first bad one (see [`crate::record`]). If everything from there on is zeros, that is
//! its clean end and the zeros stay for the next records; otherwise the file is truncated
//! there: what a crash tore off had not been answered to anyone as durable, and nothing of it
//! may stay behind to be read as a record later. A bad frame in any *older* segment is
//! damage, not a crash, and opening refuses it ([`OpenError::Damaged`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::OpenError;
use crate::record::{self, BadFrame};

/// Bytes of a segment's header.
pub const HEADER_LEN: u64 = 32;

const MAGIC: &[u8; 8] = b"DWLQSEG\0";

/// The segment format this build writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 2;

/// The oldest segment format this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// The lock file's name inside the queue directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

const EXTENSION: &str = "seg";
const TEMP_SUFFIX: &str = ".seg.tmp";
/// A dead segment renamed out of the queue, its space not freed yet (see [`retire`]).
const RETIRED_SUFFIX: &str = ".seg.retired";

/// The file of segment `number` in `dir`.
pub(crate) fn path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.{EXTENSION}"))
}

/// The segment numbers found in `dir`, ascending. Leftover temporary files of a creation that
/// did not finish are removed.
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>, OpenError> {
    let io = |source| OpenError::Io {
        path: dir.to_path_buf(),
        doing: "listing the queue directory",
        source,
    };
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TEMP_SUFFIX) {
            fs::remove_file(entry.path()).map_err(|source| OpenError::Io {
                path: entry.path(),
                doing: "removing a segment whose creation did not finish",
                source,
            })?;
        } else if name.ends_with(RETIRED_SUFFIX) {
            // Gone already is fine: a queue of this process closed a moment ago may still be
            // removing its retired segments.
            remove_if_present(&entry.path()).map_err(|source| OpenError::Io {
                path: entry.path(),
                doing: "removing a segment retired by the previous run",
                source,
            })?;
        } else if let Some(number) = name
            .strip_suffix(".seg")
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
        {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn header(number: u64, next_seq: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&number.to_le_bytes());
    h[20..28].copy_from_slice(&next_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Creates segment `number` (header only) in `dir` and returns it open for appending: written
/// under a temporary name, synced, renamed into place, directory synced.
pub(crate) fn create(dir: &Path, number: u64, next_seq: u64) -> std::io::Result<File> {
    let final_path = path(dir, number);
    let temp = dir.join(format!("{number:020}{TEMP_SUFFIX}"));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&temp)?;
    file.write_all(&header(number, next_seq))?;
    file.sync_all()?;
    fs::rename(&temp, &final_path)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Seals segment `number` of `dir` where its records end (`end`): cuts the zeros written
/// ahead and syncs it, size included, so that a newer segment may follow it (only the newest
/// segment may end in zeros). For opening a queue whose newest segment has an older format.
pub(crate) fn seal(dir: &Path, number: u64, end: u64) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).open(path(dir, number))?;
    file.set_len(end)?;
    file.sync_all()
}

/// Takes dead segment `number` out of the queue: renamed (a directory entry change, durable
/// with the next [`sync_dir`]), then removed by a short-lived thread of its own. Removing a
/// 64 MiB file frees its blocks, which took 15–20 ms on the development VM: in the writer
/// thread that held every send waiting. A retired file left by a crash is removed on open.
pub(crate) fn retire(dir: &Path, number: u64) -> std::io::Result<()> {
    let retired = dir.join(format!("{number:020}{RETIRED_SUFFIX}"));
    fs::rename(path(dir, number), &retired)?;
    let removal = std::thread::Builder::new()
        .name("logq-retire".to_owned())
        .spawn(move || {
            if let Err(e) = remove_if_present(&retired) {
                tracing::warn!(file = %retired.display(), error = %e, "a retired segment could not be removed; the next open removes it");
            }
        });
    if let Err(e) = removal {
        tracing::warn!(error = %e, "no thread to remove a retired segment; the next open removes it");
    }
    Ok(())
}

/// Removes `file`; a file that is not there (removed meanwhile by someone else) is no error.
fn remove_if_present(file: &Path) -> std::io::Result<()> {
    match fs::remove_file(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Makes the directory's entries (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One segment as read on open: its header's next seq and its records' payloads.
#[derive(Debug)]
pub(crate) struct ReadSegment {
    /// The message seq the queue was at when the segment was created.
    pub(crate) next_seq: u64,
    /// Its header's format version.
    pub(crate) version: u32,
    /// The whole file (records are decoded from it in place).
    pub(crate) data: Vec<u8>,
    /// Offsets `(start, end)` of each good record's payload in `data`.
    pub(crate) payloads: Vec<(usize, usize)>,
    /// Where the good records end: where the next record goes.
    pub(crate) end: u64,
    /// The file's length (after any cut): beyond `end` it holds zeros written ahead.
    pub(crate) len: u64,
}

/// Reads segment `number` of `dir`. For the newest segment (`last`), a bad frame is a torn tail:
/// the file is truncated at it (and synced), keeping every record before it. Anywhere else it
/// is damage.
pub(crate) fn read(dir: &Path, number: u64, last: bool) -> Result<ReadSegment, OpenError> {
    let file_path = path(dir, number);
    let io = |doing, source| OpenError::Io {
        path: file_path.clone(),
        doing,
        source,
    };
    let data = fs::read(&file_path).map_err(|e| io("reading a segment", e))?;
    let (version, next_seq) = check_header(&file_path, &data, number)?;
    let mut payloads = Vec::new();
    let mut at = HEADER_LEN as usize;
    let bad = loop {
        match record::read_frame(&data, at) {
            Ok(Some((payload, next))) => {
                payloads.push((next - payload.len(), next));
                at = next;
            }
            Ok(None) => break None,
            Err(bad) => break Some(bad),
        }
    };
    let mut len = data.len() as u64;
    if let Some(bad) = bad {
        if !last {
            return Err(damaged(&file_path, at as u64, &bad.to_string()));
        }
        // Only zeros after the last record: the zeros the writer puts ahead of its records
        // (see `crate::writer`), the clean end of the newest segment, kept for the next ones.
        if data[at..].iter().any(|&b| b != 0) {
            cut_torn_tail(&file_path, at as u64, len, bad)?;
            len = at as u64;
        }
    }
    Ok(ReadSegment {
        next_seq,
        version,
        data,
        payloads,
        end: at as u64,
        len,
    })
}

/// The format version and the next seq of a segment's header.
fn check_header(file: &Path, data: &[u8], number: u64) -> Result<(u32, u64), OpenError> {
    let h = data
        .get(..HEADER_LEN as usize)
        .ok_or_else(|| damaged(file, 0, "a header cut short"))?;
    if &h[..8] != MAGIC {
        return Err(damaged(file, 0, "no segment header (wrong magic bytes)"));
    }
    let stored = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if crc32c::crc32c(&h[..28]) != stored {
        return Err(damaged(file, 0, "a header whose checksum does not match"));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version < OLDEST_FORMAT_VERSION {
        return Err(damaged(file, 8, "a format version that never existed"));
    }
    if version > FORMAT_VERSION {
        return Err(OpenError::NewerFormat {
            file: file.to_path_buf(),
            found: version,
            known: FORMAT_VERSION,
        });
    }
    let mut n = [0; 8];
    n.copy_from_slice(&h[12..20]);
    if u64::from_le_bytes(n) != number {
        return Err(damaged(
            file,
            12,
            "a header naming another segment number than its file name",
        ));
    }
    n.copy_from_slice(&h[20..28]);
    Ok((version, u64::from_le_bytes(n)))
}

fn cut_torn_tail(file: &Path, at: u64, len: u64, bad: BadFrame) -> Result<(), OpenError> {
    tracing::warn!(
        segment = %file.display(),
        offset = at,
        bytes_cut = len - at,
        reason = %bad,
        "cutting the torn tail of the newest queue segment (a batch the last run did not finish \
         writing; none of it had been reported durable)"
    );
    let io = |source| OpenError::Io {
        path: file.to_path_buf(),
        doing: "cutting the torn tail of the newest segment",
        source,
    };
    let f = OpenOptions::new().write(true).open(file).map_err(io)?;
    f.set_len(at).map_err(io)?;
    f.sync_all().map_err(io)
}

pub(crate) fn damaged(file: &Path, offset: u64, what: &str) -> OpenError {
    OpenError::Damaged {
        file: file.to_path_buf(),
        offset,
        what: what.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_segment_removed_meanwhile_by_another_queue_is_no_error() {
        // A queue closed a moment ago in this process may still be removing its retired
        // segments while the next open lists them: whoever comes second finds nothing.
        let dir = tempfile::tempdir().unwrap();
        drop(create(dir.path(), 0, 1).unwrap());
        drop(create(dir.path(), 1, 1).unwrap());
        let retired = dir.path().join(format!("{:020}{RETIRED_SUFFIX}", 0));
        fs::rename(path(dir.path(), 0), &retired).unwrap();
        remove_if_present(&retired).unwrap();
        remove_if_present(&retired).unwrap();
        assert!(!retired.exists());
        // And a listing that meets one removes it and lists the live segments only.
        fs::write(&retired, b"old").unwrap();
        assert_eq!(list(dir.path()).unwrap(), [1]);
        assert!(!retired.exists());
    }

    #[test]
    fn a_created_segment_reads_back_empty_with_its_next_seq() {
        let dir = tempfile::tempdir().unwrap();
        drop(create(dir.path(), 3, 42).unwrap());
        assert_eq!(list(dir.path()).unwrap(), [3]);
        let read = read(dir.path(), 3, true).unwrap();
        assert_eq!(read.next_seq, 42);
        assert!(read.payloads.is_empty());
        assert_eq!(read.end, HEADER_LEN);
    }

    #[test]
    fn leftover_temporary_files_are_removed_and_other_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("00000000000000000004.seg.tmp"), b"DWLQ").unwrap();
        fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        drop(create(dir.path(), 9, 0).unwrap());
        drop(create(dir.path(), 10, 0).unwrap());
        assert_eq!(list(dir.path()).unwrap(), [9, 10]);
        assert!(!dir.path().join("00000000000000000004.seg.tmp").exists());
    }

    #[test]
    fn a_wrong_header_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(create(dir.path(), 1, 0).unwrap());
        fs::copy(path(dir.path(), 1), path(dir.path(), 2)).unwrap();
        let err = read(dir.path(), 2, true).unwrap_err().to_string();
        assert!(err.contains("another segment number"), "{err}");
        fs::write(
            path(dir.path(), 5),
            b"not a segment at all, just some text in a file",
        )
        .unwrap();
        let err = read(dir.path(), 5, true).unwrap_err().to_string();
        assert!(err.contains("00000000000000000005.seg"), "{err}");
        assert!(err.contains("magic"), "{err}");
    }
}
