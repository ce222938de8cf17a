//! Integration tests of the receivers: fixtures per payload shape, every answer of `receive`.

mod dataverse;
mod echo_typing;
mod fno;
mod receive;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use dualwrite_core::map::{
    ConflictPolicy, CrmEntity, DeletePolicy, ErpEntity, FieldDirection, FieldMapping, FieldRef,
    MapDirection, SideFilters, TableMap,
};
use dualwrite_core::ports::{
    DeadLetter, Delivery, QueueDepth, QueueError, QueueMessage, RetryOutcome, WorkQueue,
};
use dualwrite_core::{ChangeEvent, ValueType};
use dualwrite_receivers::{
    Accepted, BusinessEventRoute, Coverage, Parsed, ReceiverConfig, SourceAuth,
};

/// The vendor fixture, as copied into `tests/fixtures` from the shared reference folder
/// beside the repository (`the_fixture_copy_is_the_vendor_fixture` checks the copy where that
/// folder is present).
pub const CONTACT_UPDATE: &str = include_str!("../fixtures/dataverse-webhook-contact-update.json");
pub const ACCOUNT_CREATE: &str = include_str!("../fixtures/dataverse-webhook-account-create.json");
pub const ACCOUNT_DELETE: &str = include_str!("../fixtures/dataverse-webhook-account-delete.json");
pub const MSG_SIZE_EXCEEDED: &str =
    include_str!("../fixtures/dataverse-webhook-msg-size-exceeded.json");
pub const FNO_DATA_EVENT: &str = include_str!("../fixtures/fno-data-event-customersv3-update.json");
pub const FNO_BUSINESS_EVENT: &str =
    include_str!("../fixtures/fno-business-event-sales-invoice-posted.json");

pub const DATAVERSE_KEY: &str = "dv-secret-123";
pub const FNO_HEADER: &str = "X-Dualwrite-Key";
pub const FNO_SECRET: &str = "fno-secret-456";

/// The instant the tests receive events at.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
}

fn field(
    erp: Option<&str>,
    crm: Option<&str>,
    direction: FieldDirection,
    is_key: bool,
) -> FieldMapping {
    let fref = |name: &str, ty| FieldRef {
        name: name.into(),
        ty,
    };
    FieldMapping {
        erp: erp.map(|n| fref(n, ValueType::Text)),
        crm: crm.map(|n| fref(n, ValueType::Text)),
        direction,
        notation: "=".into(),
        is_key,
        value_map: None,
        default: None,
        lookup: None,
        to_crm: Vec::new(),
        to_erp: Vec::new(),
        source_of_truth: None,
        line: 1,
    }
}

/// `mapping` with the types the shipped maps declare for its F&O and Dataverse fields.
fn typed(mut mapping: FieldMapping, erp: ValueType, crm: ValueType) -> FieldMapping {
    if let Some(f) = &mut mapping.erp {
        f.ty = erp;
    }
    if let Some(f) = &mut mapping.crm {
        f.ty = crm;
    }
    mapping
}

fn map(
    name: &str,
    crm: CrmEntity,
    erp: ErpEntity,
    direction: MapDirection,
    fields: Vec<FieldMapping>,
) -> TableMap {
    TableMap {
        name: name.into(),
        description: String::new(),
        source: "test".into(),
        crm,
        erp,
        direction,
        fields,
        filters: SideFilters::default(),
        depends_on: Vec::new(),
        conflict: ConflictPolicy::default(),
        delete: DeletePolicy::default(),
        plan: Default::default(),
    }
}

fn crm(set: &str, logical: &str, key: &[&str], company: Option<&str>) -> CrmEntity {
    CrmEntity {
        entity_set: set.into(),
        logical_name: logical.into(),
        primary_id: format!("{logical}id"),
        key: key.iter().map(|k| k.to_string()).collect(),
        company_field: company.map(str::to_string),
    }
}

fn erp(entity: &str, key: &[&str], company_specific: bool) -> ErpEntity {
    ErpEntity {
        entity: entity.into(),
        key: key.iter().map(|k| k.to_string()).collect(),
        company_specific,
        physical_name: None,
    }
}

/// The maps the tests run with: contacts (needs firstname and lastname), accounts ↔
/// CustomersV3 (company-specific), currencies and invoices (F&O → Dataverse only).
pub fn test_maps() -> Vec<TableMap> {
    use FieldDirection::{Bidirectional, CrmToErp, ErpToCrm};
    vec![
        map(
            "contacts",
            crm("contacts", "contact", &[], None),
            erp("ContactPersonsV2", &["ContactPersonId"], true),
            MapDirection::Bidirectional,
            vec![
                field(Some("FirstName"), Some("firstname"), Bidirectional, false),
                field(Some("LastName"), Some("lastname"), Bidirectional, false),
            ],
        ),
        map(
            "customers-v3-accounts",
            crm(
                "accounts",
                "account",
                &["accountnumber"],
                Some("msdyn_company"),
            ),
            erp("CustomersV3", &["CustomerAccount"], true),
            MapDirection::Bidirectional,
            vec![
                field(
                    Some("CustomerAccount"),
                    Some("accountnumber"),
                    Bidirectional,
                    true,
                ),
                field(Some("OrganizationName"), Some("name"), Bidirectional, false),
                typed(
                    field(
                        Some("CreditLimit"),
                        Some("creditlimit"),
                        Bidirectional,
                        false,
                    ),
                    ValueType::Decimal,
                    ValueType::Decimal,
                ),
                typed(
                    field(
                        Some("SalesCurrencyCode"),
                        Some("transactioncurrencyid"),
                        Bidirectional,
                        false,
                    ),
                    ValueType::Text,
                    ValueType::Lookup,
                ),
                typed(
                    field(
                        Some("CreditLimitIsMandatory"),
                        Some("msdyn_creditlimitismandatory"),
                        ErpToCrm,
                        false,
                    ),
                    ValueType::Enum,
                    ValueType::Boolean,
                ),
                typed(
                    field(Some("PartyType"), None, CrmToErp, false),
                    ValueType::Enum,
                    ValueType::Text,
                ),
                typed(
                    field(None, Some("customertypecode"), ErpToCrm, false),
                    ValueType::Text,
                    ValueType::Choice,
                ),
                // A date-time F&O leaves out of data events when null.
                typed(
                    field(
                        Some("LastInvoiceDateTime"),
                        Some("msdyn_lastinvoicedate"),
                        ErpToCrm,
                        false,
                    ),
                    ValueType::DateTime,
                    ValueType::DateTime,
                ),
            ],
        ),
        map(
            "currencies",
            crm(
                "transactioncurrencies",
                "transactioncurrency",
                &["isocurrencycode"],
                None,
            ),
            erp("Currencies", &["CurrencyCode"], false),
            MapDirection::ErpToCrm,
            vec![field(
                Some("CurrencyCode"),
                Some("isocurrencycode"),
                Bidirectional,
                true,
            )],
        ),
        map(
            "invoices",
            crm(
                "invoices",
                "invoice",
                &["invoicenumber"],
                Some("msdyn_company"),
            ),
            erp("SalesInvoiceHeadersV2", &["InvoiceNumber"], true),
            MapDirection::ErpToCrm,
            vec![field(
                Some("InvoiceNumber"),
                Some("invoicenumber"),
                Bidirectional,
                true,
            )],
        ),
    ]
}

pub fn coverage() -> Coverage {
    Coverage::from_maps(&test_maps())
}

pub fn routes() -> BTreeMap<String, BusinessEventRoute> {
    BTreeMap::from([(
        "SalesInvoicePostedBusinessEvent".to_string(),
        BusinessEventRoute {
            entity: "SalesInvoiceHeadersV2".into(),
            key: vec![("InvoiceNumber".into(), "InvoiceId".into())],
        },
    )])
}

pub fn config() -> ReceiverConfig {
    let mut cfg = ReceiverConfig::new(
        SourceAuth::WebhookKey {
            secret: DATAVERSE_KEY.into(),
        },
        SourceAuth::HttpHeader {
            name: FNO_HEADER.into(),
            value: FNO_SECRET.into(),
        },
        coverage(),
    );
    cfg.business_events = routes();
    cfg
}

/// The event of a parse result that must be an event.
pub fn event_of(parsed: Parsed) -> Accepted {
    match parsed {
        Parsed::Event(accepted) => *accepted,
        Parsed::Ignored { entity } => {
            panic!("expected an event, the payload was ignored ({entity})")
        }
    }
}

/// A JSON fixture with one change applied, for variants of a documented shape.
pub fn edited(fixture: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(fixture).unwrap();
    edit(&mut v);
    v.to_string()
}

/// A work queue that records what is sent, or fails every send.
#[derive(Debug, Default)]
pub struct RecordingQueue {
    pub sent: Mutex<Vec<QueueMessage>>,
    pub fail: bool,
}

impl RecordingQueue {
    pub fn failing() -> Self {
        RecordingQueue {
            sent: Mutex::default(),
            fail: true,
        }
    }

    pub fn events(&self) -> Vec<ChangeEvent> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.event.clone())
            .collect()
    }
}

#[async_trait]
impl WorkQueue for RecordingQueue {
    async fn send(&self, messages: Vec<QueueMessage>) -> Result<(), QueueError> {
        if self.fail {
            return Err(QueueError::Unavailable("injected failure".into()));
        }
        self.sent.lock().unwrap().extend(messages);
        Ok(())
    }
    async fn receive(
        &self,
        _max: usize,
        _visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        Ok(Vec::new())
    }
    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        Err(QueueError::UnknownReceipt(receipt.into()))
    }
    async fn retry(
        &self,
        receipt: &str,
        _delay: Duration,
        _error: &str,
    ) -> Result<RetryOutcome, QueueError> {
        Err(QueueError::UnknownReceipt(receipt.into()))
    }
    async fn dead_letters(&self, _limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(Vec::new())
    }
    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        Ok(QueueDepth::default())
    }
    /// Nothing is ever dead-lettered here (nothing is delivered), so nothing is redriven.
    async fn redrive(&self, _limit: usize) -> Result<u64, QueueError> {
        Ok(0)
    }
}

/// The copy is the vendor's fixture, byte for byte, where the reference folder is beside the
/// repository (a clone without it has only the copy, which the other tests use).
#[test]
fn the_fixture_copy_is_the_vendor_fixture() {
    let reference = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/fixtures/dataverse-webhook-contact-update.json");
    match std::fs::read_to_string(&reference) {
        Ok(vendor) => assert_eq!(CONTACT_UPDATE, vendor),
        Err(e) => eprintln!("{}: {e}; only the copy is checked", reference.display()),
    }
}
