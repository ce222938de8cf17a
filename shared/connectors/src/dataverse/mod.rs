//! The Dataverse Web API v9.2 connector ([`Side::Crm`](dualwrite_core::Side)): reads by
//! primary id or alternate key, pages of queries, upserts by PATCH, deletes, and bulk upserts
//! through `UpsertMultiple` (or a `$batch` changeset where that is refused).

mod client;
mod config;
#[cfg(test)]
mod tests;
pub mod wire;

pub use client::DataverseConnector;
pub use config::DataverseConfig;
