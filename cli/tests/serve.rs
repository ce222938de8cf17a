//! `dualwrite serve` as a service manager runs it (and the commands that take its configuration):
//! it stops on SIGTERM as on Ctrl-C (SIGINT),
//! draining first, and exits 0; the queue it held is free again afterwards.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A configuration whose environments are not running: enough to start and stop.
fn write_config(dir: &Path) -> std::path::PathBuf {
    write_config_with(dir, "")
}

/// [`write_config`] with `webhooks_extra` (indented YAML lines) added to `webhooks:`.
fn write_config_with(dir: &Path, webhooks_extra: &str) -> std::path::PathBuf {
    let yaml = "listen: 127.0.0.1:0\ndb: state.db\nmaps:\n  enabled: [legal-entities]\n\
         dataverse:\n  url: http://127.0.0.1:9\n  tenant: t\n  client_id: c\n  client_secret_env: T_SECRET\n  token_url: http://127.0.0.1:9\n\
         fno:\n  url: http://127.0.0.1:9\n  tenant: t\n  client_id: c\n  client_secret_env: T_SECRET\n  token_url: http://127.0.0.1:9\n\
         webhooks:\n  dataverse:\n    secret_env: T_HOOK\n  fno:\n    secret_env: T_HOOK\n";
    let path = dir.join("serve.yaml");
    std::fs::write(&path, format!("{yaml}{webhooks_extra}")).unwrap();
    path
}

/// Starts `dualwrite serve` and waits until it listens.
fn start(dir: &Path, config: &Path) -> Child {
    start_with(dir, config, &[]).0
}

/// Starts `dualwrite serve` with `extra` arguments and waits until it listens; the child and
/// the address it listens on.
fn start_with(dir: &Path, config: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dualwrite"))
        .args(["serve", "--config"])
        .arg(config)
        .args(extra)
        .current_dir(dir)
        .env("T_SECRET", "client-secret")
        .env("T_HOOK", "hook-secret")
        .env_remove("DUALWRITE_DB")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dualwrite serve starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines
        .next()
        .expect("serve prints its address")
        .expect("readable stdout");
    let addr = first
        .strip_prefix("dualwrite listening on http://")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    // Keep reading, as a terminal would: a closed stdout would fail serve's next line.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// Runs `dualwrite <global> <args> <config>` in `dir` to its end, with the configuration's
/// secrets set.
fn run_once(
    dir: &Path,
    global: &[&std::ffi::OsStr],
    args: &[&str],
    config: &Path,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dualwrite"))
        .args(global)
        .args(args)
        .arg(config)
        .current_dir(dir)
        .env("T_SECRET", "client-secret")
        .env("T_HOOK", "hook-secret")
        .env_remove("DUALWRITE_DB")
        .output()
        .unwrap()
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Waits for the process to exit (at most 30 s); its exit code and stderr.
fn finish(mut child: Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("dualwrite serve did not stop within 30 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_stops_cleanly_on_sigterm_as_on_ctrl_c_and_frees_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());

    let child = start(dir.path(), &config);
    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("terminated: stopping"), "{stderr}");

    // The queue was released: a second run starts on it, and Ctrl-C stops that one.
    let child = start(dir.path(), &config);
    signal(&child, "INT");
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("interrupted: stopping"), "{stderr}");
}

#[test]
fn a_sender_stalled_mid_request_does_not_keep_serve_from_stopping() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (child, addr) = start_with(dir.path(), &config, &[]);
    // One sender stops after 6 of 1,000 body bytes, another in the middle of its headers.
    let mut body_stalled = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        body_stalled,
        "POST /webhooks/dataverse?code=hook-secret HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"a\":"
    )
    .unwrap();
    let mut headers_stalled = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        headers_stalled,
        "POST /webhooks/fno HTTP/1.1\r\nHost: x\r\nContent-Le"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let signalled = Instant::now();
    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        // The stalled connection holds the stop for the 10 s grace, not more.
        signalled.elapsed() < Duration::from_secs(25),
        "stopped only after {:?}: {stderr}",
        signalled.elapsed()
    );
    drop((body_stalled, headers_stalled));
}

#[test]
fn the_db_option_names_the_store_serve_uses() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (child, _) = start_with(dir.path(), &config, &["--db", "elsewhere.db"]);
    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(dir.path().join("elsewhere.db").exists(), "{stderr}");
    assert!(
        !dir.path().join("state.db").exists(),
        "the configuration's db: is not used when --db names one"
    );
}

/// Sends `request` on a fresh connection and reads the whole answer (the server closes it).
fn exchange(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_stalled_body_is_answered_408_counted_and_nothing_is_queued() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "  body_timeout: 1\n");
    let (child, addr) = start_with(dir.path(), &config, &[]);

    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stalled,
        "POST /webhooks/dataverse?code=hook-secret HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"a\":"
    )
    .unwrap();
    let sent = Instant::now();
    let mut answer = String::new();
    // The server closes the connection after its answer: read to the end.
    stalled.read_to_string(&mut answer).unwrap();
    let waited = sent.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("did not arrive within 1 s"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );

    let status = exchange(
        &addr,
        "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let body = &status[status.find("\r\n\r\n").expect("a body") + 4..];
    let stats: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(stats["receivers"]["rejected_incomplete"], 1, "{stats}");
    assert_eq!(stats["receivers"]["accepted"], 0, "{stats}");
    assert_eq!(stats["queue"]["ready"], 0, "{stats}");

    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("body not received in time"), "{stderr}");
}

#[test]
fn a_body_timeout_out_of_range_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "  body_timeout: 0\n");
    let out = run_once(dir.path(), &[], &["serve", "--config"], &config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("webhooks.body_timeout"), "{stderr}");
    assert!(stderr.contains("1 to 600 seconds"), "{stderr}");
}

#[test]
fn conflicts_resolve_uses_the_store_db_names() {
    use dualwrite_core::ports::{ConflictRecord, LinkStore, StoreOp};
    use dualwrite_core::{IntegrationKey, Record};

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // An open conflict in the store --db names; the configuration's `db:` has none.
    let elsewhere = dir.path().join("elsewhere.db");
    let store = dualwrite_sqlite::SqliteStore::open(&elsewhere).unwrap();
    let conflict = ConflictRecord {
        id: "C-DB-1".into(),
        map: "legal-entities".into(),
        key: IntegrationKey("USMF".into()),
        detected_at: chrono::Utc::now(),
        policy: "manual".into(),
        crm: Record::new("cdm_companies"),
        erp: Record::new("LegalEntities"),
        winner: None,
        open: true,
    };
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(store.commit(vec![StoreOp::RecordConflict(conflict)]))
        .unwrap();
    drop(store);

    let out = run_once(
        dir.path(),
        &[std::ffi::OsStr::new("--db"), elsewhere.as_os_str()],
        &[
            "conflicts",
            "resolve",
            "C-DB-1",
            "--keep",
            "crm",
            "--config",
        ],
        &config,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // It found the conflict (in elsewhere.db), and stopped at the missing link: nothing is
    // written without one.
    assert!(
        stderr.contains("has no link for key USMF"),
        "the conflict was looked up in the store --db names: {stderr}"
    );
    assert!(
        !dir.path().join("state.db").exists(),
        "the configuration's db: is not used when --db names one"
    );
}
