//! The HTTP surface of `dualwrite serve`: webhook endpoints wrapping the receivers, health and
//! status. Everything it does is in the receivers and the engine; this only translates HTTP.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use dualwrite_receivers::{
    Incomplete, SourceKind, WebhookRequest, WebhookResponse, credentials_ok, receive_incomplete,
    receive_oversized, receive_screened,
};
use http_body_util::BodyExt;

use crate::runtime::Shared;

/// What every handler gets.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub shared: Arc<Shared>,
}

/// The routes: `POST /webhooks/dataverse`, `POST /webhooks/fno`, `GET /healthz`, `GET /status`.
pub(crate) fn router(state: AppState) -> Router {
    // The webhook handlers read bodies themselves (`read_body`: at most the receivers' limit
    // kept, the rest drained), so every body too large gets the receivers' 413, counted;
    // axum's own limit is not used.
    Router::new()
        .route("/webhooks/dataverse", post(dataverse))
        .route("/webhooks/fno", post(fno))
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn dataverse(
    State(state): State<AppState>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    webhook(state, SourceKind::Dataverse, query, &headers, body).await
}

async fn fno(
    State(state): State<AppState>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    webhook(state, SourceKind::Fno, query, &headers, body).await
}

/// A webhook body as read by [`read_body`].
enum ReadBody {
    /// The whole body, within the limit.
    Whole(Vec<u8>),
    /// More than the limit: `seen` bytes were read and dropped; `ended` tells whether that
    /// was the whole body (else the connection is closed after the answer).
    TooLarge { seen: u64, ended: bool },
}

/// Bytes of a body too large that are still read (and dropped) so that the answer reaches the
/// sender: a socket closed with unread data is reset, and the sender may never see the 413.
/// A sender without the right credentials gets no more than twice the body limit read.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Reads the body, keeping at most `limit` bytes and reading at most `drain` bytes in all.
/// `Err` when the connection failed.
async fn read_body(mut body: Body, limit: usize, drain: u64) -> Result<ReadBody, axum::Error> {
    let announced =
        usize::try_from(axum::body::HttpBody::size_hint(&body).lower()).unwrap_or(limit);
    let mut kept: Vec<u8> = Vec::with_capacity(announced.min(limit));
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if seen <= limit as u64 {
            kept.extend_from_slice(&data);
        } else if seen > drain {
            return Ok(ReadBody::TooLarge { seen, ended: false });
        }
    }
    if seen > limit as u64 {
        return Ok(ReadBody::TooLarge { seen, ended: true });
    }
    Ok(ReadBody::Whole(kept))
}

async fn webhook(
    state: AppState,
    source: SourceKind,
    query: Vec<(String, String)>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let shared = &state.shared;
    let limit = shared.receiver.max_body_bytes;
    let mut request = WebhookRequest {
        source,
        query,
        headers: headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: Vec::new(),
    };
    let drain = if credentials_ok(&request, &shared.receiver) {
        DRAIN_LIMIT
    } else {
        (limit as u64).saturating_mul(2)
    };
    let timeout = shared.receiver.body_timeout;
    let body = match tokio::time::timeout(timeout, read_body(body, limit, drain)).await {
        Ok(Ok(body)) => body,
        Err(_) => {
            // A sender that stopped mid-body holds a connection (and a graceful shutdown) for
            // ever: answered 408 and closed. Nothing was accepted; the sender sends again.
            let answer = receive_incomplete(&request, Incomplete::TimedOut, &shared.receiver);
            return json_response(answer, true);
        }
        Ok(Err(_)) => {
            // The sender went away mid-body: there is likely nobody to answer; counted.
            let answer = receive_incomplete(&request, Incomplete::Broken, &shared.receiver);
            return json_response(answer, true);
        }
    };
    let mut close = false;
    let answer = match body {
        ReadBody::Whole(body) => {
            request.body = body;
            receive_screened(
                &request,
                &shared.receiver,
                shared.inbound.as_ref(),
                &shared.screen,
                Utc::now(),
            )
            .await
        }
        ReadBody::TooLarge { seen, ended } => {
            close = !ended;
            receive_oversized(&request, seen, ended, &shared.receiver)
        }
    };
    json_response(answer, close)
}

/// The HTTP form of a receiver's answer; `Connection: close` when `close`.
fn json_response(answer: WebhookResponse, close: bool) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        answer.body,
    )
        .into_response();
    if close {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

async fn status(State(state): State<AppState>) -> Response {
    let stats = state.shared.stats().await;
    axum::Json(stats).into_response()
}
