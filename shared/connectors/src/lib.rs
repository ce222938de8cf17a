//! dualwrite-connectors: the HTTP adapters that implement [`dualwrite_core::ports::Connector`].
//!
//! - [`entra`]: client-credentials access tokens from Entra ID, cached per scope.
//! - [`dataverse`]: the Dataverse Web API v9.2 connector ([`Side::Crm`](dualwrite_core::Side)).
//! - [`fno`]: the Finance & Operations OData connector ([`Side::Erp`](dualwrite_core::Side)).
//! - [`schema`]: field types per entity, derived from the table maps (JSON is untyped).
//! - [`http`]: shared request execution, status → error-kind mapping, `Retry-After`.
//! - [`retrying`]: a wrapper that retries throttled and transient failures as the error
//!   policy says (for the catch-up polls; the real-time worker lets its queue retry instead).
//! - [`batch`]: OData `$batch` (multipart) building, sending and parsing, shared by both
//!   connectors' bulk upserts and `call_many`.
//! - [`coalesce`]: a wrapper that coalesces concurrent reads and upserts into `$batch`
//!   requests, with no delay (group-commit style).
//!
//! Invariant: the connectors retry nothing by themselves except one token refresh on 401;
//! every other retry decision is [`dualwrite_core::error_policy`]'s.

pub mod batch;
pub mod coalesce;
pub mod dataverse;
pub mod entra;
pub mod fno;
pub mod http;
pub mod odata;
pub mod retrying;
pub mod schema;
pub mod stats;
#[cfg(test)]
mod test_server;

pub use coalesce::{Coalescing, CoalescingConfig, CoalescingSnapshot, CoalescingStats};
pub use dataverse::{DataverseConfig, DataverseConnector};
pub use entra::{EntraConfig, EntraTokenProvider, Secret, StaticToken, TokenError, TokenSource};
pub use fno::{FnoConfig, FnoConnector};
pub use http::ConnectionConfig;
pub use retrying::RetryingConnector;
pub use schema::{EntitySchema, EntitySchemas};
pub use stats::{ConnectorStats, StatsSnapshot};
