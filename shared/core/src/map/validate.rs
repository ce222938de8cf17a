//! Map validation: raw map files ([`super::raw`]) become typed [`TableMap`]s, and every problem
//! of every file is reported at once, sorted by file and line, with what to do about it.
//!
//! Entry point: [`load_maps`]. The rules are those of `docs/MAP_FORMAT.md` ("Rules").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate};
use rust_decimal::Decimal;

use super::filter::{Literal, parse_filter};
use super::raw::{RawField, RawMap, RawNode, RawScalar, RawStep, closest, parse_map_file};
use super::{
    ConflictPolicy, CrmEntity, DeletePolicy, ErpEntity, FieldDirection, FieldMapping, FieldRef,
    LookupSpec, MapDirection, SideFilters, TableMap, TransformStep, ValueMap,
};
use crate::record::Side;
use crate::value::{Value, ValueType};

/// One problem in a map file: where it is, which map and field, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name given to [`load_maps`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The map's name, when known.
    pub map: Option<String>,
    /// The field mapping's label (its F&O name, else its Dataverse name, else `#N`).
    pub field: Option<String>,
    /// What is wrong and what to do, in a sentence.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at `file:line`.
    pub fn new(
        file: &str,
        line: usize,
        map: Option<String>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            file: file.to_string(),
            line,
            map,
            field,
            message: message.into(),
        }
    }
}

/// `maps/customers.yaml:12: map "customers", field "CreditLimit": message`.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        match (&self.map, &self.field) {
            (Some(m), Some(fl)) => write!(f, "map \"{m}\", field \"{fl}\": ")?,
            (Some(m), None) => write!(f, "map \"{m}\": ")?,
            (None, Some(fl)) => write!(f, "field \"{fl}\": ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

/// Parses and validates map files given as `(file name, YAML text)`, then checks the maps
/// against each other (unique names, `depends_on`, lookups). Returns the maps in file order,
/// or every problem found, sorted by file and line.
pub fn load_maps(files: &[(String, String)]) -> Result<Vec<TableMap>, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut raws = Vec::new();
    let mut maps = Vec::new();
    for (file, text) in files {
        let (raw, mut found) = parse_map_file(file, text);
        diags.append(&mut found);
        if let Some(raw) = raw {
            let mut checker = Checker {
                file,
                map: raw.name_text().map(str::to_string),
                diags: &mut diags,
            };
            if let Some(map) = checker.map(&raw) {
                maps.push(map);
            }
            raws.push(raw);
        }
    }
    cross_map_checks(&raws, &mut diags);
    if diags.is_empty() {
        Ok(maps)
    } else {
        diags.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Err(diags)
    }
}

const DIRECTION_WORDS: &str =
    "`=`, `><`, `>`, `>>`, `<`, `<<`, `bidirectional`, `erp_to_crm` or `crm_to_erp`";
const TYPE_WORDS: &[&str] = &[
    "text", "integer", "decimal", "boolean", "date", "datetime", "choice", "enum", "lookup",
];

fn parse_type(word: &str) -> Option<ValueType> {
    Some(match word {
        "text" => ValueType::Text,
        "integer" => ValueType::Integer,
        "decimal" => ValueType::Decimal,
        "boolean" => ValueType::Boolean,
        "date" => ValueType::Date,
        "datetime" => ValueType::DateTime,
        "choice" => ValueType::Choice,
        "enum" => ValueType::Enum,
        "lookup" => ValueType::Lookup,
        _ => return None,
    })
}

/// Reads a YAML scalar as a value of `ty`. Decimals come from the scalar's text, exactly.
pub fn parse_value(scalar: &RawScalar, ty: ValueType) -> Result<Value, String> {
    if scalar.is_null() {
        return Ok(Value::Null);
    }
    let text = scalar.text.as_str();
    let bad = |example: &str| format!("`{text}` is not a valid {ty} (write e.g. {example})");
    match ty {
        ValueType::Text => Ok(Value::Text(text.into())),
        ValueType::Integer => text.parse().map(Value::Integer).map_err(|_| bad("42")),
        ValueType::Choice => text
            .parse()
            .map(Value::Choice)
            .map_err(|_| bad("806380000")),
        ValueType::Decimal => Decimal::from_str(text)
            .or_else(|_| Decimal::from_scientific(text))
            .map(Value::Decimal)
            .map_err(|_| bad("12.50")),
        ValueType::Boolean => match text.to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            _ => Err(bad("true or false")),
        },
        ValueType::Date => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map(Value::Date)
            .map_err(|_| bad("2026-05-01")),
        ValueType::DateTime => DateTime::parse_from_rfc3339(text)
            .map(Value::DateTime)
            .map_err(|_| bad("2026-05-01T00:00:00Z (RFC 3339)")),
        ValueType::Enum if text.is_empty() => Err(bad("Yes")),
        ValueType::Enum => Ok(Value::Enum(text.into())),
        ValueType::Lookup => Err(format!(
            "`{text}`: a lookup value cannot be written in a map (it is resolved through the lookup's map); \
             remove it or map a text field instead"
        )),
    }
}

/// Validates one raw map, reporting with the file and map name.
struct Checker<'a> {
    file: &'a str,
    map: Option<String>,
    diags: &'a mut Vec<Diagnostic>,
}

/// The keys of both sides, for `is_key`.
struct Keys<'k> {
    erp: &'k [String],
    crm: &'k [String],
}

impl Checker<'_> {
    fn report(&mut self, line: usize, field: Option<&str>, message: impl Into<String>) {
        self.diags.push(Diagnostic::new(
            self.file,
            line,
            self.map.clone(),
            field.map(str::to_string),
            message,
        ));
    }

    fn map(&mut self, raw: &RawMap) -> Option<TableMap> {
        let before = self.diags.len();
        let name = match &raw.name {
            None => {
                self.report(1, None, "the map has no `name`; add `name: <unique-name>` (lower-case letters, digits and `-`)");
                String::new()
            }
            Some(n) => {
                let t = &n.value.text;
                if t.is_empty()
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    self.report(n.line, None, format!("map name `{t}` may only use lower-case letters, digits and `-`; rename it"));
                }
                t.clone()
            }
        };
        let description = raw
            .description
            .as_ref()
            .map(|d| d.value.text.clone())
            .unwrap_or_default();
        let direction = match &raw.direction {
            None => MapDirection::Bidirectional,
            Some(d) => match d.value.text.as_str() {
                "bidirectional" | "=" => MapDirection::Bidirectional,
                "erp_to_crm" | ">" => MapDirection::ErpToCrm,
                "crm_to_erp" | "<" => MapDirection::CrmToErp,
                other => {
                    self.report(d.line, None, format!("unknown direction `{other}`; write `bidirectional`, `erp_to_crm` or `crm_to_erp` (or `=`, `>`, `<`)"));
                    MapDirection::Bidirectional
                }
            },
        };
        let conflict = match &raw.conflict {
            None => ConflictPolicy::default(),
            Some(c) => match c.value.text.as_str() {
                "last_writer_wins" => ConflictPolicy::LastWriterWins,
                "crm_wins" => ConflictPolicy::CrmWins,
                "erp_wins" => ConflictPolicy::ErpWins,
                "field_level" => ConflictPolicy::FieldLevel,
                "manual" => ConflictPolicy::Manual,
                other => {
                    self.report(c.line, None, format!("unknown conflict policy `{other}`; write `last_writer_wins`, `crm_wins`, `erp_wins`, `field_level` or `manual`"));
                    ConflictPolicy::default()
                }
            },
        };
        let depends_on: Vec<String> = raw
            .depends_on
            .as_ref()
            .map(|d| d.value.iter().map(|s| s.text.clone()).collect())
            .unwrap_or_default();

        let (erp, erp_filter) = self.erp(raw);
        let (crm, crm_filter) = self.crm(raw);
        if let (Some(erp), Some(crm)) = (&erp, &crm) {
            let line = raw.erp.as_ref().map_or(1, |e| {
                e.value.company_specific.as_ref().map_or(e.line, |c| c.line)
            });
            if erp.company_specific && crm.company_field.is_none() {
                self.report(line, None, "the F&O entity is company-specific but `crm.company_field` is missing; add `company_field: msdyn_company` (the Dataverse company lookup) or set `company_specific: false`");
            }
            if !erp.company_specific
                && let Some(cf) = &crm.company_field
            {
                let line = raw
                    .crm
                    .as_ref()
                    .and_then(|c| c.value.company_field.as_ref())
                    .map_or(line, |c| c.line);
                self.report(line, None, format!("`company_field: {cf}` is only for company-specific tables, but `erp.company_specific` is false; remove one of them"));
            }
        }

        let empty: Vec<String> = Vec::new();
        let keys = Keys {
            erp: erp.as_ref().map_or(&empty, |e| &e.key),
            crm: crm.as_ref().map_or(&empty, |c| &c.key),
        };
        let mut fields = Vec::new();
        match &raw.fields {
            None => self.report(
                1,
                None,
                "the map has no `fields`; add the list of field mappings",
            ),
            Some(f) if f.value.is_empty() => self.report(
                f.line,
                None,
                "`fields` is empty; a map needs at least its key fields",
            ),
            Some(f) => {
                for rf in &f.value {
                    if let Some(m) = self.field(rf, direction, conflict, &keys) {
                        fields.push((rf, m));
                    }
                }
            }
        }
        if let (Some(erp), Some(crm)) = (&erp, &crm) {
            self.key_fields(raw, direction, erp, crm, &fields);
            self.company_fields(erp, crm, &fields);
        }
        self.duplicates(&fields);
        let mapped: Vec<FieldMapping> = fields.into_iter().map(|(_, m)| m).collect();
        self.filter_literals(raw, erp_filter.as_ref(), crm_filter.as_ref(), &mapped);
        let delete = self.delete(raw, &mapped);

        if self.diags.len() > before {
            return None;
        }
        Some(TableMap {
            name,
            description,
            source: self.file.to_string(),
            crm: crm?,
            erp: erp?,
            direction,
            fields: mapped,
            filters: SideFilters {
                crm: crm_filter,
                erp: erp_filter,
            },
            depends_on,
            conflict,
            delete,
            plan: Default::default(),
        })
    }

    fn required(
        &mut self,
        value: Option<&RawScalar>,
        section_line: usize,
        section: &str,
        key: &str,
        example: &str,
    ) -> Option<String> {
        match value {
            Some(v) if !v.is_null() && !v.text.is_empty() => Some(v.text.clone()),
            _ => {
                self.report(
                    section_line,
                    None,
                    format!("`{section}.{key}` is missing; add `{key}: {example}`"),
                );
                None
            }
        }
    }

    fn filter(
        &mut self,
        value: Option<&super::raw::Located<RawScalar>>,
        side: &str,
    ) -> Option<super::Filter> {
        let f = value?;
        if f.value.is_null() {
            return None;
        }
        match parse_filter(&f.value.text) {
            Ok(filter) => Some(filter),
            Err(e) => {
                self.report(
                    f.line,
                    None,
                    format!(
                        "`{side}.filter` does not parse {e}; see \"Filters\" in docs/MAP_FORMAT.md"
                    ),
                );
                None
            }
        }
    }

    /// F&O compares an enum field only with a literal of its enum type: a plain text compared
    /// with a field the map types as an F&O enum is refused (but `'Yes'` / `'No'`, which the
    /// connector writes as `NoYes` literals), naming the form to write. Dataverse has no enum
    /// literals (choices are numbers).
    fn filter_literals(
        &mut self,
        raw: &RawMap,
        erp: Option<&super::Filter>,
        crm: Option<&super::Filter>,
        fields: &[FieldMapping],
    ) {
        fn comparisons<'f>(f: &'f super::Filter, out: &mut Vec<(&'f str, &'f Literal)>) {
            match f {
                super::Filter::And(a, b) | super::Filter::Or(a, b) => {
                    comparisons(a, out);
                    comparisons(b, out);
                }
                super::Filter::Not(a) => comparisons(a, out),
                super::Filter::Compare { field, value, .. } => out.push((field, value)),
                super::Filter::Text { .. } => {}
            }
        }
        if let Some(f) = erp {
            let line = raw
                .erp
                .as_ref()
                .and_then(|e| e.value.filter.as_ref())
                .map_or(1, |l| l.line);
            let mut found = Vec::new();
            comparisons(f, &mut found);
            for (field, literal) in found {
                let is_enum = fields.iter().any(|m| {
                    m.erp
                        .as_ref()
                        .is_some_and(|r| r.name == field && r.ty == ValueType::Enum)
                });
                if let Literal::Text(symbol) = literal
                    && is_enum
                    && !symbol.eq_ignore_ascii_case("yes")
                    && !symbol.eq_ignore_ascii_case("no")
                {
                    let escaped = symbol.replace('\'', "''");
                    self.report(
                        line,
                        Some(field),
                        format!(
                            "`erp.filter` compares the enum field {field} with the text '{escaped}', \
                             which F&O refuses (incompatible types); write the enum literal \
                             `{field} eq Microsoft.Dynamics.DataEntities.<EnumType>'{escaped}'` \
                             with the field's enum type from F&O's $metadata"
                        ),
                    );
                }
            }
        }
        if let Some(f) = crm {
            let line = raw
                .crm
                .as_ref()
                .and_then(|c| c.value.filter.as_ref())
                .map_or(1, |l| l.line);
            let mut found = Vec::new();
            comparisons(f, &mut found);
            for (field, literal) in found {
                if let Literal::Enum { ty, .. } = literal {
                    self.report(
                        line,
                        Some(field),
                        format!(
                            "`crm.filter` compares {field} with an enum literal of {ty}; Dataverse \
                             has none: compare a choice column with its number (`statecode eq 0`)"
                        ),
                    );
                }
            }
        }
    }

    fn key_list(
        &mut self,
        key: Option<&super::raw::Located<Vec<RawScalar>>>,
        section_line: usize,
        side: &str,
        example: &str,
        code: &str,
    ) -> Vec<String> {
        let names: Vec<String> = key
            .map(|k| {
                k.value
                    .iter()
                    .filter(|s| !s.is_null())
                    .map(|s| s.text.clone())
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            let line = key.map_or(section_line, |k| k.line);
            self.report(
                line,
                None,
                format!("no integration key on the {side} side ({code}); add `key: [{example}]`"),
            );
        }
        names
    }

    fn erp(&mut self, raw: &RawMap) -> (Option<ErpEntity>, Option<super::Filter>) {
        let Some(section) = &raw.erp else {
            self.report(
                1,
                None,
                "the map has no `erp` section; add `erp: {entity: ..., key: [...]}`",
            );
            return (None, None);
        };
        let e = &section.value;
        let entity = self.required(
            e.entity.as_ref().map(|l| &l.value),
            section.line,
            "erp",
            "entity",
            "CustomersV3",
        );
        let key = self.key_list(
            e.key.as_ref(),
            section.line,
            "F&O",
            "CustomerAccount",
            "DIPV1003",
        );
        let company_specific = match &e.company_specific {
            None => true,
            Some(c) => match parse_value(&c.value, ValueType::Boolean) {
                Ok(Value::Boolean(b)) => b,
                _ => {
                    self.report(
                        c.line,
                        None,
                        format!(
                            "`company_specific` must be true or false, not `{}`",
                            c.value.text
                        ),
                    );
                    true
                }
            },
        };
        let filter = self.filter(e.filter.as_ref(), "erp");
        let physical_name = match &e.physical_name {
            Some(p) if p.value.is_null() => None,
            Some(p) => {
                let name = p.value.text.as_str();
                if name.is_empty()
                    || !name.starts_with(|c: char| c.is_ascii_alphabetic())
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    self.report(
                        p.line,
                        None,
                        format!(
                            "`physical_name: {name}` is not an F&O entity name; give the entity's AOT name, letters, digits and `_`, e.g. `CustCustomerV3Entity`"
                        ),
                    );
                    None
                } else {
                    Some(name.to_string())
                }
            }
            None => None,
        };
        (
            entity.map(|entity| ErpEntity {
                entity,
                key,
                company_specific,
                physical_name,
            }),
            filter,
        )
    }

    fn crm(&mut self, raw: &RawMap) -> (Option<CrmEntity>, Option<super::Filter>) {
        let Some(section) = &raw.crm else {
            self.report(1, None, "the map has no `crm` section; add `crm: {entity_set: ..., logical_name: ..., key: [...]}`");
            return (None, None);
        };
        let c = &section.value;
        let entity_set = self.required(
            c.entity_set.as_ref().map(|l| &l.value),
            section.line,
            "crm",
            "entity_set",
            "accounts",
        );
        let logical_name = self.required(
            c.logical_name.as_ref().map(|l| &l.value),
            section.line,
            "crm",
            "logical_name",
            "account",
        );
        let key = self.key_list(
            c.key.as_ref(),
            section.line,
            "Dataverse",
            "accountnumber",
            "DIPV1003",
        );
        let text = |v: &Option<super::raw::Located<RawScalar>>| {
            v.as_ref()
                .filter(|l| !l.value.is_null())
                .map(|l| l.value.text.clone())
        };
        let primary_id = text(&c.primary_id);
        let company_field = text(&c.company_field);
        let filter = self.filter(c.filter.as_ref(), "crm");
        let entity = match (entity_set, logical_name) {
            (Some(entity_set), Some(logical_name)) => Some(CrmEntity {
                primary_id: primary_id.unwrap_or_else(|| format!("{logical_name}id")),
                entity_set,
                logical_name,
                key,
                company_field,
            }),
            _ => None,
        };
        (entity, filter)
    }

    fn field(
        &mut self,
        rf: &RawField,
        map_dir: MapDirection,
        conflict: ConflictPolicy,
        keys: &Keys<'_>,
    ) -> Option<FieldMapping> {
        let before = self.diags.len();
        let label = rf.label();
        let lbl = Some(label.as_str());
        let name = |v: &Option<super::raw::Located<RawScalar>>| {
            v.as_ref()
                .filter(|l| !l.value.is_null() && !l.value.text.is_empty())
                .map(|l| l.value.text.clone())
        };
        let erp_name = name(&rf.erp);
        let crm_name = name(&rf.crm);
        if erp_name.is_none() && crm_name.is_none() {
            self.report(rf.line, lbl, "a field mapping needs `erp`, `crm` or both");
        }

        let Some(dir) = &rf.dir else {
            self.report(
                rf.line,
                lbl,
                format!("the field has no `dir`; add `dir:` with {DIRECTION_WORDS}"),
            );
            return None;
        };
        let (direction, notation) = match dir.value.text.as_str() {
            "=" | "bidirectional" => (FieldDirection::Bidirectional, "="),
            "><" => (FieldDirection::Bidirectional, "><"),
            ">" | "erp_to_crm" => (FieldDirection::ErpToCrm, ">"),
            ">>" => (FieldDirection::ErpToCrm, ">>"),
            "<" | "crm_to_erp" => (FieldDirection::CrmToErp, "<"),
            "<<" => (FieldDirection::CrmToErp, "<<"),
            other => {
                self.report(dir.line, lbl, format!("unknown direction `{other}`; write {DIRECTION_WORDS} (quote `>` and `<` in YAML)"));
                return None;
            }
        };
        let allowed = match map_dir {
            MapDirection::Bidirectional => true,
            MapDirection::ErpToCrm => direction == FieldDirection::ErpToCrm,
            MapDirection::CrmToErp => direction == FieldDirection::CrmToErp,
        };
        if !allowed {
            let (word, arrow) = if map_dir == MapDirection::ErpToCrm {
                ("erp_to_crm", ">")
            } else {
                ("crm_to_erp", "<")
            };
            self.report(dir.line, lbl, format!("`dir: {}` is not allowed in a map whose direction is {word}; use `{arrow}` (or `{arrow}{arrow}`)", dir.value.text));
        }

        // Types.
        let ty_of =
            |v: &Option<super::raw::Located<RawScalar>>, this: &mut Self| -> Option<ValueType> {
                let l = v.as_ref()?;
                let t = parse_type(&l.value.text);
                if t.is_none() {
                    let hint = closest(&l.value.text, TYPE_WORDS)
                        .map(|c| format!("did you mean `{c}`? "))
                        .unwrap_or_default();
                    this.report(
                        l.line,
                        lbl,
                        format!(
                            "unknown type `{}`; {hint}write one of {}",
                            l.value.text,
                            TYPE_WORDS.join(", ")
                        ),
                    );
                }
                t
            };
        let both = ty_of(&rf.ty, self).unwrap_or(ValueType::Text);
        let erp_ty = ty_of(&rf.erp_type, self).unwrap_or(both);
        let crm_ty = ty_of(&rf.crm_type, self).unwrap_or(both);
        if erp_name.is_none()
            && let Some(t) = &rf.erp_type
        {
            self.report(
                t.line,
                lbl,
                "`erp_type` is given but the field has no `erp` side; remove it",
            );
        }
        if crm_name.is_none()
            && let Some(t) = &rf.crm_type
        {
            self.report(
                t.line,
                lbl,
                "`crm_type` is given but the field has no `crm` side; remove it",
            );
        }

        // Sources and destinations.
        let has_default = rf.default.as_ref().is_some_and(|d| !d.value.is_null());
        match direction {
            FieldDirection::Bidirectional => {
                if erp_name.is_none() || crm_name.is_none() {
                    self.report(dir.line, lbl, "a bidirectional field needs both `erp` and `crm`; for a constant written to one side use `>>` or `<<` with a `default`");
                }
            }
            FieldDirection::ErpToCrm | FieldDirection::CrmToErp => {
                let (src, dst, src_side, dst_side) = if direction == FieldDirection::ErpToCrm {
                    (&erp_name, &crm_name, "erp", "crm")
                } else {
                    (&crm_name, &erp_name, "crm", "erp")
                };
                if dst.is_none() {
                    self.report(dir.line, lbl, format!("the field flows to {dst_side} but has no `{dst_side}` name to write to; add `{dst_side}:` or change `dir`"));
                } else if src.is_none() && !has_default {
                    self.report(rf.line, lbl, format!("the field has no `{src_side}` source and no `default` (DIPV1031); add `default:` with the value to write"));
                }
            }
        }
        let flows_to_crm = direction.flows_from(Side::Erp);
        let flows_to_erp = direction.flows_from(Side::Crm);

        // Lookup.
        let lookup = rf.lookup.as_ref().map(|l| LookupSpec {
            maps: l.value.iter().map(|s| s.text.clone()).collect(),
        });
        if let Some(l) = &rf.lookup {
            if l.value.is_empty() {
                self.report(l.line, lbl, "`lookup` names no map; write the name of the map whose records the field refers to");
            }
            if crm_name.is_none() {
                self.report(
                    l.line,
                    lbl,
                    "a `lookup` needs a `crm` column (the Dataverse lookup column)",
                );
            } else if crm_ty != ValueType::Lookup {
                self.report(l.line, lbl, format!("the field has a `lookup` but its Dataverse type is {crm_ty}; add `crm_type: lookup`"));
            }
        } else if crm_name.is_some() && crm_ty == ValueType::Lookup {
            let line = rf
                .crm_type
                .as_ref()
                .or(rf.ty.as_ref())
                .map_or(rf.line, |t| t.line);
            self.report(line, lbl, "a Dataverse lookup column needs `lookup: <map name>` naming the map of the rows it refers to");
        }

        // Value map.
        let value_map = rf.value_map.as_ref().map(|vm| {
            if erp_name.is_none() || crm_name.is_none() {
                self.report(vm.line, lbl, "a `value_map` translates between two fields; the field needs both `erp` and `crm`");
            }
            let mut pairs = Vec::new();
            let mut seen_erp: Vec<(Value, usize)> = Vec::new();
            let mut seen_crm: Vec<(Value, usize)> = Vec::new();
            for (e, c) in &vm.value {
                let ev = parse_value(e, erp_ty);
                let cv = parse_value(c, crm_ty);
                if let Err(m) = &ev {
                    self.report(e.line, lbl, format!("value_map F&O value {m}; F&O values (the keys) must be of type {erp_ty}"));
                }
                if let Err(m) = &cv {
                    self.report(c.line, lbl, format!("value_map Dataverse value {m}; Dataverse values must be of type {crm_ty}"));
                }
                if let (Ok(ev), Ok(cv)) = (ev, cv) {
                    if let Some((_, first)) = seen_erp.iter().find(|(v, _)| *v == ev) {
                        self.report(e.line, lbl, format!("F&O value `{ev}` appears twice in value_map (first on line {first}, DIPV1029); each value may appear once"));
                    }
                    if let Some((_, first)) = seen_crm.iter().find(|(v, _)| *v == cv) {
                        self.report(c.line, lbl, format!("Dataverse value `{cv}` appears twice in value_map (first on line {first}, DIPV1029); each value may appear once, or translation back is ambiguous"));
                    }
                    seen_erp.push((ev.clone(), e.line));
                    seen_crm.push((cv.clone(), c.line));
                    pairs.push((ev, cv));
                }
            }
            ValueMap { pairs }
        });

        // Default.
        let default = match &rf.default {
            None => None,
            Some(d) if d.value.is_null() => {
                self.report(
                    d.line,
                    lbl,
                    "`default: null` is the same as no default; remove it or give a value",
                );
                None
            }
            Some(d) => {
                let ty = match (direction, &erp_name, &crm_name) {
                    (FieldDirection::ErpToCrm, _, _) => Some(crm_ty),
                    (FieldDirection::CrmToErp, _, _) => Some(erp_ty),
                    (FieldDirection::Bidirectional, _, _) if erp_ty == crm_ty => Some(erp_ty),
                    _ => None,
                };
                match ty {
                    None => {
                        self.report(d.line, lbl, format!("a default on a bidirectional field whose sides differ ({erp_ty} in F&O, {crm_ty} in Dataverse) is ambiguous; make the field one-way or give both sides one type"));
                        None
                    }
                    Some(ty) => match parse_value(&d.value, ty) {
                        Ok(v) => Some(v),
                        Err(m) => {
                            self.report(d.line, lbl, format!("default {m}"));
                            None
                        }
                    },
                }
            }
        };

        // Transforms.
        let to_crm = self.steps(rf.to_crm.as_ref(), lbl, "to_crm", flows_to_crm, "Dataverse");
        let to_erp = self.steps(rf.to_erp.as_ref(), lbl, "to_erp", flows_to_erp, "F&O");

        // Types must agree.
        if erp_name.is_some()
            && crm_name.is_some()
            && erp_ty != crm_ty
            && value_map.is_none()
            && lookup.is_none()
            && crm_ty != ValueType::Lookup
        {
            let explained = |steps: &[TransformStep], dst: ValueType| {
                steps.contains(&TransformStep::Convert(dst))
            };
            let mut missing = Vec::new();
            if flows_to_crm && !explained(&to_crm, crm_ty) {
                missing.push(format!("`to_crm: [{{convert: {crm_ty}}}]`"));
            }
            if flows_to_erp && !explained(&to_erp, erp_ty) {
                missing.push(format!("`to_erp: [{{convert: {erp_ty}}}]`"));
            }
            if !missing.is_empty() {
                self.report(rf.line, lbl, format!(
                    "types differ (DIPV1030): F&O `{}` is {erp_ty} but Dataverse `{}` is {crm_ty}; add a `value_map`, or {}",
                    erp_name.as_deref().unwrap_or_default(), crm_name.as_deref().unwrap_or_default(), missing.join(" and ")
                ));
            }
        }

        // Source of truth.
        let source_of_truth = match &rf.source_of_truth {
            None => None,
            Some(s) => match s.value.text.as_str() {
                "crm" => Some(Side::Crm),
                "erp" => Some(Side::Erp),
                other => {
                    self.report(
                        s.line,
                        lbl,
                        format!("unknown source_of_truth `{other}`; write `crm` or `erp`"),
                    );
                    None
                }
            },
        };
        let is_key = erp_name.as_ref().is_some_and(|n| keys.erp.contains(n))
            || crm_name.as_ref().is_some_and(|n| keys.crm.contains(n));
        if conflict == ConflictPolicy::FieldLevel {
            if direction == FieldDirection::Bidirectional && !is_key && rf.source_of_truth.is_none()
            {
                self.report(rf.line, lbl, "with `conflict: field_level` every bidirectional field needs `source_of_truth: crm` or `erp`; add one");
            }
        } else if let Some(s) = &rf.source_of_truth {
            self.report(s.line, lbl, "`source_of_truth` is only used with `conflict: field_level`; remove it or change the map's conflict policy");
        }

        if self.diags.len() > before {
            return None;
        }
        Some(FieldMapping {
            erp: erp_name.map(|name| FieldRef { name, ty: erp_ty }),
            crm: crm_name.map(|name| FieldRef { name, ty: crm_ty }),
            direction,
            notation: notation.to_string(),
            is_key,
            value_map,
            default,
            lookup,
            to_crm,
            to_erp,
            source_of_truth,
            line: rf.line,
        })
    }

    fn steps(
        &mut self,
        steps: Option<&super::raw::Located<Vec<RawStep>>>,
        field: Option<&str>,
        key: &str,
        flows: bool,
        side: &str,
    ) -> Vec<TransformStep> {
        let Some(steps) = steps else {
            return Vec::new();
        };
        if !flows {
            self.report(steps.line, field, format!("`{key}` is never used: the field does not flow to {side}; remove it or change `dir`"));
        }
        let mut out = Vec::new();
        for step in &steps.value {
            match parse_step(step) {
                Ok(s) => out.push(s),
                Err(m) => self.report(step.line, field, format!("`{key}`: {m}")),
            }
        }
        out
    }

    /// DIPV1014 / DIPV1004: every key field is mapped, and bidirectional in a bidirectional map.
    /// A key field whose mapping has problems of its own counts as mapped (it is reported there).
    fn key_fields(
        &mut self,
        raw: &RawMap,
        direction: MapDirection,
        erp: &ErpEntity,
        crm: &CrmEntity,
        fields: &[(&RawField, FieldMapping)],
    ) {
        let raw_fields: &[RawField] = raw.fields.as_ref().map_or(&[], |f| &f.value);
        let sides = [
            (
                Side::Erp,
                &erp.key,
                raw.erp
                    .as_ref()
                    .and_then(|e| e.value.key.as_ref())
                    .map_or(1, |k| k.line),
                "F&O",
            ),
            (
                Side::Crm,
                &crm.key,
                raw.crm
                    .as_ref()
                    .and_then(|c| c.value.key.as_ref())
                    .map_or(1, |k| k.line),
                "Dataverse",
            ),
        ];
        let mut reported_lines = HashSet::new();
        for (side, keys, line, label) in sides {
            for key in keys {
                let named_raw = raw_fields.iter().any(|rf| {
                    let name = if side == Side::Erp { &rf.erp } else { &rf.crm };
                    name.as_ref().is_some_and(|n| &n.value.text == key)
                });
                if !named_raw {
                    self.report(line, None, format!("{label} key field `{key}` is not mapped (DIPV1014); add a field mapping for it"));
                    continue;
                }
                let found = fields
                    .iter()
                    .find(|(_, f)| f.field(side).is_some_and(|r| &r.name == key));
                if let Some((rf, f)) = found
                    && direction == MapDirection::Bidirectional
                    && f.direction != FieldDirection::Bidirectional
                    && reported_lines.insert(rf.line)
                {
                    self.report(rf.line, Some(&rf.label()), format!("key field `{}` must be bidirectional (`=` or `><`) in a bidirectional map (DIPV1004), not `{}`", f.label(), f.notation));
                }
            }
        }
    }

    /// Company-specific maps carry the company in the key, never as a mapped field.
    fn company_fields(
        &mut self,
        erp: &ErpEntity,
        crm: &CrmEntity,
        fields: &[(&RawField, FieldMapping)],
    ) {
        if !erp.company_specific {
            return;
        }
        for (rf, f) in fields {
            let erp_company = f
                .erp
                .as_ref()
                .is_some_and(|e| e.name.eq_ignore_ascii_case("dataAreaId"));
            let crm_company = f
                .crm
                .as_ref()
                .is_some_and(|c| Some(&c.name) == crm.company_field.as_ref());
            if erp_company || crm_company {
                self.report(rf.line, Some(&rf.label()), "the company (`dataAreaId` / `crm.company_field`) is part of the key of a company-specific map and is synced with it; remove this field mapping");
            }
        }
    }

    /// DIPV1023 / DIPV1026: no field is read twice or written twice in one direction.
    fn duplicates(&mut self, fields: &[(&RawField, FieldMapping)]) {
        for from in [Side::Erp, Side::Crm] {
            let mut sources: HashMap<&str, usize> = HashMap::new();
            let mut destinations: HashMap<&str, usize> = HashMap::new();
            let arrow = if from == Side::Erp {
                "F&O→Dataverse"
            } else {
                "Dataverse→F&O"
            };
            for (rf, f) in fields {
                if !f.direction.flows_from(from) {
                    continue;
                }
                // A one-way source may feed several destinations (Microsoft's own units map
                // reads UNITSYMBOL into msdyn_symbol and name); a field read twice both ways
                // would be written twice on the way back.
                if let Some(src) = f.field(from)
                    && f.direction == FieldDirection::Bidirectional
                {
                    if let Some(first) = sources.get(src.name.as_str()) {
                        self.report(rf.line, Some(&rf.label()), format!("source field `{}` is already mapped both ways on line {first} (DIPV1023); a field synced both ways may be mapped once, or it would be written twice on the way back", src.name));
                    } else {
                        sources.insert(&src.name, rf.line);
                    }
                }
                if let Some(dst) = f.field(from.other()) {
                    if let Some(first) = destinations.get(dst.name.as_str()) {
                        self.report(rf.line, Some(&rf.label()), format!("destination field `{}` is already written {arrow} on line {first} (DIPV1026); write each field once", dst.name));
                    } else {
                        destinations.insert(&dst.name, rf.line);
                    }
                }
            }
        }
    }

    fn delete(&mut self, raw: &RawMap, fields: &[FieldMapping]) -> DeletePolicy {
        let Some(d) = &raw.delete else {
            return DeletePolicy::default();
        };
        const WORDS: &str = "`propagate`, `ignore`, `deactivate` or `{deactivate: {crm: {statecode: 1}, erp: {...}}}`";
        let default_deactivate = || DeletePolicy::Deactivate {
            crm: vec![
                ("statecode".into(), Value::Choice(1)),
                ("statuscode".into(), Value::Choice(2)),
            ],
            erp: Vec::new(),
        };
        match &d.value {
            RawNode::Scalar(s) => match s.text.as_str() {
                "propagate" => DeletePolicy::Propagate,
                "ignore" => DeletePolicy::Ignore,
                "deactivate" => default_deactivate(),
                other => {
                    self.report(
                        d.line,
                        None,
                        format!("unknown delete policy `{other}`; write {WORDS}"),
                    );
                    DeletePolicy::default()
                }
            },
            RawNode::Mapping { entries, .. }
                if entries.len() == 1 && entries[0].0.text == "deactivate" =>
            {
                let body = &entries[0].1;
                if matches!(body, RawNode::Scalar(s) if s.is_null()) {
                    return default_deactivate();
                }
                let RawNode::Mapping { entries, .. } = body else {
                    self.report(
                        body.line(),
                        None,
                        format!(
                            "`deactivate` must be a mapping with `crm` and/or `erp`, not {}",
                            body.kind()
                        ),
                    );
                    return DeletePolicy::default();
                };
                let mut crm = Vec::new();
                let mut erp = Vec::new();
                for (k, v) in entries {
                    let side = match k.text.as_str() {
                        "crm" => Side::Crm,
                        "erp" => Side::Erp,
                        other => {
                            self.report(k.line, None, format!("unknown key `{other}` in `deactivate`; the keys allowed here are: crm, erp"));
                            continue;
                        }
                    };
                    let RawNode::Mapping { entries: sets, .. } = v else {
                        self.report(
                            v.line(),
                            None,
                            format!(
                                "`deactivate.{side}` must map field names to values, not {}",
                                v.kind()
                            ),
                        );
                        continue;
                    };
                    for (name, value) in sets {
                        let RawNode::Scalar(value) = value else {
                            self.report(
                                value.line(),
                                None,
                                format!("`deactivate.{side}.{}` must be a single value", name.text),
                            );
                            continue;
                        };
                        let mapped_ty = fields.iter().find_map(|f| {
                            f.field(side).filter(|r| r.name == name.text).map(|r| r.ty)
                        });
                        let parsed = match mapped_ty {
                            Some(ty) => parse_value(value, ty),
                            None => Ok(infer_value(value, side)),
                        };
                        match parsed {
                            Ok(v) => {
                                if side == Side::Crm {
                                    crm.push((name.text.clone(), v))
                                } else {
                                    erp.push((name.text.clone(), v))
                                }
                            }
                            Err(m) => self.report(
                                value.line,
                                None,
                                format!("`deactivate.{side}.{}`: {m}", name.text),
                            ),
                        }
                    }
                }
                DeletePolicy::Deactivate { crm, erp }
            }
            other => {
                self.report(
                    d.line,
                    None,
                    format!("`delete` must be {WORDS}, not {}", other.kind()),
                );
                DeletePolicy::default()
            }
        }
    }
}

/// The value of a `deactivate` field that the map does not map: whole numbers are Dataverse
/// choices / F&O integers, `true`/`false` booleans, other numbers decimals, anything else
/// Dataverse text / an F&O enum symbol.
fn infer_value(s: &RawScalar, side: Side) -> Value {
    if s.is_null() {
        return Value::Null;
    }
    if s.plain {
        if let Ok(i) = s.text.parse::<i64>() {
            return if side == Side::Crm {
                Value::Choice(i)
            } else {
                Value::Integer(i)
            };
        }
        if let Ok(Value::Boolean(b)) = parse_value(s, ValueType::Boolean) {
            return Value::Boolean(b);
        }
        if let Ok(d) = Decimal::from_str(&s.text) {
            return Value::Decimal(d);
        }
    }
    if side == Side::Crm {
        Value::Text(s.text.as_str().into())
    } else {
        Value::Enum(s.text.as_str().into())
    }
}

fn parse_step(step: &RawStep) -> Result<TransformStep, String> {
    const WORDS: &str = "`trim`, `upper`, `lower`, `{truncate: N}`, `{prefix: \"X\"}`, `{strip_prefix: \"X\"}`, `{replace: {from: \"a\", to: \"b\"}}` or `{convert: TYPE}`";
    let name = step.name.text.as_str();
    let text_arg = || match &step.arg {
        Some(RawNode::Scalar(s)) if !s.is_null() => Ok(s.text.clone()),
        _ => Err(format!("`{name}` needs a text, e.g. `{{{name}: \"X\"}}`")),
    };
    let no_arg = |s: TransformStep| match &step.arg {
        None => Ok(s),
        Some(_) => Err(format!("`{name}` takes no argument; write just `{name}`")),
    };
    match name {
        "trim" => no_arg(TransformStep::Trim),
        "upper" => no_arg(TransformStep::Upper),
        "lower" => no_arg(TransformStep::Lower),
        "truncate" => match &step.arg {
            Some(RawNode::Scalar(s)) => match s.text.parse::<usize>() {
                Ok(n) if n > 0 => Ok(TransformStep::Truncate(n)),
                _ => Err(format!("`truncate` needs a positive whole number of characters, not `{}`", s.text)),
            },
            _ => Err("`truncate` needs a number of characters, e.g. `{truncate: 100}`".into()),
        },
        "prefix" => text_arg().map(TransformStep::Prefix),
        "strip_prefix" => text_arg().map(TransformStep::StripPrefix),
        "replace" => {
            let Some(RawNode::Mapping { entries, .. }) = &step.arg else {
                return Err("`replace` needs `{from: \"a\", to: \"b\"}`".into());
            };
            let mut from = None;
            let mut to = None;
            for (k, v) in entries {
                let RawNode::Scalar(v) = v else { return Err(format!("`replace.{}` must be a text", k.text)) };
                match k.text.as_str() {
                    "from" => from = Some(v.text.clone()),
                    "to" => to = Some(if v.is_null() { String::new() } else { v.text.clone() }),
                    other => return Err(format!("unknown key `{other}` in `replace`; the keys allowed here are: from, to")),
                }
            }
            match (from, to) {
                (Some(from), Some(to)) if !from.is_empty() => Ok(TransformStep::Replace { from, to }),
                _ => Err("`replace` needs both a non-empty `from` and a `to`".into()),
            }
        }
        "convert" => match &step.arg {
            Some(RawNode::Scalar(s)) => parse_type(&s.text)
                .filter(|t| *t != ValueType::Lookup)
                .map(TransformStep::Convert)
                .ok_or_else(|| format!("`convert` needs a type (text, integer, decimal, boolean, date, datetime, choice, enum), not `{}`", s.text)),
            _ => Err("`convert` needs a type, e.g. `{convert: integer}`".into()),
        },
        other => {
            let hint = closest(other, &["trim", "upper", "lower", "truncate", "prefix", "strip_prefix", "replace", "convert"])
                .map(|c| format!("did you mean `{c}`? "))
                .unwrap_or_default();
            Err(format!("unknown transform step `{other}`; {hint}write {WORDS}"))
        }
    }
}

/// Unique names, known `depends_on` without cycles, known lookups listed in `depends_on`.
fn cross_map_checks(raws: &[RawMap], diags: &mut Vec<Diagnostic>) {
    physical_names_agree(raws, diags);
    let mut by_name: BTreeMap<&str, &RawMap> = BTreeMap::new();
    for raw in raws {
        let Some(name) = &raw.name else { continue };
        let n = name.value.text.as_str();
        match by_name.get(n) {
            Some(first) => {
                let first_line = first.name.as_ref().map_or(1, |l| l.line);
                diags.push(Diagnostic::new(&raw.file, name.line, Some(n.to_string()), None, format!(
                    "map name `{n}` is already used by {}:{first_line}; map names must be unique, rename one (a user map replacing a shipped one must live in the shipped map's place)",
                    first.file
                )));
            }
            None => {
                by_name.insert(n, raw);
            }
        }
    }
    let known: Vec<&str> = by_name.keys().copied().collect();
    let unknown_hint = |name: &str| {
        closest(name, &known)
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default()
    };

    for raw in raws {
        let Some(map) = raw.name_text() else { continue };
        let deps: HashSet<&str> = raw
            .depends_on
            .iter()
            .flat_map(|d| d.value.iter().map(|s| s.text.as_str()))
            .collect();
        if let Some(d) = &raw.depends_on {
            for dep in &d.value {
                if !by_name.contains_key(dep.text.as_str()) {
                    diags.push(Diagnostic::new(&raw.file, dep.line, Some(map.to_string()), None, format!(
                        "depends_on names `{}`, which is not a known map{}; fix the name or add that map",
                        dep.text, unknown_hint(&dep.text)
                    )));
                }
            }
        }
        for f in raw.fields.iter().flat_map(|f| f.value.iter()) {
            let Some(lookup) = &f.lookup else { continue };
            for target in &lookup.value {
                let t = target.text.as_str();
                if !by_name.contains_key(t) {
                    diags.push(Diagnostic::new(&raw.file, lookup.line, Some(map.to_string()), Some(f.label()), format!(
                        "lookup names `{t}`, which is not a known map{}; fix the name or add that map", unknown_hint(t)
                    )));
                } else if t != map && !deps.contains(t) {
                    diags.push(Diagnostic::new(&raw.file, lookup.line, Some(map.to_string()), Some(f.label()), format!(
                        "lookup map `{t}` is not in depends_on; add it to `depends_on` so its records are synced first"
                    )));
                }
            }
        }
    }

    // Cycles: depth-first search over known names; each cycle is reported once, at the
    // `depends_on` of its alphabetically first map.
    let graph: BTreeMap<&str, Vec<&str>> = by_name
        .iter()
        .map(|(n, raw)| {
            let deps = raw
                .depends_on
                .iter()
                .flat_map(|d| d.value.iter().map(|s| s.text.as_str()))
                .filter(|d| by_name.contains_key(d))
                .collect();
            (*n, deps)
        })
        .collect();
    let mut reported: HashSet<Vec<&str>> = HashSet::new();
    let mut done: HashSet<&str> = HashSet::new();
    for start in graph.keys() {
        let mut stack: Vec<&str> = Vec::new();
        find_cycles(start, &graph, &mut stack, &mut done, &mut |cycle: Vec<
            &str,
        >| {
            let min = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, n)| **n)
                .map_or(0, |(i, _)| i);
            let mut rotated: Vec<&str> = cycle[min..]
                .iter()
                .chain(cycle[..min].iter())
                .copied()
                .collect();
            if reported.insert(rotated.clone()) {
                let raw = by_name[rotated[0]];
                let line = raw.depends_on.as_ref().map_or(1, |d| d.line);
                rotated.push(rotated[0]);
                diags.push(Diagnostic::new(&raw.file, line, Some(rotated[0].to_string()), None, format!(
                    "depends_on forms a cycle: {}; a map cannot depend on itself, directly or through others; remove one of these dependencies",
                    rotated.join(" -> ")
                )));
            }
        });
    }
}

/// Maps of one F&O entity may not give it different physical names: the receivers would know
/// its data events by only one of them.
fn physical_names_agree(raws: &[RawMap], diags: &mut Vec<Diagnostic>) {
    let mut first: BTreeMap<&str, (&str, &RawMap, usize)> = BTreeMap::new();
    for raw in raws {
        let Some(erp) = &raw.erp else { continue };
        let (Some(entity), Some(physical)) = (&erp.value.entity, &erp.value.physical_name) else {
            continue;
        };
        let (entity, name) = (entity.value.text.as_str(), physical.value.text.as_str());
        match first.get(entity) {
            Some((earlier, file, line)) if !earlier.eq_ignore_ascii_case(name) => {
                diags.push(Diagnostic::new(
                    &raw.file,
                    physical.line,
                    raw.name_text().map(str::to_string),
                    None,
                    format!(
                        "`physical_name: {name}` differs from `{earlier}` given for {entity} in {}:{line}; one entity has one physical name, give the same in both maps",
                        file.file
                    ),
                ));
            }
            Some(_) => {}
            None => {
                first.insert(entity, (name, raw, physical.line));
            }
        }
    }
}

fn find_cycles<'a>(
    node: &'a str,
    graph: &BTreeMap<&'a str, Vec<&'a str>>,
    stack: &mut Vec<&'a str>,
    done: &mut HashSet<&'a str>,
    on_cycle: &mut impl FnMut(Vec<&'a str>),
) {
    if let Some(pos) = stack.iter().position(|n| *n == node) {
        on_cycle(stack[pos..].to_vec());
        return;
    }
    if done.contains(node) {
        return;
    }
    stack.push(node);
    for next in graph.get(node).into_iter().flatten() {
        find_cycles(next, graph, stack, done, on_cycle);
    }
    stack.pop();
    done.insert(node);
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURRENCIES: &str = "\
name: currencies
erp: { entity: Currencies, key: [CurrencyCode], company_specific: false }
crm: { entity_set: transactioncurrencies, logical_name: transactioncurrency, key: [isocurrencycode] }
fields:
  - { erp: CurrencyCode, crm: isocurrencycode, dir: \"=\" }
";

    /// A valid map; field mappings added by a test start on line 14.
    const BASE: &str = "\
name: customers
depends_on: [currencies]
erp:
  entity: CustomersV3
  key: [CustomerAccount]
crm:
  entity_set: accounts
  logical_name: account
  key: [accountnumber]
  company_field: msdyn_company
fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: \"=\" }
  - { erp: Name, crm: name, dir: \"=\" }
";

    fn files(texts: &[(&str, &str)]) -> Vec<(String, String)> {
        texts
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect()
    }

    /// Loads `text` as `m.yaml` beside the currencies map and returns its diagnostics.
    fn errors_of(text: &str) -> Vec<Diagnostic> {
        match load_maps(&files(&[
            ("m.yaml", text),
            ("z-currencies.yaml", CURRENCIES),
        ])) {
            Ok(_) => Vec::new(),
            Err(d) => d,
        }
    }

    /// BASE with extra field lines (starting on line 14).
    fn with_fields(extra: &str) -> String {
        format!("{BASE}{extra}")
    }

    fn load_one(text: &str) -> TableMap {
        let maps = load_maps(&files(&[
            ("m.yaml", text),
            ("z-currencies.yaml", CURRENCIES),
        ]))
        .unwrap_or_else(|d| {
            panic!(
                "{}",
                d.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        maps.into_iter().find(|m| m.source == "m.yaml").unwrap()
    }

    /// Asserts exactly one diagnostic, on `line`, whose text contains every word of `words`.
    #[track_caller]
    fn assert_one(diags: &[Diagnostic], line: usize, words: &[&str]) {
        let all: Vec<String> = diags.iter().map(ToString::to_string).collect();
        assert_eq!(diags.len(), 1, "expected one diagnostic, got {all:#?}");
        assert_eq!(diags[0].line, line, "{}", all[0]);
        for w in words {
            assert!(all[0].contains(w), "`{w}` missing from: {}", all[0]);
        }
    }

    #[test]
    fn erp_physical_name_is_optional_and_checked() {
        assert_eq!(load_one(&with_fields("")).erp.physical_name, None);
        let named = BASE.replace(
            "  key: [CustomerAccount]\n",
            "  key: [CustomerAccount]\n  physical_name: CustCustomerV3Entity\n",
        );
        let map = load_one(&named);
        assert_eq!(
            map.erp.physical_name.as_deref(),
            Some("CustCustomerV3Entity")
        );
        assert_eq!(
            map.erp.virtual_entity_names(),
            ["mserp_custcustomerv3entity", "mserp_customersv3"]
        );
        let bad = BASE.replace(
            "  key: [CustomerAccount]\n",
            "  key: [CustomerAccount]\n  physical_name: \"Cust Customer\"\n",
        );
        assert_one(
            &errors_of(&bad),
            6,
            &[
                "physical_name: Cust Customer",
                "AOT name",
                "CustCustomerV3Entity",
            ],
        );

        // Two maps of one entity must agree on its physical name.
        let other = |physical: &str| {
            format!(
                "name: other\nerp:\n  entity: CustomersV3\n  key: [CustomerAccount]\n  company_specific: false\n  physical_name: {physical}\ncrm: {{ entity_set: contacts, logical_name: contact, key: [accountnumber] }}\nfields:\n  - {{ erp: CustomerAccount, crm: accountnumber, dir: \"=\" }}\n"
            )
        };
        let load = |second: &str| {
            load_maps(&files(&[
                ("m.yaml", named.as_str()),
                ("n.yaml", second),
                ("z-currencies.yaml", CURRENCIES),
            ]))
        };
        assert!(
            load(&other("custcustomerv3entity")).is_ok(),
            "case aside, the same"
        );
        let diags = load(&other("CustCustomerV2Entity")).unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:#?}");
        assert_eq!((diags[0].file.as_str(), diags[0].line), ("n.yaml", 6));
        assert!(
            diags[0]
                .to_string()
                .contains("differs from `CustCustomerV3Entity`"),
            "{}",
            diags[0]
        );
    }

    const DOC_EXAMPLE: &str = r#"name: customers-v3-accounts
description: Customers V3 (organizations) <-> accounts
direction: bidirectional           # bidirectional | erp_to_crm | crm_to_erp (or = > <)
depends_on: [legal-entities, currencies, customer-groups, payment-terms]
conflict: last_writer_wins         # last_writer_wins | crm_wins | erp_wins | field_level | manual
delete: propagate                  # propagate | ignore | deactivate (or {deactivate: {crm: {...}, erp: {...}}})

erp:
  entity: CustomersV3              # F&O OData entity set
  key: [CustomerAccount]           # natural key, without dataAreaId
  company_specific: true           # dataAreaId is part of the key (default true)
  filter: "PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'"
  physical_name: CustCustomerV3Entity  # AOT name: data events name mserp_custcustomerv3entity

crm:
  entity_set: accounts
  logical_name: account
  primary_id: accountid            # default: <logical_name>id
  key: [accountnumber]             # alternate key, without the company
  company_field: msdyn_company     # lookup to cdm_companies; required when company_specific
  filter: "customertypecode eq 3"

fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: "=" }          # type defaults to text
  - { erp: OrganizationName, crm: name, dir: "=" }
  - { erp: CreditLimit, crm: creditlimit, dir: "=", type: decimal }
  - { erp: SalesCurrencyCode, crm: transactioncurrencyid, dir: "=", crm_type: lookup, lookup: currencies }
  - erp: CreditLimitIsMandatory
    crm: msdyn_creditlimitismandatory
    dir: "><"
    erp_type: enum
    crm_type: boolean
    value_map: { "No": false, "Yes": true }
  - { erp: PartyType, dir: "<<", erp_type: enum, default: Organization }   # constant to F&O
  - { crm: customertypecode, dir: ">>", crm_type: choice, default: 3 }      # constant to Dataverse
  - { erp: SalesMemo, crm: description, dir: "=", to_crm: [trim, {truncate: 2000}] }
"#;

    fn stub(name: &str) -> String {
        format!(
            "name: {name}\nerp: {{ entity: E{n}, key: [Id], company_specific: false }}\ncrm: {{ entity_set: s{n}, logical_name: l{n}, key: [id] }}\nfields:\n  - {{ erp: Id, crm: id, dir: \"=\" }}\n",
            n = name.len()
        )
    }

    #[test]
    fn the_example_in_map_format_md_validates_clean() {
        let mut all = vec![("maps/customers.yaml".to_string(), DOC_EXAMPLE.to_string())];
        for n in [
            "legal-entities",
            "currencies",
            "customer-groups",
            "payment-terms",
        ] {
            all.push((format!("maps/{n}.yaml"), stub(n)));
        }
        let maps = load_maps(&all).unwrap_or_else(|d| panic!("{d:#?}"));
        let m = &maps[0];
        assert_eq!(m.name, "customers-v3-accounts");
        assert_eq!(m.source, "maps/customers.yaml");
        assert_eq!(m.crm.primary_id, "accountid");
        assert!(m.erp.company_specific);
        assert_eq!(m.erp.physical_name.as_deref(), Some("CustCustomerV3Entity"));
        assert_eq!(m.depends_on.len(), 4);
        assert_eq!(m.fields.len(), 8);
        let f = |name: &str| m.fields.iter().find(|f| f.label().contains(name)).unwrap();
        assert!(f("CustomerAccount").is_key && !f("OrganizationName").is_key);
        assert_eq!(f("CustomerAccount").line, 24);
        assert_eq!(
            f("CreditLimit ").erp.as_ref().unwrap().ty,
            ValueType::Decimal
        );
        assert_eq!(
            f("SalesCurrencyCode").lookup,
            Some(LookupSpec {
                maps: vec!["currencies".into()]
            })
        );
        let vm = f("CreditLimitIsMandatory").value_map.as_ref().unwrap();
        assert_eq!(
            vm.pairs[1],
            (Value::Enum("Yes".into()), Value::Boolean(true))
        );
        assert_eq!(f("CreditLimitIsMandatory").notation, "><");
        assert_eq!(
            f("PartyType").default,
            Some(Value::Enum("Organization".into()))
        );
        assert_eq!(f("PartyType").direction, FieldDirection::CrmToErp);
        assert_eq!(f("customertypecode").default, Some(Value::Choice(3)));
        assert_eq!(
            f("SalesMemo").to_crm,
            vec![TransformStep::Trim, TransformStep::Truncate(2000)]
        );
        assert_eq!(
            m.filters.erp.as_ref().unwrap().to_odata(),
            "PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'"
        );
        assert_eq!(
            m.filters.crm.as_ref().unwrap().to_odata(),
            "customertypecode eq 3"
        );
    }

    #[test]
    fn diagnostics_display_file_line_map_and_field() {
        let d = Diagnostic::new("a.yaml", 3, Some("m".into()), Some("F".into()), "bad");
        assert_eq!(d.to_string(), "a.yaml:3: map \"m\", field \"F\": bad");
        assert_eq!(
            Diagnostic::new("a.yaml", 3, Some("m".into()), None, "bad").to_string(),
            "a.yaml:3: map \"m\": bad"
        );
        assert_eq!(
            Diagnostic::new("a.yaml", 1, None, None, "bad").to_string(),
            "a.yaml:1: bad"
        );
    }

    #[test]
    fn defaults_and_word_notation() {
        let text = BASE
            .replace("  company_field: msdyn_company\n", "")
            .replace(
                "  key: [CustomerAccount]\n",
                "  key: CustomerAccount\n  company_specific: false\n",
            )
            + "  - { erp: Memo, crm: description, dir: erp_to_crm }\n  - { erp: Note, crm: note, dir: crm_to_erp }\n  - { erp: Other, crm: other, dir: bidirectional }\n";
        let m = load_one(&text);
        assert_eq!(m.crm.primary_id, "accountid");
        assert!(!m.erp.company_specific);
        assert_eq!(m.crm.company_field, None);
        assert_eq!(m.direction, MapDirection::Bidirectional);
        assert_eq!(m.conflict, ConflictPolicy::LastWriterWins);
        assert_eq!(m.delete, DeletePolicy::Propagate);
        let notations: Vec<&str> = m.fields.iter().map(|f| f.notation.as_str()).collect();
        assert_eq!(notations, ["=", "=", ">", "<", "="]);
        assert_eq!(m.fields[2].direction, FieldDirection::ErpToCrm);
    }

    #[test]
    fn yaml_syntax_errors_are_reported_with_line() {
        let d = errors_of("name: m\nfields: [\n");
        assert_eq!(d.len(), 1);
        assert!(
            d[0].message.contains("YAML syntax error at column"),
            "{}",
            d[0]
        );
        assert_eq!(d[0].file, "m.yaml");
    }

    #[test]
    fn unknown_keys_are_reported() {
        let d = errors_of(&with_fields(
            "  - { erp: A, crm: a, dir: \"=\", typ: text }\n",
        ));
        assert_one(
            &d,
            14,
            &["field \"A\"", "unknown key `typ`", "did you mean `type`"],
        );
    }

    #[test]
    fn missing_required_keys_are_reported() {
        let d = errors_of("description: nothing else\n");
        let messages: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 4, "{messages:#?}");
        assert!(messages.iter().any(|m| m.contains("no `name`")));
        assert!(messages.iter().any(|m| m.contains("no `erp` section")));
        assert!(messages.iter().any(|m| m.contains("no `crm` section")));
        assert!(messages.iter().any(|m| m.contains("no `fields`")));

        let d = errors_of(
            &BASE
                .replace("  entity: CustomersV3\n", "")
                .replace("  logical_name: account\n", ""),
        );
        assert_eq!(d.len(), 2, "{d:#?}");
        assert_eq!((d[0].line, d[1].line), (3, 5));
        assert!(d[0].message.contains("`erp.entity` is missing"));
        assert!(d[1].message.contains("`crm.logical_name` is missing"));

        let d = errors_of(&with_fields("  - { erp: A, crm: a }\n"));
        assert_one(&d, 14, &["no `dir`"]);
    }

    #[test]
    fn bad_words_are_reported() {
        let d = errors_of(&BASE.replace(
            "depends_on",
            "direction: sideways\nconflict: coin_toss\ndelete: shred\ndepends_on",
        ));
        assert_eq!(d.len(), 3, "{d:#?}");
        assert!(d[0].line == 2 && d[0].message.contains("unknown direction `sideways`"));
        assert!(d[1].line == 3 && d[1].message.contains("unknown conflict policy `coin_toss`"));
        assert!(d[2].line == 4 && d[2].message.contains("unknown delete policy `shred`"));

        let d = errors_of(&with_fields("  - { erp: A, crm: a, dir: \"=>\" }\n"));
        assert_one(&d, 14, &["unknown direction `=>`"]);
        let d = errors_of(&with_fields(
            "  - { erp: A, crm: a, dir: \"=\", type: txt }\n",
        ));
        assert_one(&d, 14, &["unknown type `txt`", "did you mean `text`"]);
        let d = errors_of(&with_fields(
            "  - erp: A\n    crm: a\n    dir: \">\"\n    to_crm: [trim, uper]\n",
        ));
        assert_one(
            &d,
            17,
            &["unknown transform step `uper`", "did you mean `upper`"],
        );
        let d = errors_of(&with_fields(
            "  - { erp: A, crm: a, dir: \">\", to_crm: [{truncate: -1}] }\n",
        ));
        assert_one(&d, 14, &["positive whole number"]);
        let d = errors_of(&with_fields(
            "  - { erp: A, crm: a, dir: \">\", to_crm: [{convert: money}] }\n",
        ));
        assert_one(&d, 14, &["`convert` needs a type", "`money`"]);
    }

    #[test]
    fn a_side_without_integration_key_is_reported() {
        let d = errors_of(&BASE.replace("  key: [accountnumber]\n", ""));
        assert_one(
            &d,
            6,
            &[
                "no integration key on the Dataverse side",
                "DIPV1003",
                "key: [",
            ],
        );
        let d = errors_of(&BASE.replace("  key: [CustomerAccount]\n", "  key: []\n"));
        assert_one(&d, 5, &["no integration key on the F&O side"]);
    }

    #[test]
    fn key_fields_must_be_mapped_and_bidirectional() {
        let d = errors_of(&BASE.replace(
            "  key: [accountnumber]",
            "  key: [accountnumber, msdyn_code]",
        ));
        assert_one(
            &d,
            9,
            &["Dataverse key field `msdyn_code` is not mapped", "DIPV1014"],
        );
        let d = errors_of(&BASE.replace(
            "crm: accountnumber, dir: \"=\"",
            "crm: accountnumber, dir: \">\"",
        ));
        assert_one(
            &d,
            12,
            &[
                "key field `CustomerAccount > accountnumber` must be bidirectional",
                "DIPV1004",
                "not `>`",
            ],
        );
    }

    #[test]
    fn fields_written_or_read_twice_are_reported() {
        let d = errors_of(&with_fields("  - { erp: Other, crm: name, dir: \">\" }\n"));
        assert_one(
            &d,
            14,
            &[
                "destination field `name` is already written F&O→Dataverse on line 13",
                "DIPV1026",
            ],
        );
        let d = errors_of(&with_fields("  - { erp: Name, crm: other, dir: \"<\" }\n"));
        assert_one(
            &d,
            14,
            &["destination field `Name` is already written Dataverse→F&O on line 13"],
        );
        let d = errors_of(&with_fields("  - { erp: Name, crm: name2, dir: \"=\" }\n"));
        assert!(
            d.iter().any(|x| x.line == 14
                && x.message
                    .contains("source field `Name` is already mapped both ways on line 13")
                && x.message.contains("DIPV1023")),
            "{d:#?}"
        );
        // One way, a source may feed two destinations (UNITSYMBOL > msdyn_symbol & > name).
        let d = errors_of(&with_fields("  - { erp: Name, crm: name2, dir: \">\" }\n"));
        assert!(d.iter().all(|x| !x.message.contains("DIPV1023")), "{d:#?}");
    }

    #[test]
    fn duplicate_value_map_entries_are_reported_on_either_side() {
        let d = errors_of(&with_fields(
            "  - erp: Status\n    crm: statuscode\n    dir: \"=\"\n    erp_type: enum\n    crm_type: choice\n    value_map:\n      Open: 1\n      Closed: 2\n      Cancelled: 2\n",
        ));
        assert_one(
            &d,
            22,
            &[
                "Dataverse value `2` appears twice in value_map (first on line 21",
                "DIPV1029",
            ],
        );
        let d = errors_of(&with_fields(
            "  - { erp: Qty, crm: qty, dir: \"=\", erp_type: integer, crm_type: text, value_map: { 1: one, 01: uno } }\n",
        ));
        assert_one(&d, 14, &["F&O value `1` appears twice"]);
    }

    #[test]
    fn lookups_must_name_known_maps_listed_in_depends_on() {
        let d = errors_of(&with_fields(
            "  - { erp: Cur, crm: transactioncurrencyid, dir: \"=\", crm_type: lookup, lookup: currency }\n",
        ));
        assert_one(
            &d,
            14,
            &[
                "lookup names `currency`, which is not a known map",
                "did you mean `currencies`",
            ],
        );
        let text = with_fields("  - { erp: Cur, crm: transactioncurrencyid, dir: \"=\", crm_type: lookup, lookup: currencies }\n")
            .replace("depends_on: [currencies]\n", "");
        let d = errors_of(&text);
        assert_one(&d, 13, &["lookup map `currencies` is not in depends_on"]);
        let d = errors_of(&with_fields(
            "  - { erp: Cur, crm: transactioncurrencyid, dir: \"=\", lookup: currencies }\n",
        ));
        assert_one(&d, 14, &["add `crm_type: lookup`"]);
        let d = errors_of(&with_fields(
            "  - { erp: Cur, crm: transactioncurrencyid, dir: \"=\", crm_type: lookup }\n",
        ));
        assert_one(&d, 14, &["needs `lookup: <map name>`"]);
    }

    #[test]
    fn lookup_accepts_a_name_or_a_list_and_may_point_at_its_own_map() {
        let text = with_fields(
            "  - { erp: Cur, crm: transactioncurrencyid, dir: \"=\", crm_type: lookup, lookup: [currencies, customers] }\n",
        );
        let m = load_one(&text);
        assert_eq!(
            m.fields[2].lookup.as_ref().unwrap().maps,
            ["currencies", "customers"]
        );
    }

    #[test]
    fn types_must_agree() {
        let d = errors_of(&with_fields(
            "  - { erp: Qty, crm: qty, dir: \"=\", erp_type: integer, crm_type: decimal }\n",
        ));
        assert_one(
            &d,
            14,
            &[
                "types differ (DIPV1030)",
                "F&O `Qty` is integer",
                "Dataverse `qty` is decimal",
                "`to_crm: [{convert: decimal}]` and `to_erp: [{convert: integer}]`",
            ],
        );
        let d = errors_of(&with_fields(
            "  - { erp: Qty, crm: qty, dir: \">\", erp_type: integer, crm_type: decimal, to_crm: [{convert: decimal}] }\n",
        ));
        assert!(d.is_empty(), "{d:#?}");
        let d = errors_of(&with_fields(
            "  - { erp: Flag, crm: flag, dir: \"=\", erp_type: enum, crm_type: boolean, value_map: { \"No\": nope } }\n",
        ));
        assert_one(
            &d,
            14,
            &["value_map Dataverse value `nope` is not a valid boolean"],
        );
        let d = errors_of(&with_fields(
            "  - { crm: code, dir: \">>\", crm_type: choice, default: three }\n",
        ));
        assert_one(&d, 14, &["default `three` is not a valid choice"]);
        let d = errors_of(&with_fields(
            "  - { crm: when, dir: \">>\", crm_type: datetime, default: \"2026-05-01\" }\n",
        ));
        assert_one(&d, 14, &["not a valid datetime", "RFC 3339"]);
    }

    #[test]
    fn scalars_parse_into_the_declared_type_exactly() {
        let s = |text: &str, plain: bool| RawScalar {
            text: text.into(),
            plain,
            line: 1,
            column: 1,
        };
        assert_eq!(
            parse_value(&s("0.1000000000000000000001", true), ValueType::Decimal),
            Ok(Value::Decimal(
                Decimal::from_str("0.1000000000000000000001").unwrap()
            ))
        );
        assert_eq!(
            parse_value(&s("42", true), ValueType::Text),
            Ok(Value::Text("42".into()))
        );
        assert_eq!(
            parse_value(&s("True", true), ValueType::Boolean),
            Ok(Value::Boolean(true))
        );
        assert_eq!(
            parse_value(&s("2026-05-01", true), ValueType::Date),
            Ok(Value::Date(NaiveDate::from_ymd_opt(2026, 5, 1).unwrap()))
        );
        assert!(matches!(
            parse_value(&s("2026-05-01T10:00:00+02:00", true), ValueType::DateTime),
            Ok(Value::DateTime(_))
        ));
        assert_eq!(
            parse_value(&s("~", true), ValueType::Integer),
            Ok(Value::Null)
        );
        assert_eq!(
            parse_value(&s("~", false), ValueType::Text),
            Ok(Value::Text("~".into()))
        );
        assert!(parse_value(&s("1.5", true), ValueType::Integer).is_err());
        assert!(parse_value(&s("x", true), ValueType::Lookup).is_err());
    }

    #[test]
    fn depends_on_must_be_known_and_acyclic() {
        let d = errors_of(&BASE.replace(
            "depends_on: [currencies]",
            "depends_on: [currencies, curencies]",
        ));
        assert_one(
            &d,
            2,
            &["depends_on names `curencies`, which is not a known map"],
        );

        let a = BASE
            .replace("depends_on: [currencies]", "depends_on: [b-map]")
            .replace("name: customers", "name: a-map");
        let b = CURRENCIES.replace("name: currencies", "name: b-map\ndepends_on: [c-map]");
        let c = CURRENCIES.replace("name: currencies", "name: c-map\ndepends_on: [a-map]");
        let d = load_maps(&files(&[("a.yaml", &a), ("b.yaml", &b), ("c.yaml", &c)])).unwrap_err();
        assert_one(
            &d,
            2,
            &[
                "a.yaml:2: map \"a-map\"",
                "depends_on forms a cycle: a-map -> b-map -> c-map -> a-map",
            ],
        );

        let selfish = BASE.replace("depends_on: [currencies]", "depends_on: [customers]");
        let d = load_maps(&files(&[("s.yaml", &selfish)])).unwrap_err();
        assert_one(&d, 2, &["cycle: customers -> customers"]);
    }

    #[test]
    fn a_field_without_source_needs_a_default() {
        let d = errors_of(&with_fields(
            "  - { crm: customertypecode, dir: \">>\", crm_type: choice }\n",
        ));
        assert_one(&d, 14, &["no `erp` source and no `default`", "DIPV1031"]);
        let d = errors_of(&with_fields("  - { erp: A, dir: \">\" }\n"));
        assert_one(&d, 14, &["flows to crm but has no `crm` name"]);
        let d = errors_of(&with_fields("  - { erp: A, dir: \"=\", default: x }\n"));
        assert_one(
            &d,
            14,
            &["a bidirectional field needs both `erp` and `crm`"],
        );
    }

    #[test]
    fn field_direction_must_fit_the_map_direction() {
        let text = BASE
            .replace("depends_on", "direction: erp_to_crm\ndepends_on")
            .replace("crm: name, dir: \"=\"", "crm: name, dir: \">\"");
        let d = errors_of(&text);
        assert_eq!(d.len(), 1, "{d:#?}");
        assert!(
            d[0].line == 13
                && d[0]
                    .message
                    .contains("`dir: =` is not allowed in a map whose direction is erp_to_crm"),
            "{}",
            d[0]
        );
    }

    #[test]
    fn field_level_conflicts_need_source_of_truth() {
        let text = BASE.replace("depends_on", "conflict: field_level\ndepends_on");
        let d = errors_of(&text);
        assert_one(
            &d,
            14,
            &["field \"Name\"", "needs `source_of_truth: crm` or `erp`"],
        );
        let fixed = text.replace(
            "crm: name, dir: \"=\"",
            "crm: name, dir: \"=\", source_of_truth: crm",
        );
        assert_eq!(load_one(&fixed).fields[1].source_of_truth, Some(Side::Crm));
        let d = errors_of(&BASE.replace(
            "crm: name, dir: \"=\"",
            "crm: name, dir: \"=\", source_of_truth: erp",
        ));
        assert_one(&d, 13, &["only used with `conflict: field_level`"]);
    }

    #[test]
    fn map_names_must_be_unique_across_files() {
        let d = load_maps(&files(&[("a.yaml", CURRENCIES), ("b.yaml", CURRENCIES)])).unwrap_err();
        assert_one(
            &d,
            1,
            &[
                "b.yaml:1",
                "map name `currencies` is already used by a.yaml:1",
            ],
        );
    }

    #[test]
    fn bad_filters_are_reported_with_position() {
        let d = errors_of(&BASE.replace(
            "  key: [accountnumber]",
            "  key: [accountnumber]\n  filter: \"statecode eq 0 and\"",
        ));
        assert_one(
            &d,
            10,
            &[
                "`crm.filter` does not parse at column 19",
                "expected a condition",
            ],
        );
    }

    #[test]
    fn an_f_and_o_enum_filtered_by_plain_text_is_refused_naming_the_literal_to_write() {
        let party = "  - { erp: PartyType, crm: customertypecode, dir: \"=\", erp_type: enum, crm_type: choice, value_map: { Organization: 3, Person: 1 } }\n";
        let untyped = with_fields(party).replace(
            "  key: [CustomerAccount]\n",
            "  key: [CustomerAccount]\n  filter: \"PartyType eq 'Organization' and Name ne ''\"\n",
        );
        assert_one(
            &errors_of(&untyped),
            6,
            &[
                "PartyType",
                "'Organization'",
                "Microsoft.Dynamics.DataEntities.<EnumType>'Organization'",
            ],
        );
        // The typed literal, and NoYes symbols (which the connector types), load.
        for ok in [
            "PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'",
            "PartyType ne 'No'",
        ] {
            let typed = with_fields(party).replace(
                "  key: [CustomerAccount]\n",
                &format!("  key: [CustomerAccount]\n  filter: \"{ok}\"\n"),
            );
            assert_eq!(errors_of(&typed), Vec::new(), "{ok}");
        }
        // Dataverse has no enum literals.
        let crm = BASE.replace(
            "  key: [accountnumber]",
            "  key: [accountnumber]\n  filter: \"statecode eq Microsoft.Dynamics.CRM.State'Active'\"",
        );
        assert_one(
            &errors_of(&crm),
            10,
            &["`crm.filter`", "statecode", "number"],
        );
    }

    #[test]
    fn company_specific_maps_need_a_company_field_and_do_not_map_the_company() {
        let d = errors_of(&BASE.replace("  company_field: msdyn_company\n", ""));
        assert_one(
            &d,
            3,
            &["company-specific but `crm.company_field` is missing"],
        );
        let d = errors_of(&with_fields(
            "  - { erp: dataAreaId, crm: msdyn_company, dir: \"=\" }\n",
        ));
        assert_one(&d, 14, &["part of the key of a company-specific map"]);
    }

    #[test]
    fn deactivate_defaults_to_dataverse_state_and_status() {
        let m = load_one(&BASE.replace("depends_on", "delete: deactivate\ndepends_on"));
        assert_eq!(
            m.delete,
            DeletePolicy::Deactivate {
                crm: vec![
                    ("statecode".into(), Value::Choice(1)),
                    ("statuscode".into(), Value::Choice(2))
                ],
                erp: vec![],
            }
        );
        let text = BASE.replace("depends_on", "delete: { deactivate: { crm: { statecode: 1, name: gone }, erp: { Blocked: All } } }\ndepends_on");
        let m = load_one(&text);
        assert_eq!(
            m.delete,
            DeletePolicy::Deactivate {
                crm: vec![
                    ("statecode".into(), Value::Choice(1)),
                    ("name".into(), Value::Text("gone".into()))
                ],
                erp: vec![("Blocked".into(), Value::Enum("All".into()))],
            }
        );
        let d = errors_of(&BASE.replace(
            "depends_on",
            "delete: { deactivate: { dataverse: {} } }\ndepends_on",
        ));
        assert_one(&d, 2, &["unknown key `dataverse` in `deactivate`"]);
    }

    #[test]
    fn a_file_with_many_faults_reports_all_of_them_sorted() {
        let text = "\
name: Bad_Name
direction: sideways
depends_on: [nowhere]
erp:
  entity: CustomersV3
  key: [CustomerAccount]
  colour: blue
crm:
  entity_set: accounts
  logical_name: account
  key: [accountnumber]
  company_field: msdyn_company
  filter: \"name eq\"
fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: \">\" }
  - { erp: Qty, crm: qty, dir: \"=\", erp_type: integer, crm_type: text }
  - { crm: code, dir: \">>\", crm_type: choice }
  - { erp: Cur, crm: cur, dir: \"=\", crm_type: lookup, lookup: nope }
";
        let d = load_maps(&files(&[("bad.yaml", text)])).unwrap_err();
        let got: Vec<(usize, String)> = d.iter().map(|d| (d.line, d.message.clone())).collect();
        let expect: &[(usize, &str)] = &[
            (1, "may only use lower-case letters"),
            (2, "unknown direction `sideways`"),
            (3, "depends_on names `nowhere`"),
            (7, "unknown key `colour`"),
            (13, "`crm.filter` does not parse"),
            (15, "must be bidirectional"),
            (16, "types differ"),
            (17, "no `erp` source and no `default`"),
            (18, "lookup names `nope`"),
        ];
        assert_eq!(got.len(), expect.len(), "{got:#?}");
        for ((line, message), (want_line, want)) in got.iter().zip(expect) {
            assert_eq!(line, want_line, "{message}");
            assert!(message.contains(want), "`{want}` missing from {message}");
        }
        assert!(
            d.iter()
                .all(|d| d.file == "bad.yaml" && d.map.as_deref() == Some("Bad_Name"))
        );
    }
}
