//! Plumbing shared by every simulator: the HTTP server loop, request/response types, service
//! protection (throttling), fault injection, request counters and small encoding helpers.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::entra::{EntraState, TokenProblem};

/// What can go wrong when starting or driving a simulator from a test.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The simulator could not bind its listener on 127.0.0.1.
    #[error(
        "could not bind the {sim} simulator to 127.0.0.1:0: {source}; check that the loopback interface is up"
    )]
    Bind {
        /// Which simulator.
        sim: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A table or entity named in a call is not defined.
    #[error(
        "{sim} simulator: table or entity `{name}` is not defined; call define_table/define_entity first"
    )]
    UnknownTable {
        /// Which simulator.
        sim: &'static str,
        /// The entity set / entity name given.
        name: String,
    },
    /// A simulated user action was rejected the way the API would reject it.
    #[error("{sim} simulator: {operation} on `{target}` failed with HTTP {status}: {message}")]
    Rejected {
        /// Which simulator.
        sim: &'static str,
        /// What was attempted (user_edit, user_create, user_delete).
        operation: &'static str,
        /// The entity set and key.
        target: String,
        /// The HTTP status the API would have answered.
        status: u16,
        /// The error message the API would have answered.
        message: String,
    },
}

/// One HTTP request as the simulators see it (also used for the parts of a `$batch`).
#[derive(Debug, Clone)]
pub(crate) struct SimRequest {
    pub method: Method,
    /// Path without query string, percent-encoded as received.
    pub path: String,
    /// Raw query string (without `?`), may be empty.
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl SimRequest {
    /// A header value as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTP response produced by a simulator.
#[derive(Debug, Clone)]
pub(crate) struct SimResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl SimResponse {
    pub fn empty(status: StatusCode) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn json(status: StatusCode, value: &serde_json::Value) -> Self {
        Self::json_bytes(status, serde_json::to_vec(value).unwrap_or_default())
    }

    /// A JSON answer whose body is already written.
    pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: vec![(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; odata.metadata=minimal"),
            )],
            body: Bytes::from(body),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }

    pub fn is_success(&self) -> bool {
        self.status.is_success() || self.status == StatusCode::NOT_MODIFIED
    }
}

/// What the request handler of a simulator decided to do with a request.
#[derive(Debug)]
pub(crate) enum Outcome {
    Respond(SimResponse),
    /// Close the connection without answering (fault injection).
    Drop,
}

/// Marker put in a response's extensions to make the server loop close the connection.
#[derive(Debug, Clone, Copy)]
struct DropConnection;

/// Implemented by each simulator's shared state: turns a request into an outcome.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, req: SimRequest) -> impl Future<Output = Outcome> + Send;
}

async fn route<H: Handler>(State(handler): State<Arc<H>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 * 1024 * 1024).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let sim_req = SimRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: parts.headers,
        body,
    };
    match handler.handle(sim_req).await {
        Outcome::Respond(r) => {
            let mut resp = Response::new(Body::from(r.body));
            *resp.status_mut() = r.status;
            let headers = resp.headers_mut();
            headers.insert("OData-Version", HeaderValue::from_static("4.0"));
            for (k, v) in r.headers {
                headers.append(k, v);
            }
            resp
        }
        Outcome::Drop => {
            let mut resp = Response::new(Body::empty());
            resp.extensions_mut().insert(DropConnection);
            resp
        }
    }
}

/// A running HTTP server; aborting the accept loop when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Binds 127.0.0.1:0 and serves `handler` until the returned [`Server`] is dropped.
pub(crate) async fn serve<H: Handler>(
    sim: &'static str,
    handler: Arc<H>,
) -> Result<Server, SimError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| SimError::Bind { sim, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SimError::Bind { sim, source })?;
    let router: Router = Router::new().fallback(route::<H>).with_state(handler);
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let mut router = router.clone();
                        async move {
                            let resp =
                                tower_service::Service::call(&mut router, req.map(Body::new))
                                    .await
                                    .unwrap_or_else(|e: Infallible| match e {});
                            if resp.extensions().get::<DropConnection>().is_some() {
                                return Err(std::io::Error::other(
                                    "fault injection: connection dropped",
                                ));
                            }
                            Ok(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Server { addr, accept })
}

/// Service protection limits, per user (bearer token or anonymous).
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Requests allowed per user per window; `None` = unlimited. A `$batch` counts as one
    /// request, whatever it holds: both services document combining operations into a batch
    /// as the way to avoid the number-of-requests limit (PA api-limits.md, FO
    /// service-protection-api-limits.md). Their execution-time limit, which a batch does count
    /// against, is not simulated.
    pub requests_per_window: Option<u32>,
    /// Length of the window (Dataverse: 300 s). The window slides, as Dataverse's does: a
    /// request is refused while `requests_per_window` requests were admitted in the `window`
    /// before it, and `Retry-After` says when the oldest of them leaves the window.
    pub window: Duration,
    /// Concurrent requests allowed per simulator; `None` = unlimited.
    pub max_concurrent: Option<u32>,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            requests_per_window: None,
            window: Duration::from_secs(300),
            max_concurrent: None,
        }
    }
}

/// One injected fault, consumed by one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status code (5xx) and an error body, without touching data.
    Status(u16),
    /// Close the connection without answering.
    DropConnection,
    /// Wait this long, then process the request normally.
    Delay(Duration),
}

/// Fault injection settings.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Faults applied, in order, to the next requests (one each).
    pub sequence: Vec<Fault>,
    /// Probability (0.0..=1.0) that a request is answered with 503.
    pub error_rate: f64,
    /// Probability (0.0..=1.0) that a request's connection is dropped.
    pub drop_rate: f64,
    /// Latency added to every request.
    pub latency: Duration,
}

/// Observable counters of a simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimStats {
    /// HTTP requests received (each `$batch` counts as one).
    pub requests: u64,
    /// Requests answered with 429.
    pub throttled: u64,
    /// Requests answered with 401.
    pub unauthorized: u64,
    /// Requests hit by an injected fault.
    pub faults: u64,
}

/// Mutable throttling / fault / counter state shared by the simulators.
#[derive(Debug, Default)]
pub(crate) struct Guard {
    pub requests: AtomicU64,
    pub throttled: AtomicU64,
    pub unauthorized: AtomicU64,
    pub faults: AtomicU64,
    in_flight: AtomicUsize,
    throttle: Mutex<ThrottleConfig>,
    fault_cfg: Mutex<FaultConfig>,
    fault_queue: Mutex<VecDeque<Fault>>,
    /// Per user, the instants of the requests admitted within the last window, oldest first.
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    forced_throttle: AtomicU64,
}

/// Why a request was refused by service protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Throttled {
    Rate { retry_after_secs: u64 },
    Concurrency,
}

/// Keeps the in-flight count right; released when dropped.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Guard {
    pub fn new(throttle: ThrottleConfig, faults: FaultConfig) -> Self {
        let g = Self::default();
        *g.fault_queue.lock().unwrap_or_else(|e| e.into_inner()) =
            faults.sequence.iter().cloned().collect();
        *g.fault_cfg.lock().unwrap_or_else(|e| e.into_inner()) = faults;
        *g.throttle.lock().unwrap_or_else(|e| e.into_inner()) = throttle;
        g
    }

    pub fn stats(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            unauthorized: self.unauthorized.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
        }
    }

    /// The service protection limits in force.
    pub fn throttle_config(&self) -> ThrottleConfig {
        self.throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_throttle(&self, cfg: ThrottleConfig) {
        *self.throttle.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
        self.windows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn set_faults(&self, cfg: FaultConfig) {
        *self.fault_queue.lock().unwrap_or_else(|e| e.into_inner()) =
            cfg.sequence.iter().cloned().collect();
        *self.fault_cfg.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.fault_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(faults);
    }

    /// Makes the next `n` requests answer 429 regardless of the configured limits.
    pub fn force_throttle(&self, n: u64) {
        self.forced_throttle.store(n, Ordering::Relaxed);
    }

    /// Applies fault injection: returns the fault to act on (after any delay has been slept).
    pub async fn fault(&self) -> Option<Fault> {
        let (latency, error_rate, drop_rate) = {
            let cfg = self.fault_cfg.lock().unwrap_or_else(|e| e.into_inner());
            (cfg.latency, cfg.error_rate, cfg.drop_rate)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let queued = self
            .fault_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let fault = match queued {
            Some(Fault::Delay(d)) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(d).await;
                return None;
            }
            Some(f) => Some(f),
            None if drop_rate > 0.0 && rand::random::<f64>() < drop_rate => {
                Some(Fault::DropConnection)
            }
            None if error_rate > 0.0 && rand::random::<f64>() < error_rate => {
                Some(Fault::Status(503))
            }
            None => None,
        };
        if fault.is_some() {
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
        fault
    }

    /// Counts the request in the user's window and the concurrency gauge (what
    /// [`Guard::screen`] does after faults and authentication; the tests' way in).
    #[cfg(test)]
    pub fn admit(&self, user: &str) -> Result<InFlight<'_>, Throttled> {
        let guard = self.enter();
        self.check(user)?;
        Ok(guard)
    }

    /// Counts a request in flight until the guard is dropped.
    fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Service protection for a request already counted in flight: forced throttling, the
    /// concurrency limit (every request in flight counts, including those being delayed), and
    /// the user's window.
    fn check(&self, user: &str) -> Result<(), Throttled> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let forced = self.forced_throttle.load(Ordering::Relaxed);
        if forced > 0 {
            self.forced_throttle.store(forced - 1, Ordering::Relaxed);
            self.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(Throttled::Rate {
                retry_after_secs: 1,
            });
        }
        let cfg = self
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(max) = cfg.max_concurrent
            && in_flight > max as usize
        {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(Throttled::Concurrency);
        }
        if let Some(limit) = cfg.requests_per_window {
            self.count_in_window(user, limit, cfg.window, Instant::now())?;
        }
        Ok(())
    }

    /// Admits a request of `user` at `now` into the sliding window, or refuses it with the
    /// time until the oldest admitted request leaves the window.
    fn count_in_window(
        &self,
        user: &str,
        limit: u32,
        window: Duration,
        now: Instant,
    ) -> Result<(), Throttled> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let admitted = windows.entry(user.to_owned()).or_default();
        while admitted
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= window)
        {
            admitted.pop_front();
        }
        if admitted.len() >= limit as usize {
            let oldest = admitted.front().copied().unwrap_or(now);
            let left = window.saturating_sub(now.saturating_duration_since(oldest));
            self.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(Throttled::Rate {
                retry_after_secs: left.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        admitted.push_back(now);
        Ok(())
    }
}

/// Why [`Guard::screen`] turned a request away; each simulator answers it in its API's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Fault injection: close the connection without answering.
    Drop,
    /// Fault injection: answer with this status.
    Fault(StatusCode),
    /// Authentication failed: no bearer token (`None`) or one the Entra simulator rejects.
    Unauthorized(Option<TokenProblem>),
    /// Service protection refused the request.
    Throttled(Throttled),
}

impl Guard {
    /// What every simulator does before it looks at a request, in the real services' order:
    /// counts it, applies fault injection, checks the bearer token (when `auth` is set; tokens
    /// must be issued for `base`) and applies service protection to the token's client. The
    /// in-flight guard it returns must be held while the request runs.
    pub async fn screen(
        &self,
        req: &SimRequest,
        auth: Option<&EntraState>,
        base: &str,
    ) -> Result<InFlight<'_>, Refusal> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        // In flight from arrival: a request delayed by injected latency is as busy as a slow
        // one, and counts against the concurrency limit of those arriving meanwhile.
        let guard = self.enter();
        match self.fault().await {
            Some(Fault::DropConnection) => return Err(Refusal::Drop),
            Some(Fault::Status(s)) => {
                return Err(Refusal::Fault(
                    StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                ));
            }
            _ => {}
        }
        let mut user = "anonymous".to_owned();
        if let Some(auth) = auth {
            match bearer(req).map(|t| auth.validate(t, base)) {
                Some(Ok(client)) => user = client,
                problem => {
                    self.unauthorized.fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::Unauthorized(problem.and_then(Result::err)));
                }
            }
        }
        self.check(&user).map_err(Refusal::Throttled)?;
        Ok(guard)
    }
}

/// The answer to a simulated user action (`operation` on `entity_set(key)`): the JSON body on
/// success, [`SimError::Rejected`] with the API's error message otherwise.
pub(crate) fn user_op_result(
    sim: &'static str,
    operation: &'static str,
    entity_set: &str,
    key: Option<&str>,
    resp: &SimResponse,
) -> Result<serde_json::Value, SimError> {
    if !resp.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&resp.body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(SimError::Rejected {
            sim,
            operation,
            target: format!("{entity_set}({})", key.unwrap_or("")),
            status: resp.status.as_u16(),
            message,
        });
    }
    Ok(serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null))
}

/// A new random GUID (version 4), lower case.
pub(crate) fn new_guid() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: u128 = rand::random();
    b = (b & !(0xF << 76)) | (0x4 << 76);
    b = (b & !(0x3 << 62)) | (0x2 << 62);
    let mut out = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        let nibble = (b >> (124 - 4 * i)) & 0xF;
        out.push(char::from(HEX[nibble as usize]));
    }
    out
}

/// True if `s` looks like a GUID (8-4-4-4-12 hex digits), braces allowed.
pub(crate) fn is_guid(s: &str) -> bool {
    let s = s.trim_start_matches('{').trim_end_matches('}');
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Normalises a GUID to lower case without braces.
pub(crate) fn norm_guid(s: &str) -> String {
    s.trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase()
}

/// ISO-8601 UTC with second precision, as Dataverse returns it.
pub(crate) fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// WCF JSON date, `/Date(ms)/`.
pub(crate) fn wcf_date(t: DateTime<Utc>) -> String {
    format!("/Date({})/", t.timestamp_millis())
}

/// Percent-decodes a URL component (`+` stays `+`).
pub(crate) fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Percent-encodes a value for use inside a query string.
pub(crate) fn pct_encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Splits a raw query string into decoded `(name, value)` pairs (`+` decodes to a space).
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                pct_decode(&k.replace('+', " ")),
                pct_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(req: &SimRequest) -> Option<&str> {
    let h = req.header("authorization")?;
    let (scheme, token) = h.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Splits a `Prefer` header into its comma-separated preferences.
pub(crate) fn prefers(req: &SimRequest) -> Vec<String> {
    req.headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_v4_and_recognised() {
        let g = new_guid();
        assert!(is_guid(&g), "{g}");
        assert_eq!(&g[14..15], "4");
        assert!(matches!(&g[19..20], "8" | "9" | "a" | "b"), "{g}");
        assert_eq!(g, g.to_lowercase());
        assert_ne!(new_guid(), g);
        assert!(is_guid("{6D81597F-0F9F-E711-8122-000D3AA2331C}"));
        assert!(!is_guid("not-a-guid"));
    }

    #[test]
    fn query_strings_decode() {
        let q = parse_query("$filter=name%20eq%20%27a%27&$select=a,b&x=1+2");
        assert_eq!(q[0], ("$filter".into(), "name eq 'a'".into()));
        assert_eq!(q[1], ("$select".into(), "a,b".into()));
        assert_eq!(q[2], ("x".into(), "1 2".into()));
    }

    #[test]
    fn rate_limit_counts_per_user() {
        let g = Guard::new(
            ThrottleConfig {
                requests_per_window: Some(2),
                window: Duration::from_secs(60),
                max_concurrent: None,
            },
            FaultConfig::default(),
        );
        assert!(g.admit("a").is_ok());
        assert!(g.admit("a").is_ok());
        assert!(
            matches!(g.admit("a"), Err(Throttled::Rate { retry_after_secs }) if retry_after_secs >= 59)
        );
        assert!(g.admit("b").is_ok());
        assert_eq!(g.stats().throttled, 1);
    }

    #[test]
    fn the_window_slides_as_dataverse_s_does() {
        // 2 requests per 10 s: admitted at 0 s and 6 s. At 11 s the first has left the window
        // and one more is admitted; a fixed window restarted at 10 s would admit two.
        let g = Guard::new(ThrottleConfig::default(), FaultConfig::default());
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(g.count_in_window("a", 2, window, at(0)).is_ok());
        assert!(g.count_in_window("a", 2, window, at(6)).is_ok());
        assert_eq!(
            g.count_in_window("a", 2, window, at(7)),
            Err(Throttled::Rate {
                retry_after_secs: 3
            }),
            "the request of 0 s leaves at 10 s"
        );
        assert!(g.count_in_window("a", 2, window, at(11)).is_ok());
        assert_eq!(
            g.count_in_window("a", 2, window, at(12)),
            Err(Throttled::Rate {
                retry_after_secs: 4
            }),
            "the request of 6 s leaves at 16 s"
        );
        assert!(g.count_in_window("a", 2, window, at(16)).is_ok());
        assert_eq!(g.stats().throttled, 2);
    }

    #[tokio::test]
    async fn requests_delayed_by_injected_latency_count_against_the_concurrency_limit() {
        let g = std::sync::Arc::new(Guard::new(
            ThrottleConfig {
                requests_per_window: None,
                window: Duration::from_secs(60),
                max_concurrent: Some(2),
            },
            FaultConfig {
                latency: Duration::from_millis(200),
                ..FaultConfig::default()
            },
        ));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let g = g.clone();
            tasks.push(tokio::spawn(async move {
                g.screen(&request(), None, "").await.map(drop)
            }));
        }
        let mut refused = 0;
        for t in tasks {
            if let Err(Refusal::Throttled(Throttled::Concurrency)) = t.await.unwrap() {
                refused += 1;
            }
        }
        // All six arrive together and are in flight during the latency: at most two pass.
        assert!(refused >= 4, "{refused} refused");
        assert_eq!(
            g.in_flight.load(Ordering::Relaxed),
            0,
            "every guard released"
        );
    }

    fn request() -> SimRequest {
        SimRequest {
            method: Method::GET,
            path: "/".into(),
            query: String::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn screen_applies_faults_then_service_protection() {
        let g = Guard::new(
            ThrottleConfig {
                requests_per_window: Some(1),
                window: Duration::from_secs(60),
                max_concurrent: None,
            },
            FaultConfig {
                sequence: vec![Fault::Status(502), Fault::DropConnection],
                ..FaultConfig::default()
            },
        );
        let req = request();
        assert_eq!(
            g.screen(&req, None, "").await.err(),
            Some(Refusal::Fault(StatusCode::BAD_GATEWAY))
        );
        assert_eq!(g.screen(&req, None, "").await.err(), Some(Refusal::Drop));
        assert!(g.screen(&req, None, "").await.is_ok());
        assert!(matches!(
            g.screen(&req, None, "").await.err(),
            Some(Refusal::Throttled(Throttled::Rate { .. }))
        ));
        let stats = g.stats();
        assert_eq!((stats.requests, stats.faults, stats.throttled), (4, 2, 1));
    }
}
