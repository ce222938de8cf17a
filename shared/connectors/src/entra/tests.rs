//! Tests of the token provider against a local token endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;

use super::*;
use crate::stats::ConnectorStats;
use crate::test_server::serve;

#[derive(Default)]
struct TokenEndpoint {
    calls: AtomicU64,
    bodies: Mutex<Vec<String>>,
    expires_in: AtomicU64,
    refuse: std::sync::atomic::AtomicBool,
}

async fn token_handler(State(s): State<Arc<TokenEndpoint>>, body: String) -> (StatusCode, String) {
    let n = s.calls.fetch_add(1, Ordering::SeqCst) + 1;
    s.bodies.lock().unwrap().push(body);
    // Slow enough that concurrent callers overlap.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if s.refuse.load(Ordering::SeqCst) {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#.into(),
        );
    }
    let expires = s.expires_in.load(Ordering::SeqCst);
    (
        StatusCode::OK,
        format!(r#"{{"token_type":"Bearer","expires_in":{expires},"access_token":"tok-{n}"}}"#),
    )
}

async fn provider(
    expires_in: u64,
) -> (Arc<TokenEndpoint>, EntraTokenProvider, Arc<ConnectorStats>) {
    let state = Arc::new(TokenEndpoint::default());
    state.expires_in.store(expires_in, Ordering::SeqCst);
    let router = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token_handler))
        .with_state(state.clone());
    let base = serve(router).await;
    let mut config = EntraConfig::new("contoso", "app-1", Secret::new("s3cr&t"));
    config.authority = base;
    let stats = Arc::new(ConnectorStats::default());
    (
        state,
        EntraTokenProvider::new(config, stats.clone()).unwrap(),
        stats,
    )
}

#[tokio::test]
async fn form_body_is_the_client_credentials_grant() {
    let (state, p, _) = provider(3599).await;
    let token = p
        .token("https://org.crm.dynamics.com/.default")
        .await
        .unwrap();
    assert_eq!(token.expose(), "tok-1");
    assert_eq!(
        state.bodies.lock().unwrap()[0],
        "client_id=app-1&scope=https%3A%2F%2Forg.crm.dynamics.com%2F.default&client_secret=s3cr%26t&grant_type=client_credentials"
    );
}

#[tokio::test]
async fn tokens_are_cached_per_scope() {
    let (state, p, stats) = provider(3599).await;
    let a1 = p.token("https://a/.default").await.unwrap();
    let a2 = p.token("https://a/.default").await.unwrap();
    let b = p.token("https://b/.default").await.unwrap();
    assert_eq!(a1, a2);
    assert_ne!(a1, b);
    assert_eq!(state.calls.load(Ordering::SeqCst), 2);
    assert_eq!(stats.snapshot().token_fetches, 2);
}

#[tokio::test]
async fn concurrent_callers_share_one_refresh() {
    let (state, p, _) = provider(3599).await;
    let p = Arc::new(p);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            p.token("https://a/.default").await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().expose(), "tok-1");
    }
    assert_eq!(state.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    // A 2 s token is refreshed once half of it is gone (margin = min(5 min, lifetime / 2)).
    let (state, p, _) = provider(2).await;
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-1");
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-2");
    assert_eq!(state.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn invalidate_forces_a_new_token() {
    let (state, p, _) = provider(3599).await;
    let refused = p.token("s").await.unwrap();
    assert_eq!(refused.expose(), "tok-1");
    p.invalidate("s", &refused);
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-2");
    assert_eq!(state.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_late_401_keeps_the_token_fetched_since() {
    // A request sent with an older token is refused after another caller fetched a new one:
    // the new token stays cached.
    let (state, p, _) = provider(3599).await;
    let first = p.token("s").await.unwrap();
    p.invalidate("s", &first);
    let second = p.token("s").await.unwrap();
    assert_eq!(second.expose(), "tok-2");
    p.invalidate("s", &first);
    assert_eq!(p.token("s").await.unwrap(), second);
    assert_eq!(state.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_fetch_is_shared_by_the_callers_that_waited_for_it() {
    let (state, p, stats) = provider(3599).await;
    state.refuse.store(true, Ordering::SeqCst);
    let p = Arc::new(p);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let p = p.clone();
        tasks.push(tokio::spawn(
            async move { p.token("https://a/.default").await },
        ));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("AADSTS7000215"), "{err}");
    }
    assert_eq!(state.calls.load(Ordering::SeqCst), 1);
    assert_eq!(stats.snapshot().token_fetches, 1);
}

#[tokio::test]
async fn a_failure_is_held_for_a_moment_then_the_endpoint_is_asked_again() {
    let (state, p, _) = provider(3599).await;
    state.refuse.store(true, Ordering::SeqCst);
    assert!(p.token("s").await.is_err());
    assert!(p.token("s").await.is_err());
    assert_eq!(
        state.calls.load(Ordering::SeqCst),
        1,
        "asked again within the hold"
    );
    state.refuse.store(false, Ordering::SeqCst);
    tokio::time::sleep(FAILURE_HOLD + Duration::from_millis(100)).await;
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-2");
    assert_eq!(state.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_token_still_valid_is_used_while_its_refresh_fails() {
    // A 2 s token: refreshed after 1 s, usable until 1.8 s (a tenth of it before expiry).
    let (state, p, _) = provider(2).await;
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    state.refuse.store(true, Ordering::SeqCst);
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-1");
    assert_eq!(p.token("s").await.unwrap().expose(), "tok-1");
    assert_eq!(state.calls.load(Ordering::SeqCst), 2, "one refresh attempt");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = p.token("s").await.unwrap_err();
    assert!(err.to_string().contains("AADSTS7000215"), "{err}");
}

#[tokio::test]
async fn refusal_names_endpoint_scope_and_server_message() {
    let (state, p, _) = provider(3599).await;
    state.refuse.store(true, Ordering::SeqCst);
    let err = p.token("https://a/.default").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/contoso/oauth2/v2.0/token"), "{text}");
    assert!(text.contains("https://a/.default"), "{text}");
    assert!(text.contains("AADSTS7000215"), "{text}");
    let ce = err.into_connector_error(dualwrite_core::Side::Crm, "accounts");
    assert_eq!(
        ce.kind,
        dualwrite_core::ports::ConnectorErrorKind::Unauthorized
    );
}

#[test]
fn secrets_are_redacted_in_debug_output() {
    let config = EntraConfig::new("t", "c", Secret::new("hunter2"));
    let shown = format!("{config:?} {}", config.client_secret);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redacted"));
}

#[test]
fn expiry_margin_is_a_tenth_at_most_thirty_seconds() {
    assert_eq!(
        client::expiry_margin(Duration::from_secs(3600)),
        Duration::from_secs(30)
    );
    assert_eq!(
        client::expiry_margin(Duration::from_secs(2)),
        Duration::from_millis(200)
    );
}

#[test]
fn refresh_margin_is_a_tenth_or_five_minutes() {
    assert_eq!(
        client::refresh_margin(Duration::from_secs(3600)),
        Duration::from_secs(360)
    );
    assert_eq!(
        client::refresh_margin(Duration::from_secs(1800)),
        Duration::from_secs(300)
    );
    assert_eq!(
        client::refresh_margin(Duration::from_secs(60)),
        Duration::from_secs(30)
    );
}

#[test]
fn default_scope_keeps_the_origin() {
    assert_eq!(
        default_scope("https://org.crm.dynamics.com/api/data/v9.2"),
        "https://org.crm.dynamics.com/.default"
    );
    assert_eq!(
        default_scope("http://127.0.0.1:8080/data"),
        "http://127.0.0.1:8080/.default"
    );
    assert_eq!(
        default_scope("https://x.operations.dynamics.com"),
        "https://x.operations.dynamics.com/.default"
    );
}
