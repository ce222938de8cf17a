//! The HTTP surface of `dualwrite serve`: webhook endpoints wrapping the receivers, health and
//! status. Everything it does is in the receivers and the engine; this only translates HTTP.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use dualwrite_receivers::{SourceKind, WebhookRequest, receive_screened};

use crate::runtime::Shared;

/// What every handler gets.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub shared: Arc<Shared>,
}

/// The routes: `POST /webhooks/dataverse`, `POST /webhooks/fno`, `GET /healthz`, `GET /status`.
pub(crate) fn router(state: AppState) -> Router {
    // The receivers answer 413 themselves with their own message; axum's own limit only
    // guards against bodies far above that.
    let limit = state.shared.receiver.max_body_bytes.saturating_mul(2);
    Router::new()
        .route("/webhooks/dataverse", post(dataverse))
        .route("/webhooks/fno", post(fno))
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn dataverse(
    State(state): State<AppState>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    webhook(state, SourceKind::Dataverse, query, &headers, body).await
}

async fn fno(
    State(state): State<AppState>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    webhook(state, SourceKind::Fno, query, &headers, body).await
}

async fn webhook(
    state: AppState,
    source: SourceKind,
    query: Vec<(String, String)>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let request = WebhookRequest {
        source,
        query,
        headers: headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
    };
    let shared = &state.shared;
    let answer = receive_screened(
        &request,
        &shared.receiver,
        shared.inbound.as_ref(),
        &shared.screen,
        Utc::now(),
    )
    .await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        answer.body,
    )
        .into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    let stats = state.shared.stats().await;
    axum::Json(stats).into_response()
}
