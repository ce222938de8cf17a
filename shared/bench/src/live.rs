//! `dualwrite bench live`: webhook throughput and latency through the local pipeline (runtime,
//! SQLite queue and store, connectors) against the Entra ID, Dataverse and F&O simulators, with
//! a check of both sides at the end.
//!
//! How one run goes:
//! 1. Simulators and the runtime start (maps `customers-v3-accounts` and its dependencies, a
//!    temporary SQLite database). F&O data events go to the runtime, as in production: every
//!    write of the engine to F&O comes back as a webhook the runtime processes (the echo).
//! 2. Company USMF and currency USD are created in F&O and synced to Dataverse through the
//!    pipeline, so account lookups resolve through real links.
//! 3. N accounts are created in the Dataverse simulator while its webhook points at a capture
//!    endpoint of the bench: the payloads are the simulator's own RemoteExecutionContext bodies
//!    (Target + PostEntityImage with every column), for records the simulator holds.
//! 4. The bench replays those payloads to the runtime's `/webhooks/dataverse` over keep-alive
//!    connections: closed loop (as fast as `concurrency` connections go) or open loop at
//!    `rate` events/s. Each event is timed from the start of its POST (open loop: from its
//!    scheduled send time) to the moment a worker finished it, its F&O write done and its
//!    link committed ([`dualwrite_runtime::RuntimeHandle::completions`]).
//! 5. When the pipeline is idle, both sides are checked: each account exists exactly once in
//!    F&O with the event's values (else *lost*); F&O reported exactly one write of it and the
//!    Dataverse row was not written again (else *duplicated*).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use dualwrite_core::Side;

use crate::http1;
use dualwrite_runtime::demo::demo_maps;
use dualwrite_runtime::{
    BatchingSettings, LocalStack, LocalStackError, LocalStackOptions, RuntimeHandle, RuntimeStats,
};
use dualwrite_simulators::{
    DataverseSim, EntraSim, FnoSim, SimStats, WebhookAuth, WebhookMessage, WebhookRegistration,
};
use serde::Serialize;
use serde_json::{Value as Json, json};
use tokio::sync::Semaphore;

/// Sustained throughput target of a closed-loop run, events/s (2-core machine).
pub const TARGET_EVENTS_PER_SEC: f64 = 10_000.0;
/// p99 latency target of an open-loop run at [`TARGET_P99_RATE`] events/s or less, in ms.
pub const TARGET_P99_MS: f64 = 25.0;
/// The rate at which the p99 target is stated, events/s.
pub const TARGET_P99_RATE: f64 = 2_000.0;

/// The map whose webhooks the bench sends.
const MAP: &str = "customers-v3-accounts";
/// How long setup steps and the final drain may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts of one POST (like Dataverse, which retries a webhook on 5xx).
const POST_ATTEMPTS: u32 = 3;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveOptions {
    /// Webhook deliveries (one distinct account each).
    pub events: usize,
    /// Open loop at this many events/s; `None` for closed loop (maximum throughput).
    pub rate: Option<f64>,
    /// Most POSTs in flight at once (keep-alive connections).
    pub concurrency: usize,
    /// Worker tasks of the runtime.
    pub workers: usize,
    /// How long to wait for every event to complete after the last POST.
    pub timeout: Duration,
    /// How the runtime coalesces connector calls into `$batch` requests.
    pub batching: BatchingSettings,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            events: 20_000,
            rate: None,
            concurrency: 64,
            workers: 128,
            timeout: Duration::from_secs(120),
            batching: BatchingSettings::default(),
        }
    }
}

/// What one run measured and found; serialises to the JSON object `dualwrite bench live`
/// prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveReport {
    /// Webhook deliveries sent (one distinct account each).
    pub events: usize,
    /// Completed events per second, from the first POST to the last completion.
    pub events_per_sec: f64,
    /// Median latency, POST start (open loop: scheduled send) to completion, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Largest latency, ms.
    pub max_ms: f64,
    /// Accounts missing in F&O or holding other values than their event's.
    pub lost: usize,
    /// Accounts written more than once: several F&O writes, or the Dataverse row written back.
    pub duplicated: usize,
    /// Open-loop rate asked for (events/s); `null` for closed loop.
    pub rate: Option<f64>,
    /// Most POSTs in flight at once.
    pub concurrency: usize,
    /// Worker tasks of the runtime.
    pub workers: usize,
    /// Seconds from the first POST to the last completion.
    pub duration_s: f64,
    /// Seconds from the last completion until the pipeline was idle (the echoes of the last
    /// writes, still queued, settled): outside `duration_s`, so `events_per_sec` does not
    /// count it; a large value says the echoes fell behind. `null` when an event did not
    /// complete (the run waited for it until `--timeout`).
    pub drain_s: Option<f64>,
    /// CPU time of the whole process (load generator, runtime and simulators, user + system)
    /// from the first POST until the pipeline was idle again (echoes included), per event, in
    /// µs: what one event costs the machine, steadier than a rate on a shared host. `null`
    /// where the platform does not tell (`/proc/self/stat`).
    pub cpu_us_per_event: Option<f64>,
    /// The same without the simulators' threads: what the pipeline (and the load generator's
    /// HTTP client, a few µs) costs per event — the figure to size a deployment by, where
    /// Dataverse and F&O run elsewhere. `null` where the platform does not tell.
    pub cpu_us_per_event_pipeline: Option<f64>,
    /// The same, per kind of thread (`tokio-rt-worker`: the runtime's HTTP server, receivers,
    /// workers and connectors, and the load generator; `simulators`: the Dataverse, F&O and
    /// Entra ID simulators; `sqlite-writer` / `sqlite-checkpt`: the database; `logq-writer`:
    /// the work queue), from `/proc/self/task/*/stat` (the kernel keeps 15 bytes of a name);
    /// empty where the platform does not tell.
    pub cpu_us_per_event_by_thread: std::collections::BTreeMap<String, f64>,
    /// The target this run is judged by, in words.
    pub target: String,
    /// True when that target is met and `lost == duplicated == 0`.
    pub target_met: bool,
    /// Events whose completion was observed (the others are late or lost).
    pub latency_samples: usize,
    /// POSTs the runtime did not answer 2xx at the first attempt (retried).
    pub post_retries: u64,
    /// POSTs still refused after every attempt.
    pub post_failures: u64,
    /// The pipeline's counters at the end (engine, queue, receivers).
    pub pipeline: RuntimeStats,
    /// What the simulators served during the whole run (setup and check included): requests,
    /// throttled (429), unauthorised and faulted ones.
    pub simulators: SimulatorCounts,
    /// The first differences found by the check, in words.
    pub problems: Vec<String>,
}

/// The simulators' counters of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimulatorCounts {
    /// The Dataverse Web API simulator.
    pub dataverse: SimStats,
    /// The F&O OData simulator.
    pub fno: SimStats,
}

/// Why the bench could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The options cannot give a meaningful run.
    #[error("invalid option: {0}")]
    Options(String),
    /// A simulator failed to start or refused a call.
    #[error("simulator: {0}; this is a bug of the bench or the simulators, please report it")]
    Simulator(String),
    /// The generated configuration did not validate (a bug of the bench).
    #[error("bench configuration: {0}")]
    Config(#[from] dualwrite_runtime::ConfigError),
    /// The runtime did not start.
    #[error(transparent)]
    Start(#[from] dualwrite_runtime::StartError),
    /// A step did not complete in time.
    #[error("step `{step}` did not complete within {secs} s: {waiting}")]
    Timeout {
        /// The step.
        step: String,
        /// Seconds waited.
        secs: u64,
        /// What was still missing.
        waiting: String,
    },
    /// The local HTTP client or the capture endpoint could not be set up.
    #[error("local HTTP: {0}")]
    Http(String),
}

impl From<LocalStackError> for LiveError {
    fn from(e: LocalStackError) -> Self {
        match e {
            LocalStackError::Simulator(m) => LiveError::Simulator(m),
            LocalStackError::Config(e) => LiveError::Config(e),
            LocalStackError::Start(e) => LiveError::Start(e),
        }
    }
}

fn sim_err(e: impl std::fmt::Display) -> LiveError {
    LiveError::Simulator(e.to_string())
}

/// One captured webhook, ready to replay.
#[derive(Debug, Clone)]
struct Captured {
    /// Index of the account (`BENCH-{index:06}`).
    index: usize,
    /// The event id the receiver will give it (the context's `OperationId`).
    event_id: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

/// The simulators, the runtime and the temporary database.
struct Stage {
    dv: DataverseSim,
    fno: FnoSim,
    rt: RuntimeHandle,
    dv_secret: String,
    _entra: EntraSim,
    _dir: tempfile::TempDir,
    /// Last: dropped after the simulators' handles.
    _sim_rt: SimulatorRuntime,
}

/// Name of the simulators' threads (see [`LiveReport::cpu_us_per_event_by_thread`]).
pub const SIMULATOR_THREADS: &str = "simulators";

/// The simulators' own tokio runtime: one worker thread named [`SIMULATOR_THREADS`], so that
/// the CPU time of the simulators is told apart from the pipeline's. Shut down in the
/// background when dropped (a runtime may not be dropped from async code otherwise).
struct SimulatorRuntime(Option<tokio::runtime::Runtime>);

impl SimulatorRuntime {
    fn start() -> Result<Self, LiveError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(SIMULATOR_THREADS)
            .enable_all()
            .build()
            .map(|rt| SimulatorRuntime(Some(rt)))
            .map_err(|e| LiveError::Simulator(format!("starting the simulators' runtime: {e}")))
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.0.as_ref().map(|rt| rt.handle().clone())
    }
}

impl Drop for SimulatorRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs the live bench; `progress` gets one line per step.
///
/// # Errors
/// [`LiveError`] when a step cannot run or times out. A run that completes with lost or
/// duplicated events is an `Ok` report with `target_met == false`.
pub async fn run(
    options: LiveOptions,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<LiveReport, LiveError> {
    if options.events == 0 || options.concurrency == 0 || options.workers == 0 {
        return Err(LiveError::Options(
            "--events, --concurrency and --workers must be at least 1".into(),
        ));
    }
    if let Some(rate) = options.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(LiveError::Options(format!(
            "--rate {rate} is not a positive number of events per second"
        )));
    }
    let stage = start(options.workers, options.batching).await?;
    progress(&format!(
        "runtime on http://{} with {} workers; seeding company USMF and currency USD through the pipeline ...",
        stage.rt.addr(),
        options.workers
    ));
    seed(&stage).await?;
    progress(&format!(
        "creating {} accounts in Dataverse and capturing their webhooks ...",
        options.events
    ));
    let (captured, versions) = capture(&stage, options.events).await?;
    progress(&format!(
        "sending {} webhooks ({}, {} connections) ...",
        captured.len(),
        options
            .rate
            .map_or_else(|| "closed loop".to_string(), |r| format!("{r} events/s")),
        options.concurrency
    ));
    let (cpu_before, threads_before) = (process_cpu(), thread_cpu());
    let drive = drive(&stage, &captured, &options).await?;
    progress("waiting for the pipeline to go idle, then checking both sides ...");
    wait_idle(&stage).await?;
    let drain_s = drive
        .last
        .filter(|_| drive.latencies.len() == options.events)
        .map(|last| last.elapsed().as_secs_f64());
    let per_event = |d: Duration| round1(d.as_secs_f64() * 1e6 / options.events as f64);
    let cpu_us_per_event = cpu_before
        .zip(process_cpu())
        .map(|(a, b)| per_event(b.saturating_sub(a)));
    let mut cpu_us_per_event_by_thread = std::collections::BTreeMap::new();
    for (name, after) in thread_cpu() {
        let before = threads_before.get(&name).copied().unwrap_or_default();
        cpu_us_per_event_by_thread.insert(name, per_event(after.saturating_sub(before)));
    }
    let cpu_us_per_event_pipeline = cpu_us_per_event.map(|total| {
        let simulators = cpu_us_per_event_by_thread
            .get(SIMULATOR_THREADS)
            .copied()
            .unwrap_or(0.0);
        round1((total - simulators).max(0.0))
    });
    let check = check(&stage, options.events, &versions).await;
    let pipeline = stage.rt.stats().await;
    let simulators = SimulatorCounts {
        dataverse: stage.dv.stats(),
        fno: stage.fno.stats(),
    };
    stage.rt.shutdown().await;

    let mut latencies_ms: Vec<f64> = drive
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    let duration_s = drive.duration.as_secs_f64();
    let events_per_sec = if duration_s > 0.0 {
        round1(drive.latencies.len() as f64 / duration_s)
    } else {
        0.0
    };
    let p50_ms = percentile(&latencies_ms, 0.50);
    let p99_ms = percentile(&latencies_ms, 0.99);
    let correct = check.lost == 0 && check.duplicated == 0;
    let (target, met) = match options.rate {
        None => (
            format!("closed loop: >= {TARGET_EVENTS_PER_SEC} events/s, lost = duplicated = 0"),
            events_per_sec >= TARGET_EVENTS_PER_SEC,
        ),
        Some(rate) if rate <= TARGET_P99_RATE => (
            format!(
                "open loop at <= {TARGET_P99_RATE} events/s: p99 < {TARGET_P99_MS} ms, lost = duplicated = 0"
            ),
            p99_ms < TARGET_P99_MS,
        ),
        Some(_) => (
            format!(
                "open loop above {TARGET_P99_RATE} events/s: no latency target, lost = duplicated = 0"
            ),
            true,
        ),
    };
    Ok(LiveReport {
        events: options.events,
        events_per_sec,
        p50_ms,
        p99_ms,
        max_ms: latencies_ms.last().copied().map_or(0.0, round1),
        lost: check.lost,
        duplicated: check.duplicated,
        rate: options.rate,
        concurrency: options.concurrency,
        workers: options.workers,
        duration_s: (duration_s * 1000.0).round() / 1000.0,
        drain_s: drain_s.map(|d| (d * 1000.0).round() / 1000.0),
        cpu_us_per_event,
        cpu_us_per_event_pipeline,
        cpu_us_per_event_by_thread,
        target,
        target_met: met && correct && drive.latencies.len() == options.events,
        latency_samples: drive.latencies.len(),
        post_retries: drive.post_retries,
        post_failures: drive.post_failures,
        pipeline,
        simulators,
        problems: {
            let mut problems = check.problems;
            let late = options.events.saturating_sub(drive.latencies.len());
            if late > 0 {
                problems.insert(
                    0,
                    format!(
                        "{late} event(s) did not complete within --timeout {} s; the figures are those of the {} that did",
                        options.timeout.as_secs(),
                        drive.latencies.len()
                    ),
                );
            }
            problems
        },
    })
}

/// CPU time this process used so far (user + system), from `/proc/self/stat`; `None` where
/// that file does not exist or cannot be read.
fn process_cpu() -> Option<Duration> {
    cpu_of_stat(&std::fs::read_to_string("/proc/self/stat").ok()?).map(|(_, cpu)| cpu)
}

/// CPU time used so far by the threads of this process, summed by thread name (the kernel
/// keeps the first 15 bytes of a name), from `/proc/self/task/*/stat`; empty where those files
/// do not exist. Threads that ended meanwhile are not counted.
fn thread_cpu() -> std::collections::BTreeMap<String, Duration> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some((name, cpu)) = cpu_of_stat(&stat) {
            *by_name.entry(name).or_insert(Duration::ZERO) += cpu;
        }
    }
    by_name
}

/// The command name and user + system time of a `/proc/…/stat` line.
fn cpu_of_stat(stat: &str) -> Option<(String, Duration)> {
    // The command name is in parentheses and may hold spaces; after it, state is field 3,
    // utime and stime are fields 14 and 15, in clock ticks.
    let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux architecture this runs on.
    Some((name.to_owned(), Duration::from_millis(ticks * 10)))
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The value at quantile `q` of `sorted` (nearest rank), rounded to 0.1.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    round1(sorted[rank.clamp(1, sorted.len()) - 1])
}

async fn start(workers: usize, batching: BatchingSettings) -> Result<Stage, LiveError> {
    let sim_rt = SimulatorRuntime::start()?;
    let mut options = LocalStackOptions::new("bench", demo_maps(&[MAP]));
    options.workers = workers;
    options.batching = batching;
    options.visibility_timeout_secs = 60;
    options.simulator_runtime = sim_rt.handle();
    let local = LocalStack::start(options).await?;
    // F&O echoes every write of the engine back to the runtime, as in production. Dataverse
    // webhooks are not registered: the bench itself is the Dataverse webhook source.
    local.register_fno_events(&format!("{}/webhooks/fno", local.runtime_url()));
    let LocalStack {
        entra,
        dv,
        fno,
        rt,
        secrets,
        dir,
        ..
    } = local;
    Ok(Stage {
        dv,
        fno,
        rt,
        dv_secret: secrets.dataverse_webhook_key,
        _entra: entra,
        _dir: dir,
        _sim_rt: sim_rt,
    })
}

/// Polls `found` every 5 ms until it holds or [`STEP_TIMEOUT`] passes.
async fn wait_until(
    step: &str,
    waiting: &str,
    mut found: impl FnMut() -> bool,
) -> Result<(), LiveError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !found() {
        if Instant::now() > deadline {
            return Err(LiveError::Timeout {
                step: step.into(),
                secs: STEP_TIMEOUT.as_secs(),
                waiting: waiting.into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn text_eq(row: &Json, field: &str, want: &str) -> bool {
    row.get(field)
        .and_then(Json::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case(want))
}

/// The primary id of the Dataverse row of `set` whose `field` is `want`.
fn crm_id(dv: &DataverseSim, set: &str, id_field: &str, field: &str, want: &str) -> Option<String> {
    dv.rows(set)
        .into_iter()
        .find(|r| text_eq(r, field, want))
        .and_then(|r| r.get(id_field).and_then(Json::as_str).map(str::to_string))
}

/// Company USMF and currency USD, created in F&O and synced to Dataverse by the pipeline.
async fn seed(stage: &Stage) -> Result<(), LiveError> {
    stage
        .fno
        .user_create(
            "LegalEntities",
            json!({"LegalEntityId": "USMF", "Name": "Contoso Entertainment System USA"}),
        )
        .map_err(sim_err)?;
    wait_until(
        "seed company USMF",
        "cdm_companies row USMF in Dataverse",
        || {
            crm_id(
                &stage.dv,
                "cdm_companies",
                "cdm_companyid",
                "cdm_companycode",
                "USMF",
            )
            .is_some()
        },
    )
    .await?;
    stage
        .fno
        .user_create(
            "Currencies",
            json!({"CurrencyCode": "USD", "Name": "US Dollar", "Symbol": "$"}),
        )
        .map_err(sim_err)?;
    wait_until(
        "seed currency USD",
        "transactioncurrencies row USD in Dataverse",
        || {
            crm_id(
                &stage.dv,
                "transactioncurrencies",
                "transactioncurrencyid",
                "isocurrencycode",
                "USD",
            )
            .is_some()
        },
    )
    .await?;
    wait_idle(stage).await
}

/// The account number of bench account `i`.
fn account_number(i: usize) -> String {
    format!("BENCH-{i:06}")
}

/// The values bench account `i` is created with (and must arrive with in F&O).
struct Expected {
    name: String,
    credit_limit: i64,
    city: String,
    phone: String,
}

fn expected(i: usize) -> Expected {
    Expected {
        name: format!("Bench Account {i}"),
        credit_limit: 1_000 + i64::try_from(i).unwrap_or(i64::MAX - 1_000),
        city: format!("City {}", i % 97),
        phone: format!("+1 425 555 {:04}", i % 10_000),
    }
}

/// What the capture endpoint keeps: each POST's `x-ms-*` headers and body.
type CaptureLog = Arc<Mutex<Vec<(Vec<(String, String)>, Bytes)>>>;

/// Starts an HTTP endpoint that keeps every POST body and its `x-ms-*` headers.
async fn capture_endpoint() -> Result<(String, CaptureLog, tokio::task::JoinHandle<()>), LiveError>
{
    let kept: CaptureLog = Arc::default();
    let sink = kept.clone();
    let app = axum::Router::new().route(
        "/capture",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let headers = headers
                    .iter()
                    .filter(|(n, _)| n.as_str().starts_with("x-ms-"))
                    .filter_map(|(n, v)| {
                        Some((n.as_str().to_string(), v.to_str().ok()?.to_string()))
                    })
                    .collect();
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| LiveError::Http(format!("cannot bind the capture endpoint: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LiveError::Http(format!("capture endpoint address: {e}")))?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/capture"), kept, server))
}

/// Creates `n` accounts in the Dataverse simulator with its webhook pointed at a capture
/// endpoint; returns the captured webhooks and each account's `versionnumber` after creation.
async fn capture(
    stage: &Stage,
    n: usize,
) -> Result<(Vec<Captured>, HashMap<usize, i64>), LiveError> {
    let dv = &stage.dv;
    let missing = |what: &str| LiveError::Timeout {
        step: "find seeded reference data".into(),
        secs: 0,
        waiting: what.into(),
    };
    let usmf = crm_id(
        dv,
        "cdm_companies",
        "cdm_companyid",
        "cdm_companycode",
        "USMF",
    )
    .ok_or_else(|| missing("cdm_companies row USMF"))?;
    let usd = crm_id(
        dv,
        "transactioncurrencies",
        "transactioncurrencyid",
        "isocurrencycode",
        "USD",
    )
    .ok_or_else(|| missing("transactioncurrencies row USD"))?;
    let (url, kept, server) = capture_endpoint().await?;
    dv.register_webhook(WebhookRegistration {
        url,
        entity_logical_names: vec!["account".into()],
        messages: vec![WebhookMessage::Create],
        auth: WebhookAuth::WebhookKey(stage.dv_secret.clone()),
    });
    for i in 0..n {
        let e = expected(i);
        dv.user_create(
            "accounts",
            json!({
                "accountnumber": account_number(i),
                "name": e.name,
                "customertypecode": 3,
                "creditlimit": e.credit_limit,
                "address1_city": e.city,
                "telephone1": e.phone,
                "emailaddress1": format!("bench{i}@example.com"),
                "msdyn_company@odata.bind": format!("/cdm_companies({usmf})"),
                "transactioncurrencyid@odata.bind": format!("/transactioncurrencies({usd})"),
            }),
        )
        .map_err(sim_err)?;
    }
    let idle = dv.wait_webhooks_idle(STEP_TIMEOUT).await;
    dv.clear_webhooks();
    server.abort();
    let kept = std::mem::take(
        &mut *kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    if !idle || kept.len() != n {
        return Err(LiveError::Timeout {
            step: "capture account webhooks".into(),
            secs: STEP_TIMEOUT.as_secs(),
            waiting: format!("{} of {n} webhooks captured", kept.len()),
        });
    }
    let mut captured = Vec::with_capacity(n);
    for (headers, body) in kept {
        let ctx: Json = serde_json::from_slice(&body).map_err(sim_err)?;
        let event_id = ctx
            .get("OperationId")
            .and_then(Json::as_str)
            .ok_or_else(|| sim_err("a captured webhook has no OperationId"))?
            .to_string();
        let number = ctx
            .pointer("/PostEntityImages/0/value/Attributes")
            .and_then(Json::as_array)
            .and_then(|attrs| {
                attrs
                    .iter()
                    .find(|a| a.get("key").and_then(Json::as_str) == Some("accountnumber"))
            })
            .and_then(|a| a.get("value").and_then(Json::as_str))
            .ok_or_else(|| sim_err("a captured webhook has no accountnumber in its post image"))?;
        let index = number
            .strip_prefix("BENCH-")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| sim_err(format!("unexpected account number {number}")))?;
        captured.push(Captured {
            index,
            event_id,
            headers,
            body,
        });
    }
    captured.sort_by_key(|c| c.index);
    let versions = dv
        .rows("accounts")
        .iter()
        .filter_map(|r| {
            let index = r
                .get("accountnumber")
                .and_then(Json::as_str)?
                .strip_prefix("BENCH-")?
                .parse()
                .ok()?;
            Some((index, r.get("versionnumber").and_then(Json::as_i64)?))
        })
        .collect();
    Ok((captured, versions))
}

/// What the send phase measured.
struct Drive {
    /// Latency of every event whose completion was seen.
    latencies: Vec<Duration>,
    /// First POST start to last completion.
    duration: Duration,
    /// The last completion, when there was one.
    last: Option<Instant>,
    post_retries: u64,
    post_failures: u64,
}

/// Sends every captured webhook and waits for the completions.
async fn drive(
    stage: &Stage,
    captured: &[Captured],
    options: &LiveOptions,
) -> Result<Drive, LiveError> {
    // Every request prepared once: the load generator's own cost per webhook stays small.
    let path = format!("/webhooks/dataverse?code={}", stage.dv_secret);
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        captured
            .iter()
            .map(|c| http1::post_request(stage.rt.addr(), &path, &c.headers, &c.body))
            .collect(),
    );
    let client = Arc::new(http1::Pool::new(stage.rt.addr()));
    let index_of: Arc<HashMap<String, usize>> = Arc::new(
        captured
            .iter()
            .enumerate()
            .map(|(i, c)| (c.event_id.clone(), i))
            .collect(),
    );
    // Completions: collected by their own task so a slow POST never delays their reading.
    let mut completions = stage.rt.completions();
    let total = captured.len();
    // Shared with the collector, so a run that times out still reports the events that did
    // complete (their latencies, the throughput they make) beside what it lost.
    let done: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total]));
    let collector = {
        let index_of = index_of.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while seen < total {
                let Some(c) = completions.recv().await else {
                    break;
                };
                if c.source != Side::Crm {
                    continue;
                }
                if let Some(&i) = index_of.get(&c.event_id) {
                    let mut done = done
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if done[i].is_none() {
                        done[i] = Some(c.at);
                        seen += 1;
                    }
                }
            }
        })
    };

    let retries = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let starts: Vec<Option<Instant>> = match options.rate {
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..options.concurrency.min(total))
                .map(|_| {
                    let (client, requests) = (client.clone(), requests.clone());
                    let (next, retries, failures) =
                        (next.clone(), retries.clone(), failures.clone());
                    tokio::spawn(async move {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(request) = requests.get(i) else {
                                break;
                            };
                            let at = Instant::now();
                            post(&client, request, &retries, &failures).await;
                            mine.push((i, at));
                        }
                        mine
                    })
                })
                .collect();
            let mut starts = vec![None; total];
            for t in tasks {
                for (i, at) in t.await.unwrap_or_default() {
                    starts[i] = Some(at);
                }
            }
            starts
        }
        Some(rate) => {
            let permits = Arc::new(Semaphore::new(options.concurrency));
            let mut tasks = Vec::with_capacity(total);
            for i in 0..total {
                // Open loop: each event is due at its scheduled time and timed from it, so a
                // stalled pipeline shows in the latencies instead of slowing the sender.
                let due = began + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (client, requests) = (client.clone(), requests.clone());
                let (retries, failures) = (retries.clone(), failures.clone());
                tasks.push(tokio::spawn(async move {
                    post(&client, &requests[i], &retries, &failures).await;
                    drop(permit);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            (0..total)
                .map(|i| Some(began + Duration::from_secs_f64(i as f64 / rate)))
                .collect()
        }
    };
    match tokio::time::timeout(options.timeout, collector).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => return Err(LiveError::Http(format!("completion collector failed: {e}"))),
    }
    let done = done
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut latencies = Vec::with_capacity(total);
    let mut last = began;
    for (start, end) in starts.iter().zip(&done) {
        if let (Some(s), Some(e)) = (start, end) {
            latencies.push(e.saturating_duration_since(*s));
            last = last.max(*e);
        }
    }
    Ok(Drive {
        latencies,
        last: (last > began).then_some(last),
        duration: last.saturating_duration_since(began),
        post_retries: retries.load(Ordering::Relaxed),
        post_failures: failures.load(Ordering::Relaxed),
    })
}

/// POSTs one webhook (its prepared `request`); retries on 5xx or a failed connection (as
/// Dataverse does).
async fn post(client: &http1::Pool, request: &[u8], retries: &AtomicU64, failures: &AtomicU64) {
    for attempt in 1..=POST_ATTEMPTS {
        match client.exchange(request).await {
            Ok(status) if (200..300).contains(&status) => return,
            Ok(status) if (400..500).contains(&status) => break,
            _ if attempt < POST_ATTEMPTS => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => {}
        }
    }
    failures.fetch_add(1, Ordering::Relaxed);
}

/// Waits until the queue is empty, F&O has no event left to deliver and the engine's counters
/// stand still.
async fn wait_idle(stage: &Stage) -> Result<(), LiveError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut last = None;
    let mut quiet = 0;
    loop {
        let fno_idle = stage.fno.wait_events_idle(Duration::from_millis(200)).await;
        let stats = stage.rt.stats().await;
        let q = stats.queue;
        let empty = q.ready + q.in_flight + q.delayed == 0;
        if fno_idle && empty && last == Some(stats.engine.events) {
            quiet += 1;
            if quiet >= 2 {
                return Ok(());
            }
        } else {
            quiet = 0;
        }
        last = Some(stats.engine.events);
        if Instant::now() > deadline {
            return Err(LiveError::Timeout {
                step: "pipeline idle".into(),
                secs: STEP_TIMEOUT.as_secs(),
                waiting: format!(
                    "queue ready {} in flight {} delayed {}, F&O events idle {fno_idle}",
                    q.ready, q.in_flight, q.delayed
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the check of both sides found.
struct Check {
    lost: usize,
    duplicated: usize,
    problems: Vec<String>,
}

/// The most problems listed in the report.
const MAX_PROBLEMS: usize = 20;

fn number_eq(v: Option<&Json>, want: i64) -> bool {
    match v {
        Some(Json::Number(n)) => n
            .to_string()
            .parse::<rust_decimal::Decimal>()
            .is_ok_and(|d| d == rust_decimal::Decimal::from(want)),
        Some(Json::String(s)) => s
            .parse::<rust_decimal::Decimal>()
            .is_ok_and(|d| d == rust_decimal::Decimal::from(want)),
        _ => false,
    }
}

/// Checks both sides: every account once in F&O with its event's values, written once there,
/// and not written again in Dataverse.
async fn check(stage: &Stage, n: usize, versions: &HashMap<usize, i64>) -> Check {
    let mut problems = Vec::new();
    let mut note = |p: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        }
    };
    // F&O: one row per account. The entity key is (company, account): a second row of an
    // account (in another company) or a row of no account of the run is a duplicate too, as is
    // a second write of a row, counted below from F&O's own change log.
    let rows = stage.fno.rows("CustomersV3");
    let mut by_index: HashMap<usize, &Json> = HashMap::new();
    let mut extra_rows = 0;
    for r in &rows {
        let Some(index) = r
            .get("CustomerAccount")
            .and_then(Json::as_str)
            .and_then(|s| s.strip_prefix("BENCH-"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            extra_rows += 1;
            note(format!("unexpected F&O customer {r}"));
            continue;
        };
        if by_index.insert(index, r).is_some() {
            extra_rows += 1;
            note(format!(
                "{}: more than one row in F&O",
                account_number(index)
            ));
        }
    }
    let mut lost = 0;
    for i in 0..n {
        let e = expected(i);
        let number = account_number(i);
        let Some(row) = by_index.get(&i) else {
            lost += 1;
            note(format!("{number}: missing in F&O CustomersV3"));
            continue;
        };
        let wrong: Vec<&str> = [
            ("dataAreaId", text_eq(row, "dataAreaId", "usmf")),
            (
                "OrganizationName",
                text_eq(row, "OrganizationName", &e.name),
            ),
            (
                "CreditLimit",
                number_eq(row.get("CreditLimit"), e.credit_limit),
            ),
            (
                "DeliveryAddressCity",
                text_eq(row, "DeliveryAddressCity", &e.city),
            ),
            (
                "PrimaryContactPhone",
                text_eq(row, "PrimaryContactPhone", &e.phone),
            ),
            (
                "SalesCurrencyCode",
                text_eq(row, "SalesCurrencyCode", "USD"),
            ),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(f, _)| f)
        .collect();
        if !wrong.is_empty() {
            lost += 1;
            note(format!(
                "{number}: F&O holds other values in {}",
                wrong.join(", ")
            ));
        }
    }
    // F&O writes, from its change log (one data event per write of a record).
    let mut writes: HashMap<String, usize> = HashMap::new();
    for d in stage.fno.event_deliveries() {
        if d.entity == "CustomersV3" {
            *writes.entry(d.record_id).or_default() += 1;
        }
    }
    let written_twice = writes.values().filter(|&&w| w > 1).count();
    if written_twice > 0 {
        note(format!(
            "{written_twice} F&O customers were written more than once"
        ));
    }
    let mut duplicated = written_twice + extra_rows;
    let created = writes.len();
    if created != by_index.len() {
        note(format!(
            "F&O reported writes of {created} customers but holds {}",
            by_index.len()
        ));
    }
    // Dataverse: the source rows must not have been written again by the pipeline.
    for r in stage.dv.rows("accounts") {
        let Some(index) = r
            .get("accountnumber")
            .and_then(Json::as_str)
            .and_then(|s| s.strip_prefix("BENCH-"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let now = r.get("versionnumber").and_then(Json::as_i64);
        if now != versions.get(&index).copied() {
            duplicated += 1;
            note(format!(
                "{}: the Dataverse row was written again (versionnumber {:?} -> {now:?})",
                account_number(index),
                versions.get(&index)
            ));
        }
    }
    Check {
        lost,
        duplicated,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert!((percentile(&v, 0.5) - 100.0).abs() < f64::EPSILON);
        assert!((percentile(&v, 0.99) - 198.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 0.99).abs() < f64::EPSILON);
    }

    #[test]
    fn stat_lines_give_name_and_cpu() {
        let line = "4242 (tokio-rt worker) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 1 0";
        assert_eq!(
            cpu_of_stat(line),
            Some(("tokio-rt worker".into(), Duration::from_millis(2_000)))
        );
        assert_eq!(cpu_of_stat("garbage"), None);
    }

    #[test]
    fn numbers_compare_as_decimals() {
        assert!(number_eq(Some(&json!(1500)), 1500));
        assert!(number_eq(
            Some(&serde_json::from_str("1500.00").unwrap()),
            1500
        ));
        assert!(number_eq(Some(&json!("1500.0")), 1500));
        assert!(!number_eq(Some(&json!(1501)), 1500));
        assert!(!number_eq(None, 1500));
    }
}
