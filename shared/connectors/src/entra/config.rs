//! Configuration of the Entra ID client-credentials token provider.

use std::time::Duration;

use serde::Deserialize;

use super::Secret;

/// Where and as whom to ask for tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// Authority base URL, `https://login.microsoftonline.com` in Azure; a simulator's URL in
    /// tests. The token endpoint is `<authority>/<tenant>/oauth2/v2.0/token`.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Directory (tenant) id or domain.
    pub tenant: String,
    /// Application (client) id of the app registration.
    pub client_id: String,
    /// Client secret of the app registration (never logged).
    pub client_secret: Secret,
    /// Timeout of one token request.
    #[serde(default = "default_timeout", with = "secs")]
    pub timeout: Duration,
}

fn default_authority() -> String {
    "https://login.microsoftonline.com".to_string()
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

impl EntraConfig {
    /// A configuration with the default authority and timeout.
    pub fn new(
        tenant: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: Secret,
    ) -> Self {
        EntraConfig {
            authority: default_authority(),
            tenant: tenant.into(),
            client_id: client_id.into(),
            client_secret,
            timeout: default_timeout(),
        }
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority.trim_end_matches('/'),
            self.tenant
        )
    }
}
