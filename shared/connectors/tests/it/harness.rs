//! The test environment: EntraSim, DataverseSim and FnoSim with the tables of a few shipped
//! maps, a client-credentials token provider against EntraSim, and connectors built on it.

use std::sync::Arc;

use dualwrite_connectors::{
    ConnectorStats, DataverseConfig, DataverseConnector, EntitySchemas, EntraConfig,
    EntraTokenProvider, FnoConfig, FnoConnector, Secret,
};
use dualwrite_core::Side;
use dualwrite_core::record::{Record, RecordKey};
use dualwrite_core::value::{LookupRef, Value};
use dualwrite_simulators as sim;
use serde_json::json;

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "6f1e0a52-1111-4c6e-9d1e-000000000001";
pub const CLIENT_SECRET: &str = "s3cr3t~value";

/// Everything one test needs; each test builds its own so tests never share state.
#[derive(Debug)]
pub struct Env {
    pub entra: sim::EntraSim,
    pub dv: sim::DataverseSim,
    pub fno: sim::FnoSim,
    /// The token provider every connector of this environment uses.
    pub tokens: Arc<EntraTokenProvider>,
    /// Counters of the token provider (token fetches).
    pub token_stats: Arc<ConnectorStats>,
    /// Counters of [`Env::dataverse`] (and of wrappers built with [`Env::dataverse_with`]).
    pub dv_stats: Arc<ConnectorStats>,
    /// Counters of [`Env::erp`].
    pub fno_stats: Arc<ConnectorStats>,
    pub dataverse: DataverseConnector,
    pub erp: FnoConnector,
    /// `cdm_companyid` of company USMF.
    pub usmf_id: String,
    /// `transactioncurrencyid` of USD.
    pub usd_id: String,
}

impl Env {
    pub async fn start() -> Env {
        let entra = sim::EntraSim::start(sim::EntraConfig {
            clients: vec![sim::EntraClient {
                tenant: TENANT.into(),
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                allowed_scopes: vec![],
            }],
            ..sim::EntraConfig::default()
        })
        .await
        .expect("EntraSim starts");
        let table = |set: &str, logical: &str, id: &str, keys: &[&[&str]]| sim::TableDef {
            entity_set: set.into(),
            logical_name: logical.into(),
            primary_id: id.into(),
            alternate_keys: keys
                .iter()
                .map(|k| k.iter().map(|c| c.to_string()).collect())
                .collect(),
            key_lookups: Vec::new(),
        };
        let dv = sim::DataverseSim::start(sim::DataverseConfig {
            tables: vec![
                table(
                    "cdm_companies",
                    "cdm_company",
                    "cdm_companyid",
                    &[&["cdm_companycode"]],
                ),
                table(
                    "transactioncurrencies",
                    "transactioncurrency",
                    "transactioncurrencyid",
                    &[&["isocurrencycode"]],
                ),
                table(
                    "accounts",
                    "account",
                    "accountid",
                    &[&["accountnumber", "msdyn_company"]],
                ),
            ],
            auth: Some(entra.clone()),
            ..sim::DataverseConfig::default()
        })
        .await
        .expect("DataverseSim starts");
        let entity = |set: &str, keys: &[&str], modified: Option<&str>| sim::FnoEntityDef {
            entity_set: set.into(),
            key_fields: keys.iter().map(|k| k.to_string()).collect(),
            modified_field: modified.map(str::to_string),
            datetime_fields: Vec::new(),
            fields: Vec::new(),
            text_fields: Vec::new(),
            physical_name: None,
            // F&O types CustomersV3.PartyType as DirPartyBaseType: a filter must name it.
            enum_fields: if set == "CustomersV3" {
                [("PartyType".to_string(), "DirPartyBaseType".to_string())].into()
            } else {
                Default::default()
            },
        };
        let fno = sim::FnoSim::start(sim::FnoConfig {
            entities: vec![
                entity(
                    "CustomersV3",
                    &["dataAreaId", "CustomerAccount"],
                    Some("ModifiedDateTime"),
                ),
                entity("Currencies", &["CurrencyCode"], None),
                entity(
                    "CDSSalesOrderLines",
                    &[
                        "dataAreaId",
                        "SalesOrderNumber",
                        "LineCreationSequenceNumber",
                    ],
                    Some("ModifiedDateTime"),
                ),
            ],
            // As F&O types it: a line's sequence number is an integer, so a quoted key literal
            // or a JSON string for it is refused.
            key_types: vec![sim::FnoKeyType {
                entity_set: "CDSSalesOrderLines".into(),
                field: "LineCreationSequenceNumber".into(),
                kind: sim::FnoKeyKind::Integer,
            }],
            default_company: "usmf".into(),
            auth: Some(entra.clone()),
            ..sim::FnoConfig::default()
        })
        .await
        .expect("FnoSim starts");

        let mut usmf_id = String::new();
        for (code, name) in [
            ("USMF", "Contoso Entertainment System USA"),
            ("DEMF", "Contoso Germany"),
        ] {
            let row = dv
                .user_create(
                    "cdm_companies",
                    json!({"cdm_companycode": code, "cdm_name": name}),
                )
                .expect("company row");
            if code == "USMF" {
                usmf_id = row["cdm_companyid"]
                    .as_str()
                    .expect("company id")
                    .to_string();
            }
        }
        let usd = dv
            .user_create(
                "transactioncurrencies",
                json!({"isocurrencycode": "USD", "currencyname": "US Dollar", "exchangerate": 1.0}),
            )
            .expect("currency row");
        let usd_id = usd["transactioncurrencyid"]
            .as_str()
            .expect("currency id")
            .to_string();

        let token_stats = Arc::new(ConnectorStats::default());
        let mut entra_config = EntraConfig::new(TENANT, CLIENT_ID, Secret::new(CLIENT_SECRET));
        entra_config.authority = entra.base_url();
        let tokens = Arc::new(
            EntraTokenProvider::new(entra_config, token_stats.clone()).expect("token provider"),
        );
        let dv_stats = Arc::new(ConnectorStats::default());
        let fno_stats = Arc::new(ConnectorStats::default());
        let mut env = Env {
            dataverse: dataverse_connector(&dv, &tokens, &dv_stats),
            erp: fno_connector(&fno, &tokens, &fno_stats),
            entra,
            dv,
            fno,
            tokens,
            token_stats,
            dv_stats,
            fno_stats,
            usmf_id,
            usd_id,
        };
        env.usmf_id = env.usmf_id.to_lowercase();
        env
    }

    /// Another Dataverse connector of this environment (same tokens), counting in `stats`.
    pub fn dataverse_with(&self, stats: &Arc<ConnectorStats>) -> DataverseConnector {
        dataverse_connector(&self.dv, &self.tokens, stats)
    }

    /// Another F&O connector of this environment (same tokens), counting in `stats`.
    pub fn erp_with(&self, stats: &Arc<ConnectorStats>) -> FnoConnector {
        fno_connector(&self.fno, &self.tokens, stats)
    }

    /// Another F&O connector sending at most `max_batch` calls per `$batch`.
    pub fn erp_batching(&self, stats: &Arc<ConnectorStats>, max_batch: usize) -> FnoConnector {
        let schemas = EntitySchemas::from_maps(&dualwrite_maps::builtin_maps(), Side::Erp);
        let mut config =
            FnoConfig::new(self.fno.base_url(), self.tokens.clone(), Arc::new(schemas));
        config.connection.stats = stats.clone();
        config.connection.max_batch = max_batch;
        FnoConnector::new(config).expect("F&O connector")
    }
}

fn dataverse_connector(
    dv: &sim::DataverseSim,
    tokens: &Arc<EntraTokenProvider>,
    stats: &Arc<ConnectorStats>,
) -> DataverseConnector {
    let schemas = EntitySchemas::from_maps(&dualwrite_maps::builtin_maps(), Side::Crm);
    let mut config = DataverseConfig::new(dv.api_url(), tokens.clone(), Arc::new(schemas));
    config.connection.stats = stats.clone();
    DataverseConnector::new(config).expect("Dataverse connector")
}

fn fno_connector(
    fno: &sim::FnoSim,
    tokens: &Arc<EntraTokenProvider>,
    stats: &Arc<ConnectorStats>,
) -> FnoConnector {
    let schemas = EntitySchemas::from_maps(&dualwrite_maps::builtin_maps(), Side::Erp);
    let mut config = FnoConfig::new(fno.base_url(), tokens.clone(), Arc::new(schemas));
    config.connection.stats = stats.clone();
    FnoConnector::new(config).expect("F&O connector")
}

/// The Dataverse key of account `number` of company `company`.
pub fn account_key(number: &str, company: &str) -> RecordKey {
    RecordKey::new([("accountnumber", number), ("msdyn_company", company)])
}

/// An account of USMF as the engine would write it: key fields, a name, a credit limit and
/// the currency by alternate key.
pub fn account(number: &str, name: &str, credit_limit: &str) -> Record {
    let mut r = Record::new("accounts")
        .with("accountnumber", Value::Text(number.into()))
        .with("name", Value::Text(name.into()))
        .with(
            "creditlimit",
            Value::Decimal(credit_limit.parse().expect("decimal")),
        )
        .with("customertypecode", Value::Choice(3))
        .with(
            "transactioncurrencyid",
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "transactioncurrencies".into(),
                id: None,
                key: Some(RecordKey::new([("isocurrencycode", "USD")])),
            })),
        );
    r.company = Some("USMF".into());
    r
}

/// The F&O key of customer `account` of company `company`.
pub fn customer_key(company: &str, account: &str) -> RecordKey {
    RecordKey::new([("dataAreaId", company), ("CustomerAccount", account)])
}

/// A CustomersV3 record of `company`.
pub fn customer(company: &str, account: &str, name: &str, mandatory: &str) -> Record {
    let mut r = Record::new("CustomersV3")
        .with("CustomerAccount", Value::Text(account.into()))
        .with("OrganizationName", Value::Text(name.into()))
        .with(
            "CreditLimit",
            Value::Decimal("1234567.891".parse().expect("decimal")),
        )
        .with("CreditLimitIsMandatory", Value::Enum(mandatory.into()))
        .with("PartyType", Value::Enum("Organization".into()));
    r.company = Some(company.into());
    r
}
