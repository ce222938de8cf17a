//! In-memory adapters of every port: what tests, `dualwrite bench engine` and the convergence
//! proofs run on. Always compiled; no I/O.

mod connector;
mod queue;
mod store;

pub use connector::{MemoryConnector, WriteKind, WriteLogEntry};
pub use queue::MemoryQueue;
pub use store::MemoryStore;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the data of these
/// adapters is always left consistent between statements).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
