//! `dualwrite demo`: the whole pipeline against local simulators of Entra ID, Dataverse and
//! F&O — reference data seeded, a scenario run through real webhooks and connectors, a summary
//! of what happened, and a pairwise check that both sides converged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualwrite_core::map::TableMap;
use dualwrite_core::map::apply::{
    LookupResolution, LookupTarget, ResolvedLookups, apply_map, integration_key,
    lookup_requests_with, record_key,
};
use dualwrite_core::ports::{Connector, JournalStore, LinkStore, Query, WorkQueue};
use dualwrite_core::{IntegrationKey, LookupRef, Record, Side, Value};
use dualwrite_simulators::{DataverseSim, EntraSim, FnoSim};
use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::local::{LocalStack, LocalStackError, LocalStackOptions};
pub use crate::local::{crm_tables, erp_entities, maps_with_dependencies as demo_maps};
use crate::runtime::{RuntimeHandle, StartError};

/// The maps the demo enables (their dependencies are enabled too).
pub const DEMO_MAPS: &[&str] = &[
    "legal-entities",
    "currencies",
    "units",
    "payment-terms",
    "customer-groups",
    "customers-v3-accounts",
    "released-distinct-products",
    "sales-order-headers",
    "sales-order-lines",
];

/// How long the demo waits for one step before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// Accounts created on each side.
    pub records: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { records: 5 }
    }
}

/// Why the demo could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A simulator failed to start or refused a call.
    #[error("simulator: {0}")]
    Simulator(String),
    /// The generated configuration did not validate (a bug of the demo).
    #[error("demo configuration: {0}")]
    Config(#[from] crate::ConfigError),
    /// The runtime did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A step did not complete in time.
    #[error("step `{step}` did not complete within {secs} s: still waiting for {waiting}")]
    Timeout {
        /// The step.
        step: String,
        /// Seconds waited.
        secs: u64,
        /// What was missing.
        waiting: String,
    },
    /// Reading a side for the convergence check failed.
    #[error("reading {entity} on {side} for the convergence check failed: {message}")]
    Read {
        /// The side.
        side: Side,
        /// The entity.
        entity: String,
        /// What failed.
        message: String,
    },
}

impl From<LocalStackError> for DemoError {
    fn from(e: LocalStackError) -> Self {
        match e {
            LocalStackError::Simulator(m) => DemoError::Simulator(m),
            LocalStackError::Config(e) => DemoError::Config(e),
            LocalStackError::Start(e) => DemoError::Start(e),
        }
    }
}

fn sim_err(e: impl std::fmt::Display) -> DemoError {
    DemoError::Simulator(e.to_string())
}

/// How the conflicting edit was resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictShown {
    /// The record (F&O customer account).
    pub record: String,
    /// The value written in Dataverse.
    pub crm_value: String,
    /// The value written in F&O.
    pub erp_value: String,
    /// The value both sides hold at the end.
    pub final_value: String,
    /// `crm`, `erp`, or `none` when the sides still differ.
    pub winner: String,
    /// The customers map's conflict policy, e.g. `last_writer_wins`.
    pub policy: String,
    /// Conflicts the engine logged for the two edits: 1 when they met as a conflict, as the
    /// demo arranges (both edits are queued before either is processed); anything else fails
    /// the run.
    pub detected: u64,
}

/// What the demo measured and found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoReport {
    /// Events processed by the engine (duplicates included).
    pub events: u64,
    /// Records written by the engine.
    pub writes: u64,
    /// Changes recognised as dualwrite's own writes coming back.
    pub echoes_suppressed: u64,
    /// Conflicts detected.
    pub conflicts: u64,
    /// Changes parked for a dependency (and released later).
    pub parked: u64,
    /// Errors logged for a person.
    pub errors: u64,
    /// The error log's messages (newest first), so a failed run says what went wrong.
    pub error_messages: Vec<String>,
    /// Messages in the dead-letter queue.
    pub dead_letters: u64,
    /// Webhook deliveries accepted by the receivers.
    pub webhooks_accepted: u64,
    /// Changes timed from a simulator change to the other side's write.
    pub latency_samples: usize,
    /// Median end-to-end latency in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile end-to-end latency in milliseconds.
    pub p99_ms: f64,
    /// Linked record pairs compared.
    pub records_checked: usize,
    /// Every difference found, in words; empty when converged.
    pub differences: Vec<String>,
    /// True when every mapped record matched on both sides.
    pub converged: bool,
    /// True when the demo showed what it set out to: converged, no error logged, no dead
    /// letter, echoes recognised, and the simultaneous edits met as one conflict won by the
    /// side the policy names. `dualwrite demo` exits 0 only then.
    pub passed: bool,
    /// Why the run did not pass, in words; empty when it passed.
    pub failures: Vec<String>,
    /// The conflicting edit and its resolution.
    pub conflict: Option<ConflictShown>,
    /// Wall time of the whole demo in milliseconds.
    pub duration_ms: u64,
}

/// Where progress lines go.
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// The running simulators and pipeline.
struct Stage {
    dv: DataverseSim,
    fno: FnoSim,
    rt: RuntimeHandle,
    maps: Vec<TableMap>,
    latencies: Vec<Duration>,
    /// Records the scenario created (each must be one checked pair at the end).
    created: usize,
    /// Accounts created in Dataverse that nothing of the scenario changes afterwards: their
    /// number, row id and `versionnumber` after creation. Dualwrite writes them to F&O and
    /// never back (its own write's echo is recognised), which the end of the run checks.
    untouched_crm_accounts: Vec<(String, String, Option<i64>)>,
    _entra: EntraSim,
    _dir: tempfile::TempDir,
}

/// Runs the demo: simulators up, reference data seeded, scenario run, pipeline idle, summary
/// and convergence check. Progress lines go to `progress`.
///
/// # Errors
/// [`DemoError`] when a step cannot run or does not complete in time; a run that completes
/// but does not converge, or does not show what it claims, is an `Ok` report with
/// `passed == false` and its `failures`.
pub async fn run_demo(
    options: DemoOptions,
    progress: Progress<'_>,
) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let mut stage = start(progress).await?;
    seed(&mut stage, progress).await?;
    let n = options.records.max(1);
    let crm_accounts = accounts_from_crm(&mut stage, n, progress).await?;
    let erp_accounts = accounts_from_erp(&mut stage, n, progress).await?;
    erp_update(&mut stage, &erp_accounts[0], progress).await?;
    sales_order(&mut stage, &crm_accounts[0], progress).await?;
    let conflict = conflict(&mut stage, &erp_accounts[0], progress).await?;
    progress("waiting for the pipeline to go idle ...");
    wait_idle(&stage, "final").await?;
    let stats = stage.rt.stats().await;
    let (records_checked, differences) = check_convergence(&stage).await?;
    let mut lat: Vec<f64> = stage
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let logged = stage.rt.store().errors(100).await.unwrap_or_default();
    let error_messages: Vec<String> = logged
        .iter()
        .map(|e| {
            format!(
                "{:?} {} {}: {}",
                e.class,
                e.map.as_deref().unwrap_or("-"),
                e.key.as_deref().unwrap_or("-"),
                e.message
            )
        })
        .collect();
    let errors = errors_logged(logged.len() as u64, stats.engine.errors);
    let mut failures = demo_failures(
        &differences,
        (records_checked, stage.created),
        errors,
        stats.queue.dead,
        stats.engine.echoes_suppressed,
        &conflict,
    );
    failures.extend(echo_failures(&stage));
    let report = DemoReport {
        events: stats.engine.events,
        writes: stats.engine.writes,
        echoes_suppressed: stats.engine.echoes_suppressed,
        conflicts: stats.engine.conflicts,
        parked: stats.engine.parked,
        errors,
        error_messages,
        dead_letters: stats.queue.dead,
        webhooks_accepted: stats.receivers.accepted,
        latency_samples: lat.len(),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        records_checked,
        converged: differences.is_empty(),
        passed: failures.is_empty(),
        failures,
        differences,
        conflict: Some(conflict),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    stage.rt.shutdown().await;
    Ok(report)
}

/// The accounts created in Dataverse and left alone since: never written back to Dataverse
/// (their `versionnumber` is what it was after creation). A write back means the echo of
/// dualwrite's own write to F&O was taken for a change of the customer.
fn echo_failures(stage: &Stage) -> Vec<String> {
    let mut failures = Vec::new();
    for (number, id, version) in &stage.untouched_crm_accounts {
        let now = stage
            .dv
            .row("accounts", id)
            .and_then(|r| r.get("versionnumber").and_then(Json::as_i64));
        if version.is_none() || now != *version {
            failures.push(format!(
                "account {number} was written back to Dataverse (versionnumber {version:?} -> {now:?}): an echo taken for a change"
            ));
        }
    }
    failures
}

fn errors_logged(in_log: u64, counted: u64) -> u64 {
    in_log.max(counted)
}

/// Why a demo run does not show what it set out to (empty: it does).
fn demo_failures(
    differences: &[String],
    (checked, created): (usize, usize),
    errors: u64,
    dead_letters: u64,
    echoes_suppressed: u64,
    conflict: &ConflictShown,
) -> Vec<String> {
    let mut failures = Vec::new();
    if !differences.is_empty() {
        failures.push(format!(
            "the sides differ in {} place(s)",
            differences.len()
        ));
    }
    if checked < created {
        failures.push(format!(
            "only {checked} record pair(s) were found to compare, for {created} record(s) created"
        ));
    }
    if errors > 0 {
        failures.push(format!("{errors} error(s) logged for a person"));
    }
    if dead_letters > 0 {
        failures.push(format!("{dead_letters} change(s) in the dead letters"));
    }
    if echoes_suppressed == 0 {
        failures.push("no echo of dualwrite's own writes was recognised".to_string());
    }
    if conflict.detected != 1 {
        failures.push(format!(
            "the simultaneous edits of {} were not met as one conflict ({} detected)",
            conflict.record, conflict.detected
        ));
    }
    // The F&O edit is made after the Dataverse one (a tie goes to F&O too).
    let expected = match conflict.policy.as_str() {
        "last_writer_wins" | "erp_wins" => Some("erp"),
        "crm_wins" => Some("crm"),
        _ => None,
    };
    if let Some(expected) = expected
        && conflict.winner != expected
    {
        failures.push(format!(
            "policy {} should have made {expected} win the conflict of {}; the winner was {}",
            conflict.policy, conflict.record, conflict.winner
        ));
    }
    failures
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let value = sorted[rank.clamp(1, sorted.len()) - 1];
    (value * 10.0).round() / 10.0
}

/// Renders the summary table printed by `dualwrite demo`.
pub fn summary_table(r: &DemoReport) -> String {
    let rows = [
        ("events", r.events.to_string()),
        ("writes", r.writes.to_string()),
        ("echoes suppressed", r.echoes_suppressed.to_string()),
        ("conflicts", r.conflicts.to_string()),
        ("parked", r.parked.to_string()),
        ("errors", r.errors.to_string()),
        ("dead letters", r.dead_letters.to_string()),
        ("webhooks accepted", r.webhooks_accepted.to_string()),
        (
            "latency p50",
            format!("{:.1} ms ({} samples)", r.p50_ms, r.latency_samples),
        ),
        ("latency p99", format!("{:.1} ms", r.p99_ms)),
        ("records checked", r.records_checked.to_string()),
        (
            "converged",
            if r.converged {
                "yes".into()
            } else {
                format!("NO ({} differences)", r.differences.len())
            },
        ),
        (
            "passed",
            if r.passed {
                "yes".into()
            } else {
                format!("NO ({} failures)", r.failures.len())
            },
        ),
        (
            "duration",
            format!("{:.1} s", r.duration_ms as f64 / 1000.0),
        ),
    ];
    let mut out = String::from("+---------------------+------------------------------+\n");
    for (k, v) in rows {
        out.push_str(&format!("| {k:<19} | {v:<28} |\n"));
    }
    out.push_str("+---------------------+------------------------------+\n");
    out
}

async fn start(progress: Progress<'_>) -> Result<Stage, DemoError> {
    let maps = demo_maps(DEMO_MAPS);
    progress(&format!(
        "enabling {} maps: {}",
        maps.len(),
        maps.iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let local = LocalStack::start(LocalStackOptions::new("demo", maps.clone())).await?;
    progress(&format!(
        "simulators up: Entra ID {}, Dataverse {}, F&O {}",
        local.entra.base_url(),
        local.dv.base_url(),
        local.fno.base_url()
    ));
    progress(&format!(
        "dualwrite runtime listening on {}",
        local.runtime_url()
    ));
    local.connect_webhooks();
    let LocalStack {
        entra,
        dv,
        fno,
        rt,
        dir,
        ..
    } = local;
    Ok(Stage {
        dv,
        fno,
        rt,
        maps,
        latencies: Vec::new(),
        created: 0,
        untouched_crm_accounts: Vec::new(),
        _entra: entra,
        _dir: dir,
    })
}

/// Waits until the queue is empty, no webhook is pending and the engine counters stand still.
async fn wait_idle(stage: &Stage, step: &str) -> Result<(), DemoError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut last = None;
    let mut quiet = 0;
    loop {
        let dv_idle = stage
            .dv
            .wait_webhooks_idle(Duration::from_millis(500))
            .await;
        let fno_idle = stage.fno.wait_events_idle(Duration::from_millis(500)).await;
        let depth = stage.rt.queue().depth().await.unwrap_or_default();
        let events = stage.rt.engine().stats().events;
        let empty = depth.ready + depth.in_flight + depth.delayed == 0;
        if dv_idle && fno_idle && empty && last == Some(events) {
            quiet += 1;
            if quiet >= 2 {
                return Ok(());
            }
        } else {
            quiet = 0;
        }
        last = Some(events);
        if Instant::now() > deadline {
            return Err(DemoError::Timeout {
                step: step.into(),
                secs: STEP_TIMEOUT.as_secs(),
                waiting: format!(
                    "queue ready {} in flight {} delayed {}, webhooks idle: dataverse {dv_idle}, fno {fno_idle}",
                    depth.ready, depth.in_flight, depth.delayed
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Polls until `found` holds for every pending item, recording each item's latency from
/// `since`.
async fn wait_for<T: Clone + std::fmt::Debug>(
    step: &str,
    mut pending: Vec<(T, Instant)>,
    mut found: impl FnMut(&T) -> bool,
    latencies: &mut Vec<Duration>,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !pending.is_empty() {
        let now = Instant::now();
        pending.retain(|(item, since)| {
            if found(item) {
                latencies.push(now.duration_since(*since));
                false
            } else {
                true
            }
        });
        if pending.is_empty() {
            break;
        }
        if now > deadline {
            return Err(DemoError::Timeout {
                step: step.into(),
                secs: STEP_TIMEOUT.as_secs(),
                waiting: format!("{:?}", pending.iter().map(|p| &p.0).collect::<Vec<_>>()),
            });
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    Ok(())
}

fn field_eq(row: &Json, field: &str, want: &str) -> bool {
    match row.get(field) {
        Some(Json::String(s)) => s.eq_ignore_ascii_case(want),
        Some(Json::Number(n)) => n.to_string() == want,
        _ => false,
    }
}

fn number_of(row: &Json, field: &str) -> Option<f64> {
    match row.get(field)? {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn find_row(rows: &[Json], field: &str, want: &str) -> Option<Json> {
    rows.iter().find(|r| field_eq(r, field, want)).cloned()
}

fn crm_id(
    stage: &Stage,
    set: &str,
    id_field: &str,
    field: &str,
    want: &str,
) -> Result<String, DemoError> {
    find_row(&stage.dv.rows(set), field, want)
        .and_then(|r| r.get(id_field).and_then(Json::as_str).map(str::to_string))
        .ok_or_else(|| DemoError::Timeout {
            step: "lookup in Dataverse".into(),
            secs: 0,
            waiting: format!("{set} row with {field} = {want}"),
        })
}

/// An F&O row to create, and the Dataverse row it must become: entity set, field, value and,
/// for a per-company row, the company's code (the same row is seeded in two companies).
type SeedRow<'a> = (&'a str, Json, (&'a str, &'a str, String, Option<&'a str>));

async fn seed(stage: &mut Stage, progress: Progress<'_>) -> Result<(), DemoError> {
    progress(
        "seeding reference data in F&O: companies, currencies, units, payment terms, customer groups, products",
    );
    let t0 = Instant::now();
    // In waves, dependencies first: a company must exist in Dataverse before its rows.
    let mut waves: Vec<Vec<SeedRow<'_>>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for (id, name) in [
        ("USMF", "Contoso Entertainment System USA"),
        ("DEMF", "Contoso Entertainment System Germany"),
    ] {
        waves[0].push((
            "LegalEntities",
            json!({"LegalEntityId": id, "Name": name}),
            ("cdm_companies", "cdm_companycode", id.into(), None),
        ));
    }
    for (code, name, sym) in [("USD", "US Dollar", "$"), ("EUR", "Euro", "€")] {
        waves[1].push((
            "Currencies",
            json!({"CurrencyCode": code, "Name": name, "Symbol": sym}),
            (
                "transactioncurrencies",
                "isocurrencycode",
                code.into(),
                None,
            ),
        ));
    }
    for (sym, class) in [("ea", "Quantity"), ("pcs", "Quantity")] {
        waves[1].push((
            "UnitsOfMeasure",
            json!({"UnitSymbol": sym, "UnitClass": class, "DecimalPrecision": 0}),
            ("uoms", "msdyn_symbol", sym.into(), None),
        ));
    }
    for company in ["usmf", "demf"] {
        waves[1].push((
            "TermsOfPayment",
            json!({"dataAreaId": company, "Name": "Net30", "Description": "Net 30 days"}),
            (
                "msdyn_paymentterms",
                "msdyn_name",
                "Net30".into(),
                Some(company),
            ),
        ));
        for (group, desc) in [("10", "Wholesale customers"), ("20", "Retail customers")] {
            waves[2].push(("CustomerGroups", json!({"dataAreaId": company, "CustomerGroupId": group, "Description": desc, "PaymentTermId": "Net30"}), ("msdyn_customergroups", "msdyn_groupid", group.into(), Some(company))));
        }
    }
    for (num, name, price) in [
        ("P-1000", "Surround speaker", 129.99),
        ("P-2000", "Subwoofer", 349.5),
        ("P-3000", "Installation service", 80.0),
    ] {
        let kind = if num == "P-3000" { "Service" } else { "Item" };
        waves[2].push(("CDSReleasedDistinctProducts", json!({
            "ProductNumber": num, "ProductName": name, "ProductDescription": format!("{name} (demo)"),
            "ItemNumber": num, "CurrencyCode": "USD", "SalesUnitSymbol": "ea", "SalesPrice": price,
            "UnitCost": price / 2.0, "ProductType": kind, "SalesUnitDecimalPrecision": 0
        }), ("products", "msdyn_productnumber", num.into(), None)));
    }
    for wave in waves {
        let mut expect = Vec::new();
        for (set, row, (crm_set, field, want, company)) in wave {
            stage.fno.user_create(set, row).map_err(sim_err)?;
            expect.push((
                (crm_set.to_string(), field.to_string(), want, company),
                Instant::now(),
            ));
            stage.created += 1;
        }
        let dv = stage.dv.clone();
        wait_for(
            "seed reference data",
            expect,
            |(set, field, want, company)| {
                // A per-company row arrived only when its own company's did.
                let company_id = company.map(|code| {
                    dv.rows("cdm_companies")
                        .iter()
                        .find(|c| field_eq(c, "cdm_companycode", code))
                        .and_then(|c| c.get("cdm_companyid").and_then(Json::as_str))
                        .map(str::to_string)
                });
                dv.rows(set).iter().any(|r| {
                    field_eq(r, field, want)
                        && match &company_id {
                            None => true,
                            Some(None) => false,
                            Some(Some(id)) => field_eq(r, "_msdyn_company_value", id),
                        }
                })
            },
            &mut stage.latencies,
        )
        .await?;
        wait_idle(stage, "seed reference data").await?;
    }
    progress(&format!(
        "  reference data arrived in Dataverse in {} ms",
        t0.elapsed().as_millis()
    ));
    Ok(())
}

async fn accounts_from_crm(
    stage: &mut Stage,
    n: usize,
    progress: Progress<'_>,
) -> Result<Vec<String>, DemoError> {
    progress(&format!(
        "creating {n} accounts in Dataverse (as a user) ..."
    ));
    let usmf = crm_id(
        stage,
        "cdm_companies",
        "cdm_companyid",
        "cdm_companycode",
        "USMF",
    )?;
    let usd = crm_id(
        stage,
        "transactioncurrencies",
        "transactioncurrencyid",
        "isocurrencycode",
        "USD",
    )?;
    let group = stage
        .dv
        .rows("msdyn_customergroups")
        .into_iter()
        .find(|r| field_eq(r, "msdyn_groupid", "10") && field_eq(r, "_msdyn_company_value", &usmf))
        .and_then(|r| {
            r.get("msdyn_customergroupid")
                .and_then(Json::as_str)
                .map(str::to_string)
        })
        .ok_or_else(|| DemoError::Timeout {
            step: "find customer group 10".into(),
            secs: 0,
            waiting: "msdyn_customergroups row 10 of USMF".into(),
        })?;
    let t0 = Instant::now();
    let mut pending = Vec::new();
    let mut numbers = Vec::new();
    for i in 1..=n {
        let number = format!("CRM-{i:04}");
        let row = stage
            .dv
            .user_create(
                "accounts",
                json!({
                    "accountnumber": number,
                    "name": format!("Fabrikam Branch {i}"),
                    "customertypecode": 3,
                    "creditlimit": 1000 * i,
                    "address1_city": "Seattle",
                    "telephone1": format!("+1 206 555 {i:04}"),
                    "msdyn_company@odata.bind": format!("/cdm_companies({usmf})"),
                    "transactioncurrencyid@odata.bind": format!("/transactioncurrencies({usd})"),
                    "msdyn_customergroupid@odata.bind": format!("/msdyn_customergroups({group})"),
                }),
            )
            .map_err(sim_err)?;
        stage.created += 1;
        if i > 1 {
            // The first one is the sales order's customer; the others are left alone.
            stage.untouched_crm_accounts.push((
                number.clone(),
                row.get("accountid")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_string(),
                row.get("versionnumber").and_then(Json::as_i64),
            ));
        }
        pending.push((number.clone(), Instant::now()));
        numbers.push(number);
    }
    let fno = stage.fno.clone();
    wait_for(
        "accounts to F&O customers",
        pending,
        |num| {
            fno.rows("CustomersV3")
                .iter()
                .any(|r| field_eq(r, "CustomerAccount", num))
        },
        &mut stage.latencies,
    )
    .await?;
    progress(&format!(
        "  {n} accounts appeared as F&O customers (CustomersV3) in {} ms",
        t0.elapsed().as_millis()
    ));
    Ok(numbers)
}

async fn accounts_from_erp(
    stage: &mut Stage,
    n: usize,
    progress: Progress<'_>,
) -> Result<Vec<String>, DemoError> {
    progress(&format!("creating {n} customers in F&O (as a user) ..."));
    let t0 = Instant::now();
    let mut pending = Vec::new();
    let mut numbers = Vec::new();
    for i in 1..=n {
        let number = format!("ERP-{i:04}");
        stage
            .fno
            .user_create(
                "CustomersV3",
                json!({
                    "dataAreaId": "usmf",
                    "CustomerAccount": number,
                    "OrganizationName": format!("Northwind Outlet {i}"),
                    "PartyType": "Organization",
                    "SalesCurrencyCode": "USD",
                    "CustomerGroupId": "20",
                    "CreditLimit": 500 * i,
                    "DeliveryAddressCity": "Redmond",
                    "PaymentTerms": "Net30",
                }),
            )
            .map_err(sim_err)?;
        stage.created += 1;
        pending.push((number.clone(), Instant::now()));
        numbers.push(number);
    }
    let dv = stage.dv.clone();
    wait_for(
        "F&O customers to accounts",
        pending,
        |num| {
            dv.rows("accounts")
                .iter()
                .any(|r| field_eq(r, "accountnumber", num))
        },
        &mut stage.latencies,
    )
    .await?;
    progress(&format!(
        "  {n} customers appeared as Dataverse accounts in {} ms",
        t0.elapsed().as_millis()
    ));
    Ok(numbers)
}

async fn erp_update(
    stage: &mut Stage,
    account: &str,
    progress: Progress<'_>,
) -> Result<(), DemoError> {
    wait_idle(stage, "before the F&O update").await?;
    progress(&format!(
        "updating customer {account} in F&O: CreditLimit 98765.43 ..."
    ));
    stage
        .fno
        .user_edit(
            "CustomersV3",
            &format!("dataAreaId='usmf',CustomerAccount='{account}'"),
            json!({"CreditLimit": 98765.43}),
        )
        .map_err(sim_err)?;
    let dv = stage.dv.clone();
    let account = account.to_string();
    wait_for(
        "F&O update to Dataverse",
        vec![(account.clone(), Instant::now())],
        |num| {
            dv.rows("accounts").iter().any(|r| {
                field_eq(r, "accountnumber", num)
                    && number_of(r, "creditlimit").is_some_and(|c| (c - 98765.43).abs() < 1e-6)
            })
        },
        &mut stage.latencies,
    )
    .await?;
    progress(&format!(
        "  account {account} in Dataverse now has creditlimit 98765.43"
    ));
    Ok(())
}

async fn sales_order(
    stage: &mut Stage,
    account: &str,
    progress: Progress<'_>,
) -> Result<(), DemoError> {
    wait_idle(stage, "before the sales order").await?;
    progress(&format!(
        "creating sales order SO-DEMO-1 with 2 lines in Dataverse for account {account} ..."
    ));
    let usmf = crm_id(
        stage,
        "cdm_companies",
        "cdm_companyid",
        "cdm_companycode",
        "USMF",
    )?;
    let usd = crm_id(
        stage,
        "transactioncurrencies",
        "transactioncurrencyid",
        "isocurrencycode",
        "USD",
    )?;
    let acc = crm_id(stage, "accounts", "accountid", "accountnumber", account)?;
    let ea = crm_id(stage, "uoms", "uomid", "msdyn_symbol", "ea")?;
    let so = stage
        .dv
        .user_create(
            "salesorders",
            json!({
                "msdyn_salesordernumber": "SO-DEMO-1",
                "name": "Demo order",
                "msdyn_ordertype": 192350000,
                "shipto_city": "Seattle",
                "customerid@odata.bind": format!("/accounts({acc})"),
                "msdyn_invoicecustomerid@odata.bind": format!("/accounts({acc})"),
                "transactioncurrencyid@odata.bind": format!("/transactioncurrencies({usd})"),
                "msdyn_company@odata.bind": format!("/cdm_companies({usmf})"),
            }),
        )
        .map_err(sim_err)?;
    stage.created += 1;
    let t_header = Instant::now();
    let so_id = so
        .get("salesorderid")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string();
    let mut pending = vec![("header SO-DEMO-1".to_string(), t_header)];
    for (seq, product, qty, price) in [(1, "P-1000", 4, 129.99), (2, "P-2000", 1, 349.5)] {
        let pid = crm_id(
            stage,
            "products",
            "productid",
            "msdyn_productnumber",
            product,
        )?;
        stage
            .dv
            .user_create(
                "salesorderdetails",
                json!({
                    "salesorderid@odata.bind": format!("/salesorders({so_id})"),
                    "sequencenumber": seq,
                    "productid@odata.bind": format!("/products({pid})"),
                    "description": product,
                    "quantity": qty,
                    "priceperunit": price,
                    "manualdiscountamount": 0,
                    "ispriceoverridden": true,
                    "uomid@odata.bind": format!("/uoms({ea})"),
                    "msdyn_company@odata.bind": format!("/cdm_companies({usmf})"),
                }),
            )
            .map_err(sim_err)?;
        stage.created += 1;
        pending.push((format!("line {seq} {product}"), Instant::now()));
    }
    let fno = stage.fno.clone();
    let account = account.to_string();
    wait_for(
        "sales order to F&O",
        pending,
        |what| {
            if what.starts_with("header") {
                fno.rows("CDSSalesOrderHeaders").iter().any(|r| {
                    field_eq(r, "SalesOrderNumber", "SO-DEMO-1")
                        && field_eq(r, "OrderingCustomerAccountNumber", &account)
                })
            } else {
                let product = what.rsplit(' ').next().unwrap_or_default();
                fno.rows("CDSSalesOrderLines").iter().any(|r| {
                    field_eq(r, "SalesOrderNumber", "SO-DEMO-1")
                        && field_eq(r, "ProductNumber", product)
                })
            }
        },
        &mut stage.latencies,
    )
    .await?;
    progress(&format!(
        "  order SO-DEMO-1 is in F&O for customer {account}, lines with products P-1000 and P-2000 resolved"
    ));

    // A line added in F&O: Dataverse addresses it by its alternate key, whose order lookup is
    // given by the order's row id (`_salesorderid_value=<guid>`).
    wait_idle(stage, "before the F&O line").await?;
    progress("adding line 3 (P-1000 x 2) to SO-DEMO-1 in F&O (as a user) ...");
    stage
        .fno
        .user_create(
            "CDSSalesOrderLines",
            json!({
                "dataAreaId": "usmf",
                "SalesOrderNumber": "SO-DEMO-1",
                "LineCreationSequenceNumber": 3,
                "ProductNumber": "P-1000",
                "ProductName": "P-1000",
                "OrderedSalesQuantity": 2,
                "SalesUnitSymbol": "ea",
                "SalesPrice": 129.99,
                "TotalDiscountAmount": 0,
                "LineAmount": 259.98,
                "TotalTaxAmount": 0,
                "CurrencyCode": "USD",
                "SalesOrderLineStatus": "Backorder",
            }),
        )
        .map_err(sim_err)?;
    stage.created += 1;
    let dv = stage.dv.clone();
    wait_for(
        "F&O line to Dataverse",
        vec![("line 3 P-1000".to_string(), Instant::now())],
        |_| {
            dv.rows("salesorderdetails").iter().any(|r| {
                r.get("sequencenumber").and_then(Json::as_i64) == Some(3)
                    && field_eq(r, "_salesorderid_value", &so_id)
            })
        },
        &mut stage.latencies,
    )
    .await?;
    progress("  line 3 is in Dataverse on order SO-DEMO-1");
    Ok(())
}

async fn conflict(
    stage: &mut Stage,
    account: &str,
    progress: Progress<'_>,
) -> Result<ConflictShown, DemoError> {
    wait_idle(stage, "before the conflicting edit").await?;
    let id = crm_id(stage, "accounts", "accountid", "accountnumber", account)?;
    let crm_value = format!("{account} renamed in Dataverse");
    let erp_value = format!("{account} renamed in F&O");
    let policy = stage
        .maps
        .iter()
        .find(|m| m.erp.entity == "CustomersV3" && m.crm.entity_set == "accounts")
        .map(|m| {
            serde_json::to_value(m.conflict)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let conflicts_before = stage.rt.stats().await.engine.conflicts;
    progress(&format!(
        "conflicting edit of {account} on both sides at once (policy {policy}) ..."
    ));
    // Both edits reach the queue before either is processed: otherwise the first could be
    // synced before the other edit is made, and the two would be a plain sequence of changes.
    let held = stage.rt.hold_workers().await;
    stage
        .dv
        .user_edit("accounts", &id, json!({"name": crm_value}))
        .map_err(sim_err)?;
    stage
        .fno
        .user_edit(
            "CustomersV3",
            &format!("dataAreaId='usmf',CustomerAccount='{account}'"),
            json!({"OrganizationName": erp_value}),
        )
        .map_err(sim_err)?;
    let delivered = stage.dv.wait_webhooks_idle(STEP_TIMEOUT).await
        && stage.fno.wait_events_idle(STEP_TIMEOUT).await;
    drop(held);
    if !delivered {
        return Err(DemoError::Timeout {
            step: "conflicting edit".into(),
            secs: STEP_TIMEOUT.as_secs(),
            waiting: "the edits' webhooks to be delivered".into(),
        });
    }
    wait_idle(stage, "conflicting edit").await?;
    let crm_now = stage
        .dv
        .row("accounts", &id)
        .and_then(|r| r.get("name").and_then(Json::as_str).map(str::to_string))
        .unwrap_or_default();
    let erp_now = find_row(&stage.fno.rows("CustomersV3"), "CustomerAccount", account)
        .and_then(|r| {
            r.get("OrganizationName")
                .and_then(Json::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    let winner = if crm_now != erp_now {
        "none"
    } else if crm_now == crm_value {
        "crm"
    } else if crm_now == erp_value {
        "erp"
    } else {
        "none"
    };
    let detected = stage
        .rt
        .stats()
        .await
        .engine
        .conflicts
        .saturating_sub(conflicts_before);
    progress(&format!(
        "  Dataverse wrote \"{crm_value}\", F&O wrote \"{erp_value}\": {}; {} won; both sides now hold \"{crm_now}\"",
        if detected > 0 {
            format!("conflict detected, resolved by {policy}")
        } else {
            "NOT detected as a conflict".to_string()
        },
        match winner {
            "crm" => "Dataverse",
            "erp" => "F&O",
            _ => "nobody",
        }
    ));
    Ok(ConflictShown {
        record: account.to_string(),
        crm_value,
        erp_value,
        final_value: crm_now,
        winner: winner.into(),
        policy,
        detected,
    })
}

/// Every record of `entity` on one side, through the runtime's connector.
async fn read_all(
    connector: &dyn Connector,
    side: Side,
    entity: &str,
) -> Result<Vec<Record>, DemoError> {
    let mut out = Vec::new();
    let mut query = Query {
        page_size: Some(1000),
        ..Query::default()
    };
    loop {
        let page = connector
            .query(entity, &query)
            .await
            .map_err(|e| DemoError::Read {
                side,
                entity: entity.into(),
                message: e.to_string(),
            })?;
        out.extend(page.records);
        match page.next {
            Some(n) => query.page_token = Some(n),
            None => return Ok(out),
        }
    }
}

/// Resolves the lookups of `record` (from `source`) through the store's links, the way the
/// engine does, so [`apply_map`] can translate them.
async fn resolve(stage: &Stage, map: &TableMap, source: Side, record: &Record) -> ResolvedLookups {
    let find = |name: &str| stage.maps.iter().find(|m| m.name == name);
    let mut out = ResolvedLookups::new();
    for req in lookup_requests_with(map, source, record, find) {
        let mut resolved = None;
        match &req.target {
            LookupTarget::Keys(keys) => {
                for (name, key) in req.maps.iter().zip(keys) {
                    if let (Ok(Some(link)), Some(target)) =
                        (stage.rt.store().link(name, key).await, find(name))
                    {
                        resolved = Some(match source {
                            Side::Erp => Value::Lookup(Arc::new(LookupRef {
                                entity_set: target.crm.entity_set.clone(),
                                id: link.crm_id.clone().map(Into::into),
                                key: None,
                            })),
                            Side::Crm => natural_key(target, &link.key),
                        });
                        break;
                    }
                }
            }
            LookupTarget::CrmId(id) => {
                for name in &req.maps {
                    if let (Ok(Some(link)), Some(target)) = (
                        stage.rt.store().link_by_id(name, Side::Crm, id).await,
                        find(name),
                    ) {
                        resolved = Some(natural_key(target, &link.key));
                        break;
                    }
                }
            }
        }
        if let Some(v) = resolved {
            out.insert(req.field_index, LookupResolution::Resolved(v));
        }
    }
    out
}

fn natural_key(map: &TableMap, key: &IntegrationKey) -> Value {
    let rk = record_key(map, Side::Erp, key);
    rk.0.iter()
        .rev()
        .find(|(f, _)| f != "dataAreaId")
        .map_or(Value::Null, |(_, v)| Value::Text(v.as_str().into()))
}

/// True when `actual` holds what `expected` says: lookups by id when both have one, null and
/// empty text alike (see [`Value::is_empty`]).
fn same(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Lookup(a), Value::Lookup(b)) => match (&a.id, &b.id) {
            (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
            // Without ids, only by a key both hold: an expected reference with neither (a link
            // whose id is not known) matches nothing.
            _ => a.key.is_some() && a.key == b.key,
        },
        _ if expected.is_empty() && actual.is_empty() => true,
        _ => expected == actual,
    }
}

/// Checks every record of every enabled map on both sides: each record of a side its map
/// syncs from has a partner on the other side with the same integration key, and every field
/// mapped on both sides holds the value [`apply_map`] gives from the side it flows from.
async fn check_convergence(stage: &Stage) -> Result<(usize, Vec<String>), DemoError> {
    let mut differences = Vec::new();
    let mut checked = 0;
    for map in &stage.maps {
        let mut crm_rows = read_all(
            stage.rt.connector(Side::Crm).as_ref(),
            Side::Crm,
            &map.crm.entity_set,
        )
        .await?;
        // Dataverse returns key lookups (an order line's order) by id; the engine completes
        // them the same way for its own key.
        for row in &mut crm_rows {
            stage
                .rt
                .engine()
                .complete_key_lookups(map, row)
                .await
                .map_err(|e| DemoError::Read {
                    side: Side::Crm,
                    entity: map.crm.entity_set.clone(),
                    message: e.to_string(),
                })?;
        }
        let erp_rows = read_all(
            stage.rt.connector(Side::Erp).as_ref(),
            Side::Erp,
            &map.erp.entity,
        )
        .await?;
        // A mapped row whose key cannot be built is a difference too, not a row to skip.
        let mut index = |side: Side, rows: Vec<Record>| -> BTreeMap<IntegrationKey, Record> {
            let mut keyed = BTreeMap::new();
            for r in rows
                .into_iter()
                .filter(|r| map.filters.of(side).is_none_or(|f| f.matches(r)))
            {
                match integration_key(map, side, &r) {
                    Ok(k) => {
                        // Two rows of one key on a side: one too many (a duplicate create).
                        if let Some(first) = keyed.insert(k.clone(), r) {
                            differences.push(format!(
                                "map {}: {side} holds more than one record with key {k} ({} and another)",
                                map.name,
                                first.id.as_deref().unwrap_or("no id")
                            ));
                        }
                    }
                    Err(e) => differences.push(format!(
                        "map {}: a {side} record ({}) has no integration key: {e}",
                        map.name,
                        r.id.as_deref().unwrap_or("no id")
                    )),
                }
            }
            keyed
        };
        let crm = index(Side::Crm, crm_rows);
        let erp = index(Side::Erp, erp_rows);
        for (side, mine, theirs) in [(Side::Crm, &crm, &erp), (Side::Erp, &erp, &crm)] {
            if !map.direction.flows_from(side) {
                continue;
            }
            for key in mine.keys().filter(|k| !theirs.contains_key(*k)) {
                differences.push(format!(
                    "map {}: {key} exists in {side} but not in {}",
                    map.name,
                    side.other()
                ));
            }
        }
        for (key, erp_rec) in &erp {
            let Some(crm_rec) = crm.get(key) else {
                continue;
            };
            checked += 1;
            for source in [Side::Erp, Side::Crm] {
                if !map.direction.flows_from(source) {
                    continue;
                }
                let (src, dst) = match source {
                    Side::Erp => (erp_rec, crm_rec),
                    Side::Crm => (crm_rec, erp_rec),
                };
                let lookups = resolve(stage, map, source, src).await;
                let expected = match apply_map(map, source, src, &lookups) {
                    Ok(r) => r,
                    Err(e) => {
                        differences.push(format!(
                            "map {}: {key}: cannot map the {source} record: {e}",
                            map.name
                        ));
                        continue;
                    }
                };
                for fm in &map.fields {
                    // Only two-sided fields; a bidirectional field is compared once, from F&O.
                    let (Some(_), Some(_)) = (&fm.erp, &fm.crm) else {
                        continue;
                    };
                    if !fm.direction.flows_from(source)
                        || (source == Side::Crm && fm.direction.flows_from(Side::Erp))
                    {
                        continue;
                    }
                    let Some(target) = fm.field(source.other()) else {
                        continue;
                    };
                    let Some(want) = expected.get(&target.name) else {
                        continue;
                    };
                    // A one-way field empty on its source (null, or F&O's "") was never set
                    // there (a row created on the other side holds its own value until the
                    // source sets one).
                    if want.is_empty() && !fm.direction.flows_from(source.other()) {
                        continue;
                    }
                    let have = dst.get(&target.name).cloned().unwrap_or(Value::Null);
                    if !same(want, &have) {
                        differences.push(format!(
                            "map {}: {key}: {} {} is {have}, expected {want} (from {source})",
                            map.name,
                            source.other(),
                            target.name
                        ));
                    }
                }
            }
        }
    }
    Ok((checked, differences))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn shown(detected: u64, winner: &str, policy: &str) -> ConflictShown {
        ConflictShown {
            record: "US-0001".into(),
            crm_value: "a".into(),
            erp_value: "b".into(),
            final_value: "b".into(),
            winner: winner.into(),
            policy: policy.into(),
            detected,
        }
    }

    /// The demo passes only when it showed everything it claims, each miss named.
    #[test]
    fn a_run_passes_only_when_everything_it_shows_holds() {
        let ok = shown(1, "erp", "last_writer_wins");
        assert!(demo_failures(&[], (29, 29), 0, 0, 5, &ok).is_empty());
        let failures = demo_failures(
            &["x differs".into()],
            (28, 29),
            2,
            1,
            0,
            &shown(0, "crm", "last_writer_wins"),
        );
        assert_eq!(failures.len(), 7, "{failures:?}");
        assert!(failures.iter().any(|f| f.contains("only 28 record pair")));
        assert!(failures.iter().any(|f| f.contains("1 place")));
        assert!(failures.iter().any(|f| f.contains("2 error")));
        assert!(failures.iter().any(|f| f.contains("dead letters")));
        assert!(failures.iter().any(|f| f.contains("no echo")));
        assert!(failures.iter().any(|f| f.contains("0 detected")));
        assert!(
            failures
                .iter()
                .any(|f| f.contains("should have made erp win"))
        );
        assert!(demo_failures(&[], (29, 29), 0, 0, 5, &shown(1, "crm", "crm_wins")).is_empty());
        assert!(demo_failures(&[], (29, 29), 0, 0, 5, &shown(1, "none", "manual")).is_empty());
    }

    #[test]
    fn demo_maps_include_every_dependency() {
        let maps = demo_maps(DEMO_MAPS);
        let names: BTreeSet<&str> = maps.iter().map(|m| m.name.as_str()).collect();
        for m in &maps {
            for d in &m.depends_on {
                assert!(names.contains(d.as_str()), "{} needs {d}", m.name);
            }
        }
        assert!(names.contains("sales-order-lines"));
    }

    #[test]
    fn percentile_picks_the_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 0.5) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&v, 0.99) - 99.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn tables_carry_the_company_in_the_alternate_key() {
        let maps = demo_maps(DEMO_MAPS);
        let t = crm_tables(&maps);
        let accounts = t.iter().find(|t| t.entity_set == "accounts").unwrap();
        assert_eq!(
            accounts.alternate_keys,
            vec![vec![
                "accountnumber".to_string(),
                "msdyn_company".to_string()
            ]]
        );
        let e = erp_entities(&maps);
        let cust = e.iter().find(|e| e.entity_set == "CustomersV3").unwrap();
        assert_eq!(
            cust.key_fields,
            vec!["dataAreaId".to_string(), "CustomerAccount".to_string()]
        );
    }
}
