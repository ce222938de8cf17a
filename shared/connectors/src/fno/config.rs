//! Configuration of the F&O connector: the shared [`ConnectionConfig`] with F&O's defaults.

use std::sync::Arc;
use std::time::Duration;

use crate::entra::TokenSource;
use crate::http::ConnectionConfig;
use crate::schema::EntitySchemas;

/// How to reach one F&O environment.
#[derive(Debug, Clone)]
pub struct FnoConfig {
    /// Environment URL (e.g. `https://contoso.operations.dynamics.com`; entities are under
    /// `<base_url>/data/`), tokens, schemas, page size (at most 10,000), timeout and counters.
    pub connection: ConnectionConfig,
}

impl FnoConfig {
    /// A configuration with 10,000-row pages and a 120 s timeout.
    pub fn new(
        base_url: impl Into<String>,
        tokens: Arc<dyn TokenSource>,
        schemas: Arc<EntitySchemas>,
    ) -> Self {
        FnoConfig {
            connection: ConnectionConfig::new(
                base_url,
                tokens,
                schemas,
                10_000,
                Duration::from_secs(120),
            ),
        }
    }
}
