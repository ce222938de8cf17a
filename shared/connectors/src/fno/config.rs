//! Configuration of the F&O connector.
//!
//! Like the Dataverse one it holds live objects and is built in code, not deserialized.

use std::sync::Arc;
use std::time::Duration;

use crate::entra::{TokenSource, default_scope};
use crate::schema::EntitySchemas;
use crate::stats::ConnectorStats;

/// How to reach one F&O environment.
#[derive(Debug, Clone)]
pub struct FnoConfig {
    /// Environment URL, e.g. `https://contoso.operations.dynamics.com`; entities are under
    /// `<base_url>/data/`.
    pub base_url: String,
    /// Where bearer tokens come from.
    pub tokens: Arc<dyn TokenSource>,
    /// Token scope; `<base_url origin>/.default` when `None`.
    pub scope: Option<String>,
    /// Field types per data entity, from the table maps.
    pub schemas: Arc<EntitySchemas>,
    /// Rows per page when a query does not say (`Prefer: odata.maxpagesize`, at most 10,000).
    pub page_size: usize,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Counters shared with the retrying wrapper.
    pub stats: Arc<ConnectorStats>,
}

impl FnoConfig {
    /// A configuration with 10,000-row pages and a 120 s timeout.
    pub fn new(
        base_url: impl Into<String>,
        tokens: Arc<dyn TokenSource>,
        schemas: Arc<EntitySchemas>,
    ) -> Self {
        FnoConfig {
            base_url: base_url.into(),
            tokens,
            scope: None,
            schemas,
            page_size: 10_000,
            timeout: Duration::from_secs(120),
            stats: Arc::new(ConnectorStats::default()),
        }
    }

    /// The token scope to ask for.
    pub fn scope(&self) -> String {
        self.scope
            .clone()
            .unwrap_or_else(|| default_scope(&self.base_url))
    }
}
