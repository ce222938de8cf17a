//! Entra ID (Azure AD) access tokens: the [`TokenSource`] port the connectors take, the
//! client-credentials provider [`EntraTokenProvider`], a fixed [`StaticToken`] for local
//! runs, and [`Secret`], which keeps secrets out of `Debug` output and logs.

mod client;
mod config;
#[cfg(test)]
mod tests;

use std::fmt;

use async_trait::async_trait;
use dualwrite_core::Side;
use dualwrite_core::ports::{ConnectorError, ConnectorErrorKind};

pub use client::{EntraTokenProvider, FAILURE_HOLD};
pub use config::EntraConfig;

/// A secret (client secret, access token). `Debug` and `Display` print `[redacted]`; the
/// value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint refused the request (bad client id/secret, unknown scope, …).
    #[error(
        "token endpoint {endpoint} refused a token for scope {scope} (HTTP {status}): {message}; \
         check the tenant, client id, client secret and scope in the configuration"
    )]
    Refused {
        endpoint: String,
        scope: String,
        status: u16,
        message: String,
        retry_after_ms: Option<u64>,
    },
    /// The token endpoint could not be reached or timed out.
    #[error("token endpoint {endpoint} could not be reached for scope {scope}: {message}")]
    Unreachable {
        endpoint: String,
        scope: String,
        message: String,
    },
    /// The endpoint answered 2xx with a body that is not a token.
    #[error("token endpoint {endpoint} sent an unreadable token for scope {scope}: {message}")]
    BadResponse {
        endpoint: String,
        scope: String,
        message: String,
    },
}

impl TokenError {
    /// The connector failure this token failure stands for: a refusal needs a person
    /// (`Unauthorized`), throttling and 5xx/unreachable endpoints are retried later.
    pub fn into_connector_error(self, side: Side, entity: &str) -> ConnectorError {
        let (kind, status) = match &self {
            TokenError::Refused {
                status: 429,
                retry_after_ms,
                ..
            } => (
                ConnectorErrorKind::Throttled {
                    retry_after_ms: retry_after_ms.unwrap_or(1000),
                },
                Some(429),
            ),
            TokenError::Refused { status, .. } if *status >= 500 => {
                (ConnectorErrorKind::Transient, Some(*status))
            }
            TokenError::Refused { status, .. } => (ConnectorErrorKind::Unauthorized, Some(*status)),
            TokenError::Unreachable { .. } => (ConnectorErrorKind::Transient, None),
            TokenError::BadResponse { .. } => (ConnectorErrorKind::Transient, None),
        };
        ConnectorError {
            side,
            entity: entity.to_string(),
            kind,
            status,
            message: self.to_string(),
        }
    }
}

/// Where connectors get bearer tokens from.
///
/// Implementations must be safe for concurrent use and should cache: `token` is called before
/// every request. After a 401 the connector calls `invalidate` with the token the server
/// refused and asks once more.
#[async_trait]
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// A valid access token for `scope` (e.g. `https://org.crm.dynamics.com/.default`).
    async fn token(&self, scope: &str) -> Result<Secret, TokenError>;
    /// Forgets the cached token of `scope` if it is `refused` (a token fetched since, by
    /// another caller, is kept).
    fn invalidate(&self, scope: &str, refused: &Secret);
}

/// A fixed token for every scope (simulators, local demos, tokens obtained elsewhere).
#[derive(Debug, Clone)]
pub struct StaticToken(pub Secret);

#[async_trait]
impl TokenSource for StaticToken {
    async fn token(&self, _scope: &str) -> Result<Secret, TokenError> {
        Ok(self.0.clone())
    }

    fn invalidate(&self, _scope: &str, _refused: &Secret) {}
}

/// The `.default` scope of a resource URL: `https://org.crm.dynamics.com/api/data/v9.2` →
/// `https://org.crm.dynamics.com/.default` (scheme, host and port kept, path dropped).
pub fn default_scope(resource_url: &str) -> String {
    let after_scheme = resource_url.find("://").map_or(0, |i| i + 3);
    let end = resource_url[after_scheme..]
        .find('/')
        .map_or(resource_url.len(), |i| after_scheme + i);
    format!("{}/.default", &resource_url[..end])
}
