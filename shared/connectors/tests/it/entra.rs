//! Tokens from EntraSim: fetched once per resource and cached, refreshed once after a 401.

use dualwrite_core::ports::{Connector, RecordRef};

use crate::harness::{Env, account_key};

#[tokio::test]
async fn token_is_fetched_once_and_cached_across_calls() {
    let env = Env::start().await;
    for n in 0..5 {
        let missing = env
            .dataverse
            .read(
                "accounts",
                &RecordRef::Key(account_key(&format!("NONE-{n}"), "USMF")),
            )
            .await
            .expect("read answers");
        assert_eq!(missing, None);
    }
    assert_eq!(env.entra.tokens_issued(), 1);
    assert_eq!(env.token_stats.snapshot().token_fetches, 1);
    // F&O is another resource: it needs a token of its own, once.
    for n in 0..3 {
        let key = crate::harness::customer_key("usmf", &format!("NONE-{n}"));
        let missing = env
            .erp
            .read("CustomersV3", &RecordRef::Key(key))
            .await
            .expect("read answers");
        assert_eq!(missing, None);
    }
    assert_eq!(env.entra.tokens_issued(), 2);
    assert_eq!(env.token_stats.snapshot().token_fetches, 2);
    assert_eq!(
        env.fno_stats.snapshot().requests,
        3,
        "one request per read, no refresh"
    );
    assert_eq!(env.dv.stats().unauthorized, 0);
    assert_eq!(env.fno.stats().unauthorized, 0);
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_call_succeeds() {
    let env = Env::start().await;
    let key = RecordRef::Key(account_key("A-1", "USMF"));
    env.dataverse
        .read("accounts", &key)
        .await
        .expect("first read");
    assert_eq!(env.entra.tokens_issued(), 1);

    env.entra.expire_all_tokens();
    let after = env
        .dataverse
        .read("accounts", &key)
        .await
        .expect("read after expiry");
    assert_eq!(after, None);
    assert_eq!(
        env.dv.stats().unauthorized,
        1,
        "the stale token was refused once"
    );
    assert_eq!(env.dv_stats.snapshot().token_refreshes, 1);
    assert_eq!(env.entra.tokens_issued(), 2);

    // The refreshed token is cached again.
    env.dataverse
        .read("accounts", &key)
        .await
        .expect("third read");
    assert_eq!(env.entra.tokens_issued(), 2);
    assert_eq!(env.dv.stats().unauthorized, 1);
}

#[tokio::test]
async fn a_wrong_secret_is_unauthorized_and_names_the_endpoint() {
    let env = Env::start().await;
    let mut config = dualwrite_connectors::EntraConfig::new(
        crate::harness::TENANT,
        crate::harness::CLIENT_ID,
        dualwrite_connectors::Secret::new("wrong"),
    );
    config.authority = env.entra.base_url();
    let stats = std::sync::Arc::new(dualwrite_connectors::ConnectorStats::default());
    let provider = dualwrite_connectors::EntraTokenProvider::new(config, stats).unwrap();
    let err = dualwrite_connectors::TokenSource::token(&provider, "http://x/.default")
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("/oauth2/v2.0/token"), "{message}");
    let connector_error = err.into_connector_error(dualwrite_core::Side::Crm, "accounts");
    assert_eq!(
        connector_error.kind,
        dualwrite_core::ports::ConnectorErrorKind::Unauthorized
    );
}
