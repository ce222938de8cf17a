//! Integration tests of the engine over the in-memory adapters: echo suppression, staleness,
//! idempotency, conflict and delete policies, parking, errors, the worker loop, concurrency and
//! the convergence property.

mod convergence;
mod harness;
mod properties;
mod scenarios;
