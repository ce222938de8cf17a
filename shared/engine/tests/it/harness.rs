//! Test world: two in-memory systems, a store, a manual clock and an engine over small maps.

use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use dualwrite_core::map::{
    ConflictPolicy, CrmEntity, DeletePolicy, ErpEntity, FieldDirection, FieldMapping, FieldRef,
    LookupSpec, MapDirection, SideFilters, TableMap,
};
use dualwrite_core::ports::RecordRef;
use dualwrite_core::{ChangeEvent, Record, RecordKey, Side, Value, ValueType};
use dualwrite_engine::memory::{MemoryConnector, MemoryStore};
use dualwrite_engine::{Engine, ManualClock, WorkerConfig};

pub const ACCOUNTS: &str = "accounts";
pub const CUSTOMERS: &str = "Customers";

fn field(
    erp: Option<(&str, ValueType)>,
    crm: Option<(&str, ValueType)>,
    is_key: bool,
    sot: Option<Side>,
) -> FieldMapping {
    FieldMapping {
        erp: erp.map(|(n, ty)| FieldRef { name: n.into(), ty }),
        crm: crm.map(|(n, ty)| FieldRef { name: n.into(), ty }),
        direction: FieldDirection::Bidirectional,
        notation: "=".into(),
        is_key,
        value_map: None,
        default: None,
        lookup: None,
        to_crm: Vec::new(),
        to_erp: Vec::new(),
        source_of_truth: sot,
        line: 1,
    }
}

/// `Customers` (F&O) <-> `accounts` (Dataverse): key, name (owned by CRM), credit (owned by ERP).
pub fn accounts_map(conflict: ConflictPolicy, delete: DeletePolicy) -> TableMap {
    TableMap {
        name: "accounts".into(),
        description: "customers".into(),
        source: "test".into(),
        crm: CrmEntity {
            entity_set: ACCOUNTS.into(),
            logical_name: "account".into(),
            primary_id: "accountid".into(),
            key: vec!["accountnumber".into()],
            company_field: None,
        },
        erp: ErpEntity {
            entity: CUSTOMERS.into(),
            key: vec!["CustomerAccount".into()],
            company_specific: false,
            physical_name: None,
        },
        direction: MapDirection::Bidirectional,
        fields: vec![
            field(
                Some(("CustomerAccount", ValueType::Text)),
                Some(("accountnumber", ValueType::Text)),
                true,
                None,
            ),
            field(
                Some(("Name", ValueType::Text)),
                Some(("name", ValueType::Text)),
                false,
                Some(Side::Crm),
            ),
            field(
                Some(("Credit", ValueType::Integer)),
                Some(("creditlimit", ValueType::Integer)),
                false,
                Some(Side::Erp),
            ),
        ],
        filters: SideFilters::default(),
        depends_on: Vec::new(),
        conflict,
        delete,
        plan: Default::default(),
    }
}

/// `SalesOrders` (F&O) <-> `salesorders` (Dataverse); the customer is a lookup to `accounts`.
pub fn orders_map() -> TableMap {
    let mut customer = field(
        Some(("CustomerAccount", ValueType::Text)),
        Some(("customerid", ValueType::Lookup)),
        false,
        None,
    );
    customer.lookup = Some(LookupSpec {
        maps: vec!["accounts".into()],
    });
    TableMap {
        name: "orders".into(),
        description: "orders".into(),
        source: "test".into(),
        crm: CrmEntity {
            entity_set: "salesorders".into(),
            logical_name: "salesorder".into(),
            primary_id: "salesorderid".into(),
            key: vec!["ordernumber".into()],
            company_field: None,
        },
        erp: ErpEntity {
            entity: "SalesOrders".into(),
            key: vec!["SalesOrderNumber".into()],
            company_specific: false,
            physical_name: None,
        },
        direction: MapDirection::Bidirectional,
        fields: vec![
            field(
                Some(("SalesOrderNumber", ValueType::Text)),
                Some(("ordernumber", ValueType::Text)),
                true,
                None,
            ),
            customer,
        ],
        filters: SideFilters::default(),
        depends_on: vec!["accounts".into()],
        conflict: ConflictPolicy::LastWriterWins,
        delete: DeletePolicy::Propagate,
        plan: Default::default(),
    }
}

pub struct World {
    pub clock: Arc<ManualClock>,
    pub store: Arc<MemoryStore>,
    pub crm: Arc<MemoryConnector>,
    pub erp: Arc<MemoryConnector>,
    pub engine: Arc<Engine>,
}

impl World {
    pub fn new(maps: Vec<TableMap>) -> Self {
        let clock = Arc::new(ManualClock::new(
            DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
        ));
        let store = Arc::new(MemoryStore::new());
        let crm = Arc::new(MemoryConnector::new(Side::Crm, clock.clone()));
        let erp = Arc::new(MemoryConnector::new(Side::Erp, clock.clone()));
        let engine = Arc::new(Engine::new(
            store.clone(),
            crm.clone(),
            erp.clone(),
            maps,
            clock.clone(),
            WorkerConfig::default(),
        ));
        World {
            clock,
            store,
            crm,
            erp,
            engine,
        }
    }

    pub fn accounts(conflict: ConflictPolicy, delete: DeletePolicy) -> Self {
        Self::new(vec![accounts_map(conflict, delete)])
    }

    pub fn tick(&self) {
        self.clock.advance(Duration::from_secs(1));
    }

    pub fn side(&self, side: Side) -> &MemoryConnector {
        match side {
            Side::Crm => &self.crm,
            Side::Erp => &self.erp,
        }
    }

    /// A user edit of account `number` on `side`: `name`/`credit` given in CRM terms; a new
    /// record gets every mapped field (null when not given), like a real system returns it.
    pub fn edit_account(
        &self,
        side: Side,
        number: &str,
        name: Option<&str>,
        credit: Option<i64>,
    ) -> ChangeEvent {
        let (entity, key_field, name_field, credit_field) = match side {
            Side::Crm => (ACCOUNTS, "accountnumber", "name", "creditlimit"),
            Side::Erp => (CUSTOMERS, "CustomerAccount", "Name", "Credit"),
        };
        let at = RecordRef::Key(RecordKey::new([(key_field, number)]));
        let exists = self.side(side).record(entity, &at).is_some();
        let mut fields = vec![(key_field.to_string(), Value::Text(number.into()))];
        if name.is_some() || !exists {
            fields.push((
                name_field.to_string(),
                name.map_or(Value::Null, |n| Value::Text(n.into())),
            ));
        }
        if credit.is_some() || !exists {
            fields.push((
                credit_field.to_string(),
                credit.map_or(Value::Null, Value::Integer),
            ));
        }
        self.side(side).edit(entity, &at, fields)
    }

    /// Account `number` on `side`, as (name, credit), in CRM terms.
    pub fn account(&self, side: Side, number: &str) -> Option<(Value, Value)> {
        let (entity, key_field, name_field, credit_field) = match side {
            Side::Crm => (ACCOUNTS, "accountnumber", "name", "creditlimit"),
            Side::Erp => (CUSTOMERS, "CustomerAccount", "Name", "Credit"),
        };
        let r: Record = self.side(side).record(
            entity,
            &RecordRef::Key(RecordKey::new([(key_field, number)])),
        )?;
        let get = |f: &str| r.get(f).cloned().unwrap_or(Value::Null);
        Some((get(name_field), get(credit_field)))
    }

    pub fn writes(&self) -> usize {
        self.crm.write_count() + self.erp.write_count()
    }

    /// Processes `events` in order, then the echoes and released events they cause, until
    /// nothing is left. Panics if that does not end (ping-pong).
    pub async fn settle(&self, events: Vec<ChangeEvent>) {
        let mut pending: std::collections::VecDeque<ChangeEvent> = events.into();
        for _ in 0..10_000 {
            if pending.is_empty() {
                pending.extend(self.crm.take_echoes());
                pending.extend(self.erp.take_echoes());
                if pending.is_empty() {
                    return;
                }
            }
            let Some(event) = pending.pop_front() else {
                continue;
            };
            let outcome = self
                .engine
                .process(&event)
                .await
                .unwrap_or_else(|e| panic!("processing failed: {e}"));
            pending.extend(outcome.released.into_iter().map(|p| p.event));
        }
        panic!("the engine did not settle: writes keep causing writes");
    }
}
