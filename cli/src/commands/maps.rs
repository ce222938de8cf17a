//! `dualwrite maps …`: validate, list, show and export table maps.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dualwrite_core::map::validate::load_maps;
use dualwrite_core::map::{FieldMapping, TableMap};

#[derive(Debug, Subcommand)]
pub enum MapsCommand {
    /// Validate map files (a file or a folder of *.yaml; the shipped maps when no path is given).
    /// Prints every problem with file and line; exits 1 when there is any.
    Validate {
        /// A map file or a folder of map files. A folder is a complete map set.
        path: Option<PathBuf>,
    },
    /// List the maps (the shipped ones, or those in --maps).
    List {
        /// A folder of map files to list instead of the shipped maps.
        #[arg(long)]
        maps: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one map field by field, in Dual-write notation.
    Show {
        /// The map's name, e.g. customers-v3-accounts.
        name: String,
        /// A folder of map files to look in instead of the shipped maps.
        #[arg(long)]
        maps: Option<PathBuf>,
    },
    /// Write the shipped maps into a folder, as a starting point for your own.
    Export {
        /// The folder to write into (created if missing; existing files are not overwritten).
        dir: PathBuf,
    },
}

pub fn run(command: MapsCommand) -> Result<ExitCode> {
    match command {
        MapsCommand::Validate { path } => validate(path.as_deref()),
        MapsCommand::List { maps, json } => {
            let maps = load(maps.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&maps)?);
            } else {
                print_list(&maps);
            }
            Ok(ExitCode::SUCCESS)
        }
        MapsCommand::Show { name, maps } => {
            let maps = load(maps.as_deref())?;
            let Some(map) = maps.iter().find(|m| m.name == name) else {
                let names: Vec<_> = maps.iter().map(|m| m.name.as_str()).collect();
                bail!("no map named {name:?}; the maps are: {}", names.join(", "));
            };
            print_map(map);
            Ok(ExitCode::SUCCESS)
        }
        MapsCommand::Export { dir } => export(&dir),
    }
}

/// The maps of a folder, or the shipped maps. Fails with every diagnostic.
pub fn load(dir: Option<&Path>) -> Result<Vec<TableMap>> {
    let files = match dir {
        Some(p) => read_files(p)?,
        None => dualwrite_maps::builtin_files(),
    };
    load_maps(&files).map_err(|diags| {
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("the maps are not valid:\n{}", lines.join("\n"))
    })
}

fn validate(path: Option<&Path>) -> Result<ExitCode> {
    let files = match path {
        Some(p) => read_files(p)?,
        None => dualwrite_maps::builtin_files(),
    };
    match load_maps(&files) {
        Ok(maps) => {
            println!("{} maps in {} files: all valid", maps.len(), files.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(diags) => {
            for d in &diags {
                println!("{d}");
            }
            let n = diags.len();
            eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
            Ok(ExitCode::from(1))
        }
    }
}

/// Reads one file, or every `*.yaml`/`*.yml` file of a folder (sorted, not recursive).
fn read_files(path: &Path) -> Result<Vec<(String, String)>> {
    let mut paths = Vec::new();
    if path.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading folder {}", path.display()))?
        {
            let p = entry?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                paths.push(p);
            }
        }
        paths.sort();
        if paths.is_empty() {
            bail!("{} holds no *.yaml map files", path.display());
        }
    } else {
        paths.push(path.to_path_buf());
    }
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Ok((p.display().to_string(), text))
        })
        .collect()
}

fn export(dir: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = 0;
    for (name, text) in dualwrite_maps::builtin_files() {
        let file = name.rsplit('/').next().unwrap_or(&name);
        let target = dir.join(file);
        if target.exists() {
            eprintln!("kept existing {}", target.display());
            continue;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
        written += 1;
    }
    let schema = dir.join(dualwrite_maps::SCHEMA_FILE);
    if schema.exists() {
        eprintln!("kept existing {}", schema.display());
    } else {
        if let Some(parent) = schema.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&schema, dualwrite_maps::SCHEMA)
            .with_context(|| format!("writing {}", schema.display()))?;
    }
    println!(
        "wrote {written} map files to {} (and the format's JSON Schema, {})",
        dir.display(),
        dualwrite_maps::SCHEMA_FILE
    );
    Ok(ExitCode::SUCCESS)
}

fn direction_word(map: &TableMap) -> &'static str {
    match map.direction {
        dualwrite_core::map::MapDirection::Bidirectional => "<->",
        dualwrite_core::map::MapDirection::ErpToCrm => "->",
        dualwrite_core::map::MapDirection::CrmToErp => "<-",
    }
}

fn print_list(maps: &[TableMap]) {
    let w = maps.iter().map(|m| m.name.len()).max().unwrap_or(4).max(4);
    let we = maps
        .iter()
        .map(|m| m.erp.entity.len())
        .max()
        .unwrap_or(3)
        .max(3);
    println!(
        "{:w$}  {:we$}  dir  {:28}  fields  depends on",
        "name", "F&O", "Dataverse"
    );
    for m in maps {
        println!(
            "{:w$}  {:we$}  {:3}  {:28}  {:6}  {}",
            m.name,
            m.erp.entity,
            direction_word(m),
            m.crm.entity_set,
            m.fields.len(),
            m.depends_on.join(", ")
        );
    }
    println!("{} maps", maps.len());
}

fn print_map(map: &TableMap) {
    println!("{} — {}", map.name, map.description);
    println!("  source:    {}", map.source);
    let company = if map.erp.company_specific {
        "dataAreaId + "
    } else {
        ""
    };
    println!(
        "  F&O:       {} (key {company}{})",
        map.erp.entity,
        map.erp.key.join(", ")
    );
    let crm_company = map
        .crm
        .company_field
        .as_deref()
        .map(|c| format!(" + {c}"))
        .unwrap_or_default();
    println!(
        "  Dataverse: {} / {} (key {}{crm_company})",
        map.crm.entity_set,
        map.crm.logical_name,
        map.crm.key.join(", ")
    );
    println!(
        "  direction: {}   conflicts: {:?}   deletes: {:?}",
        direction_word(map),
        map.conflict,
        map.delete
    );
    if let Some(f) = &map.filters.erp {
        println!("  F&O filter:       {}", f.to_odata());
    }
    if let Some(f) = &map.filters.crm {
        println!("  Dataverse filter: {}", f.to_odata());
    }
    if !map.depends_on.is_empty() {
        println!("  depends on: {}", map.depends_on.join(", "));
    }
    println!();
    for f in &map.fields {
        println!("  {}{}", f.label(), field_notes(f));
    }
}

fn field_notes(f: &FieldMapping) -> String {
    let mut notes = Vec::new();
    if f.is_key {
        notes.push("key".to_string());
    }
    if let Some(l) = &f.lookup {
        notes.push(format!("lookup via {}", l.maps.join(" | ")));
    }
    if let Some(vm) = &f.value_map {
        let pairs: Vec<String> = vm.pairs.iter().map(|(e, c)| format!("{e}:{c}")).collect();
        notes.push(format!("[{}]", pairs.join(",")));
    }
    if let Some(d) = &f.default {
        notes.push(format!("default {d}"));
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!("   ({})", notes.join("; "))
    }
}
