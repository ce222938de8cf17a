//! Integration tests of the engine over the in-memory adapters: echo suppression, staleness,
//! idempotency, conflict and delete policies, parking, errors, the worker loop, concurrency and
//! the convergence property, and races between workers replayed deterministically.

mod convergence;
mod harness;
mod properties;
mod races;
mod scenarios;
