//! dualwrite-runtime: the local runtime behind `dualwrite serve` and `dualwrite demo`.
//!
//! [`config`] reads and validates the YAML configuration; [`Runtime::start`] runs the webhook
//! endpoints (axum, wrapping the receivers), N worker tasks (the engine over the SQLite queue
//! and store) and the catch-up scheduler in one process; [`demo`] runs the whole pipeline
//! against the simulators and checks that both sides converged; [`local`] starts the simulators
//! and a runtime wired to them (the demo, `dualwrite bench live` and the end-to-end tests).
//!
//! Invariant: nothing here decides how a record syncs; that is the engine's and the maps'.
//! This crate only wires adapters together.

pub mod config;
pub mod demo;
pub mod local;
mod runtime;
mod scheduler;
mod server;

pub use config::{BatchingSettings, Config, ConfigError, ConfigProblem, EnvLookup, ProcessEnv};
pub use local::{LocalSecrets, LocalStack, LocalStackError, LocalStackOptions};
pub use runtime::{
    BatchingCounts, BatchingStats, CallCounts, CatchUpCounts, CoalescedCounts, Completion,
    ConnectorCounters, ConnectorCounts, DATAVERSE_API_PATH, DatabaseCounts, Parts, QueueCounts,
    QueueLogCounts, ReceiverCounts, Runtime, RuntimeHandle, RuntimeStats, StartError, open_queue,
    queue_dir,
};
