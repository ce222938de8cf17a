//! Faithful local simulators of Dataverse, F&O and Entra ID, for tests, demo and benchmarks.
//!
//! Each simulator binds `127.0.0.1:0` (a random port) and is started in-process with
//! `XxxSim::start(config).await`; handles are cheap to clone and stop the server when the last
//! clone is dropped. Behaviour follows `shared/reference/wire-formats.md`.
//!
//! Supported surface:
//! - [`EntraSim`]: `POST /{tenant}/oauth2/v2.0/token` (client credentials); errors
//!   `invalid_scope` (400), `invalid_client` (401), `unauthorized_client` (400), tenant not found (400).
//!   Tokens are opaque, scoped to one resource (`<base>/.default`) and expire.
//! - [`DataverseSim`] under `/api/data/v9.2/`: GET collection (`$select`, `$filter`, `$top`,
//!   `$orderby`, `$count`, `Prefer: odata.maxpagesize`, opaque `$skiptoken` nextLinks, `$skip` → 400),
//!   GET/PATCH/DELETE by id or alternate key, POST create, upsert, `If-Match`/`If-None-Match`,
//!   `@odata.bind` lookups, `$batch` (change sets, `$n` references, continue-on-error),
//!   `CreateMultiple`/`UpdateMultiple`/`UpsertMultiple`, service protection 429s, fault injection,
//!   webhooks with RemoteExecutionContext bodies, simulated UI users (`user_create/edit/delete`).
//! - [`FnoSim`] under `/data/`: company-scoped data entities, `cross-company=true` (reads and
//!   PATCH/DELETE by key see the default company without it), typed integer and enum keys
//!   ([`FnoKeyType`]), `$filter` (enum literals, `*` wildcards), `$top/$skip/$orderby/$select/$count`,
//!   server paging, POST/PATCH/DELETE with F&O semantics, ETags, `$batch`, throttling, faults,
//!   data events and business events.
//!
//! Not simulated: change tracking (`odata.track-changes`), `$expand`, `$apply`, metadata documents.

mod batch;
mod common;
mod context;
mod dataverse;
mod entra;
mod fno;
mod json;
mod odata;
mod webhook;

pub use common::{Fault, FaultConfig, SimError, SimStats, ThrottleConfig};
pub use dataverse::{
    ColumnKind, DataverseConfig, DataverseSim, TableDef, WebhookAuth, WebhookMessage,
    WebhookRegistration,
};
pub use entra::{EntraClient, EntraConfig, EntraSim};
pub use fno::{
    FnoConfig, FnoEntityDef, FnoEventFormat, FnoEventRegistration, FnoKeyKind, FnoKeyType,
    FnoMessage, FnoSim,
};
pub use webhook::DeliveryRecord;
