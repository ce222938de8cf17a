//! The client-credentials token provider: one token per scope, cached, refreshed before it
//! expires, fetched by one caller at a time however many wait for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use tracing::{debug, warn};

use super::{EntraConfig, Secret, TokenError, TokenSource};
use crate::http::{encode_form, parse_retry_after, server_message};
use crate::stats::ConnectorStats;

/// Fetches tokens with the OAuth 2.0 client-credentials grant from Entra ID (or a simulator
/// of it) and caches them per scope.
///
/// A token is refreshed when less than a tenth of its lifetime, or less than five minutes
/// (but at most half its lifetime), is left. Concurrent callers needing a refresh of the same
/// scope wait for one request instead of each sending their own.
#[derive(Debug)]
pub struct EntraTokenProvider {
    config: EntraConfig,
    http: reqwest::Client,
    slots: Mutex<HashMap<String, Arc<ScopeSlot>>>,
    stats: Arc<ConnectorStats>,
}

#[derive(Debug, Default)]
struct ScopeSlot {
    cached: Mutex<Option<CachedToken>>,
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

impl EntraTokenProvider {
    /// A provider for `config`, counting fetches in `stats`.
    pub fn new(config: EntraConfig, stats: Arc<ConnectorStats>) -> Result<Self, TokenError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| TokenError::Unreachable {
                endpoint: config.token_endpoint(),
                scope: String::new(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(EntraTokenProvider {
            config,
            http,
            slots: Mutex::new(HashMap::new()),
            stats,
        })
    }

    fn slot(&self, scope: &str) -> Arc<ScopeSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(scope.to_string()).or_default().clone()
    }

    fn fresh(slot: &ScopeSlot) -> Option<Secret> {
        let cached = slot.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    async fn fetch(&self, scope: &str) -> Result<(Secret, Duration), TokenError> {
        let endpoint = self.config.token_endpoint();
        let body = format!(
            "client_id={}&scope={}&client_secret={}&grant_type=client_credentials",
            encode_form(&self.config.client_id),
            encode_form(scope),
            encode_form(self.config.client_secret.expose()),
        );
        self.stats.token_fetch();
        let response = self
            .http
            .post(&endpoint)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| TokenError::Unreachable {
                endpoint: endpoint.clone(),
                scope: scope.to_string(),
                message: e.to_string(),
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let text = response.text().await.map_err(|e| TokenError::Unreachable {
            endpoint: endpoint.clone(),
            scope: scope.to_string(),
            message: e.to_string(),
        })?;
        if !(200..300).contains(&status) {
            warn!(endpoint, scope, status, "token request refused");
            return Err(TokenError::Refused {
                endpoint,
                scope: scope.to_string(),
                status,
                message: server_message(&text).unwrap_or_else(|| "no error message".into()),
                retry_after_ms: retry_after,
            });
        }
        let parsed: TokenResponse =
            serde_json::from_str(&text).map_err(|e| TokenError::BadResponse {
                endpoint: endpoint.clone(),
                scope: scope.to_string(),
                message: e.to_string(),
            })?;
        debug!(scope, expires_in = parsed.expires_in, "token fetched");
        Ok((
            Secret::new(parsed.access_token),
            Duration::from_secs(parsed.expires_in),
        ))
    }
}

/// How long before expiry a token of `lifetime` is refreshed.
pub(crate) fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).max(Duration::from_secs(300).min(lifetime / 2))
}

#[async_trait]
impl TokenSource for EntraTokenProvider {
    async fn token(&self, scope: &str) -> Result<Secret, TokenError> {
        let slot = self.slot(scope);
        if let Some(token) = Self::fresh(&slot) {
            return Ok(token);
        }
        let _single_flight = slot.refresh.lock().await;
        // Someone else may have refreshed while we waited.
        if let Some(token) = Self::fresh(&slot) {
            return Ok(token);
        }
        let obtained = Instant::now();
        let (token, lifetime) = self.fetch(scope).await?;
        let refresh_at = obtained + lifetime.saturating_sub(refresh_margin(lifetime));
        *slot.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(CachedToken {
            token: token.clone(),
            refresh_at,
        });
        Ok(token)
    }

    fn invalidate(&self, scope: &str) {
        let slot = self.slot(scope);
        *slot.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
