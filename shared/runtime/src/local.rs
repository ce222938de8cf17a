//! A local stack: the Entra ID, Dataverse and F&O simulators and a runtime wired to them, with
//! a temporary database — what `dualwrite demo`, `dualwrite bench live` and the end-to-end
//! tests start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use dualwrite_connectors::CoalescingConfig;
use dualwrite_core::map::TableMap;
use dualwrite_core::map::filter::{Filter, Literal};
use dualwrite_core::{Side, ValueType};
use dualwrite_receivers::BusinessEventRoute;
use dualwrite_simulators::{
    ColumnKind, DataverseConfig, DataverseSim, EntraClient, EntraConfig, EntraSim, FnoConfig,
    FnoEntityDef, FnoEventFormat, FnoEventRegistration, FnoKeyKind, FnoKeyType, FnoMessage, FnoSim,
    TableDef, WebhookAuth, WebhookMessage, WebhookRegistration,
};

use crate::config::{BatchingSettings, Config, ConfigError, DEFAULT_FNO_SECRET_HEADER};
use crate::runtime::{Runtime, RuntimeHandle, StartError};

/// Environment variable names the generated configuration reads its secrets from (looked up in
/// the stack's own map, never in the process environment).
const CLIENT_SECRET_ENV: &str = "LOCAL_CLIENT_SECRET";
const DATAVERSE_WEBHOOK_SECRET_ENV: &str = "LOCAL_DATAVERSE_WEBHOOK_SECRET";
const FNO_WEBHOOK_SECRET_ENV: &str = "LOCAL_FNO_WEBHOOK_SECRET";

/// The secrets shared by the simulators and the runtime. Its `Debug` shows none of them.
#[derive(Clone, PartialEq, Eq)]
pub struct LocalSecrets {
    /// The client secret the runtime presents to the Entra ID simulator.
    pub client_secret: String,
    /// The Dataverse webhook key the runtime expects (`?code=`).
    pub dataverse_webhook_key: String,
    /// The F&O event secret the runtime expects in [`DEFAULT_FNO_SECRET_HEADER`].
    pub fno_event_secret: String,
}

impl std::fmt::Debug for LocalSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecrets")
            .field("client_secret", &"<redacted>")
            .field("dataverse_webhook_key", &"<redacted>")
            .field("fno_event_secret", &"<redacted>")
            .finish()
    }
}

impl LocalSecrets {
    /// Fresh secrets, different in every call.
    pub fn random() -> LocalSecrets {
        LocalSecrets {
            client_secret: format!("local-{:032x}", rand_u128()),
            dataverse_webhook_key: format!("hook-{:032x}", rand_u128()),
            fno_event_secret: format!("hook-{:032x}", rand_u128()),
        }
    }
}

/// What to start. [`LocalStackOptions::new`] gives the defaults for a set of maps.
#[derive(Debug, Clone)]
pub struct LocalStackOptions {
    /// Names the stack in its tenant, client id, database and configuration file (`demo`,
    /// `bench`, `e2e`): it shows in the runtime's logs and configuration errors.
    pub name: String,
    /// The maps the simulators get tables and entities for and the runtime enables, each with
    /// its dependencies (see [`maps_with_dependencies`]).
    pub maps: Vec<TableMap>,
    /// Worker tasks of the runtime.
    pub workers: usize,
    /// Seconds a delivered queue message stays invisible before it is delivered again.
    pub visibility_timeout_secs: u64,
    /// How long the F&O simulator waits before retrying a failed event delivery.
    pub fno_event_retry_delay: Duration,
    /// A cron expression for the catch-up scheduler; no scheduler when `None`.
    pub catch_up: Option<String>,
    /// Map files (name, YAML text) the runtime loads from `<dir>/maps` instead of the shipped
    /// maps (e.g. a shipped map changed to `conflict: manual`); the shipped maps when `None`.
    pub map_files: Option<Vec<(String, String)>>,
    /// The secrets to use; random ones when `None`.
    pub secrets: Option<LocalSecrets>,
    /// How the runtime coalesces connector calls into `$batch` requests.
    pub batching: BatchingSettings,
    /// The tokio runtime the simulators run on (their servers and webhook senders), so that
    /// their threads and CPU time are told apart from the pipeline's (`bench live`); the
    /// caller's runtime when `None`.
    pub simulator_runtime: Option<tokio::runtime::Handle>,
    /// F&O business events the runtime acts on (`webhooks.fno.business_events`), by
    /// `BusinessEventId`; none by default.
    pub fno_business_events: BTreeMap<String, BusinessEventRoute>,
}

impl LocalStackOptions {
    /// The defaults for `maps`: 2 workers, 30 s visibility timeout, F&O event retries after
    /// 200 ms, no catch-up, shipped maps, random secrets, default batching.
    pub fn new(name: &str, maps: Vec<TableMap>) -> LocalStackOptions {
        LocalStackOptions {
            name: name.to_string(),
            maps,
            workers: 2,
            visibility_timeout_secs: 30,
            fno_event_retry_delay: Duration::from_millis(200),
            catch_up: None,
            map_files: None,
            secrets: None,
            batching: BatchingSettings::default(),
            simulator_runtime: None,
            fno_business_events: BTreeMap::new(),
        }
    }
}

/// Runs `start` (a simulator's start) on `runtime` when given, so that what it spawns runs
/// there; else here.
async fn start_on<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    runtime: Option<&tokio::runtime::Handle>,
    start: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, LocalStackError> {
    match runtime {
        None => start.await.map_err(sim_err),
        Some(handle) => handle.spawn(start).await.map_err(sim_err)?.map_err(sim_err),
    }
}

/// Why a local stack did not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalStackError {
    /// A simulator failed to start or refused a call: a bug of the simulators or of the stack.
    #[error("simulator: {0}")]
    Simulator(String),
    /// The generated configuration did not validate: a bug of the stack or of the map files
    /// given in [`LocalStackOptions::map_files`].
    #[error("local stack configuration: {0}")]
    Config(#[from] ConfigError),
    /// The runtime did not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

fn sim_err(e: impl std::fmt::Display) -> LocalStackError {
    LocalStackError::Simulator(e.to_string())
}

/// The running simulators and runtime. Dropping it stops the simulators and removes the
/// temporary directory; call [`RuntimeHandle::shutdown`] first for a clean stop.
pub struct LocalStack {
    /// The Entra ID simulator both environments authenticate against.
    pub entra: EntraSim,
    /// The Dataverse simulator.
    pub dv: DataverseSim,
    /// The F&O simulator.
    pub fno: FnoSim,
    /// The running pipeline.
    pub rt: RuntimeHandle,
    /// The maps the runtime runs, as its configuration validated them.
    pub maps: Vec<TableMap>,
    /// The secrets shared by the simulators and the runtime.
    pub secrets: LocalSecrets,
    /// The temporary directory of the database (and map files); removed when dropped.
    pub dir: tempfile::TempDir,
}

impl std::fmt::Debug for LocalStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStack")
            .field("runtime", &self.rt.addr())
            .field("dataverse", &self.dv.base_url())
            .field("fno", &self.fno.base_url())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl LocalStack {
    /// Starts the simulators (a Dataverse table and an F&O entity per map, choice columns as
    /// option sets) and the runtime against them. No webhook is registered yet: see
    /// [`LocalStack::connect_webhooks`] and the `register_*` methods.
    ///
    /// # Errors
    /// [`LocalStackError`] when a simulator or the runtime does not start.
    pub async fn start(options: LocalStackOptions) -> Result<LocalStack, LocalStackError> {
        let maps = options.maps;
        let tenant = format!("{}-tenant", options.name);
        let client_id = format!("dualwrite-{}", options.name);
        let secrets = options.secrets.unwrap_or_else(LocalSecrets::random);
        let sim_rt = options.simulator_runtime.as_ref();
        let entra = start_on(
            sim_rt,
            EntraSim::start(EntraConfig {
                clients: vec![EntraClient {
                    tenant: tenant.clone(),
                    client_id: client_id.clone(),
                    client_secret: secrets.client_secret.clone(),
                    allowed_scopes: Vec::new(),
                }],
                ..EntraConfig::default()
            }),
        )
        .await?;
        let dv = start_on(
            sim_rt,
            DataverseSim::start(DataverseConfig {
                tables: crm_tables(&maps),
                auth: Some(entra.clone()),
                ..DataverseConfig::default()
            }),
        )
        .await?;
        for map in &maps {
            for f in &map.fields {
                let kind = match f.crm.as_ref().map(|c| c.ty) {
                    Some(ValueType::Choice) => ColumnKind::OptionSet,
                    Some(ValueType::Text) => ColumnKind::Text,
                    _ => continue,
                };
                if let Some(c) = &f.crm {
                    dv.set_column_kind(&map.crm.entity_set, &c.name, kind)
                        .map_err(sim_err)?;
                }
            }
        }
        let fno = start_on(
            sim_rt,
            FnoSim::start(FnoConfig {
                entities: erp_entities(&maps),
                key_types: erp_key_types(&maps),
                default_company: "usmf".into(),
                auth: Some(entra.clone()),
                event_retry_delay: options.fno_event_retry_delay,
                ..FnoConfig::default()
            }),
        )
        .await?;

        let dir = tempfile::tempdir().map_err(sim_err)?;
        let map_source = match &options.map_files {
            None => "shipped",
            Some(files) => {
                let folder = dir.path().join("maps");
                std::fs::create_dir_all(&folder).map_err(sim_err)?;
                for (name, text) in files {
                    std::fs::write(folder.join(name), text).map_err(sim_err)?;
                }
                "maps"
            }
        };
        let enabled: Vec<String> = maps.iter().map(|m| format!("\"{}\"", m.name)).collect();
        let (dv_url, fno_url, authority) = (dv.base_url(), fno.base_url(), entra.base_url());
        let mut yaml = format!(
            "listen: 127.0.0.1:0\n\
             db: {name}.db\n\
             maps:\n  source: {map_source}\n  enabled: [{enabled}]\n\
             dataverse:\n  url: {dv_url}\n  tenant: {tenant}\n  client_id: {client_id}\n  client_secret_env: {CLIENT_SECRET_ENV}\n  token_url: {authority}\n\
             fno:\n  url: {fno_url}\n  tenant: {tenant}\n  client_id: {client_id}\n  client_secret_env: {CLIENT_SECRET_ENV}\n  token_url: {authority}\n\
             webhooks:\n  dataverse:\n    secret_env: {DATAVERSE_WEBHOOK_SECRET_ENV}\n    post_image_all_columns: true\n  fno:\n    secret_env: {FNO_WEBHOOK_SECRET_ENV}\n{business_events}\
             worker:\n  concurrency: {workers}\n  visibility_timeout: {visibility}\n  max_attempts: 8\n",
            name = options.name,
            enabled = enabled.join(", "),
            workers = options.workers,
            visibility = options.visibility_timeout_secs,
            business_events = business_events_yaml(&options.fno_business_events),
        );
        yaml.push_str(&batching_yaml(&options.batching));
        if let Some(cron) = &options.catch_up {
            yaml.push_str(&format!("scheduler:\n  catch_up: \"{cron}\"\n"));
        }
        let env: BTreeMap<String, String> = BTreeMap::from([
            (CLIENT_SECRET_ENV.to_string(), secrets.client_secret.clone()),
            (
                DATAVERSE_WEBHOOK_SECRET_ENV.to_string(),
                secrets.dataverse_webhook_key.clone(),
            ),
            (
                FNO_WEBHOOK_SECRET_ENV.to_string(),
                secrets.fno_event_secret.clone(),
            ),
        ]);
        let file = format!("{}.yaml", options.name);
        let config = Config::parse(&yaml, &file, dir.path(), &env)?;
        let maps = config.maps.clone();
        let rt = Runtime::start(config).await?;
        Ok(LocalStack {
            entra,
            dv,
            fno,
            rt,
            maps,
            secrets,
            dir,
        })
    }

    /// The runtime's base URL (`http://127.0.0.1:<port>`).
    pub fn runtime_url(&self) -> String {
        format!("http://{}", self.rt.addr())
    }

    /// Points the Dataverse simulator's webhook (create, update, delete of each table the maps
    /// sync from Dataverse, with the stack's webhook key) at `url`.
    pub fn register_dataverse_webhook(&self, url: &str) {
        self.dv.register_webhook(WebhookRegistration {
            url: url.to_string(),
            // Steps on the tables whose changes the enabled maps sync, as an administrator
            // registers them: a change of any other table would only be ignored.
            entity_logical_names: self
                .maps
                .iter()
                .filter(|m| m.direction.flows_from(Side::Crm))
                .map(|m| m.crm.logical_name.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            messages: vec![
                WebhookMessage::Create,
                WebhookMessage::Update,
                WebhookMessage::Delete,
            ],
            auth: WebhookAuth::WebhookKey(self.secrets.dataverse_webhook_key.clone()),
        });
    }

    /// Points the F&O simulator's data events (created, updated, deleted of each entity the
    /// maps sync from F&O, with the stack's event secret) at `url`.
    pub fn register_fno_events(&self, url: &str) {
        self.fno.register_events(FnoEventRegistration {
            url: url.to_string(),
            entity_sets: self
                .maps
                .iter()
                .filter(|m| m.direction.flows_from(Side::Erp))
                .map(|m| m.erp.entity.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            messages: vec![
                FnoMessage::Created,
                FnoMessage::Updated,
                FnoMessage::Deleted,
            ],
            format: FnoEventFormat::DataEvent,
            headers: vec![(
                DEFAULT_FNO_SECRET_HEADER.to_string(),
                self.secrets.fno_event_secret.clone(),
            )],
        });
    }

    /// Points both simulators' webhooks straight at the runtime's endpoints, as in
    /// production.
    pub fn connect_webhooks(&self) {
        let base = self.runtime_url();
        self.register_dataverse_webhook(&format!("{base}/webhooks/dataverse"));
        self.register_fno_events(&format!("{base}/webhooks/fno"));
    }

    /// The temporary directory of the database.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The `batching:` section of a configuration stating `settings` for each environment.
fn batching_yaml(settings: &BatchingSettings) -> String {
    let side = |name: &str, s: &Option<CoalescingConfig>| match s {
        Some(c) => format!(
            "  {name}:\n    max_in_flight: {}\n    max_batch: {}\n",
            c.max_in_flight, c.max_batch
        ),
        None => format!("  {name}:\n    enabled: false\n"),
    };
    format!(
        "batching:\n{}{}",
        side("dataverse", &settings.dataverse),
        side("fno", &settings.fno)
    )
}

/// The maps of `names` and every map they depend on, in the shipped order.
pub fn maps_with_dependencies(names: &[&str]) -> Vec<TableMap> {
    let all = dualwrite_maps::builtin_maps();
    let by_name: HashMap<&str, &TableMap> = all.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = names.iter().map(|s| (*s).to_string()).collect();
    while let Some(n) = stack.pop() {
        if wanted.insert(n.clone())
            && let Some(m) = by_name.get(n.as_str())
        {
            stack.extend(m.depends_on.iter().cloned());
        }
    }
    all.iter()
        .filter(|m| wanted.contains(&m.name))
        .cloned()
        .collect()
}

/// Dataverse tables for the maps: one per entity set, alternate key = key columns + company.
pub fn crm_tables(maps: &[TableMap]) -> Vec<TableDef> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in maps {
        if !seen.insert(m.crm.entity_set.clone()) {
            continue;
        }
        let mut key = m.crm.key.clone();
        key.extend(m.crm.company_field.iter().cloned());
        let key_lookups =
            key.iter()
                .filter(|column| {
                    Some(*column) == m.crm.company_field.as_ref()
                        || m.fields.iter().filter_map(|f| f.crm.as_ref()).any(|f| {
                            &f.name == *column && f.ty == dualwrite_core::ValueType::Lookup
                        })
                })
                .cloned()
                .collect();
        out.push(TableDef {
            entity_set: m.crm.entity_set.clone(),
            logical_name: m.crm.logical_name.clone(),
            primary_id: m.crm.primary_id.clone(),
            alternate_keys: vec![key],
            key_lookups,
        });
    }
    out
}

/// The integer key fields of the maps' F&O entities, so the simulator refuses a key literal
/// of the wrong type (`LineNumber='1'`) as F&O's OData does.
pub fn erp_key_types(maps: &[TableMap]) -> Vec<FnoKeyType> {
    let mut seen = BTreeSet::new();
    maps.iter()
        .flat_map(|m| {
            m.fields
                .iter()
                .filter_map(|f| f.erp.as_ref())
                .filter(|f| m.erp.key.contains(&f.name) && f.ty == ValueType::Integer)
                .map(|f| (m.erp.entity.clone(), f.name.clone()))
        })
        .filter(|pair| seen.insert(pair.clone()))
        .map(|(entity_set, field)| FnoKeyType {
            entity_set,
            field,
            kind: FnoKeyKind::Integer,
        })
        .collect()
}

/// The F&O enum fields a filter compares with enum literals, and their enum types (without
/// the `Microsoft.Dynamics.DataEntities.` namespace): what the local run knows of F&O's enum
/// types, so that the simulator refuses a filter comparing them with anything else.
fn enum_comparisons(filter: &Filter) -> Vec<(String, String)> {
    match filter {
        Filter::And(a, b) | Filter::Or(a, b) => {
            let mut out = enum_comparisons(a);
            out.extend(enum_comparisons(b));
            out
        }
        Filter::Not(a) => enum_comparisons(a),
        Filter::Compare {
            field,
            value: Literal::Enum { ty, .. },
            ..
        } => ty
            .strip_prefix("Microsoft.Dynamics.DataEntities.")
            .map(|t| vec![(field.clone(), t.to_string())])
            .unwrap_or_default(),
        Filter::Compare { .. } | Filter::Text { .. } => Vec::new(),
    }
}

/// F&O entities for the maps: key = `dataAreaId` (company-specific) + natural key.
pub fn erp_entities(maps: &[TableMap]) -> Vec<FnoEntityDef> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in maps {
        if !seen.insert(m.erp.entity.clone()) {
            continue;
        }
        let mut key = Vec::new();
        if m.erp.company_specific {
            key.push("dataAreaId".to_string());
        }
        key.extend(m.erp.key.iter().cloned());
        // The entity's fields: every field any map names (the maps are what the local run knows
        // of F&O's schema), date-times apart.
        let (mut datetime_fields, mut fields, mut text_fields) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for f in maps
            .iter()
            .filter(|other| other.erp.entity == m.erp.entity)
            .flat_map(|other| other.fields.iter())
            .filter_map(|f| f.erp.as_ref())
            .filter(|f| !key.contains(&f.name))
        {
            match f.ty {
                ValueType::Date | ValueType::DateTime => datetime_fields.insert(f.name.clone()),
                ValueType::Text => {
                    text_fields.insert(f.name.clone());
                    fields.insert(f.name.clone())
                }
                _ => fields.insert(f.name.clone()),
            };
        }
        out.push(FnoEntityDef {
            entity_set: m.erp.entity.clone(),
            key_fields: key,
            modified_field: Some("ModifiedDateTime".into()),
            datetime_fields: datetime_fields.into_iter().collect(),
            fields: fields.into_iter().collect(),
            text_fields: text_fields.into_iter().collect(),
            // The first map naming the entity's physical name gives it: the data events then
            // name the virtual table as F&O's do (`mserp_custcustomerv3entity`).
            physical_name: maps
                .iter()
                .filter(|other| other.erp.entity == m.erp.entity)
                .find_map(|other| other.erp.physical_name.clone()),
            enum_fields: maps
                .iter()
                .filter(|other| other.erp.entity == m.erp.entity)
                .filter_map(|other| other.filters.erp.as_ref())
                .flat_map(enum_comparisons)
                .collect(),
        });
    }
    out
}

/// A value unlikely to repeat across calls and processes (secrets of a local run).
fn rand_u128() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    xxhash_rust::xxh3::xxh3_128(&t.to_le_bytes()) ^ u128::from(std::process::id())
}

/// `webhooks.fno.business_events` for `routes` (nothing when there are none).
fn business_events_yaml(routes: &BTreeMap<String, BusinessEventRoute>) -> String {
    if routes.is_empty() {
        return String::new();
    }
    let mut yaml = String::from("    business_events:\n");
    for (id, route) in routes {
        let key: Vec<String> = route
            .key
            .iter()
            .map(|(field, from)| format!("{field}: {from}"))
            .collect();
        yaml.push_str(&format!(
            "      {id}:\n        entity: {}\n        key: {{ {} }}\n",
            route.entity,
            key.join(", ")
        ));
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_secrets_differ() {
        let (a, b) = (LocalSecrets::random(), LocalSecrets::random());
        assert_ne!(a.client_secret, a.dataverse_webhook_key);
        assert_ne!(a.dataverse_webhook_key, a.fno_event_secret);
        assert_ne!(a, b);
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let secrets = LocalSecrets::random();
        let shown = format!("{secrets:?}");
        for secret in [
            &secrets.client_secret,
            &secrets.dataverse_webhook_key,
            &secrets.fno_event_secret,
        ] {
            assert!(!shown.contains(secret.as_str()), "{shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[tokio::test]
    async fn starts_a_stack_whose_webhooks_reach_the_runtime() {
        let maps = maps_with_dependencies(&["currencies"]);
        let mut options = LocalStackOptions::new("unit", maps);
        options.catch_up = Some("0 0 * * * *".into());
        let stack = LocalStack::start(options).await.unwrap();
        assert_eq!(
            stack
                .maps
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            vec!["legal-entities", "currencies"]
        );
        assert!(stack.path().join("unit.db").exists());
        let health = reqwest::get(format!("{}/healthz", stack.runtime_url()))
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);

        stack.connect_webhooks();
        stack
            .fno
            .user_create(
                "Currencies",
                serde_json::json!({"CurrencyCode": "USD", "Name": "US Dollar", "Symbol": "$"}),
            )
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !stack
            .dv
            .rows("transactioncurrencies")
            .iter()
            .any(|r| r["isocurrencycode"] == "USD")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "currency USD did not reach Dataverse through the registered webhooks"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack.rt.shutdown().await;
    }
}
