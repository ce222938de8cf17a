//! The standard table maps shipped with dualwrite (`maps/*.yaml`), embedded in the binary.
//!
//! The YAML files live in the repository's top-level `maps/` folder so users can read and copy
//! them; this crate embeds them with `include_str!` and validates them with
//! [`dualwrite_core::map::validate::load_maps`]. A test checks that [`BUILTIN_FILES`] lists every
//! file of `maps/`, so a new map file is never forgotten.

use dualwrite_core::map::TableMap;
use dualwrite_core::map::validate::load_maps;

/// The prefix of the source name of a shipped map file: `builtin:maps/<file>`.
pub const BUILTIN_PREFIX: &str = "builtin:maps/";

/// The JSON Schema of the map format (`maps/schema/table-map.schema.json`), written beside
/// exported maps at [`SCHEMA_FILE`] so editors keep checking them.
pub const SCHEMA: &str = include_str!("../../../maps/schema/table-map.schema.json");

/// Where [`SCHEMA`] goes, relative to a folder of map files (the path the editor hint of
/// docs/MAP_FORMAT.md, `# yaml-language-server: $schema=…`, names).
pub const SCHEMA_FILE: &str = "schema/table-map.schema.json";

/// Declares [`BUILTIN_FILES`] from a list of file names in `maps/`, each embedded once.
macro_rules! builtin_files {
    ($($file:literal),* $(,)?) => {
        /// Every shipped map file as `(file name in maps/, YAML text)`, in dependency-friendly
        /// order (reference tables first). Add a new file of `maps/` here.
        pub const BUILTIN_FILES: &[(&str, &str)] = &[
            $(($file, include_str!(concat!("../../../maps/", $file))),)*
        ];
    };
}

builtin_files![
    "legal-entities.yaml",
    "currencies.yaml",
    "units.yaml",
    "payment-terms.yaml",
    "payment-days.yaml",
    "payment-schedules.yaml",
    "customer-payment-methods.yaml",
    "vendor-payment-methods.yaml",
    "sales-tax-groups.yaml",
    "delivery-modes.yaml",
    "customer-groups.yaml",
    "vendor-groups.yaml",
    "vendors-v2.yaml",
    "cds-contacts-v2-contacts.yaml",
    "customers-v3-accounts.yaml",
    "customers-v3-contacts.yaml",
    "released-distinct-products.yaml",
    "released-products-v2.yaml",
    "sales-order-headers.yaml",
    "sales-order-lines.yaml",
    "purchase-order-headers.yaml",
    "purchase-order-lines.yaml",
    "projects.yaml",
];

/// The shipped map files as `("builtin:maps/<file>", yaml)`, ready for
/// [`load_maps`] (alone, or followed by the user's own files).
pub fn builtin_files() -> Vec<(String, String)> {
    BUILTIN_FILES
        .iter()
        .map(|(file, text)| (format!("{BUILTIN_PREFIX}{file}"), (*text).to_string()))
        .collect()
}

/// The shipped maps, validated.
///
/// # Panics
///
/// When a shipped map does not validate. The maps are part of the build, so that is a bug in
/// this crate (the `shipped_maps_validate_clean` test catches it first); the panic message lists
/// every diagnostic.
pub fn builtin_maps() -> Vec<TableMap> {
    match load_maps(&builtin_files()) {
        Ok(maps) => maps,
        Err(diagnostics) => {
            let listed: Vec<String> = diagnostics.iter().map(|d| format!("  {d}")).collect();
            panic!(
                "the table maps shipped in maps/ do not validate ({} problems); fix the files in \
                 maps/:\n{}",
                diagnostics.len(),
                listed.join("\n")
            )
        }
    }
}
