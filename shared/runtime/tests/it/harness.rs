//! Test harness for end-to-end tests of `dualwrite serve`: the Entra, Dataverse and F&O
//! simulators, the runtime wired to them through a relay that can capture webhooks instead of
//! delivering them, reference data seeding, and wait-until-condition helpers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dualwrite_core::map::ConflictPolicy;
use dualwrite_runtime::demo::demo_maps;
use dualwrite_runtime::{LocalSecrets, LocalStack, LocalStackOptions, RuntimeHandle, RuntimeStats};
use dualwrite_simulators::{DataverseSim, EntraSim, FnoSim};
use serde_json::{Value as Json, json};

/// The map every end-to-end test exercises.
pub const CUSTOMERS: &str = "customers-v3-accounts";
/// The Dataverse webhook key the runtime expects (`?code=`).
pub const DV_KEY: &str = "e2e-dataverse-webhook-key";
/// The F&O event secret the runtime expects in `x-dualwrite-secret`.
pub const FNO_SECRET: &str = "e2e-fno-event-secret";
/// The header carrying [`FNO_SECRET`].
pub const FNO_SECRET_HEADER: &str = "x-dualwrite-secret";
/// How long a wait-until helper waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(15);

/// Which webhook source a relayed call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The Dataverse simulator's webhook.
    Dataverse,
    /// The F&O simulator's event endpoint.
    Fno,
}

impl Source {
    fn path(self) -> &'static str {
        match self {
            Source::Dataverse => "dataverse",
            Source::Fno => "fno",
        }
    }
}

/// One webhook call the relay saw, exactly as the simulator sent it.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Where it came from.
    pub source: Source,
    /// The query string (Dataverse's `code=`), without `?`.
    pub query: String,
    /// The request headers worth replaying (`x-*` and content type).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// The runtime's status when forwarded, `None` when only captured.
    pub forwarded_status: Option<u16>,
}

impl Captured {
    /// The body as JSON.
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).expect("webhook bodies are JSON")
    }
}

struct RelayState {
    target: String,
    forward_dataverse: AtomicBool,
    forward_fno: AtomicBool,
    captured: Mutex<Vec<Captured>>,
    http: reqwest::Client,
}

/// Sits between the simulators and the runtime: records every webhook call and forwards it
/// to the runtime, or (forwarding off) answers 200 itself so the notification is "missed".
#[derive(Clone)]
pub struct Relay {
    state: Arc<RelayState>,
    addr: std::net::SocketAddr,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let state = Arc::new(RelayState {
            target,
            forward_dataverse: AtomicBool::new(true),
            forward_fno: AtomicBool::new(true),
            captured: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        let app = Router::new()
            .route("/{source}", post(relay))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Relay { state, addr }
    }

    /// The URL the simulator of `source` posts to.
    pub fn url(&self, source: Source) -> String {
        format!("http://{}/{}", self.addr, source.path())
    }

    /// Turns delivery to the runtime on or off for `source` (capturing goes on either way).
    pub fn set_forwarding(&self, source: Source, on: bool) {
        let flag = match source {
            Source::Dataverse => &self.state.forward_dataverse,
            Source::Fno => &self.state.forward_fno,
        };
        flag.store(on, Ordering::SeqCst);
    }

    /// Every call seen so far, in arrival order.
    pub fn captured(&self) -> Vec<Captured> {
        self.state.captured.lock().unwrap().clone()
    }

    /// The calls of `source` seen after the first `from` calls (of any source).
    pub fn captured_since(&self, from: usize, source: Source) -> Vec<Captured> {
        self.captured()
            .into_iter()
            .skip(from)
            .filter(|c| c.source == source)
            .collect()
    }
}

async fn relay(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let source = match source.as_str() {
        "dataverse" => Source::Dataverse,
        "fno" => Source::Fno,
        _ => return (StatusCode::NOT_FOUND, String::new()),
    };
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("x-") || n.as_str() == "content-type")
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let mut captured = Captured {
        source,
        query: query.unwrap_or_default(),
        headers,
        body,
        forwarded_status: None,
    };
    let forward = match source {
        Source::Dataverse => state.forward_dataverse.load(Ordering::SeqCst),
        Source::Fno => state.forward_fno.load(Ordering::SeqCst),
    };
    let answer = if forward {
        let url = format!("{}/webhooks/{}", state.target, source.path());
        match replay_to(&state.http, &url, &captured).await {
            Ok((status, text)) => {
                captured.forwarded_status = Some(status);
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    text,
                )
            }
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
        }
    } else {
        (StatusCode::OK, "{\"captured\":1}".to_string())
    };
    state.captured.lock().unwrap().push(captured);
    answer
}

async fn replay_to(
    http: &reqwest::Client,
    url: &str,
    call: &Captured,
) -> Result<(u16, String), reqwest::Error> {
    let url = if call.query.is_empty() {
        url.to_string()
    } else {
        format!("{url}?{}", call.query)
    };
    let mut req = http.post(url).body(call.body.clone());
    for (n, v) in &call.headers {
        req = req.header(n, v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// One seeded F&O row: entity set, fields, and the Dataverse (table, column, value) it becomes.
type SeedRow<'a> = (&'a str, Json, (&'a str, &'a str, &'a str));

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Run the customers map with `conflict: manual` (from a map folder exported from the
    /// shipped maps) instead of the shipped `last_writer_wins`.
    pub manual_conflict: bool,
    /// A cron expression for the catch-up scheduler; none when `None`.
    pub catch_up: Option<String>,
    /// F&O business events the runtime acts on, by `BusinessEventId`.
    pub fno_business_events:
        std::collections::BTreeMap<String, dualwrite_receivers::BusinessEventRoute>,
}

/// The simulators, the relay and the runtime, with reference data seeded.
pub struct Stack {
    /// Dataverse simulator.
    pub dv: DataverseSim,
    /// F&O simulator.
    pub fno: FnoSim,
    /// The running pipeline.
    pub rt: RuntimeHandle,
    /// Between the simulators' webhooks and the runtime.
    pub relay: Relay,
    /// Plain HTTP client for posting to the runtime.
    pub http: reqwest::Client,
    /// Dataverse ids of the seeded company USMF, currency USD and customer group 10.
    pub usmf: String,
    /// See [`Stack::usmf`].
    pub usd: String,
    /// See [`Stack::usmf`].
    pub group10: String,
    _entra: EntraSim,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything and seeds USMF, USD, Net30 and customer group 10 through webhooks.
    pub async fn start(options: StackOptions) -> Stack {
        let mut local_options = LocalStackOptions::new("e2e", demo_maps(&[CUSTOMERS]));
        local_options.fno_event_retry_delay = Duration::from_millis(100);
        local_options.catch_up = options.catch_up;
        local_options.fno_business_events = options.fno_business_events;
        local_options.secrets = Some(LocalSecrets {
            client_secret: "e2e-client-secret-0123456789".to_string(),
            dataverse_webhook_key: DV_KEY.to_string(),
            fno_event_secret: FNO_SECRET.to_string(),
        });
        if options.manual_conflict {
            local_options.map_files = Some(maps_with_manual_customers());
        }
        let local = LocalStack::start(local_options).await.unwrap();
        if options.manual_conflict {
            let customers = local.maps.iter().find(|m| m.name == CUSTOMERS).unwrap();
            assert_eq!(
                customers.conflict,
                ConflictPolicy::Manual,
                "the exported customers map must carry conflict: manual"
            );
        }
        let relay = Relay::start(local.runtime_url()).await;
        local.register_dataverse_webhook(&relay.url(Source::Dataverse));
        local.register_fno_events(&relay.url(Source::Fno));
        let LocalStack {
            entra,
            dv,
            fno,
            rt,
            dir,
            ..
        } = local;
        let mut stack = Stack {
            dv,
            fno,
            rt,
            relay,
            http: reqwest::Client::new(),
            usmf: String::new(),
            usd: String::new(),
            group10: String::new(),
            _entra: entra,
            _dir: dir,
        };
        stack.seed().await;
        stack
    }

    async fn seed(&mut self) {
        let waves: [&[SeedRow<'_>]; 3] = [
            &[(
                "LegalEntities",
                json!({"LegalEntityId": "USMF", "Name": "Contoso Entertainment System USA"}),
                ("cdm_companies", "cdm_companycode", "USMF"),
            )],
            &[
                (
                    "Currencies",
                    json!({"CurrencyCode": "USD", "Name": "US Dollar", "Symbol": "$"}),
                    ("transactioncurrencies", "isocurrencycode", "USD"),
                ),
                (
                    "TermsOfPayment",
                    json!({"dataAreaId": "usmf", "Name": "Net30", "Description": "Net 30 days"}),
                    ("msdyn_paymentterms", "msdyn_name", "Net30"),
                ),
            ],
            &[(
                "CustomerGroups",
                json!({"dataAreaId": "usmf", "CustomerGroupId": "10", "Description": "Wholesale", "PaymentTermId": "Net30"}),
                ("msdyn_customergroups", "msdyn_groupid", "10"),
            )],
        ];
        for wave in waves {
            for (set, row, _) in wave {
                self.fno.user_create(set, row.clone()).unwrap();
            }
            for (_, _, (crm_set, field, want)) in wave {
                let dv = self.dv.clone();
                wait_until(&format!("{crm_set} {field} = {want} in Dataverse"), || {
                    find(&dv.rows(crm_set), field, want)
                })
                .await;
            }
            self.wait_idle().await;
        }
        self.usmf = id_of(
            &self.dv,
            "cdm_companies",
            "cdm_companyid",
            "cdm_companycode",
            "USMF",
        );
        self.usd = id_of(
            &self.dv,
            "transactioncurrencies",
            "transactioncurrencyid",
            "isocurrencycode",
            "USD",
        );
        self.group10 = id_of(
            &self.dv,
            "msdyn_customergroups",
            "msdyn_customergroupid",
            "msdyn_groupid",
            "10",
        );
    }

    /// The runtime's base URL.
    pub fn base(&self) -> String {
        format!("http://{}", self.rt.addr())
    }

    /// Waits until no webhook is pending, the queue is empty and the engine's counters stood
    /// still over two polls.
    pub async fn wait_idle(&self) {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        let mut quiet = 0;
        loop {
            let dv_idle = self.dv.wait_webhooks_idle(Duration::from_millis(500)).await;
            let fno_idle = self.fno.wait_events_idle(Duration::from_millis(500)).await;
            let s = self.rt.stats().await;
            let busy = s.queue.ready + s.queue.in_flight + s.queue.delayed;
            let now = (s.engine, s.receivers);
            if dv_idle && fno_idle && busy == 0 && last == Some(now) {
                quiet += 1;
                if quiet >= 2 {
                    return;
                }
            } else {
                quiet = 0;
            }
            last = Some(now);
            assert!(
                Instant::now() < deadline,
                "pipeline not idle after {WAIT:?}: queue busy {busy}, webhooks idle dataverse {dv_idle} fno {fno_idle}"
            );
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    /// Runtime counters now.
    pub async fn stats(&self) -> RuntimeStats {
        self.rt.stats().await
    }

    /// Creates account `number` (a Dataverse user action) in USMF with currency USD and
    /// customer group 10; returns its `accountid`.
    pub fn create_account(&self, number: &str, name: &str, credit: i64) -> String {
        let row = self
            .dv
            .user_create(
                "accounts",
                json!({
                    "accountnumber": number,
                    "name": name,
                    "customertypecode": 3,
                    "creditlimit": credit,
                    "address1_city": "Seattle",
                    "telephone1": "+1 206 555 0100",
                    "msdyn_company@odata.bind": format!("/cdm_companies({})", self.usmf),
                    "transactioncurrencyid@odata.bind": format!("/transactioncurrencies({})", self.usd),
                    "msdyn_customergroupid@odata.bind": format!("/msdyn_customergroups({})", self.group10),
                }),
            )
            .unwrap();
        row["accountid"].as_str().unwrap().to_string()
    }

    /// Creates customer `account` (an F&O user action) in USMF with currency USD and group 10.
    pub fn create_customer(&self, account: &str, name: &str, credit: f64) {
        self.fno
            .user_create(
                "CustomersV3",
                json!({
                    "dataAreaId": "usmf",
                    "CustomerAccount": account,
                    "OrganizationName": name,
                    "PartyType": "Organization",
                    "SalesCurrencyCode": "USD",
                    "CustomerGroupId": "10",
                    "CreditLimit": credit,
                    "DeliveryAddressCity": "Redmond",
                    "PaymentTerms": "Net30",
                }),
            )
            .unwrap();
    }

    /// The F&O key segment of customer `account` of USMF.
    pub fn customer_key(account: &str) -> String {
        format!("dataAreaId='usmf',CustomerAccount='{account}'")
    }

    /// The F&O customer `account` of USMF, if present.
    pub fn customer(&self, account: &str) -> Option<Json> {
        find(&self.fno.rows("CustomersV3"), "CustomerAccount", account)
    }

    /// The Dataverse account with `accountnumber`, if present.
    pub fn account(&self, number: &str) -> Option<Json> {
        find(&self.dv.rows("accounts"), "accountnumber", number)
    }

    /// Creates account `number` in Dataverse and waits until it is an F&O customer and the
    /// pipeline is idle; returns the `accountid`.
    pub async fn synced_account(&self, number: &str, name: &str, credit: i64) -> String {
        let id = self.create_account(number, name, credit);
        wait_until(&format!("customer {number} in F&O"), || {
            self.customer(number)
                .filter(|c| c["OrganizationName"] == name)
        })
        .await;
        self.wait_idle().await;
        id
    }

    /// Posts `body` to `/webhooks/<source>` of the runtime with `query` (no `?`) and
    /// `headers` as given (credentials included); returns status and response body.
    pub async fn post(
        &self,
        source: Source,
        query: &str,
        headers: &[(String, String)],
        body: impl Into<reqwest::Body>,
    ) -> (u16, String) {
        let url = format!(
            "{}/webhooks/{}{}",
            self.base(),
            source.path(),
            if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            }
        );
        let mut req = self.http.post(url).body(body);
        for (n, v) in headers {
            req = req.header(n, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// Posts a captured call again, exactly as the simulator sent it.
    pub async fn replay(&self, call: &Captured) -> (u16, String) {
        self.post(call.source, &call.query, &call.headers, call.body.clone())
            .await
    }

    /// F&O events delivered so far for entity `entity_set`.
    pub fn fno_events(&self, entity_set: &str) -> usize {
        self.fno
            .event_deliveries()
            .iter()
            .filter(|d| d.entity == entity_set)
            .count()
    }

    /// Dataverse webhooks delivered so far for table `logical_name`.
    pub fn dv_webhooks(&self, logical_name: &str) -> usize {
        self.dv
            .webhook_deliveries()
            .iter()
            .filter(|d| d.entity == logical_name)
            .count()
    }
}

/// The shipped map files, with `conflict: manual` on the customers map.
fn maps_with_manual_customers() -> Vec<(String, String)> {
    dualwrite_maps::builtin_files()
        .into_iter()
        .map(|(name, text)| {
            let file = name.rsplit('/').next().unwrap().to_string();
            if file != format!("{CUSTOMERS}.yaml") {
                return (file, text.to_string());
            }
            let mut out = String::new();
            let mut replaced = false;
            for line in text.lines() {
                if line.starts_with("conflict:") {
                    continue;
                }
                out.push_str(line);
                out.push('\n');
                if line.starts_with("direction:") {
                    out.push_str("conflict: manual\n");
                    replaced = true;
                }
            }
            assert!(
                replaced,
                "the customers map has no `direction:` line to anchor on"
            );
            (file, out)
        })
        .collect()
}

/// The first row whose `field` equals `want` (text, case-insensitive, or number).
pub fn find(rows: &[Json], field: &str, want: &str) -> Option<Json> {
    rows.iter()
        .find(|r| match r.get(field) {
            Some(Json::String(s)) => s.eq_ignore_ascii_case(want),
            Some(Json::Number(n)) => n.to_string() == want,
            _ => false,
        })
        .cloned()
}

fn id_of(dv: &DataverseSim, set: &str, id_field: &str, field: &str, want: &str) -> String {
    find(&dv.rows(set), field, want)
        .and_then(|r| r[id_field].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no {set} row with {field} = {want}"))
}

/// A JSON number or numeric string as f64.
pub fn number(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Polls `check` every 10 ms until it gives a value; fails the test after [`WAIT`].
pub async fn wait_until<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_until_within(what, WAIT, check).await
}

/// Polls `check` every 10 ms until it gives a value; fails the test after `timeout`.
pub async fn wait_until_within<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
