//! The Finance & Operations OData connector ([`Side::Erp`](dualwrite_core::Side)): data
//! entities under `/data/`, keyed by `dataAreaId` and natural key, read across companies,
//! written by read-then-PATCH-or-POST (F&O has no upsert), bulk writes as `$batch`
//! changesets.

mod client;
mod config;
#[cfg(test)]
mod tests;
pub mod wire;

pub use client::FnoConnector;
pub use config::FnoConfig;
