//! Failures of opening a queue directory (the port's `QueueError` covers everything after).

use std::path::PathBuf;

/// Why a [`LogQueue`](crate::LogQueue) could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A file or directory operation failed.
    #[error(
        "cannot open the dualwrite work queue: {doing} {path} failed: {source}; check that the \
         directory exists (or can be created), is writable and that the disk is not full"
    )]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What was being done, as a phrase (`creating the queue directory`).
        doing: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another `LogQueue` in this one) has the directory open.
    #[error(
        "the dualwrite work queue {dir} is in use: another process holds its lock file \
         {dir}/LOCK; stop the other dualwrite process (or close the other queue) before opening \
         it, or point this one at another directory"
    )]
    Locked {
        /// The queue directory.
        dir: PathBuf,
    },
    /// A segment other than the newest has a bad record or header: damage (a failing disk, a
    /// file edited or copied in), not a crash, which can only tear the newest segment's tail.
    #[error(
        "the dualwrite work queue segment {file} is damaged at byte {offset}: {what}; this is \
         not the torn tail a crash leaves, so nothing was cut. Restore the queue directory from \
         a backup, or move this file out of the directory to open the queue without the \
         messages it holds (they are then lost: the sources must send them again)"
    )]
    Damaged {
        /// The segment file.
        file: PathBuf,
        /// Where in the file the damage starts.
        offset: u64,
        /// What is wrong there.
        what: String,
    },
    /// A segment was written by a newer dualwrite whose format this build does not know.
    #[error(
        "the dualwrite work queue segment {file} has format version {found}, this build knows \
         up to {known}; upgrade dualwrite or point it at another directory"
    )]
    NewerFormat {
        /// The segment file.
        file: PathBuf,
        /// The version in its header.
        found: u32,
        /// The newest version this build reads.
        known: u32,
    },
    /// The thread that appends and syncs the segments could not be started.
    #[error(
        "cannot start the writer thread of the dualwrite work queue {dir}: {source}; the system \
         is out of threads or memory, free some and retry"
    )]
    WriterThread {
        /// The queue directory.
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}
