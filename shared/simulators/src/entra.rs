//! Entra ID (Azure AD) token endpoint simulator: OAuth2 client credentials grant (wire-formats §5).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::common::{
    Guard, Outcome, Server, SimError, SimRequest, SimResponse, new_guid, parse_query, serve,
};

/// An application registered in the simulated tenant. Its `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct EntraClient {
    /// Tenant id or domain the client lives in (the `{tenant}` path segment).
    pub tenant: String,
    /// Application (client) id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// Scopes the client may request (`https://host/.default`); empty = any scope.
    pub allowed_scopes: Vec<String>,
}

impl std::fmt::Debug for EntraClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraClient")
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("allowed_scopes", &self.allowed_scopes)
            .finish()
    }
}

/// Configuration of [`EntraSim`].
#[derive(Debug, Clone)]
pub struct EntraConfig {
    /// Registered clients.
    pub clients: Vec<EntraClient>,
    /// Lifetime of issued tokens (`expires_in`); real Entra: 60–90 minutes.
    pub token_lifetime: Duration,
}

impl Default for EntraConfig {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            token_lifetime: Duration::from_secs(3599),
        }
    }
}

/// Why a bearer token was refused by a resource simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Unknown,
    Expired,
    WrongAudience,
}

#[derive(Debug)]
struct IssuedToken {
    scope: String,
    client_id: String,
    expires: Instant,
}

#[derive(Debug)]
pub(crate) struct EntraState {
    clients: RwLock<Vec<EntraClient>>,
    lifetime: RwLock<Duration>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    issued: AtomicU64,
    guard: Guard,
}

impl EntraState {
    /// Checks that `token` was issued for `scope` (a resource's `<base>/.default`) and is not
    /// expired; returns the client id it was issued to.
    pub(crate) fn validate(&self, token: &str, base_url: &str) -> Result<String, TokenProblem> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let t = tokens.get(token).ok_or(TokenProblem::Unknown)?;
        if Instant::now() >= t.expires {
            return Err(TokenProblem::Expired);
        }
        let base = base_url.trim_end_matches('/');
        let scope = t.scope.trim_end_matches("/.default").trim_end_matches('/');
        if !scope.eq_ignore_ascii_case(base) {
            return Err(TokenProblem::WrongAudience);
        }
        Ok(t.client_id.clone())
    }

    fn error(status: StatusCode, error: &str, code: u32, description: &str) -> SimResponse {
        let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
        let trace = new_guid();
        let corr = new_guid();
        SimResponse::json(
            status,
            &json!({
                "error": error,
                "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {now}"),
                "error_codes": [code],
                "timestamp": now,
                "trace_id": trace,
                "correlation_id": corr,
            }),
        )
    }

    fn token(&self, tenant: &str, form: &[(String, String)]) -> SimResponse {
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if get("grant_type") != Some("client_credentials") {
            return Self::error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type; use grant_type=client_credentials.",
            );
        }
        let Some(client_id) = get("client_id") else {
            return Self::error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            );
        };
        let Some(scope) = get("scope") else {
            return Self::error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            );
        };
        let client = {
            let clients = self.clients.read().unwrap_or_else(|e| e.into_inner());
            if !clients
                .iter()
                .any(|c| c.tenant.eq_ignore_ascii_case(tenant))
            {
                return Self::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    90002,
                    &format!(
                        "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID."
                    ),
                );
            }
            match clients.iter().find(|c| {
                c.tenant.eq_ignore_ascii_case(tenant) && c.client_id.eq_ignore_ascii_case(client_id)
            }) {
                Some(c) => c.clone(),
                None => {
                    return Self::error(
                        StatusCode::BAD_REQUEST,
                        "unauthorized_client",
                        700016,
                        &format!(
                            "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
                        ),
                    );
                }
            }
        };
        if get("client_secret") != Some(client.client_secret.as_str()) {
            return Self::error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            );
        }
        let valid_shape = scope.ends_with("/.default") && !scope.contains(' ');
        let allowed = client.allowed_scopes.is_empty()
            || client.allowed_scopes.iter().any(|s| {
                s.trim_end_matches('/')
                    .eq_ignore_ascii_case(scope.trim_end_matches('/'))
            });
        if !valid_shape || !allowed {
            return Self::error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                70011,
                &format!(
                    "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
                ),
            );
        }
        let lifetime = *self.lifetime.read().unwrap_or_else(|e| e.into_inner());
        let token = format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.{}{}",
            new_guid().replace('-', ""),
            new_guid().replace('-', "")
        );
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token.clone(),
                IssuedToken {
                    scope: scope.to_owned(),
                    client_id: client.client_id.clone(),
                    expires: Instant::now() + lifetime,
                },
            );
        self.issued.fetch_add(1, Ordering::Relaxed);
        SimResponse::json(
            StatusCode::OK,
            &json!({"token_type": "Bearer", "expires_in": lifetime.as_secs(), "ext_expires_in": lifetime.as_secs(), "access_token": token}),
        )
    }
}

impl crate::common::Handler for EntraState {
    async fn handle(self: Arc<Self>, req: SimRequest) -> Outcome {
        self.guard.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.guard.fault().await {
            return match f {
                crate::common::Fault::DropConnection => Outcome::Drop,
                crate::common::Fault::Status(s) => Outcome::Respond(Self::error(
                    StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "temporarily_unavailable",
                    50020,
                    "The service is temporarily unavailable (fault injected by the simulator).",
                )),
                crate::common::Fault::Delay(_) => {
                    Outcome::Respond(SimResponse::empty(StatusCode::OK))
                }
            };
        }
        let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let resp = match (&req.method, segs.as_slice()) {
            (&Method::POST, [tenant, "oauth2", "v2.0", "token"]) => {
                let form = parse_query(std::str::from_utf8(&req.body).unwrap_or(""));
                self.token(tenant, &form)
            }
            _ => Self::error(
                StatusCode::NOT_FOUND,
                "invalid_request",
                900561,
                "The endpoint only accepts POST /{tenant}/oauth2/v2.0/token.",
            ),
        };
        Outcome::Respond(resp)
    }
}

/// A running Entra ID token endpoint. Cloning shares the same simulator.
#[derive(Debug, Clone)]
pub struct EntraSim {
    state: Arc<EntraState>,
    server: Arc<Server>,
}

impl EntraSim {
    /// Starts the simulator on 127.0.0.1 with a random port.
    pub async fn start(config: EntraConfig) -> Result<Self, SimError> {
        let state = Arc::new(EntraState {
            clients: RwLock::new(config.clients),
            lifetime: RwLock::new(config.token_lifetime),
            tokens: Mutex::new(HashMap::new()),
            issued: AtomicU64::new(0),
            guard: Guard::default(),
        });
        let server = serve("Entra ID", state.clone()).await?;
        Ok(Self {
            state,
            server: Arc::new(server),
        })
    }

    /// `http://127.0.0.1:<port>` — the authority host; tokens are at `{base}/{tenant}/oauth2/v2.0/token`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The token endpoint URL for `tenant`.
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base_url())
    }

    /// Registers another client at run time.
    pub fn add_client(&self, client: EntraClient) {
        self.state
            .clients
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(client);
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *self
            .state
            .lifetime
            .write()
            .unwrap_or_else(|e| e.into_inner()) = lifetime;
    }

    /// Number of tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.state.issued.load(Ordering::Relaxed)
    }

    /// Makes every token issued so far invalid (as if it had expired).
    pub fn expire_all_tokens(&self) {
        let mut tokens = self.state.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for t in tokens.values_mut() {
            t.expires = now;
        }
    }

    pub(crate) fn state(&self) -> Arc<EntraState> {
        self.state.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_debug_output_hides_its_secret() {
        let client = EntraClient {
            tenant: "contoso.onmicrosoft.com".into(),
            client_id: "app-1".into(),
            client_secret: "s3cr3t-value".into(),
            allowed_scopes: Vec::new(),
        };
        let shown = format!("{client:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("app-1"), "{shown}");
    }
}
