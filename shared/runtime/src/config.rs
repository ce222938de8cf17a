//! The `dualwrite serve` configuration: raw YAML structs (`deny_unknown_fields`) validated
//! into a [`Config`], with every problem reported at once and secrets resolved but never shown.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use dualwrite_connectors::{CoalescingConfig, Secret};
use dualwrite_core::map::TableMap;
use dualwrite_core::map::validate::load_maps;
use dualwrite_receivers::{BusinessEventRoute, Coverage, DEFAULT_BODY_TIMEOUT, SourceAuth};
use serde::Deserialize;

/// The Entra ID authority used when an environment does not name one.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The header F&O event endpoints carry their secret in, unless the configuration names one.
pub const DEFAULT_FNO_SECRET_HEADER: &str = "x-dualwrite-secret";

// ---------------------------------------------------------------------------------------------
// Raw form, as written in the file
// ---------------------------------------------------------------------------------------------

/// The configuration file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address the webhook endpoints listen on, e.g. `127.0.0.1:8080`.
    pub listen: String,
    /// The SQLite file holding the state store (created when missing); the work queue lives
    /// beside it, in the directory of the same name ending in `.queue`.
    pub db: String,
    /// Which table maps to load and which of them to run.
    pub maps: RawMaps,
    /// The Dataverse environment.
    pub dataverse: RawEnvironment,
    /// The Finance & Operations environment.
    pub fno: RawEnvironment,
    /// Secrets the webhook senders must present.
    pub webhooks: RawWebhooks,
    /// Worker settings; defaults when left out.
    #[serde(default)]
    pub worker: RawWorker,
    /// How concurrent reads and writes are coalesced into OData `$batch` requests; on with
    /// the defaults when left out.
    #[serde(default)]
    pub batching: RawBatching,
    /// The catch-up poll; no polling when left out.
    #[serde(default)]
    pub scheduler: Option<RawScheduler>,
}

/// Which maps to load and run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaps {
    /// `shipped` (the maps built into dualwrite, the default) or a folder of `*.yaml` map files.
    #[serde(default)]
    pub source: Option<String>,
    /// Names of the maps to run; their `depends_on` maps must be listed too.
    pub enabled: Vec<String>,
}

/// One environment (Dataverse or F&O) and the app registration used to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvironment {
    /// Environment URL, e.g. `https://org.crm.dynamics.com` or
    /// `https://contoso.operations.dynamics.com`. Tokens are asked for `<url>/.default`.
    pub url: String,
    /// Directory (tenant) id or domain.
    pub tenant: String,
    /// Application (client) id of the app registration.
    pub client_id: String,
    /// Name of the environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// File holding the client secret (trailing newline ignored).
    #[serde(default)]
    pub client_secret_file: Option<String>,
    /// Entra ID authority base URL; the token endpoint is
    /// `<token_url>/<tenant>/oauth2/v2.0/token`. Default `https://login.microsoftonline.com`.
    #[serde(default)]
    pub token_url: Option<String>,
}

/// Webhook secrets per source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    /// What Dataverse webhooks present.
    pub dataverse: RawWebhookSecret,
    /// What F&O data and business events present.
    pub fno: RawWebhookSecret,
    /// Seconds a webhook's body may take to arrive once its headers did (1 to 600, default
    /// 30); a sender stalled longer is answered 408 and its connection closed.
    #[serde(default)]
    pub body_timeout: Option<u64>,
}

/// Where one webhook secret comes from and how it is sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhookSecret {
    /// Name of the environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<String>,
    /// Header carrying the secret. Dataverse: when left out the secret is a `WebhookKey`
    /// (`?code=`). F&O: default `x-dualwrite-secret`.
    #[serde(default)]
    pub header: Option<String>,
    /// Dataverse only: `true` when the webhook steps' post images are registered with all
    /// columns (no attributes chosen). Dataverse leaves null columns out of images, so then a
    /// column missing from a post image is null and the worker need not read the row.
    /// Default `false`: an event missing a mapped column is read back from Dataverse.
    #[serde(default)]
    pub post_image_all_columns: Option<bool>,
    /// F&O only: the business events to act on, by `BusinessEventId`. A business event
    /// carries no record, only fields of its own: each route names the data entity it is about
    /// (the F&O entity of an enabled map) and, for each of that entity's key fields other than
    /// `dataAreaId` (taken from `BusinessEventLegalEntity`), the envelope field holding its
    /// value; the worker then reads the record by key. Business events not listed are
    /// answered 200 and counted as ignored.
    #[serde(default)]
    pub business_events: BTreeMap<String, RawBusinessEventRoute>,
}

/// One F&O business event's route to the record it is about.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBusinessEventRoute {
    /// The F&O data entity (entity set), e.g. `SalesOrderHeadersV2`.
    pub entity: String,
    /// Each key field of the entity (but `dataAreaId`) and the envelope field holding its
    /// value, e.g. `{ SalesOrderNumber: SalesOrderId }`.
    pub key: BTreeMap<String, String>,
}

/// Worker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    /// Events processed at once (1 to 1,024). Default 32. Each waits mostly on the systems'
    /// answers; the calls to each system are bounded separately (`batching.max_in_flight`,
    /// concurrent calls sharing `$batch` requests), so this can exceed their service-protection
    /// concurrency limits (52).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Seconds a delivery stays invisible to other workers while being processed. Default 60.
    #[serde(default = "default_visibility")]
    pub visibility_timeout: u64,
    /// Deliveries after which a message goes to the dead-letter queue. Default 10. Failed
    /// deliveries are retried with exponential backoff from 0.1–0.2 s, doubling each time (or
    /// after the system's `Retry-After`, when longer), so the default rides out about one to
    /// two minutes of an unreachable or failing system; a dead letter keeps its event, and
    /// `dualwrite queue redrive` puts it back on the queue.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Hours a processed event's id is remembered (at least 1). Default 168 (a week). A
    /// delivery of the same event within them is skipped by its id; a later one by the link,
    /// whose version it does not exceed — nothing is written twice either way. The store
    /// forgets older ids, so it does not grow with every event ever processed.
    #[serde(default = "default_idempotency_hours")]
    pub idempotency_hours: u64,
}

impl Default for RawWorker {
    fn default() -> Self {
        RawWorker {
            concurrency: default_concurrency(),
            visibility_timeout: default_visibility(),
            max_attempts: default_max_attempts(),
            idempotency_hours: default_idempotency_hours(),
        }
    }
}

fn default_concurrency() -> usize {
    32
}
fn default_visibility() -> u64 {
    60
}
fn default_max_attempts() -> u32 {
    10
}
fn default_idempotency_hours() -> u64 {
    168
}

/// Coalescing of the workers' concurrent reads and writes into OData `$batch` requests, for
/// both environments; `dataverse` and `fno` override any value for one of them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatching {
    /// `false` sends every read and write as a request of its own. Default `true`.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Most requests in flight to one environment at once (1 to 52); while all are busy, new
    /// calls wait and leave together in the next `$batch`. Default 4.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Most calls in one `$batch` (1 to 1,000 for Dataverse, 1 to 5,000 for F&O). Default 10.
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// Values for Dataverse only.
    #[serde(default)]
    pub dataverse: Option<RawBatchingSide>,
    /// Values for F&O only.
    #[serde(default)]
    pub fno: Option<RawBatchingSide>,
}

/// Batching values for one environment, overriding the shared ones.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatchingSide {
    /// As `batching.enabled`, for this environment.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// As `batching.max_in_flight`, for this environment.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// As `batching.max_batch`, for this environment.
    #[serde(default)]
    pub max_batch: Option<usize>,
}

/// The catch-up poll.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScheduler {
    /// When to poll every enabled map's source tables for changes since the last poll: a
    /// 6- or 7-field cron expression (`sec min hour day month weekday [year]`), e.g.
    /// `0 */5 * * * *` for every five minutes.
    pub catch_up: String,
    /// Seconds before the watermark each poll reads from (0 to 86,400; default 120): a change
    /// is stamped when its transaction starts and becomes visible when it commits, so a row
    /// can appear behind a watermark a poll has already passed (a long posting, a plugin
    /// chain). Rows read again are recognised by their event id and cost no write.
    #[serde(default)]
    pub overlap: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Validated form
// ---------------------------------------------------------------------------------------------

/// A validated configuration: what [`crate::Runtime::start`] takes.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the webhook endpoints listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The SQLite file of the state store and the queue.
    pub db: PathBuf,
    /// The enabled maps, validated, in dependency-friendly order.
    pub maps: Vec<TableMap>,
    /// The Dataverse environment.
    pub dataverse: Environment,
    /// The F&O environment.
    pub fno: Environment,
    /// What Dataverse webhooks must present.
    pub dataverse_auth: SourceAuth,
    /// What F&O events must present.
    pub fno_auth: SourceAuth,
    /// The Dataverse steps' post images are registered with all columns.
    pub dataverse_post_image_all_columns: bool,
    /// F&O business events acted on, by `BusinessEventId`, their key fields in key order.
    pub fno_business_events: BTreeMap<String, BusinessEventRoute>,
    /// How long a webhook's body may take once its headers arrived (`webhooks.body_timeout`).
    pub webhook_body_timeout: Duration,
    /// Worker settings.
    pub worker: WorkerSettings,
    /// Coalescing of connector calls into `$batch` requests.
    pub batching: BatchingSettings,
    /// The catch-up poll, if any.
    pub catch_up: Option<CatchUp>,
}

/// How each environment's reads and writes are coalesced, validated: `None` sends every call
/// as a request of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchingSettings {
    /// Dataverse.
    pub dataverse: Option<CoalescingConfig>,
    /// F&O.
    pub fno: Option<CoalescingConfig>,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        BatchingSettings {
            dataverse: Some(CoalescingConfig::default()),
            fno: Some(CoalescingConfig::default()),
        }
    }
}

/// The most concurrent requests Dataverse and F&O take from one user (service protection).
pub const MAX_IN_FLIGHT_LIMIT: usize = 52;
/// The most requests Dataverse takes in one `$batch`.
pub const DATAVERSE_MAX_BATCH_LIMIT: usize = 1000;
/// The most operations F&O takes in one `$batch`.
pub const FNO_MAX_BATCH_LIMIT: usize = 5000;

/// One environment, with its client secret resolved.
#[derive(Debug, Clone)]
pub struct Environment {
    /// Environment URL without a trailing slash.
    pub url: String,
    /// Tenant id or domain.
    pub tenant: String,
    /// Application (client) id.
    pub client_id: String,
    /// The client secret (redacted in `Debug`/`Display`).
    pub client_secret: Secret,
    /// Entra ID authority base URL.
    pub authority: String,
}

/// Worker settings, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSettings {
    /// Worker tasks.
    pub concurrency: usize,
    /// Visibility timeout (and claim lease) of a delivery.
    pub visibility_timeout: Duration,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// How long a processed event's id is remembered.
    pub idempotency_window: Duration,
}

/// The catch-up poll schedule.
#[derive(Debug, Clone)]
pub struct CatchUp {
    /// The expression as written.
    pub expression: String,
    /// The parsed schedule.
    pub schedule: cron::Schedule,
    /// How far before its watermark each poll reads.
    pub overlap: Duration,
}

/// `scheduler.overlap` when left out: two minutes.
pub const DEFAULT_CATCH_UP_OVERLAP: Duration = Duration::from_secs(120);

/// One thing wrong with a configuration, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Key path, e.g. `dataverse.client_secret_env`.
    pub path: String,
    /// What is wrong and what to do, as a sentence.
    pub message: String,
    /// The line (1-based) of the key in the file, or of the nearest enclosing key written
    /// there when the key itself is missing; `None` when nothing of the path is in the file.
    pub line: Option<usize>,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(
        "cannot read the configuration file {file}: {source}; check the path given to --config"
    )]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for the configuration format.
    #[error("{file}{}: {message}; every key is in docs/CONFIG.md", at_line(*line))]
    Syntax {
        /// The file.
        file: String,
        /// The line the parser stopped at, when it tells.
        line: Option<usize>,
        /// The parser's message, with the key path.
        message: String,
    },
    /// The file parsed but its content is wrong; every problem is listed.
    #[error("{file}: {} problem(s) in the configuration:\n{}", problems.len(), render(file, problems))]
    Invalid {
        /// The file.
        file: String,
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

/// `:N` for a known line, as in `file:N:`.
fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!(":{n}")).unwrap_or_default()
}

/// One problem a line, each as `file:line: path: message` (the form editors jump to).
fn render(file: &str, problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {file}{}: {p}", at_line(p.line)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The line of key path `path` (`a.b`, `a.list[2].c`, keys may contain dots) in the YAML tree
/// `root`: the line of the last key or item of the path found, so a missing key is placed at
/// its nearest enclosing key.
fn line_of(root: &marked_yaml::Node, path: &str) -> Option<usize> {
    let mut node = root;
    let mut line = None;
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let (index, tail) = after.split_once(']')?;
            let item = node.as_sequence()?.get(index.parse::<usize>().ok()?)?;
            line = item.span().start().map(|m| m.line()).or(line);
            node = item;
            rest = tail.strip_prefix('.').unwrap_or(tail);
            continue;
        }
        let Some(mapping) = node.as_mapping() else {
            break;
        };
        // The longest key the rest of the path starts with, followed by `.`, `[` or the end.
        let found = mapping
            .iter()
            .filter(|(k, _)| {
                let key: &str = k.as_str();
                rest.strip_prefix(key)
                    .is_some_and(|t| t.is_empty() || t.starts_with('.') || t.starts_with('['))
            })
            .max_by_key(|(k, _)| k.as_str().len());
        let Some((key, value)) = found else {
            break;
        };
        line = key.span().start().map(|m| m.line()).or(line);
        node = value;
        rest = &rest[key.as_str().len()..];
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    line
}

/// Where secrets named by `*_env` keys are looked up (the process environment normally).
pub trait EnvLookup {
    /// The value of variable `name`, `None` when unset.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvLookup for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvLookup for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Config {
    /// Reads and validates the configuration file at `path`; secrets from the process
    /// environment or files. Relative `db`, map folder and secret file paths are relative to
    /// the configuration file's folder.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and every problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &file, base, &ProcessEnv)
    }

    /// Parses and validates configuration `text` (named `file` in messages); relative paths
    /// are resolved against `base`, `*_env` secrets through `env`.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for YAML or unknown/missing keys, [`ConfigError::Invalid`] with
    /// every problem of the content.
    pub fn parse(
        text: &str,
        file: &str,
        base: &Path,
        env: &dyn EnvLookup,
    ) -> Result<Config, ConfigError> {
        // A key given twice is a mistake to report, not a value to pick (the loader's default
        // keeps the last one).
        let options = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true);
        let raw: RawConfig = marked_yaml::from_yaml_with_options(0, text, options)
            .map_err(|e| syntax_error(file, &e))?;
        raw.validate(base, env).map_err(|mut problems| {
            if let Ok(root) = marked_yaml::parse_yaml(0, text) {
                for problem in &mut problems {
                    problem.line = line_of(&root, &problem.path);
                }
            }
            ConfigError::Invalid {
                file: file.to_string(),
                problems,
            }
        })
    }
}

/// A YAML or format error, with the line the parser stopped at.
fn syntax_error(file: &str, e: &marked_yaml::FromYamlError) -> ConfigError {
    use marked_yaml::LoadError as L;
    let (line, message) = match e {
        marked_yaml::FromYamlError::FromNode(e) => {
            (e.start_mark().map(|m| m.line()), e.to_string())
        }
        // The loader's messages start with the marker (`line:column: `); the line is shown in
        // front as for every other problem, the rest kept.
        marked_yaml::FromYamlError::ParseYaml(load) => {
            let marker = match load {
                L::TopLevelMustBeMapping(m)
                | L::TopLevelMustBeSequence(m)
                | L::UnexpectedAnchor(m)
                | L::MappingKeyMustBeScalar(m)
                | L::UnexpectedTag(m)
                | L::ScanError(m, _) => Some(*m),
                L::DuplicateKey(inner) => inner.key.span().start().copied(),
            };
            let text = load.to_string();
            let text = match marker {
                Some(m) => text
                    .strip_prefix(&format!("{m}: "))
                    .map_or(text.clone(), |rest| {
                        format!("column {}: {rest}", m.column())
                    }),
                None => text,
            };
            (marker.map(|m| m.line()), text)
        }
    };
    ConfigError::Syntax {
        file: file.to_string(),
        line,
        message,
    }
}

struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
            line: None,
        });
    }

    /// Pushes the problem unless the same one is listed already (a shared value checked for
    /// each environment).
    fn push_once(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let problem = ConfigProblem {
            path: path.into(),
            message: message.into(),
            line: None,
        };
        if !self.0.contains(&problem) {
            self.0.push(problem);
        }
    }
}

impl RawConfig {
    /// Validates every part, collecting all problems.
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn validate(self, base: &Path, env: &dyn EnvLookup) -> Result<Config, Vec<ConfigProblem>> {
        let mut p = Problems(Vec::new());
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.push(
                    "listen",
                    format!(
                        "`{}` is not an address; write ip:port, e.g. 127.0.0.1:8080",
                        self.listen
                    ),
                );
                None
            }
        };
        if self.db.trim().is_empty() {
            p.push(
                "db",
                "is empty; name the SQLite file, e.g. .dualwrite/state.db",
            );
        }
        let db = base.join(&self.db);
        let maps = validate_maps(&self.maps, base, &mut p);
        let dataverse = validate_env("dataverse", &self.dataverse, base, env, &mut p);
        let fno = validate_env("fno", &self.fno, base, env, &mut p);
        let dataverse_auth = validate_webhook(
            "webhooks.dataverse",
            &self.webhooks.dataverse,
            None,
            base,
            env,
            &mut p,
        );
        let fno_auth = validate_webhook(
            "webhooks.fno",
            &self.webhooks.fno,
            Some(DEFAULT_FNO_SECRET_HEADER),
            base,
            env,
            &mut p,
        );
        if !self.webhooks.dataverse.business_events.is_empty() {
            p.push(
                "webhooks.dataverse.business_events",
                "applies to F&O business events only; move it to webhooks.fno",
            );
        }
        let business_events = maps
            .as_deref()
            .map(|maps| validate_business_events(&self.webhooks.fno.business_events, maps, &mut p))
            .unwrap_or_default();
        if self.webhooks.fno.post_image_all_columns.is_some() {
            p.push(
                "webhooks.fno.post_image_all_columns",
                "applies to Dataverse webhooks only (F&O data events carry no post image); \
                 move it to webhooks.dataverse",
            );
        }
        if let Some(secs) = self.webhooks.body_timeout
            && !(1..=600).contains(&secs)
        {
            p.push(
                "webhooks.body_timeout",
                format!("is {secs}; give 1 to 600 seconds (default 30)"),
            );
        }
        if !(1..=1_024).contains(&self.worker.concurrency) {
            p.push(
                "worker.concurrency",
                format!(
                    "is {}; use 1 to 1024 events at once",
                    self.worker.concurrency
                ),
            );
        }
        if self.worker.visibility_timeout == 0 {
            p.push(
                "worker.visibility_timeout",
                "is 0; give the seconds a delivery may take, e.g. 60",
            );
        }
        if self.worker.max_attempts == 0 {
            p.push(
                "worker.max_attempts",
                "is 0; allow at least 1 delivery, e.g. 10",
            );
        }
        if !(1..=87_600).contains(&self.worker.idempotency_hours) {
            p.push(
                "worker.idempotency_hours",
                format!(
                    "is {}; remember processed events for 1 to 87600 hours, e.g. 168",
                    self.worker.idempotency_hours
                ),
            );
        }
        let batching = validate_batching(&self.batching, &mut p);
        let catch_up = self
            .scheduler
            .and_then(|s| match cron::Schedule::from_str(&s.catch_up) {
                Ok(schedule) => match s.overlap {
                    Some(secs) if secs > 86_400 => {
                        p.push(
                            "scheduler.overlap",
                            format!("is {secs}; give 0 to 86400 seconds (default 120)"),
                        );
                        None
                    }
                    overlap => Some(CatchUp {
                        expression: s.catch_up,
                        schedule,
                        overlap: overlap.map_or(DEFAULT_CATCH_UP_OVERLAP, Duration::from_secs),
                    }),
                },
                Err(e) => {
                    p.push(
                        "scheduler.catch_up",
                        format!(
                            "`{}` is not a cron expression ({e}); write 6 or 7 fields \
                             `sec min hour day month weekday [year]`, e.g. `0 */5 * * * *`",
                            s.catch_up
                        ),
                    );
                    None
                }
            });
        match (listen, maps, dataverse, fno, dataverse_auth, fno_auth) {
            (Some(listen), Some(maps), Some(dataverse), Some(fno), Some(da), Some(fa))
                if p.0.is_empty() =>
            {
                Ok(Config {
                    listen,
                    db,
                    maps,
                    dataverse,
                    fno,
                    dataverse_auth: da,
                    fno_auth: fa,
                    dataverse_post_image_all_columns: self
                        .webhooks
                        .dataverse
                        .post_image_all_columns
                        .unwrap_or(false),
                    fno_business_events: business_events,
                    webhook_body_timeout: self
                        .webhooks
                        .body_timeout
                        .map_or(DEFAULT_BODY_TIMEOUT, Duration::from_secs),
                    worker: WorkerSettings {
                        concurrency: self.worker.concurrency,
                        visibility_timeout: Duration::from_secs(self.worker.visibility_timeout),
                        max_attempts: self.worker.max_attempts,
                        idempotency_window: Duration::from_secs(
                            self.worker.idempotency_hours * 3_600,
                        ),
                    },
                    batching,
                    catch_up,
                })
            }
            _ => Err(p.0),
        }
    }
}

/// Checks each business-event route against the enabled maps: its entity must be the F&O
/// entity of an enabled map whose changes flow to Dataverse, and its key must name exactly
/// that entity's key fields (but `dataAreaId`). The routes come back with the entity's own
/// spelling and the key in the entity's key order.
fn validate_business_events(
    raw: &BTreeMap<String, RawBusinessEventRoute>,
    maps: &[TableMap],
    p: &mut Problems,
) -> BTreeMap<String, BusinessEventRoute> {
    let coverage = Coverage::from_maps(maps);
    let mut routes = BTreeMap::new();
    for (id, route) in raw {
        let at = format!("webhooks.fno.business_events.{id}");
        if id.trim().is_empty() {
            p.push(&at, "has an empty BusinessEventId; name the business event");
            continue;
        }
        let Some(cov) = coverage.erp(&route.entity) else {
            let covered: Vec<&str> = maps
                .iter()
                .filter(|m| m.direction.flows_from(dualwrite_core::Side::Erp))
                .map(|m| m.erp.entity.as_str())
                .collect();
            p.push(
                format!("{at}.entity"),
                format!(
                    "`{}` is not the F&O entity of an enabled map whose changes flow to \
                     Dataverse; use one of: {}",
                    route.entity,
                    covered.join(", ")
                ),
            );
            continue;
        };
        let missing: Vec<&str> = cov
            .key
            .iter()
            .filter(|f| !route.key.contains_key(*f))
            .map(String::as_str)
            .collect();
        let unknown: Vec<&str> = route
            .key
            .keys()
            .filter(|f| !cov.key.contains(f))
            .map(String::as_str)
            .collect();
        let empty: Vec<&str> = route
            .key
            .iter()
            .filter(|(_, from)| from.trim().is_empty())
            .map(|(f, _)| f.as_str())
            .collect();
        if !missing.is_empty() || !unknown.is_empty() || !empty.is_empty() {
            let mut what = Vec::new();
            if !missing.is_empty() {
                what.push(format!("lacks {}", missing.join(", ")));
            }
            if !unknown.is_empty() {
                what.push(format!("names {} that are not", unknown.join(", ")));
            }
            if !empty.is_empty() {
                what.push(format!("gives no envelope field for {}", empty.join(", ")));
            }
            p.push(
                format!("{at}.key"),
                format!(
                    "{}: the key of {} is {}{} (map each to the envelope field holding it)",
                    what.join("; "),
                    cov.entity,
                    cov.key.join(", "),
                    if cov.company_specific {
                        ", with dataAreaId from BusinessEventLegalEntity"
                    } else {
                        ""
                    }
                ),
            );
            continue;
        }
        routes.insert(
            id.clone(),
            BusinessEventRoute {
                entity: cov.entity.clone(),
                key: cov
                    .key
                    .iter()
                    .map(|f| (f.clone(), route.key[f].clone()))
                    .collect(),
            },
        );
    }
    routes
}

fn validate_batching(raw: &RawBatching, p: &mut Problems) -> BatchingSettings {
    let side = |name: &str,
                over: Option<&RawBatchingSide>,
                system: &str,
                limit: usize,
                p: &mut Problems| {
        let over = over.cloned().unwrap_or_default();
        // Each value with the key it was read from, so a problem names the key to change.
        let pick = |own: Option<usize>, shared: Option<usize>, key: &str, default: usize| match (
            own, shared,
        ) {
            (Some(v), _) => (v, format!("batching.{name}.{key}")),
            (None, Some(v)) => (v, format!("batching.{key}")),
            (None, None) => (default, format!("batching.{key}")),
        };
        let defaults = CoalescingConfig::default();
        let (max_in_flight, in_flight_key) = pick(
            over.max_in_flight,
            raw.max_in_flight,
            "max_in_flight",
            defaults.max_in_flight,
        );
        let (max_batch, batch_key) = pick(
            over.max_batch,
            raw.max_batch,
            "max_batch",
            defaults.max_batch,
        );
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight) {
            p.push_once(
                in_flight_key,
                format!(
                    "is {max_in_flight}; use 1 to {MAX_IN_FLIGHT_LIMIT} requests in flight \
                     (Dataverse and F&O refuse more than {MAX_IN_FLIGHT_LIMIT} concurrent \
                     requests per user)"
                ),
            );
        }
        if max_batch == 0 {
            p.push_once(batch_key, "is 0; send at least 1 call per request");
        } else if max_batch > limit {
            p.push_once(
                batch_key,
                format!(
                    "is {max_batch}; {system} takes at most {limit} requests in one $batch, \
                     so use 1 to {limit}"
                ),
            );
        }
        over.enabled
            .or(raw.enabled)
            .unwrap_or(true)
            .then_some(CoalescingConfig {
                max_in_flight,
                max_batch,
            })
    };
    BatchingSettings {
        dataverse: side(
            "dataverse",
            raw.dataverse.as_ref(),
            "Dataverse",
            DATAVERSE_MAX_BATCH_LIMIT,
            p,
        ),
        fno: side("fno", raw.fno.as_ref(), "F&O", FNO_MAX_BATCH_LIMIT, p),
    }
}

fn validate_maps(raw: &RawMaps, base: &Path, p: &mut Problems) -> Option<Vec<TableMap>> {
    let source = raw.source.as_deref().unwrap_or("shipped");
    let all = if source == "shipped" {
        dualwrite_maps::builtin_maps()
    } else {
        let folder = base.join(source);
        let mut files = Vec::new();
        match std::fs::read_dir(&folder) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                    .collect();
                paths.sort();
                for path in paths {
                    match std::fs::read_to_string(&path) {
                        Ok(text) => files.push((path.display().to_string(), text)),
                        Err(e) => p.push(
                            "maps.source",
                            format!("cannot read map file {}: {e}", path.display()),
                        ),
                    }
                }
            }
            Err(e) => {
                p.push(
                    "maps.source",
                    format!(
                        "cannot read the map folder {}: {e}; write `shipped` or an existing folder",
                        folder.display()
                    ),
                );
                return None;
            }
        }
        match load_maps(&files) {
            Ok(maps) => maps,
            Err(diagnostics) => {
                for d in diagnostics {
                    p.push("maps.source", d.to_string());
                }
                return None;
            }
        }
    };
    let known: BTreeSet<&str> = all.iter().map(|m| m.name.as_str()).collect();
    let enabled: BTreeSet<&str> = raw.enabled.iter().map(String::as_str).collect();
    if raw.enabled.is_empty() {
        p.push("maps.enabled", "is empty; list the maps to run");
    }
    let mut ok = true;
    for (i, name) in raw.enabled.iter().enumerate() {
        if !known.contains(name.as_str()) {
            ok = false;
            p.push(
                format!("maps.enabled[{i}]"),
                format!(
                    "no map named `{name}` in {source}; known maps: {}",
                    known.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }
    for map in all.iter().filter(|m| enabled.contains(m.name.as_str())) {
        let missing: Vec<&str> = map
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| !enabled.contains(d))
            .collect();
        if !missing.is_empty() {
            ok = false;
            p.push(
                "maps.enabled",
                format!(
                    "map `{}` depends on {}, which {} not enabled; add {} to maps.enabled",
                    map.name,
                    missing.join(", "),
                    if missing.len() == 1 { "is" } else { "are" },
                    if missing.len() == 1 { "it" } else { "them" }
                ),
            );
        }
    }
    ok.then(|| {
        all.into_iter()
            .filter(|m| enabled.contains(m.name.as_str()))
            .collect()
    })
}

fn read_secret(
    path: &str,
    from_env: Option<&str>,
    from_file: Option<&str>,
    (env_key, file_key): (&str, &str),
    base: &Path,
    env: &dyn EnvLookup,
    p: &mut Problems,
) -> Option<Secret> {
    match (from_env, from_file) {
        (Some(_), Some(_)) => {
            p.push(
                path,
                format!("both {env_key} and {file_key} are set; keep one"),
            );
            None
        }
        (None, None) => {
            p.push(
                path,
                format!("no secret; set {env_key} (an environment variable name) or {file_key}"),
            );
            None
        }
        (Some(var), None) => match env.var(var) {
            Some(v) if !v.is_empty() => Some(Secret::new(v)),
            _ => {
                p.push(
                    format!("{path}.{env_key}"),
                    format!("environment variable {var} is not set or empty; export it"),
                );
                None
            }
        },
        (None, Some(file)) => {
            let full = base.join(file);
            match std::fs::read_to_string(&full) {
                Ok(v) if !v.trim().is_empty() => {
                    Some(Secret::new(v.trim_end_matches(['\r', '\n'])))
                }
                Ok(_) => {
                    p.push(
                        format!("{path}.{file_key}"),
                        format!("{} is empty; write the secret into it", full.display()),
                    );
                    None
                }
                Err(e) => {
                    p.push(
                        format!("{path}.{file_key}"),
                        format!("cannot read {}: {e}", full.display()),
                    );
                    None
                }
            }
        }
    }
}

fn validate_env(
    path: &str,
    raw: &RawEnvironment,
    base: &Path,
    env: &dyn EnvLookup,
    p: &mut Problems,
) -> Option<Environment> {
    let before = p.0.len();
    let url = raw.url.trim_end_matches('/').to_string();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        p.push(
            format!("{path}.url"),
            format!(
                "`{}` is not an http(s) URL; write the environment URL",
                raw.url
            ),
        );
    }
    if raw.tenant.trim().is_empty() {
        p.push(
            format!("{path}.tenant"),
            "is empty; give the tenant id or domain",
        );
    }
    if raw.client_id.trim().is_empty() {
        p.push(
            format!("{path}.client_id"),
            "is empty; give the app registration's client id",
        );
    }
    let authority = raw
        .token_url
        .clone()
        .unwrap_or_else(|| DEFAULT_AUTHORITY.to_string())
        .trim_end_matches('/')
        .to_string();
    if !(authority.starts_with("https://") || authority.starts_with("http://")) {
        p.push(
            format!("{path}.token_url"),
            format!("`{authority}` is not an http(s) URL"),
        );
    }
    let secret = read_secret(
        path,
        raw.client_secret_env.as_deref(),
        raw.client_secret_file.as_deref(),
        ("client_secret_env", "client_secret_file"),
        base,
        env,
        p,
    );
    let secret = secret?;
    (p.0.len() == before).then(|| Environment {
        url,
        tenant: raw.tenant.clone(),
        client_id: raw.client_id.clone(),
        client_secret: secret,
        authority,
    })
}

fn validate_webhook(
    path: &str,
    raw: &RawWebhookSecret,
    default_header: Option<&str>,
    base: &Path,
    env: &dyn EnvLookup,
    p: &mut Problems,
) -> Option<SourceAuth> {
    if let Some(h) = &raw.header
        && (h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        p.push(
            format!("{path}.header"),
            format!("`{h}` is not a header name; use letters, digits and dashes"),
        );
    }
    let secret = read_secret(
        path,
        raw.secret_env.as_deref(),
        raw.secret_file.as_deref(),
        ("secret_env", "secret_file"),
        base,
        env,
        p,
    )?;
    let secret = secret.expose().to_string();
    Some(match raw.header.as_deref().or(default_header) {
        Some(name) => SourceAuth::HttpHeader {
            name: name.to_string(),
            value: secret,
        },
        None => SourceAuth::WebhookKey { secret },
    })
}
