//! The `dualwrite` binary as a user runs it: exit codes and what it prints.

use std::path::Path;
use std::process::{Command, Output};

fn dualwrite(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dualwrite"))
        .args(args)
        .current_dir(cwd)
        .env_remove("DUALWRITE_DB")
        .output()
        .expect("the dualwrite binary runs")
}

/// A Dataverse account change `event_id` of the account `record_id`.
fn account_change(event_id: &str, record_id: &str) -> dualwrite_core::ChangeEvent {
    let mut record = dualwrite_core::Record::new("accounts");
    record.id = Some(record_id.into());
    dualwrite_core::ChangeEvent {
        event_id: event_id.into(),
        source: dualwrite_core::Side::Crm,
        operation: dualwrite_core::Operation::Upsert,
        record,
        partial: false,
        received_at: chrono::DateTime::UNIX_EPOCH,
        correlation_id: None,
        depth: None,
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_shipped_maps_validate_clean() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualwrite(&["maps", "validate"], dir.path());
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("all valid"), "{}", stdout(&out));
}

#[test]
fn maps_list_shows_at_least_18_standard_maps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualwrite(&["maps", "list"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    for name in [
        "customers-v3-accounts",
        "vendors-v2",
        "sales-order-lines",
        "projects",
        "currencies",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    let rows = text
        .lines()
        .filter(|l| l.contains("<->") || l.contains("->") || l.contains("<-"))
        .count();
    assert!(rows >= 18, "{rows} maps listed:\n{text}");
}

#[test]
fn a_broken_map_is_rejected_with_every_fault_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        r#"name: broken
direction: bidirectional
depends_on: [nowhere]
erp:
  entity: CustomersV3
  key: [CustomerAccount]
  company_specific: false
crm:
  entity_set: accounts
  logical_name: account
  key: [accountnumber]
  colour: blue
fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: ">" }
  - { erp: Name, crm: name, dir: "=" }
  - { erp: Name2, crm: name, dir: "=" }
  - { erp: CreditLimit, crm: creditlimit, dir: "=", erp_type: decimal, crm_type: boolean }
"#,
    )
    .unwrap();
    let out = dualwrite(&["maps", "validate", "."], dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    let file = "./broken.yaml";
    // Unknown key, unknown dependency, key not bidirectional, field written twice, type mismatch.
    for (line, words) in [
        (12, "colour"),
        (3, "nowhere"),
        (14, "CustomerAccount"),
        (16, "name"),
        (17, "CreditLimit"),
    ] {
        let prefix = format!("{file}:{line}:");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&prefix) && l.contains(words)),
            "no diagnostic at {prefix} mentioning {words}:\n{text}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("problems found"));
}

#[test]
fn showing_an_unknown_map_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualwrite(&["maps", "show", "custmers"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no map named \"custmers\"") && err.contains("customers-v3-accounts"),
        "{err}"
    );
}

#[test]
fn maps_export_writes_files_that_validate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualwrite(&["maps", "export", "mine"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let out = dualwrite(&["maps", "validate", "mine"], dir.path());
    assert!(out.status.success(), "{}", stdout(&out));
    // The JSON Schema the map files' editor hint names is beside them.
    let schema = std::fs::read_to_string(dir.path().join("mine/schema/table-map.schema.json"))
        .expect("the schema is exported");
    let schema: serde_json::Value = serde_json::from_str(&schema).unwrap();
    assert!(schema.get("$schema").is_some() || schema.get("properties").is_some());
}

#[test]
fn status_without_a_store_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualwrite(&["status"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no local store"), "{err}");
    assert!(
        err.contains("--db") && err.contains("relative to the configuration file"),
        "says where serve's store is: {err}"
    );
}

#[test]
fn conflicts_list_shows_open_conflicts_with_both_versions() {
    use dualwrite_core::ports::{ConflictRecord, LinkStore, StoreOp};
    use dualwrite_core::{IntegrationKey, Record, Side, Value};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store = dualwrite_sqlite::SqliteStore::open(&db).unwrap();
    let conflict = |id: &str, open: bool| ConflictRecord {
        id: id.into(),
        map: "customers-v3-accounts".into(),
        key: IntegrationKey("USMF/C-1".into()),
        detected_at: chrono::Utc::now(),
        policy: "manual".into(),
        crm: Record::new("accounts").with("name", Value::Text("Name in Dataverse".into())),
        erp: Record::new("CustomersV3").with("OrganizationName", Value::Text("Name in F&O".into())),
        winner: (!open).then_some(Side::Erp),
        open,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.commit(vec![
        StoreOp::RecordConflict(conflict("c-open", true)),
        StoreOp::RecordConflict(conflict("c-done", false)),
    ]))
    .unwrap();
    drop(store);

    let db_arg = db.display().to_string();
    let out = dualwrite(
        &["--db", &db_arg, "conflicts", "list", "--open"],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("c-open") && text.contains("OPEN"), "{text}");
    assert!(
        text.contains("Name in Dataverse") && text.contains("Name in F&O"),
        "{text}"
    );
    assert!(!text.contains("c-done"), "only open ones: {text}");

    let out = dualwrite(&["--db", &db_arg, "conflicts", "list"], dir.path());
    assert!(
        stdout(&out).contains("c-done") && stdout(&out).contains("erp won"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn status_counts_the_queue_and_says_when_a_running_process_holds_it() {
    use dualwrite_core::ports::{QueueMessage, WorkQueue};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    drop(dualwrite_sqlite::SqliteStore::open(&db).unwrap());
    let queue_dir = dir.path().join("state.queue");
    let open_queue = || {
        dualwrite_logqueue::LogQueue::open(&queue_dir, dualwrite_logqueue::QueueConfig::default())
            .unwrap()
    };
    let message = |id: &str| QueueMessage::for_event(account_change(id, id));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queue = open_queue();
    rt.block_on(queue.send(vec![message("a"), message("b")]))
        .unwrap();
    drop(queue);

    let db_arg = db.display().to_string();
    let out = dualwrite(&["--db", &db_arg, "status", "--json"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["queue"]["ready"], 2, "{status}");
    assert_eq!(status["queue"]["held_by_another_process"], false);

    // While a process (here: this test, standing in for `dualwrite serve`) holds the queue.
    let _held = open_queue();
    let out = dualwrite(&["--db", &db_arg, "status"], dir.path());
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("held by a running dualwrite process"),
        "{}",
        stdout(&out)
    );
    // Its counts are unknown here: null, not 0 (a monitor must not read "no backlog").
    let out = dualwrite(&["--db", &db_arg, "status", "--json"], dir.path());
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["queue"]["held_by_another_process"], true, "{status}");
    for count in ["ready", "in_flight", "delayed", "dead"] {
        assert!(status["queue"][count].is_null(), "{count}: {status}");
    }
    assert_eq!(status["queue"]["earlier_dead"], 0, "{status}");
}

#[test]
fn status_lists_the_most_recent_dead_letters_newest_first() {
    use std::time::Duration;

    use dualwrite_core::ports::{QueueMessage, RetryOutcome, WorkQueue};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    drop(dualwrite_sqlite::SqliteStore::open(&db).unwrap());
    let queue = dualwrite_logqueue::LogQueue::open(
        dir.path().join("state.queue"),
        dualwrite_logqueue::QueueConfig {
            max_attempts: 1,
            ..dualwrite_logqueue::QueueConfig::default()
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Eight messages die one after the other, d0 first.
        for n in 0..8 {
            let id = format!("d{n}");
            queue
                .send(vec![QueueMessage::for_event(account_change(&id, &id))])
                .await
                .unwrap();
            for d in queue.receive(10, Duration::from_secs(30)).await.unwrap() {
                let outcome = queue
                    .retry(&d.receipt, Duration::ZERO, &format!("failure {n}"))
                    .await
                    .unwrap();
                assert_eq!(outcome, RetryOutcome::DeadLettered);
            }
        }
    });
    drop(queue);
    let db_arg = db.display().to_string();
    let out = dualwrite(
        &["--db", &db_arg, "status", "--recent", "3", "--json"],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["queue"]["dead"], 8, "{status}");
    let errors: Vec<&str> = status["recent_dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["last_error"].as_str().unwrap())
        .collect();
    assert_eq!(errors, ["failure 7", "failure 6", "failure 5"], "{status}");
}

#[test]
fn queue_redrive_moves_dead_letters_back_and_refuses_while_serve_holds_the_queue() {
    use std::time::Duration;

    use dualwrite_core::ports::{QueueMessage, RetryOutcome, WorkQueue};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    drop(dualwrite_sqlite::SqliteStore::open(&db).unwrap());
    let queue_dir = dir.path().join("state.queue");
    // One attempt: a single failed delivery dead-letters (as an outage does after them all).
    let open_queue = || {
        dualwrite_logqueue::LogQueue::open(
            &queue_dir,
            dualwrite_logqueue::QueueConfig {
                max_attempts: 1,
                ..dualwrite_logqueue::QueueConfig::default()
            },
        )
        .unwrap()
    };
    let message = |id: &str| QueueMessage::for_event(account_change(id, id));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queue = open_queue();
    rt.block_on(async {
        queue.send(vec![message("a"), message("b")]).await.unwrap();
        for d in queue.receive(10, Duration::from_secs(30)).await.unwrap() {
            let outcome = queue
                .retry(&d.receipt, Duration::ZERO, "F&O unavailable")
                .await
                .unwrap();
            assert_eq!(outcome, RetryOutcome::DeadLettered);
        }
    });
    drop(queue);
    let db_arg = db.display().to_string();

    let out = dualwrite(&["--db", &db_arg, "status"], dir.path());
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("`dualwrite queue redrive`"),
        "the dead letters say how to send them back:\n{}",
        stdout(&out)
    );

    // While a process (here: this test, standing in for `dualwrite serve`) holds the queue.
    let held = open_queue();
    let out = dualwrite(&["--db", &db_arg, "queue", "redrive"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for words in [
        "held by a running dualwrite process",
        "nothing was redriven",
        "Stop `dualwrite serve`",
        "start `dualwrite serve` again",
    ] {
        assert!(err.contains(words), "{words:?} missing from: {err}");
    }
    drop(held);

    let out = dualwrite(
        &[
            "--db", &db_arg, "queue", "redrive", "--limit", "1", "--json",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["moved"], 1, "{report}");
    assert_eq!(
        report["remaining_dead_letters"], 1,
        "nothing moved while held: {report}"
    );

    let out = dualwrite(&["--db", &db_arg, "queue", "redrive"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("1 dead letter(s) moved back to the work queue; 0 dead letter(s) remain"),
        "{text}"
    );

    let queue = open_queue();
    rt.block_on(async {
        assert!(queue.dead_letters(10).await.unwrap().is_empty());
        let again = queue.receive(10, Duration::from_secs(30)).await.unwrap();
        let ids: Vec<_> = again
            .iter()
            .map(|d| d.message.event.event_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b"], "oldest death first");
        assert!(again.iter().all(|d| d.attempt == 1));
        assert_eq!(again[0].message, message("a"));
    });
}

#[test]
fn errors_retry_sends_failed_changes_again_under_new_ids_and_refuses_while_serve_holds_the_queue() {
    use std::time::Duration;

    use dualwrite_core::ChangeEvent;
    use dualwrite_core::ports::{ErrorClass, ErrorRecord, LinkStore, StoreOp, WorkQueue};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let store = dualwrite_sqlite::SqliteStore::open(&db).unwrap();
    let failed = |id: &str| account_change(id, &format!("rec-{id}"));
    let error = |id: &str, event: Option<ChangeEvent>| {
        StoreOp::RecordError(ErrorRecord {
            at: chrono::Utc::now(),
            map: Some("customers-v3-accounts".into()),
            key: Some("USMF/C-1".into()),
            event_id: Some(id.into()),
            class: ErrorClass::Permanent,
            message: "fno CustomersV3: The value 'XX' of field 'CustomerGroupId' is not found"
                .into(),
            event,
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.commit(vec![
        error("ev-1", Some(failed("ev-1"))),
        error("ev-2", Some(failed("ev-2"))),
        error("ev-old", None),
    ]))
    .unwrap();
    drop(store);
    let db_arg = db.display().to_string();

    let out = dualwrite(&["--db", &db_arg, "status"], dir.path());
    assert!(
        stdout(&out).contains("`dualwrite errors retry ev-1`"),
        "status says how to retry:\n{}",
        stdout(&out)
    );

    // While a process (standing in for `dualwrite serve`) holds the queue: refused, nothing sent.
    let queue_dir = dir.path().join("state.queue");
    let open_queue = || {
        dualwrite_logqueue::LogQueue::open(&queue_dir, dualwrite_logqueue::QueueConfig::default())
            .unwrap()
    };
    let held = open_queue();
    let out = dualwrite(&["--db", &db_arg, "errors", "retry", "ev-1"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("held by a running dualwrite process") && err.contains("nothing was sent"),
        "{err}"
    );
    drop(held);

    let out = dualwrite(
        &[
            "--db", &db_arg, "errors", "retry", "ev-1", "nope", "ev-old", "--json",
        ],
        dir.path(),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unknown id fails the run: {out:?}"
    );
    let answer: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let sent = answer["sent"].as_array().unwrap();
    assert_eq!(sent.len(), 1, "{answer}");
    assert!(
        sent[0].as_str().unwrap().starts_with("ev-1~retry-"),
        "{answer}"
    );
    assert_eq!(answer["unknown"], serde_json::json!(["nope"]));
    assert_eq!(answer["without_event"], serde_json::json!(["ev-old"]));

    let out = dualwrite(&["--db", &db_arg, "errors", "retry", "--all"], dir.path());
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("2 failed change(s) sent to the work queue again"),
        "{}",
        stdout(&out)
    );

    // What `serve` will find in the queue: the changes, under their new ids, in their groups.
    let queue = open_queue();
    let delivered = rt.block_on(async {
        queue
            .receive(10, Duration::from_secs(30))
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.message.event.event_id, d.message.group_id))
            .collect::<Vec<_>>()
    });
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    assert!(delivered.iter().all(|(id, _)| id.contains("~retry-")));
    assert!(
        delivered
            .iter()
            .any(|(id, group)| id.starts_with("ev-1~") && group.ends_with("rec-ev-1")),
        "{delivered:?}"
    );
}
