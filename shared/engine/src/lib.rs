//! The sync engine: ingest, the worker step and loop, metrics, and in-memory adapters of every
//! port (tests, benchmarks and the convergence proofs run on them).
//!
//! The engine is written against the core's ports only: no HTTP, SQLite, AWS or axum here, so
//! the local runner and the Lambda functions wrap [`Engine`] unchanged.

pub mod clock;
mod engine;
pub mod memory;
#[cfg(feature = "queue-contract")]
pub mod queue_contract;
pub mod replay;
mod stats;
mod worker;

pub use clock::{ManualClock, SystemClock};
pub use engine::{
    Engine, EventStatus, MapAction, MapResult, ProcessError, ProcessOutcome, ReleaseError,
    ResolveError, SWEEP_LIMIT, WorkerConfig,
};
pub use stats::{EngineStats, StatsSnapshot};
pub use worker::{DrainReport, drain, handle_delivery, ingest, run_worker};
