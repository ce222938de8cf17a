//! Dataverse Web API v9.2 simulator: in-memory tables, OData queries and paging, upsert by
//! alternate key, ETags, lookups, `$batch`, bulk messages, service protection, fault injection
//! and outbound webhooks carrying a RemoteExecutionContext (wire-formats §1–2).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use chrono::Utc;
use serde_json::{Map, Value, json};

use crate::batch::{self, BatchTarget};
use crate::common::{
    Fault, FaultConfig, Guard, Outcome, Refusal, Server, SimError, SimRequest, SimResponse,
    SimStats, ThrottleConfig, Throttled, is_guid, iso, new_guid, norm_guid, parse_query,
    pct_decode, pct_encode, prefers, serve, user_op_result, wcf_date,
};
use crate::context::{self, CONTRACTS, RemoteContext};
use crate::entra::{EntraSim, TokenProblem};
use crate::json;
use crate::odata::{
    KeyPart, Row, eval, key_text, order_rows, parse_filter, parse_key, parse_orderby,
    split_key_segment,
};
use crate::webhook::{Delivery, DeliveryRecord, Dispatcher, RetryPolicy};

const API: &str = "/api/data/v9.2/";
const MAX_PAGE: usize = 5000;
const LOOKUP_ANN: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";

/// A table of the simulated environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableDef {
    /// Entity set name used in URLs (`accounts`).
    pub entity_set: String,
    /// Logical name (`account`).
    pub logical_name: String,
    /// Primary id column (`accountid`).
    pub primary_id: String,
    /// Alternate keys, each a list of column logical names (a lookup column by its logical name).
    pub alternate_keys: Vec<Vec<String>>,
    /// The lookup columns among the key columns: a key names them by row id, as
    /// `_<column>_value=<guid>` (a quoted value or other text is refused, as the Web API does).
    pub key_lookups: Vec<String>,
}

/// How a column is typed in webhook payloads (everything else is sent as its JSON value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Choice column: sent as `OptionSetValue`.
    OptionSet,
    /// Currency column: sent as `Money`.
    Money,
    /// Text column: sent as the text it holds, even one that reads as a date-time (a column of
    /// no declared kind holding ISO 8601 text is taken for a date-time and sent as a WCF date).
    Text,
}

/// Messages a webhook step can be registered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookMessage {
    /// A row was created.
    Create,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
}

impl WebhookMessage {
    fn name(self) -> &'static str {
        match self {
            Self::Create => "Create",
            Self::Update => "Update",
            Self::Delete => "Delete",
        }
    }
}

/// How the webhook authenticates to the receiver (serviceendpoint authtype).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookAuth {
    /// authtype 4: `?code=<value>`.
    WebhookKey(String),
    /// authtype 5: these headers on every request.
    HttpHeader(Vec<(String, String)>),
    /// authtype 6: these query string pairs.
    HttpQueryString(Vec<(String, String)>),
}

/// A webhook service endpoint plus its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRegistration {
    /// Receiver URL.
    pub url: String,
    /// Tables (logical names) the steps are registered on; empty = every table.
    pub entity_logical_names: Vec<String>,
    /// Messages the steps are registered for.
    pub messages: Vec<WebhookMessage>,
    /// Authentication sent to the receiver.
    pub auth: WebhookAuth,
}

/// Configuration of [`DataverseSim`].
#[derive(Debug, Clone)]
pub struct DataverseConfig {
    /// Tables defined at start.
    pub tables: Vec<TableDef>,
    /// When set, every request needs a bearer token issued by this Entra simulator for `<base_url>/.default`.
    pub auth: Option<EntraSim>,
    /// Service protection limits.
    pub throttle: ThrottleConfig,
    /// Fault injection.
    pub faults: FaultConfig,
    /// Organization name sent in `x-ms-dynamics-organization` and `OrganizationName`.
    pub organization_name: String,
    /// The user id that Web API calls act as (the integration / application user).
    pub integration_user_id: String,
    /// The user id that `user_*` calls act as (a person in the UI).
    pub ui_user_id: String,
    /// Force the `x-ms-dynamics-msg-size-exceeded` form on every webhook (no images, no InputParameters).
    pub msg_size_exceeded: bool,
}

impl Default for DataverseConfig {
    fn default() -> Self {
        Self {
            tables: Vec::new(),
            auth: None,
            throttle: ThrottleConfig::default(),
            faults: FaultConfig::default(),
            organization_name: "dualwritesim".into(),
            integration_user_id: "a1a1a1a1-0000-4000-8000-000000000001".into(),
            ui_user_id: "b2b2b2b2-0000-4000-8000-000000000002".into(),
            msg_size_exceeded: false,
        }
    }
}

#[derive(Debug)]
struct Table {
    def: TableDef,
    rows: BTreeMap<String, Row>,
    key_index: Vec<HashMap<Vec<String>, String>>,
    kinds: HashMap<String, ColumnKind>,
    /// Deleted rows as change tracking reports them: (the store's version at the delete, id).
    deleted: Vec<(u64, String)>,
    /// Change tracking is enabled on the table (the default here; a table setting in
    /// Dataverse). Without it `Prefer: odata.track-changes` is ignored.
    tracked: bool,
}

impl Table {
    fn new(def: TableDef) -> Self {
        let key_index = def.alternate_keys.iter().map(|_| HashMap::new()).collect();
        Self {
            def,
            rows: BTreeMap::new(),
            key_index,
            kinds: HashMap::new(),
            deleted: Vec::new(),
            tracked: true,
        }
    }

    fn key_values(&self, k: usize, row: &Row) -> Option<Vec<String>> {
        self.def.alternate_keys[k]
            .iter()
            .map(|a| {
                row.get(a.as_str())
                    .or_else(|| row.get(&format!("_{a}_value")))
                    .and_then(key_text)
            })
            .collect()
    }

    fn unindex(&mut self, id: &str) {
        if let Some(row) = self.rows.get(id) {
            let keys: Vec<_> = (0..self.key_index.len())
                .map(|k| self.key_values(k, row))
                .collect();
            for (k, vals) in keys.into_iter().enumerate() {
                if let Some(v) = vals {
                    self.key_index[k].remove(&v);
                }
            }
        }
    }

    fn put(&mut self, id: &str, row: Option<Row>) {
        self.unindex(id);
        match row {
            Some(row) => {
                for k in 0..self.key_index.len() {
                    if let Some(v) = self.key_values(k, &row) {
                        self.key_index[k].insert(v, id.to_owned());
                    }
                }
                self.rows.insert(id.to_owned(), row);
            }
            None => {
                self.rows.remove(id);
            }
        }
    }
}

/// A key segment resolved against a table.
#[derive(Debug)]
enum KeyRef {
    Id(String),
    Alt {
        index: usize,
        values: Vec<String>,
        attrs: Row,
    },
}

#[derive(Debug, Clone)]
struct Actor {
    user_id: String,
    tag: Option<String>,
    correlation_id: String,
}

#[derive(Debug)]
struct Notice {
    logical: String,
    message: WebhookMessage,
    id: String,
    target: Vec<(String, Value)>,
    image: Vec<(String, Value)>,
    actor: Actor,
}

#[derive(Debug, Default)]
struct Store {
    tables: HashMap<String, Table>,
    version: u64,
    undo: Option<Vec<(String, String, Option<Row>)>>,
    pending: Vec<Notice>,
}

fn err(status: StatusCode, code: &str, message: &str) -> SimResponse {
    SimResponse::json(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn bad_request(message: &str) -> SimResponse {
    err(StatusCode::BAD_REQUEST, "0x80060888", message)
}

fn etag(row: &Row) -> String {
    format!(
        "W/\"{}\"",
        row.get("versionnumber")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    )
}

#[derive(Debug)]
pub(crate) struct DvState {
    store: Mutex<Store>,
    guard: Guard,
    base: OnceLock<String>,
    auth: Option<Arc<crate::entra::EntraState>>,
    config: DataverseConfig,
    /// Webhook registrations; a snapshot is taken per flush (registration is rare).
    hooks: RwLock<Arc<Vec<WebhookRegistration>>>,
    /// Steps registered in synchronous mode: called inside the change's transaction, which
    /// fails (and is rolled back) unless they answer 2xx.
    sync_hooks: RwLock<Arc<Vec<WebhookRegistration>>>,
    dispatcher: Dispatcher,
    msg_size_exceeded: std::sync::atomic::AtomicBool,
}

impl DvState {
    fn api(&self) -> String {
        format!(
            "{}/api/data/v9.2/",
            self.base.get().map_or("", String::as_str)
        )
    }

    fn resolve_key(table: &Table, inner: &str) -> Result<KeyRef, SimResponse> {
        let parts = parse_key(inner)
            .map_err(|e| bad_request(&format!("Bad Request - Error in query syntax: {e}.")))?;
        if parts.len() == 1 && parts[0].name.is_none() {
            let v = &parts[0].value;
            if !is_guid(v) {
                return Err(bad_request(&format!(
                    "'{v}' is not a valid GUID; use (<guid>) or (keyattribute='value')."
                )));
            }
            return Ok(KeyRef::Id(norm_guid(v)));
        }
        if parts.len() == 1 && parts[0].name.as_deref() == Some(table.def.primary_id.as_str()) {
            return Ok(KeyRef::Id(norm_guid(&parts[0].value)));
        }
        let plain = |n: &str| -> String {
            n.strip_prefix('_')
                .and_then(|s| s.strip_suffix("_value"))
                .map_or_else(|| n.to_owned(), str::to_owned)
        };
        let given: HashMap<String, &KeyPart> = parts
            .iter()
            .map(|p| (plain(p.name.as_deref().unwrap_or("")), p))
            .collect();
        for (index, key) in table.def.alternate_keys.iter().enumerate() {
            if key.len() == given.len() && key.iter().all(|a| given.contains_key(a)) {
                let mut values = Vec::new();
                let mut attrs = Row::new();
                for a in key {
                    let p = given[a];
                    if table.def.key_lookups.contains(a) && (p.quoted || !is_guid(&p.value)) {
                        return Err(bad_request(&format!(
                            "The value {}'{}' of key attribute '{a}' is not a row id: a lookup \
                             in an alternate key is given as _{a}_value=<guid>.",
                            if p.quoted { "" } else { "unquoted " },
                            p.value
                        )));
                    }
                    let lookup = p.name.as_deref().is_some_and(|n| n.starts_with('_'))
                        || (!p.quoted && is_guid(&p.value));
                    let json = if p.quoted || lookup {
                        Value::String(p.value.clone())
                    } else {
                        p.value
                            .parse::<serde_json::Number>()
                            .map_or_else(|_| Value::String(p.value.clone()), Value::Number)
                    };
                    values.push(key_text(&json).unwrap_or_default());
                    attrs.insert(
                        if lookup {
                            format!("_{a}_value")
                        } else {
                            a.clone()
                        },
                        json,
                    );
                }
                return Ok(KeyRef::Alt {
                    index,
                    values,
                    attrs,
                });
            }
        }
        let names: Vec<_> = given.keys().cloned().collect();
        Err(bad_request(&format!(
            "The key attributes ({}) do not match a primary key or an alternate key of entity '{}'.",
            names.join(","),
            table.def.logical_name
        )))
    }

    fn find(table: &Table, key: &KeyRef) -> Option<String> {
        match key {
            KeyRef::Id(id) => table.rows.contains_key(id).then(|| id.clone()),
            KeyRef::Alt { index, values, .. } => table.key_index[*index].get(values).cloned(),
        }
    }

    fn not_found(table: &Table, key: &KeyRef) -> SimResponse {
        match key {
            KeyRef::Id(id) => err(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("{} With Id = {id} Does Not Exist", table.def.logical_name),
            ),
            KeyRef::Alt { .. } => err(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!(
                    "A record with the specified key values does not exist in {} entity",
                    table.def.logical_name
                ),
            ),
        }
    }

    /// Resolves `x@odata.bind` values and drops annotations; returns the attributes to write.
    fn prepare(
        store: &Store,
        table: &Table,
        body: &Map<String, Value>,
    ) -> Result<Row, SimResponse> {
        let mut out = Row::new();
        for (k, v) in body {
            if let Some(field) = k.strip_suffix("@odata.bind") {
                let Some(target) = v.as_str() else {
                    out.insert(format!("_{field}_value"), Value::Null);
                    continue;
                };
                let rel = target
                    .rsplit_once(API)
                    .map_or(target, |(_, r)| r)
                    .trim_start_matches('/');
                let resolved = split_key_segment(rel).ok().and_then(|(set, key)| {
                    let t = store.tables.get(set)?;
                    let key = Self::resolve_key(t, key?).ok()?;
                    Some((t.def.logical_name.clone(), Self::find(t, &key)))
                });
                match resolved {
                    Some((logical, Some(id))) => {
                        out.insert(format!("_{field}_value"), Value::String(id));
                        out.insert(
                            format!("_{field}_value{LOOKUP_ANN}"),
                            Value::String(logical),
                        );
                    }
                    Some((logical, None)) => {
                        return Err(err(
                            StatusCode::BAD_REQUEST,
                            "0x80040217",
                            &format!(
                                "The lookup '{field}@odata.bind' of {} refers to '{target}': {logical} With the given key Does Not Exist. Create the referenced row first or fix the reference.",
                                table.def.logical_name
                            ),
                        ));
                    }
                    None => {
                        return Err(bad_request(&format!(
                            "The lookup '{field}@odata.bind' of {} refers to '{target}', which is not a known entity set with a valid key.",
                            table.def.logical_name
                        )));
                    }
                }
            } else if k.starts_with('@') || k.contains('@') {
                continue;
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok(out)
    }

    /// Writes attributes to row `id` (creating it when `prev` is None).
    fn write(
        &self,
        store: &mut Store,
        set: &str,
        id: &str,
        mut attrs: Row,
        actor: &Actor,
    ) -> Result<(Row, bool), SimResponse> {
        // Dataverse keeps no empty text: a column written "" holds null (and reads, images and
        // webhooks show null).
        for v in attrs.values_mut() {
            if v.as_str() == Some("") {
                *v = Value::Null;
            }
        }
        store.version += 1;
        let version = store.version;
        let wants_hooks = !self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        let Some(table) = store.tables.get_mut(set) else {
            return Err(bad_request(&format!(
                "Resource not found for the segment '{set}'."
            )));
        };
        let prev = table.rows.get(id).cloned();
        let created = prev.is_none();
        let now = iso(Utc::now());
        let mut row = prev.clone().unwrap_or_else(|| {
            let mut r = Row::new();
            r.insert(table.def.primary_id.clone(), Value::String(id.to_owned()));
            r.insert("createdon".into(), Value::String(now.clone()));
            r
        });
        let pid = table.def.primary_id.clone();
        for (k, v) in &attrs {
            if *k != pid {
                row.insert(k.clone(), v.clone());
            }
        }
        row.insert("versionnumber".into(), json!(version));
        row.insert("modifiedon".into(), Value::String(now.clone()));
        for k in 0..table.key_index.len() {
            if let Some(vals) = table.key_values(k, &row)
                && let Some(other) = table.key_index[k].get(&vals)
                && other != id
            {
                return Err(err(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    &format!(
                        "A record that has the attribute values {} already exists. The entity key requires that this set of attributes contains unique values. Select unique values and try again.",
                        vals.join(", ")
                    ),
                ));
            }
        }
        table.put(id, Some(row.clone()));
        let logical = table.def.logical_name.clone();
        if wants_hooks {
            let mut changed: Row = attrs;
            changed.insert(pid.clone(), Value::String(id.to_owned()));
            changed.insert("modifiedon".into(), Value::String(now));
            let target = typed_attributes(table, &changed, actor);
            let image = image_attributes(table, &row, actor);
            let message = if created {
                WebhookMessage::Create
            } else {
                WebhookMessage::Update
            };
            store.pending.push(Notice {
                logical,
                message,
                id: id.to_owned(),
                target,
                image,
                actor: actor.clone(),
            });
        }
        if let Some(undo) = store.undo.as_mut() {
            undo.push((set.to_owned(), id.to_owned(), prev));
        }
        Ok((row, created))
    }

    fn delete_row(&self, store: &mut Store, set: &str, id: &str, actor: &Actor) {
        let wants_hooks = !self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        let version = store.version + 1;
        let Some(table) = store.tables.get_mut(set) else {
            return;
        };
        let prev = table.rows.get(id).cloned();
        table.put(id, None);
        if prev.is_some() {
            table.deleted.push((version, id.to_owned()));
            store.version = version;
        }
        let Some(table) = store.tables.get_mut(set) else {
            return;
        };
        if wants_hooks && let Some(p) = &prev {
            let image = image_attributes(table, p, actor);
            store.pending.push(Notice {
                logical: table.def.logical_name.clone(),
                message: WebhookMessage::Delete,
                id: id.to_owned(),
                target: Vec::new(),
                image,
                actor: actor.clone(),
            });
        }
        if let Some(undo) = store.undo.as_mut() {
            undo.push((set.to_owned(), id.to_owned(), prev));
        }
    }

    fn view(table: &Table, row: &Row, select: Option<&[String]>, annotations: bool) -> Value {
        let mut out = Map::new();
        out.insert("@odata.etag".into(), Value::String(etag(row)));
        match select {
            Some(cols) => {
                out.insert(
                    table.def.primary_id.clone(),
                    row.get(&table.def.primary_id)
                        .cloned()
                        .unwrap_or(Value::Null),
                );
                for c in cols {
                    let lookup = format!("_{c}_value");
                    let name = if !row.contains_key(c.as_str()) && row.contains_key(&lookup) {
                        lookup
                    } else {
                        c.clone()
                    };
                    out.insert(name.clone(), row.get(&name).cloned().unwrap_or(Value::Null));
                    let ann = format!("{name}{LOOKUP_ANN}");
                    if annotations && let Some(a) = row.get(&ann) {
                        out.insert(ann, a.clone());
                    }
                }
            }
            None => {
                for (k, v) in row {
                    if !k.contains('@') || annotations {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        Value::Object(out)
    }

    fn execute(&self, store: &mut Store, req: &SimRequest, actor: &Actor) -> SimResponse {
        let Some(rel) = req.path.strip_prefix(API) else {
            return bad_request(&format!(
                "Resource not found for the segment '{}'; the Web API lives under {API}.",
                req.path
            ));
        };
        let (first, action) = split_path(rel);
        let rel = pct_decode(rel);
        let (set, key) = match split_key_segment(&first) {
            Ok(x) => x,
            Err(e) => return bad_request(&format!("Bad Request - Error in query syntax: {e}.")),
        };
        let version_now = store.version;
        let Some(table) = store.tables.get(set) else {
            return err(
                StatusCode::NOT_FOUND,
                "0x80060888",
                &format!("Resource not found for the segment '{set}'."),
            );
        };
        let query = parse_query(&req.query);
        let q = |n: &str| query.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        let prefs = prefers(req);
        let annotations = prefs
            .iter()
            .any(|p| p.starts_with("odata.include-annotations"));
        let representation = prefs.iter().any(|p| p == "return=representation");
        let select: Option<Vec<String>> =
            q("$select").map(|s| s.split(',').map(|c| c.trim().to_owned()).collect());
        let set = set.to_owned();
        if !action.is_empty() {
            if req.method != Method::POST || key.is_some() {
                return err(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "0x80060888",
                    &format!(
                        "The HTTP method '{}' is not allowed for '{rel}'.",
                        req.method
                    ),
                );
            }
            return self.bulk(store, &set, &action, &req.body, actor);
        }
        let key = match key.map(|k| Self::resolve_key(table, k)).transpose() {
            Ok(k) => k,
            Err(e) => return e,
        };
        match (&req.method, key) {
            (&Method::GET, None)
                if table.tracked && prefs.iter().any(|p| p == "odata.track-changes") =>
            {
                self.tracked_query(table, req, &query, select.as_deref(), &prefs, version_now)
            }
            (&Method::GET, None) => {
                self.query(table, req, &query, select.as_deref(), annotations, &prefs)
            }
            (&Method::GET, Some(key)) => {
                let Some(id) = Self::find(table, &key) else {
                    return Self::not_found(table, &key);
                };
                let row = &table.rows[&id];
                if req.header("if-none-match").is_some_and(|t| t == etag(row)) {
                    return SimResponse::empty(StatusCode::NOT_MODIFIED);
                }
                let mut body = Self::view(table, row, select.as_deref(), annotations);
                if let Some(o) = body.as_object_mut() {
                    o.insert(
                        "@odata.context".into(),
                        Value::String(format!("{}$metadata#{set}/$entity", self.api())),
                    );
                }
                SimResponse::json(StatusCode::OK, &body).with_header("etag", &etag(row))
            }
            (&Method::POST, None) => {
                let body = match parse_body(&req.body) {
                    Ok(b) => b,
                    Err(e) => return e,
                };
                let attrs = match Self::prepare(store, table, &body) {
                    Ok(a) => a,
                    Err(e) => return e,
                };
                let id = attrs
                    .get(&table.def.primary_id)
                    .and_then(Value::as_str)
                    .map_or_else(new_guid, norm_guid);
                if table.rows.contains_key(&id) {
                    return err(
                        StatusCode::PRECONDITION_FAILED,
                        "0x80040237",
                        "A record with matching key values already exists.",
                    );
                }
                match self.write(store, &set, &id, attrs, actor) {
                    Ok((row, _)) => self.written(
                        store,
                        &set,
                        &id,
                        &row,
                        StatusCode::CREATED,
                        representation,
                        select.as_deref(),
                        annotations,
                    ),
                    Err(e) => e,
                }
            }
            (&Method::PATCH, Some(key)) => {
                let body = match parse_body(&req.body) {
                    Ok(b) => b,
                    Err(e) => return e,
                };
                let mut attrs = match Self::prepare(store, table, &body) {
                    Ok(a) => a,
                    Err(e) => return e,
                };
                let existing = Self::find(table, &key);
                if let Some(m) = req.header("if-match") {
                    let Some(id) = &existing else {
                        return Self::not_found(table, &key);
                    };
                    if m != "*" && m != etag(&table.rows[id]) {
                        return err(
                            StatusCode::PRECONDITION_FAILED,
                            "0x80060882",
                            "The version of the existing record doesn't match the RowVersion property provided.",
                        );
                    }
                }
                if req.header("if-none-match") == Some("*") && existing.is_some() {
                    return err(
                        StatusCode::PRECONDITION_FAILED,
                        "0x80040237",
                        "A record with matching key values already exists.",
                    );
                }
                let id = match (&existing, &key) {
                    (Some(id), _) => id.clone(),
                    (None, KeyRef::Id(id)) => id.clone(),
                    (
                        None,
                        KeyRef::Alt {
                            attrs: key_attrs, ..
                        },
                    ) => {
                        for (k, v) in key_attrs {
                            attrs.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                        attrs
                            .get(&table.def.primary_id)
                            .and_then(Value::as_str)
                            .map_or_else(new_guid, norm_guid)
                    }
                };
                match self.write(store, &set, &id, attrs, actor) {
                    Ok((row, created)) => {
                        let status = if created {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        self.written(
                            store,
                            &set,
                            &id,
                            &row,
                            status,
                            representation,
                            select.as_deref(),
                            annotations,
                        )
                    }
                    Err(e) => e,
                }
            }
            (&Method::DELETE, Some(key)) => {
                let Some(id) = Self::find(table, &key) else {
                    return Self::not_found(table, &key);
                };
                if let Some(m) = req.header("if-match")
                    && m != "*"
                    && m != etag(&table.rows[&id])
                {
                    return err(
                        StatusCode::PRECONDITION_FAILED,
                        "0x80060882",
                        "The version of the existing record doesn't match the RowVersion property provided.",
                    );
                }
                self.delete_row(store, &set, &id, actor);
                SimResponse::empty(StatusCode::NO_CONTENT)
            }
            (m, _) => err(
                StatusCode::METHOD_NOT_ALLOWED,
                "0x80060888",
                &format!("The HTTP method '{m}' is not allowed for '{rel}'."),
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn written(
        &self,
        store: &Store,
        set: &str,
        id: &str,
        row: &Row,
        status: StatusCode,
        representation: bool,
        select: Option<&[String]>,
        annotations: bool,
    ) -> SimResponse {
        let entity_id = format!("{}{set}({id})", self.api());
        let resp = if representation {
            let table = &store.tables[set];
            let mut body = Self::view(table, row, select, annotations);
            if let Some(o) = body.as_object_mut() {
                o.insert(
                    "@odata.context".into(),
                    Value::String(format!("{}$metadata#{set}/$entity", self.api())),
                );
            }
            SimResponse::json(status, &body)
                .with_header("preference-applied", "return=representation")
        } else {
            SimResponse::empty(StatusCode::NO_CONTENT)
        };
        resp.with_header("odata-entityid", &entity_id)
            .with_header("etag", &etag(row))
    }

    #[allow(clippy::too_many_arguments)]
    /// A collection read with change tracking (`Prefer: odata.track-changes`): without
    /// `$deltatoken`, every row (paged as any query, the start version carried by the
    /// nextLink) and, on the last page, `@odata.deltaLink`; with one, the rows changed since
    /// and a `$deletedEntity` entry for each row deleted since, and a new deltaLink. `$filter`,
    /// `$orderby` and `$top` are refused with tracking, as Dataverse refuses them.
    fn tracked_query(
        &self,
        table: &Table,
        req: &SimRequest,
        query: &[(String, String)],
        select: Option<&[String]>,
        prefs: &[String],
        version_now: u64,
    ) -> SimResponse {
        let q = |n: &str| query.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        for option in ["$filter", "$orderby", "$top", "$expand"] {
            if q(option).is_some() {
                return bad_request(&format!(
                    "The query option {option} cannot be used with change tracking \
                     (Prefer: odata.track-changes)."
                ));
            }
        }
        let set = &table.def.entity_set;
        let select_param = q("$select").map(|s| format!("$select={}&", pct_encode(s)));
        let delta_link = |version: u64| {
            format!(
                "{}{set}?{}$deltatoken={version}",
                self.api(),
                select_param.as_deref().unwrap_or("")
            )
        };
        if let Some(token) = q("$deltatoken") {
            let Ok(since) = token.parse::<u64>() else {
                return bad_request(
                    "The $deltatoken is not valid; follow @odata.deltaLink unchanged.",
                );
            };
            let mut values: Vec<Value> = table
                .rows
                .values()
                .filter(|r| {
                    r.get("versionnumber")
                        .and_then(Value::as_u64)
                        .is_some_and(|v| v > since)
                })
                .map(|r| Self::view(table, r, select, false))
                .collect();
            for (_, id) in table
                .deleted
                .iter()
                .filter(|(v, id)| *v > since && !table.rows.contains_key(id))
            {
                values.push(json!({
                    "@odata.context": format!("{}$metadata#{set}/$deletedEntity", self.api()),
                    "id": id,
                    "reason": "deleted",
                }));
            }
            let body = json!({
                "@odata.context": format!("{}$metadata#{set}", self.api()),
                "value": values,
                "@odata.deltaLink": delta_link(version_now),
            });
            return SimResponse::json(StatusCode::OK, &body)
                .with_header("preference-applied", "odata.track-changes");
        }
        // The initial read: pages as any query; the version it started at rides on the
        // nextLink so that the deltaLink covers what changed while it was paged.
        let start = q("trackstart")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(version_now);
        let mut plain_query: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| k != "trackstart")
            .cloned()
            .collect();
        plain_query.retain(|(k, _)| k != "$deltatoken");
        let resp = self.query(table, req, &plain_query, select, false, prefs);
        if resp.status != StatusCode::OK {
            return resp;
        }
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&resp.body) else {
            return resp;
        };
        match body.get("@odata.nextLink").and_then(Value::as_str) {
            Some(next) if !next.contains("trackstart=") => {
                let next = format!("{next}&trackstart={start}");
                body.insert("@odata.nextLink".into(), Value::String(next));
            }
            Some(_) => {}
            None => {
                body.insert("@odata.deltaLink".into(), Value::String(delta_link(start)));
            }
        }
        let applied = prefs
            .iter()
            .filter(|p| p.starts_with("odata.maxpagesize="))
            .cloned()
            .chain(std::iter::once("odata.track-changes".to_owned()))
            .collect::<Vec<_>>()
            .join(",");
        SimResponse::json(StatusCode::OK, &Value::Object(body))
            .with_header("preference-applied", &applied)
    }

    fn query(
        &self,
        table: &Table,
        req: &SimRequest,
        query: &[(String, String)],
        select: Option<&[String]>,
        annotations: bool,
        prefs: &[String],
    ) -> SimResponse {
        let q = |n: &str| query.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        for (k, _) in query {
            match k.as_str() {
                "$select" | "$filter" | "$top" | "$orderby" | "$count" | "$skiptoken" => {}
                "$skip" => {
                    return bad_request(
                        "The query parameter $skip is not supported; follow @odata.nextLink to page.",
                    );
                }
                other if other.starts_with('$') => {
                    return bad_request(&format!(
                        "The query parameter {other} is not supported by the simulator."
                    ));
                }
                _ => {}
            }
        }
        let filter = match q("$filter").map(parse_filter).transpose() {
            Ok(f) => f,
            Err(e) => return bad_request(&format!("Invalid $filter: {e}.")),
        };
        let order = match q("$orderby").map(parse_orderby).transpose() {
            Ok(o) => o,
            Err(e) => return bad_request(&format!("Invalid $orderby: {e}.")),
        };
        let top = match q("$top").map(str::parse::<usize>).transpose() {
            Ok(t) => t,
            Err(_) => return bad_request("$top must be a non-negative whole number."),
        };
        let max_pref = prefs
            .iter()
            .find_map(|p| p.strip_prefix("odata.maxpagesize="))
            .and_then(|v| v.trim_matches('"').parse::<usize>().ok());
        let page_size = max_pref.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
        let (page_no, last_id) = match q("$skiptoken") {
            Some(tok) => match parse_cookie(tok) {
                Some(c) => c,
                None => {
                    return bad_request(
                        "The $skiptoken is not valid; follow @odata.nextLink unchanged.",
                    );
                }
            },
            None => (1, None),
        };
        let served = (page_no - 1) * page_size;
        let remaining_top = top.map(|t| t.saturating_sub(served));
        let limit = remaining_top.map_or(page_size, |t| t.min(page_size));
        let matches = |r: &Row| filter.as_ref().is_none_or(|f| eval(f, r, false));
        let pid = &table.def.primary_id;
        let (page, more): (Vec<&Row>, bool) = if let Some(order) = &order {
            let mut all: Vec<&Row> = table.rows.values().filter(|r| matches(r)).collect();
            all.sort_by(|a, b| {
                order_rows(a, b, order).then_with(|| key_text(&a[pid]).cmp(&key_text(&b[pid])))
            });
            let rest: Vec<&Row> = all.into_iter().skip(served).collect();
            let more = rest.len() > limit;
            (rest.into_iter().take(limit).collect(), more)
        } else {
            let range = match &last_id {
                Some(l) => table
                    .rows
                    .range::<String, _>((Bound::Excluded(l), Bound::Unbounded)),
                None => table.rows.range::<String, _>(..),
            };
            let mut page: Vec<&Row> = range
                .map(|(_, r)| r)
                .filter(|r| matches(r))
                .take(limit + 1)
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            (page, more)
        };
        let more = more && remaining_top.is_none_or(|t| t > limit);
        let set = &table.def.entity_set;
        let mut body = Map::new();
        body.insert(
            "@odata.context".into(),
            Value::String(format!("{}$metadata#{set}", self.api())),
        );
        if q("$count") == Some("true") {
            let count = table
                .rows
                .values()
                .filter(|r| matches(r))
                .count()
                .min(MAX_PAGE);
            body.insert("@odata.count".into(), json!(count));
        }
        body.insert(
            "value".into(),
            Value::Array(
                page.iter()
                    .map(|r| Self::view(table, r, select, annotations))
                    .collect(),
            ),
        );
        if more && let Some(last) = page.last().and_then(|r| r.get(pid)).and_then(Value::as_str) {
            let first = page
                .first()
                .and_then(|r| r.get(pid))
                .and_then(Value::as_str)
                .unwrap_or(last);
            let inner = format!(
                "<cookie page=\"{page_no}\"><{pid} last=\"{{{}}}\" first=\"{{{}}}\" /></cookie>",
                last.to_uppercase(),
                first.to_uppercase()
            );
            let cookie = format!(
                "<cookie pagenumber=\"{}\" pagingcookie=\"{}\" istracking=\"False\" />",
                page_no + 1,
                pct_encode(&pct_encode(&inner))
            );
            let kept: Vec<&str> = req
                .query
                .split('&')
                .filter(|p| {
                    !p.is_empty() && pct_decode(p.split('=').next().unwrap_or("")) != "$skiptoken"
                })
                .collect();
            let mut link = format!("{}{set}?", self.api());
            for p in kept {
                link.push_str(p);
                link.push('&');
            }
            link.push_str("$skiptoken=");
            link.push_str(&pct_encode(&cookie));
            body.insert("@odata.nextLink".into(), Value::String(link));
        }
        let mut resp = SimResponse::json(StatusCode::OK, &Value::Object(body));
        let mut applied = Vec::new();
        if max_pref.is_some() {
            applied.push(format!("odata.maxpagesize={page_size}"));
        }
        if annotations {
            applied.push("odata.include-annotations=\"*\"".to_owned());
        }
        if !applied.is_empty() {
            resp = resp.with_header("preference-applied", &applied.join(","));
        }
        resp
    }

    fn bulk(
        &self,
        store: &mut Store,
        set: &str,
        action: &str,
        body: &Bytes,
        actor: &Actor,
    ) -> SimResponse {
        let kind = match action {
            "Microsoft.Dynamics.CRM.CreateMultiple" => "CreateMultiple",
            "Microsoft.Dynamics.CRM.UpdateMultiple" => "UpdateMultiple",
            "Microsoft.Dynamics.CRM.UpsertMultiple" => "UpsertMultiple",
            other => {
                return err(
                    StatusCode::NOT_FOUND,
                    "0x80060888",
                    &format!("Resource not found for the segment '{other}'."),
                );
            }
        };
        let body = match parse_body(body) {
            Ok(b) => b,
            Err(e) => return e,
        };
        let Some(targets) = body.get("Targets").and_then(Value::as_array) else {
            return bad_request(&format!(
                "{kind} needs a 'Targets' array in the request body."
            ));
        };
        let logical = store.tables[set].def.logical_name.clone();
        let outer_undo = store.undo.replace(Vec::new());
        let mut ids = Vec::new();
        let mut failure = None;
        for (i, t) in targets.iter().enumerate() {
            match self.bulk_one(store, set, &logical, kind, t, actor) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        let undo = std::mem::replace(&mut store.undo, outer_undo).unwrap_or_default();
        if let Some((i, e)) = failure {
            let n = undo.len();
            self.undo(store, undo);
            let keep = store.pending.len().saturating_sub(n);
            store.pending.truncate(keep);
            let msg = serde_json::from_slice::<Value>(&e.body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let code = serde_json::from_slice::<Value>(&e.body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            return err(
                e.status,
                code.as_deref().unwrap_or("0x80040265"),
                &format!("{kind} failed at Targets[{i}]; nothing was written. {msg}"),
            );
        }
        if let Some(outer) = store.undo.as_mut() {
            outer.extend(undo);
        }
        match kind {
            // Both answer 204 No Content: UpsertMultiple returns no UpsertMultipleResponse
            // (Microsoft's reference for the Web API action), so no ids.
            "UpdateMultiple" | "UpsertMultiple" => SimResponse::empty(StatusCode::NO_CONTENT),
            _ => SimResponse::json(
                StatusCode::OK,
                &json!({"@odata.context": format!("{}$metadata#Microsoft.Dynamics.CRM.{kind}Response", self.api()), "Ids": ids}),
            ),
        }
    }

    fn bulk_one(
        &self,
        store: &mut Store,
        set: &str,
        logical: &str,
        kind: &str,
        t: &Value,
        actor: &Actor,
    ) -> Result<String, SimResponse> {
        let obj = t
            .as_object()
            .ok_or_else(|| bad_request("Each item of Targets must be a JSON object."))?;
        let expected = format!("Microsoft.Dynamics.CRM.{logical}");
        if obj.get("@odata.type").and_then(Value::as_str) != Some(expected.as_str()) {
            return Err(bad_request(&format!(
                "Each item of Targets needs \"@odata.type\": \"{expected}\"."
            )));
        }
        let table = &store.tables[set];
        let mut attrs = Self::prepare(store, table, obj)?;
        let by_key = match obj.get("@odata.id").and_then(Value::as_str) {
            Some(odata_id) => {
                // `@odata.id` is a URL (relative or absolute): read like a request path, its
                // key percent-decoded, or a key with a space or non-ASCII text would miss the
                // row and create a second one.
                let rel = odata_id
                    .rsplit_once(API)
                    .map_or(odata_id, |(_, r)| r)
                    .trim_start_matches('/');
                let (first, _) = split_path(rel);
                let (_, key) = split_key_segment(&first).map_err(|e| bad_request(&e))?;
                Some(Self::resolve_key(table, key.unwrap_or_default())?)
            }
            None => attrs
                .get(&table.def.primary_id)
                .and_then(Value::as_str)
                .map(|id| KeyRef::Id(norm_guid(id))),
        };
        let existing = by_key.as_ref().and_then(|k| Self::find(table, k));
        let id = match (kind, &existing, &by_key) {
            ("CreateMultiple", Some(_), _) => {
                return Err(err(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    "A record with matching key values already exists.",
                ));
            }
            ("UpdateMultiple", None, Some(k)) => return Err(Self::not_found(table, k)),
            ("UpdateMultiple", None, None) => {
                return Err(bad_request(
                    "UpdateMultiple needs the primary id in each target.",
                ));
            }
            (_, Some(id), _) => id.clone(),
            (_, None, Some(KeyRef::Id(id))) => id.clone(),
            (
                _,
                None,
                Some(KeyRef::Alt {
                    attrs: key_attrs, ..
                }),
            ) => {
                for (k, v) in key_attrs {
                    attrs.entry(k.clone()).or_insert_with(|| v.clone());
                }
                new_guid()
            }
            (_, None, None) => new_guid(),
        };
        self.write(store, set, &id, attrs, actor)?;
        Ok(id)
    }

    fn undo(&self, store: &mut Store, undo: Vec<(String, String, Option<Row>)>) {
        for (set, id, prev) in undo.into_iter().rev() {
            if let Some(t) = store.tables.get_mut(&set) {
                t.put(&id, prev);
            }
        }
    }

    /// The synchronous steps, when any is registered.
    fn sync_steps(&self) -> Option<Arc<Vec<WebhookRegistration>>> {
        let steps = self
            .sync_hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (!steps.is_empty()).then_some(steps)
    }

    /// Calls the synchronous steps of `notices` one after the other, in this task (`client`:
    /// for a caller outside the simulator's runtime); the first that does not answer 2xx is
    /// the change's failure, in words.
    async fn call_sync_steps(
        &self,
        notices: &[Notice],
        steps: &[WebhookRegistration],
        client: Option<&reqwest::Client>,
    ) -> Result<(), String> {
        for d in self.deliveries(notices, steps, true) {
            let rec = self.dispatcher.deliver_now(&d, client).await;
            if let Some(error) = rec.error {
                return Err(format!(
                    "The synchronous webhook step registered for {} of {} failed ({error}); \
                     the operation was rolled back.",
                    d.message, d.entity
                ));
            }
        }
        Ok(())
    }

    /// Runs `req` against the store, keeping what is needed to roll it back when
    /// synchronous steps are registered (see [`DvState::finish`]).
    fn run_change(&self, store: &mut Store, req: &SimRequest, actor: &Actor) -> Prepared {
        let steps = self.sync_steps();
        let outer = if steps.is_some() {
            store.undo.replace(Vec::new())
        } else {
            None
        };
        let resp = self.execute(store, req, actor);
        let pending = std::mem::take(&mut store.pending);
        let undo = if steps.is_some() {
            std::mem::replace(&mut store.undo, outer).unwrap_or_default()
        } else {
            Vec::new()
        };
        let steps = steps.filter(|_| resp.status.is_success() && !pending.is_empty());
        Prepared {
            resp,
            pending,
            undo,
            steps,
        }
    }

    /// Ends a prepared change: a synchronous step's failure (`outcome`) rolls it back and is
    /// the answer; otherwise its notices go to the asynchronous steps.
    fn finish(&self, prepared: Prepared, outcome: Result<(), String>) -> SimResponse {
        if let Err(message) = outcome {
            let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
            self.undo(&mut store, prepared.undo);
            return err(StatusCode::BAD_REQUEST, "0x80040265", &message);
        }
        self.flush(prepared.pending);
        prepared.resp
    }

    /// Sends the notices of committed writes to the webhook lanes (asynchronous steps).
    fn flush(&self, notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        let hooks = self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone();
        for d in self.deliveries(&notices, &hooks, false) {
            self.dispatcher.send(d);
        }
    }

    /// The deliveries of `notices` to the steps of `hooks` that match them.
    fn deliveries(
        &self,
        notices: &[Notice],
        hooks: &[WebhookRegistration],
        synchronous: bool,
    ) -> Vec<Delivery> {
        let size_exceeded = self.msg_size_exceeded.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for n in notices {
            for h in hooks.iter().filter(|h| {
                h.messages.contains(&n.message)
                    && (h.entity_logical_names.is_empty()
                        || h.entity_logical_names.contains(&n.logical))
            }) {
                let (body, exceeded) = self.context_body(n, size_exceeded, synchronous);
                let mut url = h.url.clone();
                let mut headers = vec![
                    (
                        "x-ms-dynamics-organization".to_owned(),
                        format!("{}.crm.dynamics.com", self.config.organization_name),
                    ),
                    ("x-ms-dynamics-entity-name".to_owned(), n.logical.clone()),
                    (
                        "x-ms-dynamics-request-name".to_owned(),
                        n.message.name().to_owned(),
                    ),
                    (
                        "x-ms-correlation-request-id".to_owned(),
                        n.actor.correlation_id.clone(),
                    ),
                ];
                if exceeded {
                    headers.push((
                        "x-ms-dynamics-msg-size-exceeded".to_owned(),
                        "true".to_owned(),
                    ));
                }
                let sep = |u: &str| if u.contains('?') { '&' } else { '?' };
                match &h.auth {
                    WebhookAuth::WebhookKey(code) => {
                        url = format!("{url}{}code={}", sep(&url), pct_encode(code))
                    }
                    WebhookAuth::HttpHeader(pairs) => headers.extend(pairs.iter().cloned()),
                    WebhookAuth::HttpQueryString(pairs) => {
                        for (k, v) in pairs {
                            url = format!("{url}{}{}={}", sep(&url), pct_encode(k), pct_encode(v));
                        }
                    }
                }
                out.push(Delivery {
                    url,
                    headers,
                    body,
                    entity: n.logical.clone(),
                    message: n.message.name().to_owned(),
                    record_id: n.id.clone(),
                    // An asynchronous step is retried once on a gateway error; a synchronous
                    // one is not retried: its failure fails the change.
                    policy: RetryPolicy {
                        only_gateway_errors: true,
                        retries: u32::from(!synchronous),
                        delay: Duration::from_millis(50),
                        timeout: Duration::from_secs(60),
                    },
                });
            }
        }
        out
    }

    /// The webhook body of `n` and whether it was cut down (`x-ms-dynamics-msg-size-exceeded`):
    /// a body over 256 KB, or every body while `force_exceeded`, loses its ParentContext,
    /// InputParameters and images.
    fn context_body(&self, n: &Notice, force_exceeded: bool, synchronous: bool) -> (Bytes, bool) {
        let created = wcf_date(Utc::now());
        // A synchronous step runs no system job: its OperationId is the empty GUID.
        let operation_id = if synchronous {
            EMPTY_GUID.to_owned()
        } else {
            new_guid()
        };
        let body = write_context(
            n,
            &self.config.organization_name,
            &operation_id,
            &created,
            force_exceeded,
            synchronous,
        );
        if !force_exceeded && body.len() > 256 * 1024 {
            let cut = write_context(
                n,
                &self.config.organization_name,
                &operation_id,
                &created,
                true,
                synchronous,
            );
            return (Bytes::from(cut), true);
        }
        (Bytes::from(body), force_exceeded)
    }
}

/// Writes the RemoteExecutionContext of `n` (an asynchronous PostOperation step, its
/// ParentContext the PreOperation stage). `exceeded`: without ParentContext, InputParameters
/// and images, as Dataverse sends a body that would exceed 256 KB.
fn write_context(
    n: &Notice,
    organization_name: &str,
    operation_id: &str,
    created_on: &str,
    exceeded: bool,
    synchronous: bool,
) -> Vec<u8> {
    let logical_json = json::json_string(&n.logical);
    let entity = |out: &mut Vec<u8>, attrs: &[(String, Value)]| {
        context::entity(out, &n.id, &logical_json, |out| {
            for (i, (k, v)) in attrs.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json::raw(out, r#"{"key":"#);
                json::string(out, k);
                json::raw(out, r#","value":"#);
                json::any(out, v);
                out.push(b'}');
            }
        });
    };
    let empty = |out: &mut Vec<u8>| json::raw(out, "[]");
    let input = |out: &mut Vec<u8>| {
        if exceeded {
            return empty(out);
        }
        context::one_pair(out, "Target", |out| match n.message {
            WebhookMessage::Delete => context::entity_reference(out, &logical_json, &n.id),
            _ => entity(out, &n.target),
        });
    };
    let image =
        |out: &mut Vec<u8>, name: &str| context::one_pair(out, name, |out| entity(out, &n.image));
    let post = |out: &mut Vec<u8>| match n.message {
        WebhookMessage::Delete => empty(out),
        _ if exceeded => empty(out),
        _ => image(out, "PostImage"),
    };
    let pre = |out: &mut Vec<u8>| match n.message {
        WebhookMessage::Delete if !exceeded => image(out, "PreImage"),
        _ => empty(out),
    };
    let shared = |out: &mut Vec<u8>| match &n.actor.tag {
        Some(tag) => context::one_pair(out, "tag", |out| json::string(out, tag)),
        None => empty(out),
    };
    let changed_types = |out: &mut Vec<u8>| {
        context::one_pair(out, "ChangedEntityTypes", |out| {
            json::raw(
                out,
                r#"[{"__type":"KeyValuePairOfstringstring:#System.Collections.Generic","key":"#,
            );
            json::raw(out, &logical_json);
            json::raw(out, r#","value":"#);
            json::string(out, n.message.name());
            json::raw(out, "}]");
        });
    };
    let head = |stage: u32,
                post_entity_images: context::WritePart<'_>,
                pre_entity_images: context::WritePart<'_>,
                shared_variables: context::WritePart<'_>,
                parent: Option<&RemoteContext<'_>>| {
        let ctx = RemoteContext {
            correlation_id: &n.actor.correlation_id,
            user_id: &n.actor.user_id,
            message_name: n.message.name(),
            operation_created_on: created_on,
            operation_id,
            organization_name,
            primary_entity_id: &n.id,
            primary_entity_name: &n.logical,
            stage,
            input_parameters: &input,
            post_entity_images,
            pre_entity_images,
            shared_variables,
            parent,
            synchronous,
        };
        let attrs = n.target.len() + n.image.len();
        let mut out = Vec::with_capacity(1024 + 3 * 64 * attrs);
        ctx.write(&mut out);
        out
    };
    if exceeded {
        return head(40, &empty, &empty, &shared, None);
    }
    let parent = RemoteContext {
        correlation_id: &n.actor.correlation_id,
        user_id: &n.actor.user_id,
        message_name: n.message.name(),
        operation_created_on: created_on,
        operation_id,
        organization_name,
        primary_entity_id: &n.id,
        primary_entity_name: &n.logical,
        stage: 30,
        input_parameters: &input,
        post_entity_images: &empty,
        pre_entity_images: &empty,
        shared_variables: &changed_types,
        parent: None,
        synchronous,
    };
    head(40, &post, &pre, &shared, Some(&parent))
}

fn entity_reference(logical: &str, id: &str) -> Value {
    json!({"__type": format!("EntityReference:{CONTRACTS}"), "Id": id, "KeyAttributes": [], "LogicalName": logical, "Name": null, "RowVersion": null})
}

/// The attributes of an entity image: as [`typed_attributes`], without the null ones —
/// Dataverse leaves columns holding null out of pre and post images (the Target keeps a
/// column set to null, as the request set it).
fn image_attributes(table: &Table, row: &Row, actor: &Actor) -> Vec<(String, Value)> {
    let mut out = typed_attributes(table, row, actor);
    out.retain(|(_, v)| !v.is_null());
    out
}

/// Converts stored row attributes to RemoteExecutionContext attribute values.
fn typed_attributes(table: &Table, row: &Row, actor: &Actor) -> Vec<(String, Value)> {
    let mut out = Vec::with_capacity(row.len() + 1);
    for (k, v) in row {
        if k.contains('@') || k == "versionnumber" {
            continue;
        }
        if let Some(field) = k.strip_prefix('_').and_then(|s| s.strip_suffix("_value")) {
            let target = row
                .get(&format!("{k}{LOOKUP_ANN}"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let value = match v.as_str() {
                Some(id) => entity_reference(target, id),
                None => Value::Null,
            };
            out.push((field.to_owned(), value));
            continue;
        }
        let value = match (table.kinds.get(k), v) {
            (_, Value::Null) => Value::Null,
            (Some(ColumnKind::OptionSet), v) => {
                json!({"__type": format!("OptionSetValue:{CONTRACTS}"), "Value": v})
            }
            (Some(ColumnKind::Money), v) => {
                json!({"__type": format!("Money:{CONTRACTS}"), "Value": v})
            }
            (Some(ColumnKind::Text), v) => v.clone(),
            (None, Value::String(s)) if s.len() >= 19 && s.as_bytes().get(10) == Some(&b'T') => {
                crate::odata::parse_datetime(s)
                    .map_or_else(|| v.clone(), |d| Value::String(wcf_date(d)))
            }
            (None, v) => v.clone(),
        };
        out.push((k.clone(), value));
    }
    out.push((
        "modifiedby".to_owned(),
        entity_reference("systemuser", &actor.user_id),
    ));
    out
}

/// Splits a path below the Web API root into its first segment (`accounts(accountnumber='A 1')`)
/// and the rest (a bound action such as `Microsoft.Dynamics.CRM.UpsertMultiple`), each
/// percent-decoded after the split: a key value holding an encoded `/`
/// (`accounts(accountnumber='A%201%2F2')`) is part of the key, not a segment boundary.
fn split_path(rel: &str) -> (String, String) {
    let (first, rest) = rel.split_once('/').unwrap_or((rel, ""));
    (pct_decode(first), pct_decode(rest))
}

fn parse_body(body: &Bytes) -> Result<Map<String, Value>, SimResponse> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad_request("The request body must be a JSON object.")),
        Err(e) => Err(bad_request(&format!(
            "The request body is not valid JSON: {e}."
        ))),
    }
}

/// Reads `(pagenumber, last primary id)` from a skiptoken cookie.
fn parse_cookie(tok: &str) -> Option<(usize, Option<String>)> {
    let attr = |s: &str, name: &str| -> Option<String> {
        let start = s.find(&format!("{name}=\""))? + name.len() + 2;
        let end = s[start..].find('"')? + start;
        Some(s[start..end].to_owned())
    };
    let page: usize = attr(tok, "pagenumber")?.parse().ok()?;
    if page < 2 {
        return None;
    }
    let inner = pct_decode(&pct_decode(&attr(tok, "pagingcookie")?));
    let last = attr(&inner, "last").map(|l| norm_guid(&l));
    Some((page, last))
}

struct DvBatch<'a> {
    state: &'a DvState,
    store: &'a mut Store,
    actor: &'a Actor,
}

impl BatchTarget for DvBatch<'_> {
    fn exec(&mut self, req: SimRequest) -> SimResponse {
        let mut actor = self.actor.clone();
        if let Some((_, tag)) = parse_query(&req.query)
            .into_iter()
            .find(|(k, _)| k == "tag")
        {
            actor.tag = Some(tag);
        }
        let undo_was_off = self.store.undo.is_none();
        if undo_was_off {
            self.store.undo = Some(Vec::new());
        }
        let resp = self.state.execute(self.store, &req, &actor);
        if undo_was_off {
            self.store.undo = None;
        }
        resp
    }

    fn begin(&mut self) {
        self.store.undo = Some(Vec::new());
    }

    fn commit(&mut self) {
        self.store.undo = None;
    }

    fn rollback(&mut self) {
        let undo = self.store.undo.take().unwrap_or_default();
        let n = undo.len();
        self.state.undo(self.store, undo);
        // Drop the webhook notices of the undone writes.
        let keep = self.store.pending.len().saturating_sub(n);
        self.store.pending.truncate(keep);
    }
}

impl crate::common::Handler for DvState {
    async fn handle(self: Arc<Self>, req: SimRequest) -> Outcome {
        let base = self.base.get().map_or("", String::as_str);
        let _in_flight = match self.guard.screen(&req, self.auth.as_deref(), base).await {
            Ok(g) => g,
            Err(Refusal::Drop) => return Outcome::Drop,
            Err(Refusal::Fault(status)) => {
                return Outcome::Respond(err(
                    status,
                    "0x80040216",
                    "An unexpected error occurred (fault injected by the simulator).",
                ));
            }
            Err(Refusal::Unauthorized(problem)) => {
                let why = match problem {
                    None => "the request has no Authorization: Bearer header",
                    Some(TokenProblem::Expired) => {
                        "the access token has expired; request a new one"
                    }
                    Some(TokenProblem::WrongAudience) => {
                        "the access token was issued for another resource; request it for <environment-url>/.default"
                    }
                    Some(TokenProblem::Unknown) => "the access token is not valid",
                };
                let resp = err(
                    StatusCode::UNAUTHORIZED,
                    "0x80072560",
                    &format!("Authentication failed: {why}."),
                )
                .with_header(
                    "www-authenticate",
                    &format!(
                        "Bearer authorization_uri={}, error=\"invalid_token\"",
                        "https://login.microsoftonline.com/common/oauth2/authorize"
                    ),
                );
                return Outcome::Respond(resp);
            }
            Err(Refusal::Throttled(Throttled::Rate { retry_after_secs })) => {
                let limit = self.guard_limit();
                let resp = err(
                    StatusCode::TOO_MANY_REQUESTS,
                    "0x80072322",
                    &format!("Number of requests exceeded the limit of {} over time window of {} seconds.", limit.0, limit.1),
                )
                .with_header("retry-after", &retry_after_secs.to_string());
                return Outcome::Respond(resp);
            }
            Err(Refusal::Throttled(Throttled::Concurrency)) => {
                let n = self.guard.throttle_config().max_concurrent.unwrap_or(52);
                let resp = err(
                    StatusCode::TOO_MANY_REQUESTS,
                    "0x80072326",
                    &format!("Number of concurrent requests exceeded the limit of {n}."),
                )
                .with_header("retry-after", "1");
                return Outcome::Respond(resp);
            }
        };
        let query = parse_query(&req.query);
        let actor = Actor {
            user_id: self.config.integration_user_id.clone(),
            tag: query
                .iter()
                .find(|(k, _)| k == "tag")
                .map(|(_, v)| v.clone()),
            correlation_id: req
                .header("x-ms-correlation-request-id")
                .map_or_else(new_guid, str::to_owned),
        };
        let resp = if req.path == format!("{API}$batch") && req.method == Method::POST {
            self.batch(&req, &actor)
        } else {
            let prepared = {
                let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
                self.run_change(&mut store, &req, &actor)
            };
            let outcome = match &prepared.steps {
                Some(steps) => self.call_sync_steps(&prepared.pending, steps, None).await,
                None => Ok(()),
            };
            self.finish(prepared, outcome)
        };
        Outcome::Respond(resp)
    }
}

impl DvState {
    fn guard_limit(&self) -> (u32, u64) {
        let t = self.guard.throttle_config();
        (t.requests_per_window.unwrap_or(6000), t.window.as_secs())
    }

    fn batch(&self, req: &SimRequest, actor: &Actor) -> SimResponse {
        let parts = match batch::parse_batch(req.header("content-type").unwrap_or(""), &req.body) {
            Ok(p) => p,
            Err(e) => return bad_request(&format!("The $batch request is malformed: {e}.")),
        };
        let count: usize = parts.iter().map(batch::Part::len).sum();
        if count > 1000 {
            return bad_request(&format!(
                "The $batch request has {count} requests; the maximum is 1000."
            ));
        }
        let continue_on_error = prefers(req).iter().any(|p| p == "odata.continue-on-error");
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let (results, stopped) = {
            let mut target = DvBatch {
                state: self,
                store: &mut store,
                actor,
            };
            batch::run(&mut target, parts, API, continue_on_error)
        };
        let pending = std::mem::take(&mut store.pending);
        drop(store);
        self.flush(pending);
        batch::write_response(
            &results,
            if stopped {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            },
        )
    }

    fn user_op(
        &self,
        operation: &'static str,
        method: Method,
        entity_set: &str,
        id_or_key: Option<&str>,
        fields: Option<Value>,
    ) -> Result<Value, SimError> {
        // The key is percent-encoded as a client sends it: the path is decoded after it is
        // split into segments, so a key holding '/' must not split it.
        let path = match id_or_key {
            Some(k) => format!("{API}{entity_set}({})", pct_encode(k)),
            None => format!("{API}{entity_set}"),
        };
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            "prefer",
            axum::http::HeaderValue::from_static("return=representation"),
        );
        if operation == "user_edit" {
            headers.insert("if-match", axum::http::HeaderValue::from_static("*"));
        }
        let req = SimRequest {
            method,
            path,
            query: String::new(),
            headers,
            body: fields
                .map(|f| Bytes::from(serde_json::to_vec(&f).unwrap_or_default()))
                .unwrap_or_default(),
        };
        let actor = Actor {
            user_id: self.config.ui_user_id.clone(),
            tag: None,
            correlation_id: new_guid(),
        };
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if !store.tables.contains_key(entity_set) {
            return Err(SimError::UnknownTable {
                sim: "Dataverse",
                name: entity_set.to_owned(),
            });
        }
        let prepared = self.run_change(&mut store, &req, &actor);
        drop(store);
        // The caller waits for the synchronous steps, as a user's save waits in Dataverse. This
        // call is not async: they run on a thread and runtime of their own.
        let outcome = match &prepared.steps {
            Some(steps) => std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot run the synchronous steps: {e}"))?;
                    let client = crate::webhook::delivery_client();
                    rt.block_on(self.call_sync_steps(&prepared.pending, steps, Some(&client)))
                })
                .join()
                .unwrap_or_else(|_| Err("the synchronous steps panicked".to_owned()))
            }),
            None => Ok(()),
        };
        let resp = self.finish(prepared, outcome);
        user_op_result("Dataverse", operation, entity_set, id_or_key, &resp)
    }
}

/// The OperationId of a synchronous step, which runs no system job.
const EMPTY_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// A change run against the store whose synchronous steps are still to be called.
struct Prepared {
    resp: SimResponse,
    pending: Vec<Notice>,
    /// How to roll the change back.
    undo: Vec<(String, String, Option<Row>)>,
    /// The synchronous steps to call (none when the change failed or notified nothing).
    steps: Option<Arc<Vec<WebhookRegistration>>>,
}

/// A running Dataverse Web API simulator. Cloning shares the same simulator.
#[derive(Debug, Clone)]
pub struct DataverseSim {
    state: Arc<DvState>,
    server: Arc<Server>,
}

impl DataverseSim {
    /// Starts the simulator on 127.0.0.1 with a random port.
    pub async fn start(config: DataverseConfig) -> Result<Self, SimError> {
        let mut store = Store::default();
        for t in &config.tables {
            store
                .tables
                .insert(t.entity_set.clone(), Table::new(t.clone()));
        }
        let state = Arc::new(DvState {
            store: Mutex::new(store),
            guard: Guard::new(config.throttle.clone(), config.faults.clone()),
            base: OnceLock::new(),
            auth: config.auth.as_ref().map(EntraSim::state),
            msg_size_exceeded: std::sync::atomic::AtomicBool::new(config.msg_size_exceeded),
            config,
            hooks: RwLock::new(Arc::new(Vec::new())),
            sync_hooks: RwLock::new(Arc::new(Vec::new())),
            dispatcher: Dispatcher::start(),
        });
        let server = serve("Dataverse", state.clone()).await?;
        let _ = state.base.set(format!("http://{}", server.addr));
        Ok(Self {
            state,
            server: Arc::new(server),
        })
    }

    /// The environment URL, `http://127.0.0.1:<port>`; the token scope is `{base_url}/.default`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The Web API root, `{base_url}/api/data/v9.2/`.
    pub fn api_url(&self) -> String {
        self.state.api()
    }

    /// Defines (or redefines, emptying it) a table.
    pub fn define_table(&self, def: TableDef) {
        let mut store = self.state.store.lock().unwrap_or_else(|e| e.into_inner());
        store.tables.insert(def.entity_set.clone(), Table::new(def));
    }

    /// Declares how a column is typed in webhook payloads.
    pub fn set_column_kind(
        &self,
        entity_set: &str,
        column: &str,
        kind: ColumnKind,
    ) -> Result<(), SimError> {
        self.with_table(entity_set, |t| {
            t.kinds.insert(column.to_owned(), kind);
        })
    }

    /// Runs `change` on table `entity_set`.
    fn with_table(
        &self,
        entity_set: &str,
        change: impl FnOnce(&mut Table),
    ) -> Result<(), SimError> {
        let mut store = self.state.store.lock().unwrap_or_else(|e| e.into_inner());
        let t = store
            .tables
            .get_mut(entity_set)
            .ok_or_else(|| SimError::UnknownTable {
                sim: "Dataverse",
                name: entity_set.to_owned(),
            })?;
        change(t);
        Ok(())
    }

    /// Enables or disables change tracking on a table (enabled by default). A disabled table
    /// answers a `Prefer: odata.track-changes` read as a plain query, as Dataverse does.
    ///
    /// # Errors
    /// [`SimError::UnknownTable`].
    pub fn set_change_tracking(&self, entity_set: &str, enabled: bool) -> Result<(), SimError> {
        self.with_table(entity_set, |t| t.tracked = enabled)
    }

    /// Registers a webhook step in synchronous mode (PostOperation, inside the transaction):
    /// every later change to a matching table made through the Web API (a single request) or
    /// as a user waits for it, and fails — rolled back, the caller answered 400 — unless it
    /// answers 2xx. Its body says `Mode` 0 and `IsInTransaction`, with the empty GUID as
    /// `OperationId` (no system job). Not retried. `$batch` requests and bulk actions still
    /// notify asynchronously.
    pub fn register_sync_webhook(&self, registration: WebhookRegistration) {
        let mut hooks = self
            .state
            .sync_hooks
            .write()
            .unwrap_or_else(|e| e.into_inner());
        Arc::make_mut(&mut hooks).push(registration);
    }

    /// Unregisters every synchronous step.
    pub fn clear_sync_webhooks(&self) {
        *self
            .state
            .sync_hooks
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(Vec::new());
    }

    /// Registers a webhook; every later change to a matching table fires it.
    pub fn register_webhook(&self, registration: WebhookRegistration) {
        let mut hooks = self.state.hooks.write().unwrap_or_else(|e| e.into_inner());
        Arc::make_mut(&mut hooks).push(registration);
    }

    /// Removes every webhook registration.
    pub fn clear_webhooks(&self) {
        *self.state.hooks.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Vec::new());
    }

    /// A person creates a row in the UI; returns the row as the API would.
    pub fn user_create(&self, entity_set: &str, fields: Value) -> Result<Value, SimError> {
        self.state
            .user_op("user_create", Method::POST, entity_set, None, Some(fields))
    }

    /// A person edits a row in the UI; `id_or_key` is a GUID or `name='value',...`.
    pub fn user_edit(
        &self,
        entity_set: &str,
        id_or_key: &str,
        fields: Value,
    ) -> Result<Value, SimError> {
        self.state.user_op(
            "user_edit",
            Method::PATCH,
            entity_set,
            Some(id_or_key),
            Some(fields),
        )
    }

    /// A person deletes a row in the UI.
    pub fn user_delete(&self, entity_set: &str, id_or_key: &str) -> Result<(), SimError> {
        self.state
            .user_op(
                "user_delete",
                Method::DELETE,
                entity_set,
                Some(id_or_key),
                None,
            )
            .map(|_| ())
    }

    /// All rows of a table as stored (lookups as `_x_value`), ordered by primary id.
    pub fn rows(&self, entity_set: &str) -> Vec<Value> {
        let store = self.state.store.lock().unwrap_or_else(|e| e.into_inner());
        store
            .tables
            .get(entity_set)
            .map(|t| t.rows.values().map(|r| Value::Object(r.clone())).collect())
            .unwrap_or_default()
    }

    /// One row by primary id.
    pub fn row(&self, entity_set: &str, id: &str) -> Option<Value> {
        let store = self.state.store.lock().unwrap_or_else(|e| e.into_inner());
        store
            .tables
            .get(entity_set)?
            .rows
            .get(&norm_guid(id))
            .map(|r| Value::Object(r.clone()))
    }

    /// Request counters.
    pub fn stats(&self) -> SimStats {
        self.state.guard.stats()
    }

    /// Replaces the service protection limits (and resets the windows).
    pub fn set_throttle(&self, throttle: ThrottleConfig) {
        self.state.guard.set_throttle(throttle);
    }

    /// Makes the next `n` requests answer 429.
    pub fn throttle_next(&self, n: u64) {
        self.state.guard.force_throttle(n);
    }

    /// Replaces the fault injection settings.
    pub fn set_faults(&self, faults: FaultConfig) {
        self.state.guard.set_faults(faults);
    }

    /// Queues faults for the next requests.
    pub fn inject_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.guard.push_faults(faults);
    }

    /// Turns the `x-ms-dynamics-msg-size-exceeded` form of webhooks on or off.
    pub fn set_msg_size_exceeded(&self, on: bool) {
        self.state.msg_size_exceeded.store(on, Ordering::Relaxed);
    }

    /// Webhook deliveries finished so far (successful and failed).
    pub fn webhook_deliveries(&self) -> Vec<DeliveryRecord> {
        self.state.dispatcher.made()
    }

    /// Webhook deliveries that failed (like System Jobs with status Failed).
    pub fn failed_webhook_deliveries(&self) -> Vec<DeliveryRecord> {
        self.state.dispatcher.failed()
    }

    /// Waits until every queued webhook delivery has finished; false on timeout.
    pub async fn wait_webhooks_idle(&self, timeout: Duration) -> bool {
        self.state.dispatcher.wait_idle(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The webhook body builder the simulator used before bodies were written straight to
    /// bytes (`json!` trees, then serialised), kept to pin the bytes of the new writer.
    fn context_tree(
        n: &Notice,
        organization_name: &str,
        op_id: &str,
        created: &str,
        exceeded: bool,
    ) -> Value {
        let entity = |attrs: &[(String, Value)]| {
            json!({
                "__type": format!("Entity:{CONTRACTS}"),
                "Attributes": attrs.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
                "EntityState": null, "FormattedValues": [], "Id": n.id, "KeyAttributes": [],
                "LogicalName": n.logical, "RelatedEntities": [], "RowVersion": null,
            })
        };
        let target = match n.message {
            WebhookMessage::Delete => entity_reference(&n.logical, &n.id),
            _ => entity(&n.target),
        };
        let mut shared = Vec::new();
        if let Some(tag) = &n.actor.tag {
            shared.push(json!({"key": "tag", "value": tag}));
        }
        let org_id = "4ef5b371-e89e-e711-8122-000d3aa2331c";
        let base = |stage: u32,
                    input: Value,
                    post: Value,
                    pre: Value,
                    parent: Value,
                    shared: Vec<Value>| {
            json!({
                "BusinessUnitId": "e2b9dd85-e89e-e711-8122-000d3aa2331c",
                "CorrelationId": n.actor.correlation_id, "Depth": 1,
                "InitiatingUserId": n.actor.user_id, "InputParameters": input,
                "IsExecutingOffline": false, "IsInTransaction": false, "IsOfflinePlayback": false, "IsolationMode": 1,
                "MessageName": n.message.name(), "Mode": 1, "OperationCreatedOn": created,
                "OperationId": op_id, "OrganizationId": org_id, "OrganizationName": organization_name,
                "OutputParameters": [],
                "OwningExtension": {"Id": "75417616-4ea2-e711-8122-000d3aa2331c", "KeyAttributes": [], "LogicalName": "sdkmessageprocessingstep", "Name": null, "RowVersion": null},
                "ParentContext": parent, "PostEntityImages": post, "PreEntityImages": pre,
                "PrimaryEntityId": n.id, "PrimaryEntityName": n.logical, "RequestId": null,
                "SecondaryEntityName": "none", "SharedVariables": shared, "Stage": stage, "UserId": n.actor.user_id,
            })
        };
        if exceeded {
            return base(40, json!([]), json!([]), json!([]), Value::Null, shared);
        }
        let input = json!([{"key": "Target", "value": target}]);
        let parent = base(
            30,
            input.clone(),
            json!([]),
            json!([]),
            Value::Null,
            vec![
                json!({"key": "ChangedEntityTypes", "value": [{"__type": "KeyValuePairOfstringstring:#System.Collections.Generic", "key": n.logical, "value": n.message.name()}]}),
            ],
        );
        let (post, pre) = match n.message {
            WebhookMessage::Delete => (
                json!([]),
                json!([{"key": "PreImage", "value": entity(&n.image)}]),
            ),
            _ => (
                json!([{"key": "PostImage", "value": entity(&n.image)}]),
                json!([]),
            ),
        };
        base(40, input, post, pre, parent, shared)
    }

    #[test]
    fn webhook_bodies_read_as_the_former_json_tree_did() {
        let mut table = Table::new(TableDef {
            entity_set: "accounts".into(),
            logical_name: "account".into(),
            primary_id: "accountid".into(),
            alternate_keys: vec![vec!["accountnumber".into()]],
            key_lookups: Vec::new(),
        });
        table
            .kinds
            .insert("statuscode".into(), ColumnKind::OptionSet);
        table.kinds.insert("creditlimit".into(), ColumnKind::Money);
        let actor = |tag: Option<&str>| Actor {
            user_id: "75c2c1d0-0000-4000-8000-000000000001".into(),
            tag: tag.map(str::to_owned),
            correlation_id: "b374239d-0000-4000-8000-000000000002".into(),
        };
        let Value::Object(row) = json!({
            "accountid": "6d81597f-0f9f-e711-8122-000d3aa2331c", "name": "Contoso \"A\" \\ Ünï",
            "statuscode": 1, "creditlimit": 12.50, "statecode": null, "description": null,
            "modifiedon": "2026-05-01T10:00:00Z", "createdon": "2026-05-01T09:00:00Z",
            "versionnumber": 42, "_parentaccountid_value": "0e1d2c3b-0000-4000-8000-000000000004",
            "_parentaccountid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "account",
            "_primarycontactid_value": null, "numberofemployees": 7, "donotemail": false,
        }) else {
            unreachable!()
        };
        // A text column holding ISO 8601 text stays text; a column of no kind is a date.
        table.kinds.insert("description".into(), ColumnKind::Text);
        let sent = typed_attributes(
            &table,
            &Row::from_iter([
                ("description".to_string(), json!("2026-05-01T10:00:00Z")),
                (
                    "lastusedincampaign".to_string(),
                    json!("2026-05-01T10:00:00Z"),
                ),
            ]),
            &actor(None),
        );
        assert_eq!(
            sent[..2],
            [
                ("description".to_string(), json!("2026-05-01T10:00:00Z")),
                (
                    "lastusedincampaign".to_string(),
                    json!(wcf_date(
                        crate::odata::parse_datetime("2026-05-01T10:00:00Z").unwrap()
                    ))
                ),
            ]
        );
        let mut changed = Row::new();
        changed.insert("name".into(), row["name"].clone());
        changed.insert("statuscode".into(), row["statuscode"].clone());
        for (message, tag) in [
            (WebhookMessage::Create, Some("dualwrite")),
            (WebhookMessage::Update, None),
            (WebhookMessage::Delete, Some("x\"y")),
        ] {
            let a = actor(tag);
            let n = Notice {
                logical: "account".into(),
                message,
                id: "6d81597f-0f9f-e711-8122-000d3aa2331c".into(),
                target: match message {
                    WebhookMessage::Delete => Vec::new(),
                    _ => typed_attributes(&table, &changed, &a),
                },
                image: typed_attributes(&table, &row, &a),
                actor: a,
            };
            for exceeded in [false, true] {
                let op = "4af1c2d3-0000-4000-8000-000000000005";
                let created = "/Date(1777000000123)/";
                let written = write_context(&n, "OrgName", op, created, exceeded, false);
                let tree = context_tree(&n, "OrgName", op, created, exceeded);
                assert_eq!(
                    String::from_utf8(written).unwrap(),
                    serde_json::to_string(&tree).unwrap(),
                    "{message:?} exceeded={exceeded}"
                );
            }
        }
    }
}
