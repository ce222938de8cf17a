//! One module per top-level command; each stays thin and calls into the shared crates.

pub mod bench;
pub mod conflicts;
pub mod demo;
pub mod errors;
pub mod maps;
pub mod queue;
pub mod serve;
pub mod status;

/// Refuses a command whose store does not exist, saying where to find it.
///
/// # Errors
/// Always, naming `db`.
pub fn no_store(db: &std::path::Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no local store at {}: pass --db (or set DUALWRITE_DB) with the store `dualwrite serve` \
         uses, its configuration's `db:` — a path relative to the configuration file's folder \
         (the demo and the benchmarks keep no store)",
        db.display()
    )
}
