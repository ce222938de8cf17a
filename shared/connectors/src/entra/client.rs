//! The client-credentials token provider: one token per scope, cached, refreshed before it
//! expires, fetched by one caller at a time however many wait for it; a failed fetch is shared
//! by the callers that waited for it and not repeated for a short while, and a token still
//! valid keeps being used while its refresh fails.

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
/// scope wait for one request instead of each sending their own, and share its outcome: a
/// failure too, so a token endpoint that is down or refusing is asked once, not once per
/// waiting caller (each waiting out its timeout in turn). After a failure no new request is
/// sent for [`FAILURE_HOLD`] (or the endpoint's `Retry-After`, capped at a minute): callers get
/// the same error meanwhile. While a refresh fails, the cached token is still handed out until
/// shortly before it expires (MSAL's proactive-refresh behaviour), so an Entra ID outage
/// shorter than the refresh margin costs nothing.
#[derive(Debug)]
pub struct EntraTokenProvider {
    config: EntraConfig,
    http: reqwest::Client,
    slots: Mutex<HashMap<String, Arc<ScopeSlot>>>,
    stats: Arc<ConnectorStats>,
}

/// How long a failed token fetch is answered from memory before the endpoint is asked again
/// (unless it said `Retry-After`). Callers retry on their own schedule (the engine's backoff);
/// this only keeps a burst of them from turning into a burst of token requests.
pub const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// The longest `Retry-After` of the token endpoint honoured as a hold.
const MAX_FAILURE_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct ScopeSlot {
    state: Mutex<SlotState>,
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct SlotState {
    cached: Option<CachedToken>,
    failure: Option<Failure>,
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: Secret,
    /// From here on the token is refreshed before use.
    refresh_at: Instant,
    /// Until here the token may still be used when its refresh fails.
    usable_until: Instant,
}

/// The last failed fetch of a scope.
#[derive(Debug, Clone)]
struct Failure {
    /// When the failed request ended: callers that began waiting before it share it.
    at: Instant,
    /// Until when new callers get it without a request.
    hold_until: Instant,
    error: TokenError,
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

    fn state(slot: &ScopeSlot) -> std::sync::MutexGuard<'_, SlotState> {
        slot.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached token if it needs no refresh yet.
    fn fresh(slot: &ScopeSlot) -> Option<Secret> {
        Self::state(slot)
            .cached
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// The answer of a failure that still stands for a caller that arrived at `arrived`: the
    /// cached token while it is usable, else the failure's error. `None` when a new request
    /// is due.
    fn standing_failure(slot: &ScopeSlot, arrived: Instant) -> Option<Result<Secret, TokenError>> {
        let state = Self::state(slot);
        let failure = state.failure.as_ref()?;
        let now = Instant::now();
        if failure.at < arrived && now >= failure.hold_until {
            return None;
        }
        Some(Self::usable_or(&state, failure.error.clone(), now))
    }

    /// The cached token if it has not expired, else `error`.
    fn usable_or(state: &SlotState, error: TokenError, now: Instant) -> Result<Secret, TokenError> {
        match &state.cached {
            Some(c) if now < c.usable_until => Ok(c.token.clone()),
            _ => Err(error),
        }
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

/// How long before expiry a token of `lifetime` stops being used at all (so that a request
/// sent with it does not arrive after it expired): a tenth of it, at most 30 seconds.
pub(crate) fn expiry_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(30))
}

#[async_trait]
impl TokenSource for EntraTokenProvider {
    async fn token(&self, scope: &str) -> Result<Secret, TokenError> {
        let arrived = Instant::now();
        let slot = self.slot(scope);
        if let Some(token) = Self::fresh(&slot) {
            return Ok(token);
        }
        if let Some(answer) = Self::standing_failure(&slot, arrived) {
            return answer;
        }
        let _single_flight = slot.refresh.lock().await;
        // Someone else may have refreshed, or failed to, while we waited.
        if let Some(token) = Self::fresh(&slot) {
            return Ok(token);
        }
        if let Some(answer) = Self::standing_failure(&slot, arrived) {
            return answer;
        }
        let obtained = Instant::now();
        match self.fetch(scope).await {
            Ok((token, lifetime)) => {
                let refresh_at = obtained + lifetime.saturating_sub(refresh_margin(lifetime));
                let usable_until = obtained + lifetime.saturating_sub(expiry_margin(lifetime));
                let mut state = Self::state(&slot);
                state.cached = Some(CachedToken {
                    token: token.clone(),
                    refresh_at,
                    usable_until,
                });
                state.failure = None;
                Ok(token)
            }
            Err(error) => {
                let now = Instant::now();
                let hold = match &error {
                    TokenError::Refused {
                        retry_after_ms: Some(ms),
                        ..
                    } => Duration::from_millis(*ms).clamp(FAILURE_HOLD, MAX_FAILURE_HOLD),
                    _ => FAILURE_HOLD,
                };
                let mut state = Self::state(&slot);
                state.failure = Some(Failure {
                    at: now,
                    hold_until: now + hold,
                    error: error.clone(),
                });
                let answer = Self::usable_or(&state, error, now);
                if answer.is_ok() {
                    warn!(
                        scope,
                        "token refresh failed; the cached token is used until it expires"
                    );
                }
                answer
            }
        }
    }

    fn invalidate(&self, scope: &str, refused: &Secret) {
        let slot = self.slot(scope);
        let mut state = Self::state(&slot);
        // A token fetched after the refused one was sent stays: a late 401 must not throw
        // away the fresh token every other caller is using.
        if state.cached.as_ref().is_some_and(|c| &c.token == refused) {
            state.cached = None;
        }
    }
}
