//! Failures of opening a database file (the port errors cover everything after that).

use std::path::PathBuf;

/// Why a store or queue database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite refused to open or configure the file.
    #[error(
        "cannot open the dualwrite database {path}: {source}; check that the directory exists \
         and is writable and that the file is an SQLite database"
    )]
    Sqlite {
        /// The database file (`:memory:` for an in-memory database).
        path: PathBuf,
        /// SQLite's own error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer dualwrite whose schema this build does not know.
    #[error(
        "the dualwrite database {path} has schema version {found}, this build knows up to \
         {known}; upgrade dualwrite or point it at another file"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The version recorded in the file.
        found: i64,
        /// The newest version this build can migrate to.
        known: i64,
    },
    /// A migration step failed.
    #[error("migrating the dualwrite database {path} to schema version {version} failed: {source}")]
    Migration {
        /// The database file.
        path: PathBuf,
        /// The version whose migration failed.
        version: i64,
        /// SQLite's own error.
        #[source]
        source: rusqlite::Error,
    },
    /// The thread that applies the database's writes could not be started.
    #[error(
        "cannot start the writer thread for the dualwrite database {path}: {source}; the system \
         is out of threads or memory, free some and retry"
    )]
    WriterThread {
        /// The database file (`:memory:` for an in-memory database).
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}
