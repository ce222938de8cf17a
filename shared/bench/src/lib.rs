//! Benchmarks behind `dualwrite bench`: each returns a report struct that serialises to the one
//! JSON object the command prints. Figures are recorded in docs/PERFORMANCE.md.

pub mod engine;
mod http1;
pub mod live;
