//! Integration tests of the shipped table maps: the embedded list matches `maps/`, every map
//! validates, and the maps say what Microsoft's Dual-write maps say.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use dualwrite_core::map::{FieldMapping, MapDirection, TableMap};
use dualwrite_core::record::Side;
use dualwrite_core::value::{Value, ValueType};
use dualwrite_maps::{BUILTIN_FILES, BUILTIN_PREFIX, builtin_files, builtin_maps};

fn maps_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../maps")
}

fn by_name() -> BTreeMap<String, TableMap> {
    builtin_maps()
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect()
}

fn map<'a>(maps: &'a BTreeMap<String, TableMap>, name: &str) -> &'a TableMap {
    maps.get(name)
        .unwrap_or_else(|| panic!("no shipped map named {name}"))
}

/// The field mapping whose F&O field (or, for constants, Dataverse column) is `name`.
fn field<'a>(m: &'a TableMap, side: Side, name: &str) -> &'a FieldMapping {
    m.fields
        .iter()
        .find(|f| f.field(side).is_some_and(|r| r.name == name))
        .unwrap_or_else(|| panic!("map {}: no field {name} on {side:?}", m.name))
}

#[test]
fn builtin_list_matches_maps_directory() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(maps_dir())
        .expect("maps/ is readable")
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    let listed: BTreeSet<String> = BUILTIN_FILES
        .iter()
        .map(|(f, _)| (*f).to_string())
        .collect();
    assert_eq!(
        listed.len(),
        BUILTIN_FILES.len(),
        "a file is listed twice in BUILTIN_FILES"
    );
    assert_eq!(
        listed, on_disk,
        "BUILTIN_FILES in shared/maps/src/lib.rs must list exactly the files of maps/"
    );
    for (file, text) in BUILTIN_FILES {
        let disk = std::fs::read_to_string(maps_dir().join(file)).expect("map file is readable");
        assert_eq!(*text, disk, "{file}: embedded text differs from the file");
    }
}

#[test]
fn builtin_files_are_named_builtin_maps() {
    let files = builtin_files();
    assert_eq!(files.len(), BUILTIN_FILES.len());
    for ((source, text), (file, embedded)) in files.iter().zip(BUILTIN_FILES) {
        assert_eq!(source, &format!("{BUILTIN_PREFIX}{file}"));
        assert_eq!(text, embedded);
    }
}

#[test]
fn every_file_opens_with_a_header_naming_microsofts_map() {
    for (file, text) in BUILTIN_FILES {
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("# Microsoft"),
            "{file}: the first line must name Microsoft's source map, found {first:?}"
        );
        assert!(
            text.contains("Notation"),
            "{file}: the header must explain the notation"
        );
    }
}

#[test]
fn shipped_maps_validate_clean() {
    let maps = builtin_maps();
    assert!(maps.len() >= 18, "only {} shipped maps", maps.len());

    let names: BTreeSet<&str> = maps.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names.len(), maps.len(), "map names must be unique");
    for m in &maps {
        assert_eq!(
            m.source,
            format!("{BUILTIN_PREFIX}{}.yaml", m.name),
            "map {}: file name must be the map name",
            m.name
        );
        assert!(
            !m.description.is_empty(),
            "map {} has no description",
            m.name
        );
        for dep in &m.depends_on {
            assert!(
                names.contains(dep.as_str()),
                "map {}: depends_on unknown map {dep}",
                m.name
            );
        }
        for f in &m.fields {
            if let Some(lookup) = &f.lookup {
                for target in &lookup.maps {
                    assert!(
                        names.contains(target.as_str()),
                        "map {}, field {}: lookup target {target} is not a shipped map",
                        m.name,
                        f.label()
                    );
                    assert!(
                        target == &m.name || m.depends_on.contains(target),
                        "map {}, field {}: lookup target {target} missing from depends_on",
                        m.name,
                        f.label()
                    );
                }
            }
        }
    }

    // Dependency order: Kahn's algorithm must place every map.
    let mut remaining: BTreeMap<&str, BTreeSet<&str>> = maps
        .iter()
        .map(|m| {
            (
                m.name.as_str(),
                m.depends_on.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let mut order = Vec::new();
    while !remaining.is_empty() {
        let ready: Vec<&str> = remaining
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(n, _)| *n)
            .collect();
        assert!(
            !ready.is_empty(),
            "depends_on has a cycle among {:?}",
            remaining.keys()
        );
        for n in ready {
            remaining.remove(n);
            for deps in remaining.values_mut() {
                deps.remove(n);
            }
            order.push(n);
        }
    }
    assert_eq!(
        order.first(),
        Some(&"legal-entities"),
        "legal entities come first"
    );
}

#[test]
fn required_maps_are_shipped_with_microsofts_entities() {
    let maps = by_name();
    let expected = [
        ("legal-entities", "LegalEntities", "cdm_companies"),
        ("currencies", "Currencies", "transactioncurrencies"),
        ("units", "UnitsOfMeasure", "uoms"),
        ("payment-terms", "TermsOfPayment", "msdyn_paymentterms"),
        ("customer-groups", "CustomerGroups", "msdyn_customergroups"),
        ("vendor-groups", "VendorGroups", "msdyn_vendorgroups"),
        ("customers-v3-accounts", "CustomersV3", "accounts"),
        ("customers-v3-contacts", "CustomersV3", "contacts"),
        ("cds-contacts-v2-contacts", "CDSContactsV2", "contacts"),
        ("vendors-v2", "VendorsV2", "msdyn_vendors"),
        (
            "released-products-v2",
            "ReleasedProductsV2",
            "msdyn_sharedproductdetails",
        ),
        (
            "released-distinct-products",
            "CDSReleasedDistinctProducts",
            "products",
        ),
        ("sales-order-headers", "CDSSalesOrderHeaders", "salesorders"),
        (
            "sales-order-lines",
            "CDSSalesOrderLines",
            "salesorderdetails",
        ),
        (
            "purchase-order-headers",
            "PurchaseOrderHeadersV2",
            "msdyn_purchaseorders",
        ),
        (
            "purchase-order-lines",
            "CDSPurchaseOrderLines",
            "msdyn_purchaseorderproducts",
        ),
        ("projects", "ProjectsV2", "msdyn_projects"),
    ];
    for (name, erp, crm) in expected {
        let m = map(&maps, name);
        assert_eq!(m.erp.entity, erp, "map {name}");
        assert_eq!(m.crm.entity_set, crm, "map {name}");
    }
}

#[test]
fn global_and_company_specific_maps_are_told_apart() {
    let maps = by_name();
    for name in [
        "legal-entities",
        "currencies",
        "units",
        "released-distinct-products",
    ] {
        let m = map(&maps, name);
        assert!(!m.erp.company_specific, "{name} is global");
        assert_eq!(m.crm.company_field, None, "{name} has no company column");
    }
    for m in maps.values().filter(|m| m.erp.company_specific) {
        assert_eq!(
            m.crm.company_field.as_deref(),
            Some("msdyn_company"),
            "map {}",
            m.name
        );
        assert!(
            m.depends_on.iter().any(|d| d == "legal-entities"),
            "map {}",
            m.name
        );
        let company_mapped = m.fields.iter().any(|f| {
            f.erp
                .as_ref()
                .is_some_and(|r| r.name.eq_ignore_ascii_case("dataAreaId"))
                || f.crm.as_ref().is_some_and(|r| r.name == "msdyn_company")
        });
        assert!(
            !company_mapped,
            "map {}: the company is part of the key, never a field",
            m.name
        );
    }
}

#[test]
fn one_way_maps_are_erp_to_crm() {
    let maps = by_name();
    for name in [
        "legal-entities",
        "units",
        "released-products-v2",
        "released-distinct-products",
    ] {
        assert_eq!(
            map(&maps, name).direction,
            MapDirection::ErpToCrm,
            "map {name}"
        );
    }
    assert_eq!(
        map(&maps, "customers-v3-accounts").direction,
        MapDirection::Bidirectional
    );
}

#[test]
fn customers_v3_accounts_follows_microsofts_map() {
    let maps = by_name();
    let m = map(&maps, "customers-v3-accounts");
    assert_eq!(m.erp.key, ["CustomerAccount"]);
    assert_eq!(m.crm.key, ["accountnumber"]);
    assert!(
        m.filters.erp.is_some() && m.filters.crm.is_some(),
        "both sides are filtered"
    );

    let key = field(m, Side::Erp, "CustomerAccount");
    assert!(key.is_key, "CustomerAccount is the key");
    assert_eq!(
        key.crm.as_ref().map(|r| r.name.as_str()),
        Some("accountnumber")
    );

    let credit = field(m, Side::Erp, "CreditLimit");
    assert_eq!(credit.erp.as_ref().map(|r| r.ty), Some(ValueType::Decimal));

    let currency = field(m, Side::Erp, "SalesCurrencyCode");
    assert_eq!(currency.crm.as_ref().map(|r| r.ty), Some(ValueType::Lookup));
    assert_eq!(
        currency.lookup.as_ref().map(|l| l.maps.clone()),
        Some(vec!["currencies".into()])
    );

    let on_hold = field(m, Side::Erp, "OnHoldStatus");
    let pairs = &on_hold
        .value_map
        .as_ref()
        .expect("OnHoldStatus has a value map")
        .pairs;
    assert_eq!(pairs.len(), 6);
    assert!(pairs.contains(&(Value::Enum("No".into()), Value::Choice(806_380_000))));
    assert!(pairs.contains(&(Value::Enum("Never".into()), Value::Choice(806_380_005))));

    let mandatory = field(m, Side::Erp, "CreditLimitIsMandatory");
    let pairs = &mandatory.value_map.as_ref().expect("NoYes value map").pairs;
    assert!(pairs.contains(&(Value::Enum("Yes".into()), Value::Boolean(true))));

    let party_type = field(m, Side::Erp, "PartyType");
    assert!(party_type.crm.is_none(), "PARTYTYPE << none");
    assert_eq!(party_type.default, Some(Value::Enum("Organization".into())));

    let customer_type = field(m, Side::Crm, "customertypecode");
    assert!(customer_type.erp.is_none(), "none >> customertypecode");
    assert_eq!(customer_type.default, Some(Value::Choice(3)));

    assert_eq!(
        field(m, Side::Erp, "DeliveryAddressCity")
            .crm
            .as_ref()
            .unwrap()
            .name,
        "address1_city"
    );
    assert_eq!(
        field(m, Side::Erp, "InvoiceAddressCity")
            .crm
            .as_ref()
            .unwrap()
            .name,
        "address2_city"
    );
}

#[test]
fn sales_order_customer_is_a_polymorphic_lookup() {
    let maps = by_name();
    let m = map(&maps, "sales-order-headers");
    let customer = field(m, Side::Erp, "OrderingCustomerAccountNumber");
    assert_eq!(
        customer.crm.as_ref().map(|r| r.name.as_str()),
        Some("customerid")
    );
    assert_eq!(
        customer.lookup.as_ref().map(|l| l.maps.clone()),
        Some(vec![
            "customers-v3-accounts".to_string(),
            "customers-v3-contacts".to_string()
        ])
    );
    let order_type = field(m, Side::Crm, "msdyn_ordertype");
    assert_eq!(order_type.default, Some(Value::Choice(192_350_000)));
}

#[test]
fn order_lines_are_keyed_under_their_header() {
    let maps = by_name();
    let lines = map(&maps, "sales-order-lines");
    assert_eq!(
        lines.erp.key,
        ["SalesOrderNumber", "LineCreationSequenceNumber"]
    );
    assert!(lines.depends_on.iter().any(|d| d == "sales-order-headers"));
    let parent = field(lines, Side::Erp, "SalesOrderNumber");
    assert_eq!(
        parent.lookup.as_ref().map(|l| l.maps.clone()),
        Some(vec!["sales-order-headers".to_string()])
    );
    let po_lines = map(&maps, "purchase-order-lines");
    assert!(
        po_lines
            .depends_on
            .iter()
            .any(|d| d == "purchase-order-headers")
    );
}

#[test]
fn readme_lists_every_map() {
    let readme = std::fs::read_to_string(maps_dir().join("README.md")).expect("maps/README.md");
    for (file, _) in BUILTIN_FILES {
        let name = file.trim_end_matches(".yaml");
        assert!(
            readme.contains(&format!("| {name} |")),
            "maps/README.md has no row for {name}"
        );
    }
}
