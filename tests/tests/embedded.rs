//! End to end on the embedded store: the shipped maps, `SqliteStore` and `SqliteQueue` in a
//! temporary directory, in-memory Dataverse and F&O, the worker loop; then a restart that
//! reopens the SQLite file and finds the sync state intact.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dualwrite_core::decision::SkipReason;
use dualwrite_core::ports::{Clock, JournalStore, LinkStore, RecordRef, WorkQueue};
use dualwrite_core::{ChangeEvent, IntegrationKey, LookupRef, Record, RecordKey, Side, Value};
use dualwrite_engine::memory::MemoryConnector;
use dualwrite_engine::{Engine, MapAction, SystemClock, WorkerConfig, drain, ingest, run_worker};
use dualwrite_sqlite::{QueueConfig, SqliteQueue, SqliteStore};
use rust_decimal::Decimal;

/// The engine with the shipped maps over one SQLite file, and the two systems in memory.
struct Stack {
    crm: Arc<MemoryConnector>,
    erp: Arc<MemoryConnector>,
    store: Arc<SqliteStore>,
    queue: Arc<SqliteQueue>,
    engine: Arc<Engine>,
}

impl Stack {
    fn open(file: &Path, crm: Arc<MemoryConnector>, erp: Arc<MemoryConnector>) -> Stack {
        let store = Arc::new(SqliteStore::open(file).expect("open the SQLite store"));
        let queue = Arc::new(
            SqliteQueue::open(file, QueueConfig::default()).expect("open the SQLite queue"),
        );
        let engine = Arc::new(Engine::new(
            store.clone(),
            crm.clone(),
            erp.clone(),
            dualwrite_maps::builtin_maps(),
            Arc::new(SystemClock),
            WorkerConfig {
                idle_poll: Duration::from_millis(10),
                ..WorkerConfig::default()
            },
        ));
        Stack {
            crm,
            erp,
            store,
            queue,
            engine,
        }
    }

    /// Sends `events` to the queue and drains it (echoes included) until nothing is left.
    async fn sync(&self, events: Vec<ChangeEvent>) {
        let mut events = events;
        for _ in 0..20 {
            if events.is_empty() {
                return;
            }
            ingest(self.queue.as_ref(), events)
                .await
                .expect("the queue accepts the events");
            drain(self.queue.as_ref(), &self.engine)
                .await
                .expect("the queue drains");
            events = self.echoes();
        }
        panic!("echoes kept coming: dualwrite's writes keep causing writes");
    }

    fn echoes(&self) -> Vec<ChangeEvent> {
        let mut out = self.crm.take_echoes();
        out.extend(self.erp.take_echoes());
        out
    }

    fn crm_row(&self, entity: &str, field: &str, value: &str) -> Record {
        self.crm
            .records(entity)
            .into_iter()
            .find(|r| r.get(field) == Some(&text(value)))
            .unwrap_or_else(|| panic!("Dataverse has no {entity} row with {field} = {value}"))
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn erp_key(pairs: &[(&str, &str)]) -> RecordRef {
    RecordRef::Key(RecordKey::new(pairs.iter().copied()))
}

fn fields(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(f, v)| ((*f).to_string(), v.clone()))
        .collect()
}

fn lookup(entity_set: &str, row: &Record) -> Value {
    Value::Lookup(Arc::new(LookupRef {
        entity_set: entity_set.into(),
        id: row.id.clone().map(Into::into),
        key: None,
    }))
}

fn lookup_id(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::Lookup(l)) => l.id.clone(),
        _ => None,
    }
}

/// F&O reference data a customer needs: company USMF, currency USD, payment terms Net30 and
/// customer group 10 of USMF.
fn seed_reference_data(erp: &MemoryConnector) -> Vec<ChangeEvent> {
    vec![
        erp.edit(
            "LegalEntities",
            &erp_key(&[("LegalEntityId", "USMF")]),
            fields(&[("Name", text("Contoso USA"))]),
        ),
        erp.edit(
            "Currencies",
            &erp_key(&[("CurrencyCode", "USD")]),
            fields(&[("Name", text("US Dollar")), ("Symbol", text("$"))]),
        ),
        erp.edit(
            "TermsOfPayment",
            &erp_key(&[("dataAreaId", "usmf"), ("Name", "Net30")]),
            fields(&[("Description", text("Net 30 days"))]),
        ),
        erp.edit(
            "CustomerGroups",
            &erp_key(&[("dataAreaId", "usmf"), ("CustomerGroupId", "10")]),
            fields(&[
                ("Description", text("Wholesale")),
                ("PaymentTermId", text("Net30")),
            ]),
        ),
    ]
}

fn customer_v3(number: &str) -> RecordRef {
    erp_key(&[("dataAreaId", "usmf"), ("CustomerAccount", number)])
}

fn sales_order(number: &str) -> RecordRef {
    erp_key(&[("dataAreaId", "usmf"), ("SalesOrderNumber", number)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_flow_both_ways_on_the_embedded_store_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("dualwrite.db");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let crm = Arc::new(MemoryConnector::new(Side::Crm, clock.clone()));
    let erp = Arc::new(MemoryConnector::new(Side::Erp, clock));
    let stack = Stack::open(&file, crm.clone(), erp.clone());

    // 1. Reference data created in F&O reaches Dataverse, lookups resolved to Dataverse rows.
    stack.sync(seed_reference_data(&erp)).await;
    let company = stack.crm_row("cdm_companies", "cdm_companycode", "USMF");
    let usd = stack.crm_row("transactioncurrencies", "isocurrencycode", "USD");
    let terms = stack.crm_row("msdyn_paymentterms", "msdyn_name", "Net30");
    let group = stack.crm_row("msdyn_customergroups", "msdyn_groupid", "10");
    assert_eq!(
        lookup_id(group.get("msdyn_paymenttermid")),
        terms.id.map(Into::into),
        "the customer group's payment terms point at the synced Dataverse row"
    );

    // 2. A Dataverse account becomes an F&O customer with its lookups as F&O codes.
    let account = crm.edit(
        "accounts",
        &RecordRef::Key(RecordKey::new([("accountnumber", "C-0001")])),
        fields(&[
            ("name", text("Fabrikam")),
            ("customertypecode", Value::Choice(3)),
            ("creditlimit", Value::Decimal(Decimal::new(5000, 0))),
            ("msdyn_company", company_lookup(&company)),
            (
                "transactioncurrencyid",
                lookup("transactioncurrencies", &usd),
            ),
            (
                "msdyn_customergroupid",
                lookup("msdyn_customergroups", &group),
            ),
        ]),
    );
    stack.sync(vec![account]).await;
    let customer = erp
        .record("CustomersV3", &customer_v3("C-0001"))
        .expect("the account was created in F&O as customer C-0001 of usmf");
    assert_eq!(customer.company.as_deref(), Some("usmf"));
    assert_eq!(customer.get("OrganizationName"), Some(&text("Fabrikam")));
    assert_eq!(customer.get("SalesCurrencyCode"), Some(&text("USD")));
    assert_eq!(customer.get("CustomerGroupId"), Some(&text("10")));
    assert_eq!(
        customer.get("CreditLimit"),
        Some(&Value::Decimal(Decimal::new(5000, 0)))
    );
    let writes_before_update = crm.write_count() + erp.write_count();

    // 3. An F&O update comes back to the same Dataverse account, written once.
    let update = erp.edit(
        "CustomersV3",
        &customer_v3("C-0001"),
        fields(&[("OrganizationName", text("Fabrikam Inc."))]),
    );
    stack.sync(vec![update]).await;
    let renamed = stack.crm_row("accounts", "accountnumber", "C-0001");
    assert_eq!(renamed.get("name"), Some(&text("Fabrikam Inc.")));
    assert_eq!(
        crm.write_count() + erp.write_count(),
        writes_before_update + 1,
        "the update is written once and its echo is not written back"
    );

    // 4. A sales order of a customer that exists nowhere yet is parked; when the customer is
    //    created, the worker loop releases and syncs the order.
    let (shutdown, stop) = tokio::sync::watch::channel(false);
    let worker = {
        let (queue, engine) = (stack.queue.clone(), stack.engine.clone());
        tokio::spawn(async move { run_worker(queue.as_ref(), &engine, stop).await })
    };
    let order = erp.edit(
        "CDSSalesOrderHeaders",
        &sales_order("SO-1"),
        fields(&[
            ("OrderingCustomerAccountNumber", text("C-0002")),
            ("InvoiceCustomerAccountNumber", text("C-0002")),
            ("CurrencyCode", text("USD")),
        ]),
    );
    ingest(stack.queue.as_ref(), vec![order])
        .await
        .expect("the queue accepts the order");
    wait_until("the order is parked", || async {
        stack.store.parked_count().await.unwrap_or(0) == 1
    })
    .await;
    assert!(
        crm.records("salesorders").is_empty(),
        "nothing written for a parked order"
    );

    let new_customer = erp.edit(
        "CustomersV3",
        &customer_v3("C-0002"),
        fields(&[
            ("OrganizationName", text("Litware")),
            ("PartyType", Value::Enum("Organization".into())),
            ("SalesCurrencyCode", text("USD")),
        ]),
    );
    ingest(stack.queue.as_ref(), vec![new_customer])
        .await
        .expect("the queue accepts the customer");
    wait_until("the order reaches Dataverse", || async {
        !crm.records("salesorders").is_empty()
    })
    .await;
    // Echoes of the writes go through the running worker too.
    let echoes = stack.echoes();
    ingest(stack.queue.as_ref(), echoes)
        .await
        .expect("the queue accepts the echoes");
    wait_until("the queue is empty", || async {
        stack
            .queue
            .depth()
            .await
            .is_ok_and(|d| d.ready + d.in_flight + d.delayed == 0)
    })
    .await;
    shutdown.send(true).expect("the worker listens");
    worker
        .await
        .expect("the worker task ends")
        .expect("the worker loop ends cleanly");

    let order_row = stack.crm_row("salesorders", "msdyn_salesordernumber", "SO-1");
    let litware = stack.crm_row("accounts", "accountnumber", "C-0002");
    assert_eq!(
        lookup_id(order_row.get("customerid")),
        litware.id.map(Into::into),
        "the order's customer is the Dataverse account synced for C-0002"
    );
    assert_eq!(
        lookup_id(order_row.get("transactioncurrencyid")),
        usd.id.map(Into::into)
    );

    // 5. Restart: reopen the SQLite file; links, queue and parked events are as left.
    drop(stack);
    let reopened = Stack::open(&file, crm.clone(), erp.clone());
    for (map, key) in [
        ("legal-entities", "USMF"),
        ("currencies", "USD"),
        ("payment-terms", "USMF/Net30"),
        ("customer-groups", "USMF/10"),
        ("customers-v3-accounts", "USMF/C-0001"),
        ("customers-v3-accounts", "USMF/C-0002"),
        ("sales-order-headers", "USMF/SO-1"),
    ] {
        let link = reopened
            .store
            .link(map, &IntegrationKey(key.into()))
            .await
            .expect("the store reads")
            .unwrap_or_else(|| panic!("link {map}/{key} is missing after the restart"));
        assert!(
            link.crm_id.is_some() && link.erp_id.is_some(),
            "link {map}/{key} knows both records: {link:?}"
        );
    }
    let account_link = reopened
        .store
        .link_by_id(
            "customers-v3-accounts",
            Side::Crm,
            renamed.id.as_deref().unwrap_or_default(),
        )
        .await
        .expect("the store reads");
    assert_eq!(
        account_link.map(|l| l.key),
        Some(IntegrationKey("USMF/C-0001".into()))
    );
    assert_eq!(
        reopened.store.parked_count().await.expect("count parked"),
        0
    );
    assert!(
        reopened
            .queue
            .pending(10)
            .expect("list the queue")
            .is_empty(),
        "no message left in the queue"
    );
    assert!(
        reopened
            .queue
            .dead_letters(10)
            .await
            .expect("list dead letters")
            .is_empty(),
        "nothing dead-lettered"
    );
    assert!(
        reopened
            .store
            .errors(10)
            .await
            .expect("read the error log")
            .is_empty(),
        "no error logged"
    );
    // Nothing left to do after the restart: a drain finds no work and writes nothing.
    let writes = crm.write_count() + erp.write_count();
    let report = drain(reopened.queue.as_ref(), &reopened.engine)
        .await
        .expect("the queue drains");
    assert_eq!(report.deliveries, 0);
    assert_eq!(crm.write_count() + erp.write_count(), writes);
}

/// A lookup to a company row carrying its company code (the `cdm_companies` alternate key),
/// which is how the engine tells a Dataverse row's company.
fn company_lookup(company: &Record) -> Value {
    Value::Lookup(Arc::new(LookupRef {
        entity_set: "cdm_companies".into(),
        id: company.id.clone().map(Into::into),
        key: Some(RecordKey::new([("cdm_companycode", "USMF")])),
    }))
}

/// Polls `check` every 10 ms for up to 20 s.
async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2_000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_of_a_company_not_yet_in_dataverse_waits_for_its_company() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let crm = Arc::new(MemoryConnector::new(Side::Crm, clock.clone()));
    let erp = Arc::new(MemoryConnector::new(Side::Erp, clock));
    let stack = Stack::open(&dir.path().join("dualwrite.db"), crm.clone(), erp.clone());
    let terms = |company: &str, name: &str| {
        erp.edit(
            "TermsOfPayment",
            &erp_key(&[("dataAreaId", company), ("Name", name)]),
            fields(&[("Description", text("Net 10 days"))]),
        )
    };

    // F&O has company DEMF but its own event was missed: the engine syncs the company first.
    let _missed = erp.edit(
        "LegalEntities",
        &erp_key(&[("LegalEntityId", "DEMF")]),
        fields(&[("Name", text("Contoso Europe"))]),
    );
    stack.sync(vec![terms("demf", "Net10")]).await;
    let company = stack.crm_row("cdm_companies", "cdm_companycode", "DEMF");
    let row = stack.crm_row("msdyn_paymentterms", "msdyn_name", "Net10");
    // Company codes compare without case (F&O's dataAreaId is lower case).
    assert!(
        row.company
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case("DEMF"))
    );
    assert!(company.id.is_some());

    // Company FRRT exists nowhere yet: the payment terms are parked, not failed.
    stack.sync(vec![terms("frrt", "Net20")]).await;
    assert!(
        crm.records("msdyn_paymentterms")
            .iter()
            .all(|r| r.company.as_deref() != Some("FRRT"))
    );
    assert_eq!(stack.store.parked_count().await.unwrap(), 1);
    assert!(
        stack.store.errors(10).await.unwrap().is_empty(),
        "a missing company is not an error"
    );

    // The company arrives: the parked terms follow it into Dataverse.
    let company = erp.edit(
        "LegalEntities",
        &erp_key(&[("LegalEntityId", "FRRT")]),
        fields(&[("Name", text("Contoso France"))]),
    );
    stack.sync(vec![company]).await;
    assert_eq!(stack.store.parked_count().await.unwrap(), 0);
    let row = stack.crm_row("msdyn_paymentterms", "msdyn_name", "Net20");
    assert!(
        row.company
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case("FRRT"))
    );
}

/// The store forgets the ids of events processed before the idempotency window; a webhook
/// delivered again after that (a late Dataverse retry, a replay) is not recognised by its id
/// any more, but by the link: its version is not newer than the one the link holds, so it
/// writes nothing — not even after a newer change of the same record was synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_again_after_its_id_was_forgotten_writes_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let crm = Arc::new(MemoryConnector::new(Side::Crm, clock.clone()));
    let erp = Arc::new(MemoryConnector::new(Side::Erp, clock));
    let stack = Stack::open(&dir.path().join("dualwrite.db"), crm.clone(), erp.clone());
    stack.sync(seed_reference_data(&erp)).await;

    let first = erp.edit(
        "CustomersV3",
        &customer_v3("US-900"),
        fields(&[
            ("OrganizationName", text("Forgetful Ltd")),
            ("PartyType", Value::Enum("Organization".into())),
            ("SalesCurrencyCode", text("USD")),
            ("CustomerGroupId", text("10")),
        ]),
    );
    stack.sync(vec![first.clone()]).await;
    let second = erp.edit(
        "CustomersV3",
        &customer_v3("US-900"),
        fields(&[("OrganizationName", text("Forgetful Holdings"))]),
    );
    stack.sync(vec![second.clone()]).await;
    let name = |row: Record| row.fields.get("name").cloned();
    assert_eq!(
        name(stack.crm_row("accounts", "accountnumber", "US-900")),
        Some(text("Forgetful Holdings"))
    );

    let forgotten = stack
        .store
        .forget_completed_events(chrono::Utc::now() + chrono::Duration::hours(1), 100_000)
        .await
        .expect("forget");
    assert!(forgotten >= 2, "{forgotten}");
    assert!(!stack.store.event_done(&first.event_id).unwrap());

    let writes = crm.write_count() + erp.write_count();
    for event in [second, first] {
        let out = stack.engine.process(&event).await.expect("processed");
        assert!(
            out.maps.iter().all(|m| matches!(
                m.action,
                MapAction::Skipped(SkipReason::Duplicate | SkipReason::Stale | SkipReason::Echo)
                    | MapAction::Skipped(SkipReason::FilteredOut)
            )),
            "{out:?}"
        );
    }
    assert_eq!(
        crm.write_count() + erp.write_count(),
        writes,
        "nothing written twice"
    );
    assert_eq!(
        name(stack.crm_row("accounts", "accountnumber", "US-900")),
        Some(text("Forgetful Holdings")),
        "the older change did not come back"
    );
}
