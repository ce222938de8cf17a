//! Configuration of the Dataverse connector.
//!
//! It holds live objects (the token source, the schemas, the counters), so it is built in code
//! from the validated application configuration rather than deserialized itself.

use std::sync::Arc;
use std::time::Duration;

use crate::entra::{TokenSource, default_scope};
use crate::schema::EntitySchemas;
use crate::stats::ConnectorStats;

/// How to reach one Dataverse environment.
#[derive(Debug, Clone)]
pub struct DataverseConfig {
    /// Web API root, e.g. `https://org.crm.dynamics.com/api/data/v9.2` (no trailing slash
    /// needed).
    pub base_url: String,
    /// Where bearer tokens come from.
    pub tokens: Arc<dyn TokenSource>,
    /// Token scope; `<environment origin>/.default` when `None`.
    pub scope: Option<String>,
    /// Field types per entity set, from the table maps.
    pub schemas: Arc<EntitySchemas>,
    /// Rows per page when a query does not say (`Prefer: odata.maxpagesize`, at most 5,000).
    pub page_size: usize,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Counters shared with the retrying wrapper.
    pub stats: Arc<ConnectorStats>,
    /// Entity set of the company table (`cdm_companies`).
    pub company_set: String,
    /// Alternate-key column of the company table (`cdm_companycode`).
    pub company_code_field: String,
    /// Primary id column of the company table (`cdm_companyid`).
    pub company_id_field: String,
}

impl DataverseConfig {
    /// A configuration with 5,000-row pages, a 60 s timeout and the standard company table.
    pub fn new(
        base_url: impl Into<String>,
        tokens: Arc<dyn TokenSource>,
        schemas: Arc<EntitySchemas>,
    ) -> Self {
        DataverseConfig {
            base_url: base_url.into(),
            tokens,
            scope: None,
            schemas,
            page_size: 5000,
            timeout: Duration::from_secs(60),
            stats: Arc::new(ConnectorStats::default()),
            company_set: "cdm_companies".into(),
            company_code_field: "cdm_companycode".into(),
            company_id_field: "cdm_companyid".into(),
        }
    }

    /// The token scope to ask for.
    pub fn scope(&self) -> String {
        self.scope
            .clone()
            .unwrap_or_else(|| default_scope(&self.base_url))
    }
}
