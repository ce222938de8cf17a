//! One module per top-level command; each stays thin and calls into the shared crates.

pub mod bench;
pub mod conflicts;
pub mod demo;
pub mod errors;
pub mod maps;
pub mod queue;
pub mod serve;
pub mod status;
