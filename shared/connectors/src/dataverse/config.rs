//! Configuration of the Dataverse connector: the shared [`ConnectionConfig`] and the company
//! table only Dataverse has.

use std::sync::Arc;
use std::time::Duration;

use crate::entra::TokenSource;
use crate::http::ConnectionConfig;
use crate::schema::EntitySchemas;

/// How to reach one Dataverse environment.
#[derive(Debug, Clone)]
pub struct DataverseConfig {
    /// Web API root (e.g. `https://org.crm.dynamics.com/api/data/v9.2`), tokens, schemas, page
    /// size (at most 5,000), timeout and counters.
    pub connection: ConnectionConfig,
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
            connection: ConnectionConfig::new(
                base_url,
                tokens,
                schemas,
                5000,
                Duration::from_secs(60),
            ),
            company_set: "cdm_companies".into(),
            company_code_field: "cdm_companycode".into(),
            company_id_field: "cdm_companyid".into(),
        }
    }
}
