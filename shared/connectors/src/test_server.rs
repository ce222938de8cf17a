//! Test helpers (unit tests only): serve an axum router on a free local port, and a scripted
//! server that records every request and answers from a queue of canned responses.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;

/// Serves `router` on `127.0.0.1:<free port>` in the background and returns its base URL.
pub(crate) async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a local port");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("test server runs")
    });
    format!("http://{addr}")
}

/// A request as the scripted server received it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A canned answer.
#[derive(Debug, Clone)]
pub(crate) struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Canned {
    pub fn json(status: u16, body: &str) -> Self {
        Canned {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
        }
    }
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Records requests and answers them in order from `script` (404 when it runs out).
#[derive(Debug, Default)]
pub(crate) struct Scripted {
    pub seen: Mutex<Vec<Seen>>,
    pub script: Mutex<VecDeque<Canned>>,
}

impl Scripted {
    pub fn push(&self, c: Canned) {
        self.script.lock().unwrap().push_back(c);
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn answer(State(s): State<Arc<Scripted>>, req: Request) -> Response {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    s.seen.lock().unwrap().push(Seen {
        method,
        uri,
        headers,
        body: String::from_utf8_lossy(&body).into(),
    });
    let canned = s.script.lock().unwrap().pop_front().unwrap_or(Canned::json(
        404,
        r#"{"error":{"code":"0x80040217","message":"script exhausted"}}"#,
    ));
    let mut response = Response::builder().status(StatusCode::from_u16(canned.status).unwrap());
    for (n, v) in &canned.headers {
        response = response.header(n.as_str(), v.as_str());
    }
    response.body(Body::from(canned.body)).unwrap()
}

/// Starts a scripted server; returns it and its base URL.
pub(crate) async fn scripted() -> (Arc<Scripted>, String) {
    let state = Arc::new(Scripted::default());
    let router = Router::new().fallback(answer).with_state(state.clone());
    (state, serve(router).await)
}
