//! Integration tests of the runtime: configuration validation, the HTTP surface with bad and
//! good webhooks, shutdown and restart over the same database, and the demo scenario; the
//! end-to-end tests against the simulators are in the modules below.

use std::collections::BTreeMap;
use std::path::Path;

mod business_events;
mod catch_up;
mod echo_hash;
mod harness;
mod manual_conflict;
mod serve_http;

use dualwrite_runtime::demo::{DemoOptions, run_demo};
use dualwrite_runtime::{Config, ConfigError, Runtime};

const CONTACT_UPDATE: &str = include_str!("fixtures/dataverse-webhook-contact-update.json");

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "T_SECRET".to_string(),
            "client-secret-value-123".to_string(),
        ),
        ("T_DV_HOOK".to_string(), "dv-hook-secret-456".to_string()),
        ("T_FNO_HOOK".to_string(), "fno-hook-secret-789".to_string()),
    ])
}

/// A configuration whose environments are not running: enough for the receivers.
fn yaml(db: &str) -> String {
    let enabled: Vec<String> = dualwrite_runtime::demo::demo_maps(&["cds-contacts-v2-contacts"])
        .into_iter()
        .map(|m| m.name)
        .collect();
    let enabled = enabled.join(", ");
    format!(
        "listen: 127.0.0.1:0\ndb: {db}\nmaps:\n  enabled: [{enabled}]\n\
         dataverse:\n  url: http://127.0.0.1:9\n  tenant: t\n  client_id: c\n  client_secret_env: T_SECRET\n  token_url: http://127.0.0.1:9\n\
         fno:\n  url: http://127.0.0.1:9\n  tenant: t\n  client_id: c\n  client_secret_env: T_SECRET\n  token_url: http://127.0.0.1:9\n\
         webhooks:\n  dataverse:\n    secret_env: T_DV_HOOK\n  fno:\n    secret_env: T_FNO_HOOK\n\
         worker:\n  concurrency: 1\n  visibility_timeout: 5\n  max_attempts: 50\n"
    )
}

fn config(dir: &Path) -> Config {
    Config::parse(&yaml("state.db"), "test.yaml", dir, &env()).expect("valid configuration")
}

#[test]
fn every_config_problem_is_reported_at_once() {
    let text = "listen: nowhere\ndb: x.db\nmaps:\n  enabled: [customers-v3-accounts, no-such-map]\n\
        dataverse:\n  url: ftp://x\n  tenant: t\n  client_id: c\n  client_secret_env: UNSET_VAR\n\
        fno:\n  url: https://f\n  tenant: t\n  client_id: c\n  client_secret_env: T_SECRET\n  client_secret_file: s.txt\n\
        webhooks:\n  dataverse:\n    secret_env: T_DV_HOOK\n  fno: {}\n\
        worker:\n  concurrency: 0\n  idempotency_hours: 0\n\
        batching:\n  max_in_flight: 0\n  dataverse:\n    max_batch: 1001\n\
        scheduler:\n  catch_up: \"every minute\"\n";
    let err = Config::parse(text, "bad.yaml", Path::new("."), &env()).unwrap_err();
    let ConfigError::Invalid { problems, .. } = &err else {
        panic!("expected Invalid, got {err}");
    };
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "listen",
        "maps.enabled[1]",
        "maps.enabled",
        "dataverse.url",
        "dataverse.client_secret_env",
        "fno",
        "webhooks.fno",
        "worker.concurrency",
        "worker.idempotency_hours",
        "batching.max_in_flight",
        "batching.dataverse.max_batch",
        "scheduler.catch_up",
    ] {
        assert!(paths.contains(&want), "no problem at {want}: {paths:?}");
    }
    assert_eq!(
        paths
            .iter()
            .filter(|p| **p == "batching.max_in_flight")
            .count(),
        1,
        "a shared value is reported once, not once per environment"
    );
    // Each problem names the line of its key (a missing key: its nearest enclosing one).
    let line = |path: &str| problems.iter().find(|p| p.path == path).unwrap().line;
    for (path, want) in [
        ("listen", 1),
        ("maps.enabled[1]", 4),
        ("maps.enabled", 4),
        ("dataverse.url", 6),
        ("dataverse.client_secret_env", 9),
        ("fno", 10),
        ("webhooks.fno", 19),
        ("worker.concurrency", 21),
        ("worker.idempotency_hours", 22),
        ("batching.max_in_flight", 24),
        ("batching.dataverse.max_batch", 26),
        ("scheduler.catch_up", 28),
    ] {
        assert_eq!(line(path), Some(want), "line of {path}");
    }
    let text = err.to_string();
    assert!(text.contains("bad.yaml"));
    assert!(
        text.contains("  - bad.yaml:26: batching.dataverse.max_batch: "),
        "{text}"
    );
    assert!(text.contains("customers-v3-accounts` depends on"), "{text}");
    assert!(text.contains("UNSET_VAR"));
}

#[test]
fn the_catch_up_overlap_defaults_to_two_minutes_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let with = |extra: &str| {
        format!(
            "{}scheduler:\n  catch_up: \"0 */5 * * * *\"\n{extra}",
            yaml("state.db")
        )
    };
    let c = Config::parse(&with(""), "t.yaml", dir.path(), &env()).expect("valid");
    assert_eq!(
        c.catch_up.unwrap().overlap,
        std::time::Duration::from_secs(120)
    );
    let c = Config::parse(&with("  overlap: 0\n"), "t.yaml", dir.path(), &env()).expect("valid");
    assert_eq!(c.catch_up.unwrap().overlap, std::time::Duration::ZERO);
    let err = Config::parse(&with("  overlap: 90000\n"), "t.yaml", dir.path(), &env()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("scheduler.overlap"), "{text}");
    assert!(text.contains("0 to 86400 seconds"), "{text}");
}

#[test]
fn business_event_routes_are_checked_against_the_enabled_maps() {
    let dir = tempfile::tempdir().unwrap();
    let with = |routes: &str| {
        yaml("state.db").replace(
            "    secret_env: T_FNO_HOOK\n",
            &format!("    secret_env: T_FNO_HOOK\n    business_events:\n{routes}"),
        )
    };
    // A route to an enabled map's F&O entity, spelt as the entity's own name.
    let good = with(
        "      ContactChangedBusinessEvent:\n        entity: cdscontactsv2\n        key: { ContactPersonId: PersonId }\n",
    );
    let c = Config::parse(&good, "t.yaml", dir.path(), &env()).expect("valid");
    let route = &c.fno_business_events["ContactChangedBusinessEvent"];
    assert_eq!(route.entity, "CDSContactsV2");
    assert_eq!(
        route.key,
        vec![("ContactPersonId".to_string(), "PersonId".to_string())]
    );
    assert!(
        config(dir.path()).fno_business_events.is_empty(),
        "none by default"
    );

    // Every faulty route is reported, each at its own key path.
    let bad = with(concat!(
        "      NoSuchEntityEvent:\n        entity: SalesInvoiceHeadersV2\n        key: { InvoiceNumber: InvoiceId }\n",
        "      WrongKeyEvent:\n        entity: CDSContactsV2\n        key: { PersonnelNumber: PersonId }\n",
    ))
    .replace(
        "    secret_env: T_DV_HOOK\n",
        "    secret_env: T_DV_HOOK\n    business_events:\n      X:\n        entity: CDSContactsV2\n        key: { ContactPersonId: P }\n",
    );
    let err = Config::parse(&bad, "bad.yaml", dir.path(), &env()).unwrap_err();
    let ConfigError::Invalid { problems, .. } = &err else {
        panic!("expected Invalid, got {err}");
    };
    let at = |path: &str| {
        problems
            .iter()
            .find(|p| p.path == path)
            .map(|p| p.message.clone())
            .unwrap_or_else(|| panic!("no problem at {path}: {problems:?}"))
    };
    let entity = at("webhooks.fno.business_events.NoSuchEntityEvent.entity");
    assert!(
        entity.contains("SalesInvoiceHeadersV2") && entity.contains("CDSContactsV2"),
        "{entity}"
    );
    let key = at("webhooks.fno.business_events.WrongKeyEvent.key");
    assert!(
        key.contains("lacks ContactPersonId") && key.contains("PersonnelNumber"),
        "{key}"
    );
    at("webhooks.dataverse.business_events");
}

#[test]
fn processed_event_ids_are_remembered_for_a_week_unless_configured() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        config(dir.path()).worker.idempotency_window,
        std::time::Duration::from_secs(7 * 24 * 3_600)
    );
    let two_days = yaml("state.db").replace(
        "  max_attempts: 50\n",
        "  max_attempts: 50\n  idempotency_hours: 48\n",
    );
    let c = Config::parse(&two_days, "t.yaml", dir.path(), &env()).expect("valid");
    assert_eq!(
        c.worker.idempotency_window,
        std::time::Duration::from_secs(48 * 3_600)
    );
}

#[test]
fn post_image_all_columns_is_a_dataverse_setting_off_by_default() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!config(dir.path()).dataverse_post_image_all_columns);
    let on = yaml("state.db").replace(
        "    secret_env: T_DV_HOOK\n",
        "    secret_env: T_DV_HOOK\n    post_image_all_columns: true\n",
    );
    let c = Config::parse(&on, "t.yaml", dir.path(), &env()).expect("valid");
    assert!(c.dataverse_post_image_all_columns);

    let misplaced = yaml("state.db").replace(
        "    secret_env: T_FNO_HOOK\n",
        "    secret_env: T_FNO_HOOK\n    post_image_all_columns: true\n",
    );
    let err = Config::parse(&misplaced, "t.yaml", dir.path(), &env()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("webhooks.fno.post_image_all_columns") && text.contains("Dataverse"),
        "{text}"
    );
}

#[test]
fn batching_is_on_by_default_and_set_per_environment_or_for_both() {
    use dualwrite_connectors::CoalescingConfig;
    let dir = tempfile::tempdir().unwrap();
    let defaults = config(dir.path()).batching;
    let default = CoalescingConfig {
        max_in_flight: 4,
        max_batch: 10,
    };
    assert_eq!(defaults.dataverse, Some(default));
    assert_eq!(defaults.fno, Some(default));

    let text = yaml("state.db")
        + "batching:\n  max_in_flight: 2\n  max_batch: 50\n  dataverse:\n    enabled: false\n  fno:\n    max_batch: 2000\n";
    let c = Config::parse(&text, "t.yaml", dir.path(), &env()).expect("valid");
    assert_eq!(c.batching.dataverse, None, "off for Dataverse only");
    assert_eq!(
        c.batching.fno,
        Some(CoalescingConfig {
            max_in_flight: 2,
            max_batch: 2000
        })
    );
    let off = yaml("state.db") + "batching:\n  enabled: false\n";
    let c = Config::parse(&off, "t.yaml", dir.path(), &env()).expect("valid");
    assert_eq!((c.batching.dataverse, c.batching.fno), (None, None));

    // 2,000 suits F&O but not Dataverse: the shared key is named, with Dataverse's limit.
    let text = yaml("state.db") + "batching:\n  max_batch: 2000\n  fno:\n    max_in_flight: 60\n";
    let err = Config::parse(&text, "t.yaml", dir.path(), &env()).unwrap_err();
    let ConfigError::Invalid { problems, .. } = &err else {
        panic!("expected Invalid, got {err}");
    };
    let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(
        shown[0].starts_with("batching.max_batch: is 2000; Dataverse takes at most 1000"),
        "{shown:#?}"
    );
    assert!(shown[1].starts_with("batching.fno.max_in_flight: is 60; use 1 to 52"));

    let typo = yaml("state.db") + "batching:\n  max_inflight: 2\n";
    let err = Config::parse(&typo, "t.yaml", dir.path(), &env()).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(err.to_string().contains("max_inflight"), "{err}");
}

#[test]
fn unknown_keys_are_refused_with_their_name() {
    let text = yaml("a.db").replace("db: a.db", "db: a.db\ndbb: typo");
    let err = Config::parse(&text, "t.yaml", Path::new("."), &env()).unwrap_err();
    assert!(
        matches!(err, ConfigError::Syntax { line: Some(3), .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("dbb"), "{err}");
    assert!(err.to_string().starts_with("t.yaml:3: "), "{err}");
    let broken = yaml("a.db").replace("worker:\n", "worker:\n   - [\n");
    let err = Config::parse(&broken, "t.yaml", Path::new("."), &env()).unwrap_err();
    let ConfigError::Syntax {
        line: Some(line), ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert!(
        err.to_string()
            .starts_with(&format!("t.yaml:{line}: column 3: invalid indentation")),
        "the place is named as file:line: {err}"
    );
}

#[test]
fn a_key_given_twice_is_refused_at_its_second_place() {
    // The YAML loader would keep the last `db:`; the operator meant one of them.
    let text = yaml("a.db").replace("db: a.db", "db: a.db\ndb: b.db");
    let err = Config::parse(&text, "t.yaml", Path::new("."), &env()).unwrap_err();
    assert!(
        matches!(err, ConfigError::Syntax { line: Some(3), .. }),
        "{err:?}"
    );
    let shown = err.to_string();
    assert!(shown.starts_with("t.yaml:3: "), "{shown}");
    assert!(shown.contains("db"), "{shown}");
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let shown = format!("{c:?}");
    for (_, secret) in env() {
        assert!(!shown.contains(&secret), "secret leaked in {shown}");
    }
    assert!(shown.contains("redacted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_are_refused_and_enqueue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).await.unwrap();
    let base = format!("http://{}", rt.addr());
    let http = reqwest::Client::new();
    let post = |url: String, body: Vec<u8>| http.post(url).body(body).send();
    let wrong = post(
        format!("{base}/webhooks/dataverse?code=wrong"),
        CONTACT_UPDATE.into(),
    )
    .await
    .unwrap();
    assert_eq!(wrong.status(), 401);
    let missing = post(format!("{base}/webhooks/fno"), CONTACT_UPDATE.into())
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let malformed = post(
        format!("{base}/webhooks/dataverse?code=dv-hook-secret-456"),
        b"{not json".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(malformed.status(), 400);
    let big = post(
        format!("{base}/webhooks/dataverse?code=dv-hook-secret-456"),
        vec![b' '; 1024 * 1024 + 10],
    )
    .await
    .unwrap();
    assert_eq!(big.status(), 413);
    // Far above the limit: the HTTP layer stops reading, the receivers still answer (their 413
    // names the limit, and it is counted); bad credentials still come first.
    let huge = post(
        format!("{base}/webhooks/dataverse?code=dv-hook-secret-456"),
        vec![b' '; 5 * 1024 * 1024],
    )
    .await
    .unwrap();
    assert_eq!(huge.status(), 413);
    let answer = huge.text().await.unwrap();
    assert!(
        answer.contains("body is 5242880 bytes, the limit is 1048576 bytes"),
        "{answer}"
    );
    let huge_unauthorized = post(
        format!("{base}/webhooks/dataverse?code=wrong"),
        vec![b' '; 3 * 1024 * 1024 / 2],
    )
    .await
    .unwrap();
    assert_eq!(huge_unauthorized.status(), 401);
    let s = rt.stats().await;
    assert_eq!(s.receivers.accepted, 0);
    assert_eq!(s.queue.ready + s.queue.in_flight + s.queue.delayed, 0);
    assert_eq!(s.receivers.rejected_unauthorized, 3);
    assert_eq!(s.receivers.rejected_malformed, 1);
    assert_eq!(s.receivers.rejected_too_large, 2);
    let status: serde_json::Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["receivers"]["rejected_unauthorized"], 3);
    // Nothing reached the queue's log: no send, so no sync.
    assert_eq!(status["queue_log"]["synced_callers"], 0);
    assert_eq!(status["queue_log"]["syncs"], 0);
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_event_survives_shutdown_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).await.unwrap();
    let url = format!(
        "http://{}/webhooks/dataverse?code=dv-hook-secret-456",
        rt.addr()
    );
    let resp = reqwest::Client::new()
        .post(url)
        .body(CONTACT_UPDATE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    // Answered only after the send was synced in the queue's log.
    let log = rt.stats().await.queue_log;
    assert!(log.synced_callers >= 1 && log.syncs >= 1, "{log:?}");
    // The environments are unreachable, so the event cannot complete: it stays queued.
    rt.shutdown().await;
    let rt = Runtime::start(config(dir.path())).await.unwrap();
    let s = rt.stats().await;
    assert_eq!(
        s.queue.ready + s.queue.in_flight + s.queue.delayed,
        1,
        "{s:?}"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_scenario_converges() {
    let report = run_demo(DemoOptions { records: 2 }, &|_line: &str| {})
        .await
        .unwrap();
    assert!(report.converged, "differences: {:#?}", report.differences);
    assert!(report.passed, "failures: {:#?}", report.failures);
    assert!(report.records_checked >= 10);
    assert!(report.writes > 0);
    assert!(
        report.echoes_suppressed > 0,
        "echoes must be suppressed: {report:?}"
    );
    assert_eq!(report.errors, 0, "{:#?}", report.error_messages);
    assert_eq!(report.dead_letters, 0);
    // Both edits are queued before either is processed: exactly one conflict, and the later
    // edit (F&O's) wins under last_writer_wins. (Under load it once counted none — the echo
    // of the winning write moved the link before the write's final commit, which alone
    // recorded the conflict — and, once that was fixed, sometimes two — the losing change's
    // own event withdrew the winning write's announcement and took its arrival for a second
    // conflict. See the engine's race tests.)
    assert_eq!(report.conflicts, 1, "{report:?}");
    let conflict = report.conflict.unwrap();
    assert_eq!(conflict.winner, "erp", "{conflict:?}");
    assert!(report.p50_ms > 0.0 && report.p99_ms >= report.p50_ms);
}

#[test]
fn the_example_serve_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/serve.yaml");
    let text = std::fs::read_to_string(&path).expect("examples/serve.yaml exists");
    let env: BTreeMap<String, String> = [
        "DUALWRITE_DATAVERSE_SECRET",
        "DUALWRITE_FNO_SECRET",
        "DUALWRITE_DATAVERSE_WEBHOOK_KEY",
        "DUALWRITE_FNO_WEBHOOK_SECRET",
    ]
    .into_iter()
    .map(|k| (k.to_string(), format!("{k}-value")))
    .collect();
    let config = Config::parse(&text, "examples/serve.yaml", Path::new("."), &env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.maps.len(), 13);
    assert!(config.catch_up.is_some());
    let batching = config.batching.fno.expect("batching on");
    assert_eq!((batching.max_in_flight, batching.max_batch), (4, 10));
    // Without the secrets in the environment, each missing one is named.
    let err = Config::parse(
        &text,
        "examples/serve.yaml",
        Path::new("."),
        &BTreeMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("DUALWRITE_FNO_SECRET") && err.contains("DUALWRITE_DATAVERSE_WEBHOOK_KEY"),
        "{err}"
    );
}
