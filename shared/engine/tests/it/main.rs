//! Integration tests of the engine over the in-memory adapters: echo suppression, staleness,
//! idempotency, conflict and delete policies, parking, errors, the worker loop, concurrency and
//! the convergence property, races between workers replayed deterministically, and what may be
//! settled on arrival without queueing.

mod convergence;
mod harness;
mod properties;
mod queue_contract;
mod races;
mod scenarios;
mod settled;
