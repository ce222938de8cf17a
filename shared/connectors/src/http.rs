//! Shared HTTP request execution for the OData connectors: OData headers, bearer tokens, the
//! one token refresh on 401, timeouts, and the mapping of an answer to a [`ConnectorError`]
//! (status → [`ConnectorErrorKind`], `Retry-After` in seconds, the server's own message).

use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::Side;
use dualwrite_core::error_policy::{Backoff, Disposition, disposition};
use dualwrite_core::ports::{ConnectorError, ConnectorErrorKind};
use reqwest::Method;
use reqwest::header::HeaderMap;
use tracing::{debug, warn};

use crate::entra::{TokenSource, default_scope};
use crate::schema::EntitySchemas;
use crate::stats::ConnectorStats;

/// The wait assumed for a 429 that carries no usable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One answer, read to the end.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body as text.
    pub body: String,
}

impl HttpResponse {
    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A header's value, when present and readable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The failure this answer stands for (call only for non-2xx answers).
    pub fn to_error(&self, side: Side, entity: &str) -> ConnectorError {
        let retry_after = self.header("retry-after").and_then(parse_retry_after);
        ConnectorError {
            side,
            entity: entity.to_string(),
            kind: error_kind(self.status, retry_after),
            status: Some(self.status),
            message: server_message(&self.body)
                .unwrap_or_else(|| format!("HTTP {} with no error message", self.status)),
        }
    }
}

/// The kind of failure an HTTP status stands for. `retry_after` is the parsed `Retry-After`
/// header: a 503 carrying one is throttling, without one it is a transient failure.
pub fn error_kind(status: u16, retry_after: Option<Duration>) -> ConnectorErrorKind {
    let throttled = |d: Duration| ConnectorErrorKind::Throttled {
        retry_after_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    };
    match (status, retry_after) {
        (401, _) => ConnectorErrorKind::Unauthorized,
        (403, _) => ConnectorErrorKind::Forbidden,
        (404, _) => ConnectorErrorKind::NotFound,
        (412, _) => ConnectorErrorKind::PreconditionFailed,
        (429, d) => throttled(d.unwrap_or(DEFAULT_RETRY_AFTER)),
        (503, Some(d)) => throttled(d),
        (408, _) | (500..=599, _) => ConnectorErrorKind::Transient,
        _ => ConnectorErrorKind::BadRequest,
    }
}

/// The longest wait one `Retry-After` is taken to ask for. Dataverse's and F&O's service
/// protection windows are 5 minutes, so no real answer is cut; a larger value (a broken proxy,
/// `1e20`) waits this long instead of for ever.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// Parses a `Retry-After` value given in seconds (`"5"`, or `"2.5"` as some gateways send),
/// at most [`MAX_RETRY_AFTER`]. The HTTP-date form is not used by Dataverse or F&O and yields
/// `None`, as does a negative or non-numeric value.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let secs = value.parse::<f64>().ok().filter(|s| *s >= 0.0)?;
            // Infinite or too large for a Duration: as long as any wait may be.
            Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_AFTER)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The server's message from an OData error body `{"error":{"code":"…","message":"…"}}`
/// (as `code: message`), or from an OAuth error body `{"error":"…","error_description":"…"}`.
/// A short non-JSON body is returned as it is; `None` when the body is empty.
pub fn server_message(body: &str) -> Option<String> {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return None;
    }
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(trimmed) {
        let error = json.get("error");
        if let Some(obj) = error.filter(|e| e.is_object()) {
            // F&O sends `"code":""`: an empty code is no code.
            let code = obj
                .get("code")
                .and_then(|c| c.as_str())
                .filter(|c| !c.is_empty());
            let message = with_inner_messages(obj);
            return match (code, message) {
                (Some(c), Some(m)) => Some(format!("{c}: {m}")),
                (None, Some(m)) => Some(m),
                (Some(c), None) => Some(c.to_string()),
                (None, None) => Some(obj.to_string()),
            };
        }
        if let Some(code) = error.and_then(|e| e.as_str()) {
            let description = json.get("error_description").and_then(|d| d.as_str());
            return Some(match description {
                Some(d) => format!("{code}: {d}"),
                None => code.to_string(),
            });
        }
    }
    Some(trimmed.chars().take(500).collect())
}

/// An OData error's `message`, followed by what its `innererror` (and the `internalexception`s
/// inside it) say that the message does not: F&O often answers "An error has occurred." and
/// puts the Infolog ("Write failed for table row … The record already exists.") in the inner
/// error, which is what a person reading the error log needs.
fn with_inner_messages(error: &serde_json::Value) -> Option<String> {
    let mut out: Option<String> = error
        .get("message")
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    let mut inner = error.get("innererror");
    for _ in 0..8 {
        let Some(level) = inner.filter(|i| i.is_object()) else {
            break;
        };
        if let Some(m) = level.get("message").and_then(|m| m.as_str())
            && !m.trim().is_empty()
        {
            match &mut out {
                Some(text) if text.contains(m) => {}
                Some(text) => {
                    text.push_str(" | ");
                    text.push_str(m);
                }
                None => out = Some(m.to_owned()),
            }
        }
        inner = level.get("internalexception");
    }
    out
}

/// A transport failure (no answer, timeout, dropped connection) as a transient error.
pub fn transport_error(side: Side, entity: &str, error: &reqwest::Error) -> ConnectorError {
    let what = if error.is_timeout() {
        "request timed out"
    } else {
        "request failed"
    };
    ConnectorError {
        side,
        entity: entity.to_string(),
        kind: ConnectorErrorKind::Transient,
        status: None,
        message: format!("{what}: {error}"),
    }
}

/// A request to send, described so it can be sent twice (after a token refresh).
#[derive(Debug, Clone)]
pub struct ODataRequest {
    /// HTTP method.
    pub method: Method,
    /// Absolute URL, query string included.
    pub url: String,
    /// Extra headers (`If-Match`, `Prefer`, …).
    pub headers: Vec<(String, String)>,
    /// Body and its content type.
    pub body: Option<(String, String)>,
}

impl ODataRequest {
    /// A request without headers or body.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        ODataRequest {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds a header (builder style).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets a JSON body (builder style).
    pub fn json(mut self, body: String) -> Self {
        self.body = Some(("application/json".to_string(), body));
        self
    }

    /// Sets a body with its content type (builder style).
    pub fn body(mut self, content_type: impl Into<String>, body: String) -> Self {
        self.body = Some((content_type.into(), body));
        self
    }
}

/// How an OData connector reaches its environment: what the Dataverse and F&O configurations
/// share. It holds live objects (the token source, the schemas, the counters), so it is built in
/// code from the validated application configuration rather than deserialized.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Root URL requests are built from (no trailing slash needed); what it points at is the
    /// connector's (Dataverse: the Web API root, F&O: the environment URL).
    pub base_url: String,
    /// Where bearer tokens come from.
    pub tokens: Arc<dyn TokenSource>,
    /// Token scope; `<base_url origin>/.default` when `None`.
    pub scope: Option<String>,
    /// Field types per entity, from the table maps.
    pub schemas: Arc<EntitySchemas>,
    /// Rows per page when a query does not say (`Prefer: odata.maxpagesize`).
    pub page_size: usize,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Most calls of [`Connector::call_many`](dualwrite_core::ports::Connector::call_many)
    /// sent in one `$batch` request (more are split into several); at least 1.
    pub max_batch: usize,
    /// Counters shared with the retrying wrapper.
    pub stats: Arc<ConnectorStats>,
}

/// Calls per `$batch` request unless configured otherwise: well under every service's limit
/// (Dataverse 1,000 requests, F&O 5,000 changeset operations, Business Central 100) and small
/// enough that one batch's execution time stays short.
pub const DEFAULT_MAX_BATCH: usize = 100;

impl ConnectionConfig {
    /// A connection to `base_url` with the default scope, [`DEFAULT_MAX_BATCH`] calls per
    /// `$batch` and fresh counters.
    pub fn new(
        base_url: impl Into<String>,
        tokens: Arc<dyn TokenSource>,
        schemas: Arc<EntitySchemas>,
        page_size: usize,
        timeout: Duration,
    ) -> Self {
        ConnectionConfig {
            base_url: base_url.into(),
            tokens,
            scope: None,
            schemas,
            page_size,
            timeout,
            max_batch: DEFAULT_MAX_BATCH,
            stats: Arc::new(ConnectorStats::default()),
        }
    }

    /// The token scope to ask for.
    pub fn scope(&self) -> String {
        self.scope
            .clone()
            .unwrap_or_else(|| default_scope(&self.base_url))
    }

    /// An [`ODataClient`] sending to `side` with this connection's tokens, timeout and
    /// counters.
    ///
    /// # Errors
    /// A [`ConnectorErrorKind::BadRequest`] error when the HTTP client cannot be built.
    pub fn client(&self, side: Side) -> Result<ODataClient, ConnectorError> {
        ODataClient::new(
            side,
            self.tokens.clone(),
            self.scope(),
            self.timeout,
            self.stats.clone(),
        )
    }

    /// The base URL without a trailing slash.
    pub fn root(&self) -> &str {
        self.base_url.trim_end_matches('/')
    }
}

/// Sends OData requests for one connector: OData headers, bearer tokens, counters, tracing.
#[derive(Debug, Clone)]
pub struct ODataClient {
    http: reqwest::Client,
    tokens: Arc<dyn TokenSource>,
    scope: String,
    side: Side,
    stats: Arc<ConnectorStats>,
}

impl ODataClient {
    /// A client sending to `side` with tokens for `scope`; every request times out after
    /// `timeout`.
    pub fn new(
        side: Side,
        tokens: Arc<dyn TokenSource>,
        scope: String,
        timeout: Duration,
        stats: Arc<ConnectorStats>,
    ) -> Result<Self, ConnectorError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| ConnectorError {
                side,
                entity: String::new(),
                kind: ConnectorErrorKind::BadRequest,
                status: None,
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(ODataClient {
            http,
            tokens,
            scope,
            side,
            stats,
        })
    }

    /// The counters this client adds to.
    pub fn stats(&self) -> &Arc<ConnectorStats> {
        &self.stats
    }

    /// The side this client sends to.
    pub fn side(&self) -> Side {
        self.side
    }

    /// An error of `kind` about `entity` on this client's side, with no HTTP status.
    pub fn error(&self, entity: &str, kind: ConnectorErrorKind, message: String) -> ConnectorError {
        ConnectorError {
            side: self.side,
            entity: entity.to_string(),
            kind,
            status: None,
            message,
        }
    }

    /// A transient error for an answer that could not be read (`message` says why).
    pub fn bad_answer(&self, entity: &str, message: String) -> ConnectorError {
        self.error(
            entity,
            ConnectorErrorKind::Transient,
            format!(
                "unreadable answer from {}: {message}",
                system_name(self.side)
            ),
        )
    }

    /// A bad-request error for a record that does not fit the table maps' schema of `entity`.
    pub fn unfit(&self, entity: &str, problem: impl std::fmt::Display) -> ConnectorError {
        self.error(
            entity,
            ConnectorErrorKind::BadRequest,
            format!("record does not fit the table maps: {problem}"),
        )
    }

    /// Sends `request` and reads the answer, whatever its status. On a 401 the token is
    /// invalidated and the request sent once more, as [`disposition`] says; a second 401 is
    /// returned as it is. Transport failures and token failures are errors.
    pub async fn send(
        &self,
        entity: &str,
        request: impl std::borrow::Borrow<ODataRequest>,
    ) -> Result<HttpResponse, ConnectorError> {
        let request = request.borrow();
        let mut attempt = 1;
        loop {
            let token = self
                .tokens
                .token(&self.scope)
                .await
                .map_err(|e| e.into_connector_error(self.side, entity))?;
            let mut builder = self
                .http
                .request(request.method.clone(), &request.url)
                .bearer_auth(token.expose())
                .header("Accept", "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0");
            for (name, value) in &request.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            if let Some((content_type, body)) = &request.body {
                builder = builder
                    .header("Content-Type", content_type.as_str())
                    .body(body.clone());
            }
            self.stats.request();
            let response = match builder.send().await {
                Ok(r) => r,
                Err(e) => {
                    let error = transport_error(self.side, entity, &e);
                    self.stats.failure(&error.kind);
                    warn!(side = %self.side, entity, attempt, error = %e, "request failed");
                    return Err(error);
                }
            };
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.text().await.map_err(|e| {
                let error = transport_error(self.side, entity, &e);
                self.stats.failure(&error.kind);
                error
            })?;
            let answer = HttpResponse {
                status,
                headers,
                body,
            };
            debug!(side = %self.side, entity, method = %request.method, status, attempt, "request answered");
            if answer.is_success() || status == 304 {
                return Ok(answer);
            }
            // A failed `$batch` answered in multipart form (Dataverse's 400 for a batch stopped
            // at a failing part) is that part's failure: the batch reader counts each failing
            // part, so counting the envelope too would count one failure twice.
            let error = answer.to_error(self.side, entity);
            if !crate::batch::is_multipart(&answer) {
                self.stats.failure(&error.kind);
            }
            let policy = Backoff::default();
            if disposition(&error, attempt, &policy, 0.0) == Disposition::RefreshTokenOnce {
                warn!(side = %self.side, entity, status, attempt, "token refused, refreshing once");
                self.tokens.invalidate(&self.scope, &token);
                self.stats.token_refresh();
                attempt += 1;
                continue;
            }
            return Ok(answer);
        }
    }
}

/// The system on `side`, as messages name it.
fn system_name(side: Side) -> &'static str {
    match side {
        Side::Crm => "Dataverse",
        Side::Erp => "F&O",
    }
}

/// Percent-encodes `text` for use inside a URL path segment; OData key punctuation
/// (`'`, `(`, `)`, `,`, `=`) and unreserved characters are kept.
pub fn encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let keep = byte.is_ascii_alphanumeric()
            || matches!(
                byte,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'\''
                    | b'('
                    | b')'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
                    | b'!'
                    | b'$'
                    | b'*'
                    | b';'
            );
        if keep {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-encodes `text` for an `application/x-www-form-urlencoded` body: everything but
/// unreserved characters.
pub fn encode_form(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-encodes `text` for use as a query-string value.
pub fn encode_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric()
            || matches!(
                byte,
                b'-' | b'.' | b'_' | b'~' | b'\'' | b'(' | b')' | b',' | b':'
            )
        {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::{Secret, StaticToken};

    fn connection(base_url: &str) -> ConnectionConfig {
        ConnectionConfig::new(
            base_url,
            Arc::new(StaticToken(Secret::new("t"))),
            Arc::new(EntitySchemas::default()),
            100,
            Duration::from_secs(5),
        )
    }

    #[test]
    fn connection_scope_defaults_to_the_origin_and_root_drops_the_slash() {
        let mut c = connection("https://org.crm.dynamics.com/api/data/v9.2/");
        assert_eq!(c.scope(), "https://org.crm.dynamics.com/.default");
        assert_eq!(c.root(), "https://org.crm.dynamics.com/api/data/v9.2");
        c.scope = Some("api://custom/.default".into());
        assert_eq!(c.scope(), "api://custom/.default");
    }

    #[test]
    fn client_errors_name_the_side_and_entity() {
        let c = connection("https://contoso.operations.dynamics.com");
        let erp = c.client(Side::Erp).unwrap();
        let e = erp.bad_answer("CustomersV3", "not JSON".into());
        assert_eq!((e.side, e.kind), (Side::Erp, ConnectorErrorKind::Transient));
        assert_eq!(e.entity, "CustomersV3");
        assert_eq!(e.message, "unreadable answer from F&O: not JSON");
        let crm = c.client(Side::Crm).unwrap();
        let e = crm.unfit("accounts", "field x is not a number");
        assert_eq!(
            (e.side, e.kind),
            (Side::Crm, ConnectorErrorKind::BadRequest)
        );
        assert_eq!(
            e.message,
            "record does not fit the table maps: field x is not a number"
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(parse_retry_after("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-3"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        // Absurd values wait the longest a Retry-After may ask, never panic or for ever.
        for absurd in ["1e20", "18446744073709551616", "inf", "4000000000", "900.5"] {
            assert_eq!(parse_retry_after(absurd), Some(MAX_RETRY_AFTER), "{absurd}");
        }
        assert_eq!(parse_retry_after("300"), Some(Duration::from_secs(300)));
    }

    #[test]
    fn each_status_maps_to_its_kind() {
        use ConnectorErrorKind as K;
        assert_eq!(error_kind(400, None), K::BadRequest);
        assert_eq!(error_kind(401, None), K::Unauthorized);
        assert_eq!(error_kind(403, None), K::Forbidden);
        assert_eq!(error_kind(404, None), K::NotFound);
        assert_eq!(error_kind(405, None), K::BadRequest);
        assert_eq!(error_kind(408, None), K::Transient);
        assert_eq!(error_kind(412, None), K::PreconditionFailed);
        assert_eq!(error_kind(413, None), K::BadRequest);
        assert_eq!(
            error_kind(429, Some(Duration::from_secs(7))),
            K::Throttled {
                retry_after_ms: 7000
            }
        );
        assert_eq!(
            error_kind(429, None),
            K::Throttled {
                retry_after_ms: 1000
            }
        );
        assert_eq!(error_kind(500, None), K::Transient);
        assert_eq!(error_kind(502, None), K::Transient);
        assert_eq!(error_kind(503, None), K::Transient);
        assert_eq!(
            error_kind(503, Some(Duration::from_secs(2))),
            K::Throttled {
                retry_after_ms: 2000
            }
        );
        assert_eq!(error_kind(504, None), K::Transient);
    }

    #[test]
    fn server_messages_are_extracted() {
        let odata = r#"{"error":{"code":"0x80060882","message":"The version of the existing record doesn't match the RowVersion property provided."}}"#;
        assert_eq!(
            server_message(odata).as_deref(),
            Some(
                "0x80060882: The version of the existing record doesn't match the RowVersion property provided."
            )
        );
        let oauth = r#"{"error":"invalid_scope","error_description":"AADSTS70011: bad scope","error_codes":[70011]}"#;
        assert_eq!(
            server_message(oauth).as_deref(),
            Some("invalid_scope: AADSTS70011: bad scope")
        );
        // The inner error's message (and its internal exceptions') after the message, each
        // once: F&O's generic "An error has occurred." is not the whole story.
        let fno = r#"{"error":{"code":"","message":"The record already exists.","innererror":{"message":"The record already exists.","type":"AxODataWriteException","stacktrace":""}}}"#;
        assert_eq!(
            server_message(fno).as_deref(),
            Some("The record already exists.")
        );
        let fno = r#"{"error":{"code":"","message":"An error has occurred.","innererror":{"message":"Write failed for table row of type 'CustCustomerV3Entity'. Infolog: Error: The record already exists..","type":"Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException","stacktrace":"at ...","internalexception":{"message":"Customer group 'ZZ' does not exist.","type":"X","stacktrace":""}}}}"#;
        assert_eq!(
            server_message(fno).as_deref(),
            Some(
                "An error has occurred. | Write failed for table row of type 'CustCustomerV3Entity'. Infolog: Error: The record already exists.. | Customer group 'ZZ' does not exist."
            )
        );
        assert_eq!(server_message("  "), None);
        assert_eq!(
            server_message("Bad Gateway").as_deref(),
            Some("Bad Gateway")
        );
    }

    #[test]
    fn error_from_answer_keeps_status_message_and_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "12".parse().unwrap());
        let answer = HttpResponse {
            status: 429,
            headers,
            body: r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#.into(),
        };
        let e = answer.to_error(Side::Crm, "accounts");
        assert_eq!(
            e.kind,
            ConnectorErrorKind::Throttled {
                retry_after_ms: 12_000
            }
        );
        assert_eq!(e.status, Some(429));
        assert!(e.message.starts_with("0x80072322: Number of requests"));
        assert_eq!(e.entity, "accounts");
    }

    #[test]
    fn path_encoding_keeps_key_punctuation() {
        assert_eq!(
            encode_path("accountnumber='A 1/2'"),
            "accountnumber='A%201%2F2'"
        );
        assert_eq!(
            encode_path("dataAreaId='usmf',CustomerAccount='Ü#1'"),
            "dataAreaId='usmf',CustomerAccount='%C3%9C%231'"
        );
        assert_eq!(
            encode_query("modifiedon ge 2026-05-01T00:00:00Z"),
            "modifiedon%20ge%202026-05-01T00:00:00Z"
        );
    }
}
