//! The raw form of a map file: its YAML read into structs that keep the line of every key,
//! with YAML syntax errors, unknown keys and wrong shapes (a list where a name belongs) reported.
//!
//! Nothing here knows what the words mean; [`super::validate`] turns a [`RawMap`] into a
//! [`super::TableMap`]. Values whose type depends on the field (defaults, value-map entries,
//! transform arguments) stay [`RawScalar`]/[`RawNode`] until then.

use marked_yaml::{LoadError, LoaderOptions, Node};

use super::validate::Diagnostic;

/// A YAML scalar with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawScalar {
    /// The scalar's text, as written (without quotes).
    pub text: String,
    /// True when written without quotes (so `null`, `~` and an empty value mean null).
    pub plain: bool,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl RawScalar {
    /// True for an unquoted `null`, `~` or empty value.
    pub fn is_null(&self) -> bool {
        self.plain && matches!(self.text.as_str(), "" | "~" | "null" | "Null" | "NULL")
    }
}

/// Any YAML node, with positions; used for the parts of a map whose shape varies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawNode {
    Scalar(RawScalar),
    List {
        items: Vec<RawNode>,
        line: usize,
    },
    Mapping {
        entries: Vec<(RawScalar, RawNode)>,
        line: usize,
    },
}

impl RawNode {
    /// 1-based line where the node starts.
    pub fn line(&self) -> usize {
        match self {
            RawNode::Scalar(s) => s.line,
            RawNode::List { line, .. } | RawNode::Mapping { line, .. } => *line,
        }
    }

    /// `a value`, `a list` or `a mapping`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            RawNode::Scalar(_) => "a single value",
            RawNode::List { .. } => "a list",
            RawNode::Mapping { .. } => "a mapping",
        }
    }
}

/// A value together with the line of the key that introduced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    /// 1-based line of the key.
    pub line: usize,
    pub value: T,
}

/// One map file, raw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawMap {
    /// The file name the text came from.
    pub file: String,
    pub name: Option<Located<RawScalar>>,
    pub description: Option<Located<RawScalar>>,
    pub direction: Option<Located<RawScalar>>,
    pub depends_on: Option<Located<Vec<RawScalar>>>,
    pub conflict: Option<Located<RawScalar>>,
    /// A word (`propagate`, `ignore`, `deactivate`) or `{deactivate: {crm: {...}, erp: {...}}}`.
    pub delete: Option<Located<RawNode>>,
    pub erp: Option<Located<RawErp>>,
    pub crm: Option<Located<RawCrm>>,
    pub fields: Option<Located<Vec<RawField>>>,
}

impl RawMap {
    /// The map's name as written, if it is a plain value.
    pub fn name_text(&self) -> Option<&str> {
        self.name.as_ref().map(|n| n.value.text.as_str())
    }
}

/// The `erp:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawErp {
    pub entity: Option<Located<RawScalar>>,
    pub key: Option<Located<Vec<RawScalar>>>,
    pub company_specific: Option<Located<RawScalar>>,
    pub filter: Option<Located<RawScalar>>,
    pub physical_name: Option<Located<RawScalar>>,
}

/// The `crm:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawCrm {
    pub entity_set: Option<Located<RawScalar>>,
    pub logical_name: Option<Located<RawScalar>>,
    pub primary_id: Option<Located<RawScalar>>,
    pub key: Option<Located<Vec<RawScalar>>>,
    pub company_field: Option<Located<RawScalar>>,
    pub filter: Option<Located<RawScalar>>,
}

/// One entry of `fields:`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawField {
    /// 1-based line where the entry starts.
    pub line: usize,
    /// 0-based position in `fields:`.
    pub index: usize,
    pub erp: Option<Located<RawScalar>>,
    pub crm: Option<Located<RawScalar>>,
    pub dir: Option<Located<RawScalar>>,
    /// The `type:` key.
    pub ty: Option<Located<RawScalar>>,
    pub erp_type: Option<Located<RawScalar>>,
    pub crm_type: Option<Located<RawScalar>>,
    /// `(F&O value, Dataverse value)` pairs in file order.
    pub value_map: Option<Located<Vec<(RawScalar, RawScalar)>>>,
    pub default: Option<Located<RawScalar>>,
    /// One map name or several.
    pub lookup: Option<Located<Vec<RawScalar>>>,
    pub to_crm: Option<Located<Vec<RawStep>>>,
    pub to_erp: Option<Located<Vec<RawStep>>>,
    pub source_of_truth: Option<Located<RawScalar>>,
}

impl RawField {
    /// How messages name the field: its F&O name, else its Dataverse name, else its position.
    pub fn label(&self) -> String {
        field_label(
            self.erp.as_ref().map(|e| e.value.text.as_str()),
            self.crm.as_ref().map(|c| c.value.text.as_str()),
            self.index,
        )
    }
}

fn field_label(erp: Option<&str>, crm: Option<&str>, index: usize) -> String {
    match (erp, crm) {
        (Some(e), _) if !e.is_empty() => e.to_string(),
        (_, Some(c)) if !c.is_empty() => c.to_string(),
        _ => format!("#{}", index + 1),
    }
}

/// One transform step: `trim` (a word) or `{truncate: 2000}` (a word with an argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawStep {
    pub line: usize,
    pub name: RawScalar,
    pub arg: Option<RawNode>,
}

/// Keys of a map file.
pub const MAP_KEYS: &[&str] = &[
    "name",
    "description",
    "direction",
    "depends_on",
    "conflict",
    "delete",
    "erp",
    "crm",
    "fields",
];
/// Keys of the `erp:` section.
pub const ERP_KEYS: &[&str] = &[
    "entity",
    "key",
    "company_specific",
    "filter",
    "physical_name",
];
/// Keys of the `crm:` section.
pub const CRM_KEYS: &[&str] = &[
    "entity_set",
    "logical_name",
    "primary_id",
    "key",
    "company_field",
    "filter",
];
/// Keys of a field mapping.
pub const FIELD_KEYS: &[&str] = &[
    "erp",
    "crm",
    "dir",
    "type",
    "erp_type",
    "crm_type",
    "value_map",
    "default",
    "lookup",
    "to_crm",
    "to_erp",
    "source_of_truth",
];

/// Parses one map file. Returns the raw map (as far as it could be read) and every problem
/// found; `None` when the YAML itself does not parse or is not a mapping.
pub fn parse_map_file(file: &str, text: &str) -> (Option<RawMap>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        diags.push(Diagnostic::new(
            file,
            1,
            None,
            None,
            "the file is empty; a map file needs at least `name`, `erp`, `crm` and `fields`",
        ));
        return (None, diags);
    }
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        // Keeps each scalar's quoting in `may_coerce` (plain = coercible), which `RawScalar::plain` needs.
        .prevent_coercion(true);
    let node = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(node) => node,
        Err(e) => {
            diags.push(load_error(file, &e));
            return (None, diags);
        }
    };
    let root = to_raw(&node);
    let mut reader = Reader {
        file,
        map: None,
        diags: &mut diags,
    };
    let raw = reader.map(&root);
    (raw, diags)
}

fn load_error(file: &str, e: &LoadError) -> Diagnostic {
    let (line, message) = match e {
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => (
            m.line(),
            "a map file must be a YAML mapping (`name: ...`, `erp: ...`, …), not a list or a single value"
                .to_string(),
        ),
        LoadError::UnexpectedAnchor(m) => {
            (m.line(), "YAML anchors and aliases (`&a`, `*a`) are not supported in map files; write the value out".into())
        }
        LoadError::MappingKeyMustBeScalar(m) => {
            (m.line(), "a key must be a plain name, not a list or a mapping".into())
        }
        LoadError::UnexpectedTag(m) => {
            (m.line(), "YAML tags (`!tag`) are not supported in map files; remove the tag".into())
        }
        LoadError::ScanError(m, err) => (
            m.line(),
            format!("YAML syntax error at column {}: {}; fix the YAML", m.column(), err.info()),
        ),
        LoadError::DuplicateKey(inner) => {
            let first = inner.prev_key.span().start().map_or(0, |m| m.line());
            let line = inner.key.span().start().map_or(first, |m| m.line());
            (
                line,
                format!(
                    "key `{}` appears twice in the same mapping (first on line {first}); keep one",
                    inner.key.as_str()
                ),
            )
        }
    };
    Diagnostic::new(file, line.max(1), None, None, message)
}

fn to_raw(node: &Node) -> RawNode {
    let (line, column) = node
        .span()
        .start()
        .map_or((1, 1), |m| (m.line(), m.column()));
    match node {
        Node::Scalar(s) => RawNode::Scalar(RawScalar {
            text: s.as_str().to_string(),
            plain: s.may_coerce(),
            line,
            column,
        }),
        Node::Sequence(items) => RawNode::List {
            items: items.iter().map(to_raw).collect(),
            line,
        },
        Node::Mapping(map) => RawNode::Mapping {
            entries: map
                .iter()
                .map(|(k, v)| {
                    let (kl, kc) = k
                        .span()
                        .start()
                        .map_or((line, column), |m| (m.line(), m.column()));
                    let key = RawScalar {
                        text: k.as_str().to_string(),
                        plain: k.may_coerce(),
                        line: kl,
                        column: kc,
                    };
                    (key, to_raw(v))
                })
                .collect(),
            line,
        },
    }
}

/// Walks the raw tree of one file, reporting problems with the file and map name.
struct Reader<'a> {
    file: &'a str,
    map: Option<String>,
    diags: &'a mut Vec<Diagnostic>,
}

impl Reader<'_> {
    fn report(&mut self, line: usize, field: Option<&str>, message: impl Into<String>) {
        self.diags.push(Diagnostic::new(
            self.file,
            line,
            self.map.clone(),
            field.map(str::to_string),
            message,
        ));
    }

    /// The entries of a mapping node, with unknown keys reported; `None` if not a mapping.
    fn entries<'n>(
        &mut self,
        node: &'n RawNode,
        what: &str,
        allowed: &[&str],
        field: Option<&str>,
    ) -> Option<Vec<(&'n RawScalar, &'n RawNode)>> {
        let RawNode::Mapping { entries, .. } = node else {
            self.report(
                node.line(),
                field,
                format!("{what} must be a mapping of keys, not {}", node.kind()),
            );
            return None;
        };
        let mut out = Vec::new();
        for (key, value) in entries {
            if allowed.contains(&key.text.as_str()) {
                out.push((key, value));
            } else {
                let hint = match closest(&key.text, allowed) {
                    Some(c) => format!("did you mean `{c}`? "),
                    None => String::new(),
                };
                self.report(
                    key.line,
                    field,
                    format!(
                        "unknown key `{}` in {what}; {hint}the keys allowed here are: {}",
                        key.text,
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(out)
    }

    fn scalar(
        &mut self,
        key: &RawScalar,
        node: &RawNode,
        field: Option<&str>,
    ) -> Option<Located<RawScalar>> {
        match node {
            RawNode::Scalar(s) => Some(Located {
                line: key.line,
                value: s.clone(),
            }),
            other => {
                self.report(
                    key.line,
                    field,
                    format!(
                        "`{}` must be a single value, not {}",
                        key.text,
                        other.kind()
                    ),
                );
                None
            }
        }
    }

    /// A name or a list of names.
    fn names(
        &mut self,
        key: &RawScalar,
        node: &RawNode,
        field: Option<&str>,
    ) -> Option<Located<Vec<RawScalar>>> {
        match node {
            RawNode::Scalar(s) if s.is_null() => Some(Located {
                line: key.line,
                value: Vec::new(),
            }),
            RawNode::Scalar(s) => Some(Located {
                line: key.line,
                value: vec![s.clone()],
            }),
            RawNode::List { items, .. } => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        RawNode::Scalar(s) => out.push(s.clone()),
                        other => self.report(
                            other.line(),
                            field,
                            format!("`{}` must list plain names, not {}", key.text, other.kind()),
                        ),
                    }
                }
                Some(Located {
                    line: key.line,
                    value: out,
                })
            }
            RawNode::Mapping { .. } => {
                self.report(
                    key.line,
                    field,
                    format!(
                        "`{}` must be a name or a list of names, not a mapping",
                        key.text
                    ),
                );
                None
            }
        }
    }

    fn map(&mut self, root: &RawNode) -> Option<RawMap> {
        if let RawNode::Mapping { entries, .. } = root
            && let Some((_, RawNode::Scalar(name))) = entries.iter().find(|(k, _)| k.text == "name")
        {
            self.map = Some(name.text.clone());
        }
        let entries = self.entries(root, "a map file", MAP_KEYS, None)?;
        let mut raw = RawMap {
            file: self.file.to_string(),
            ..RawMap::default()
        };
        for (key, value) in entries {
            match key.text.as_str() {
                "name" => raw.name = self.scalar(key, value, None),
                "description" => raw.description = self.scalar(key, value, None),
                "direction" => raw.direction = self.scalar(key, value, None),
                "conflict" => raw.conflict = self.scalar(key, value, None),
                "depends_on" => raw.depends_on = self.names(key, value, None),
                "delete" => {
                    raw.delete = Some(Located {
                        line: key.line,
                        value: value.clone(),
                    })
                }
                "erp" => raw.erp = self.erp(key, value),
                "crm" => raw.crm = self.crm(key, value),
                "fields" => raw.fields = self.fields(key, value),
                _ => unreachable!("entries() only returns allowed keys"),
            }
        }
        Some(raw)
    }

    fn erp(&mut self, key: &RawScalar, node: &RawNode) -> Option<Located<RawErp>> {
        let entries = self.entries(node, "the `erp` section", ERP_KEYS, None)?;
        let mut erp = RawErp::default();
        for (k, v) in entries {
            match k.text.as_str() {
                "entity" => erp.entity = self.scalar(k, v, None),
                "key" => erp.key = self.names(k, v, None),
                "company_specific" => erp.company_specific = self.scalar(k, v, None),
                "filter" => erp.filter = self.scalar(k, v, None),
                "physical_name" => erp.physical_name = self.scalar(k, v, None),
                _ => unreachable!("entries() only returns allowed keys"),
            }
        }
        Some(Located {
            line: key.line,
            value: erp,
        })
    }

    fn crm(&mut self, key: &RawScalar, node: &RawNode) -> Option<Located<RawCrm>> {
        let entries = self.entries(node, "the `crm` section", CRM_KEYS, None)?;
        let mut crm = RawCrm::default();
        for (k, v) in entries {
            match k.text.as_str() {
                "entity_set" => crm.entity_set = self.scalar(k, v, None),
                "logical_name" => crm.logical_name = self.scalar(k, v, None),
                "primary_id" => crm.primary_id = self.scalar(k, v, None),
                "key" => crm.key = self.names(k, v, None),
                "company_field" => crm.company_field = self.scalar(k, v, None),
                "filter" => crm.filter = self.scalar(k, v, None),
                _ => unreachable!("entries() only returns allowed keys"),
            }
        }
        Some(Located {
            line: key.line,
            value: crm,
        })
    }

    fn fields(&mut self, key: &RawScalar, node: &RawNode) -> Option<Located<Vec<RawField>>> {
        let RawNode::List { items, .. } = node else {
            self.report(
                key.line,
                None,
                format!(
                    "`fields` must be a list of field mappings, not {}",
                    node.kind()
                ),
            );
            return None;
        };
        let fields = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.field(i, item))
            .collect();
        Some(Located {
            line: key.line,
            value: fields,
        })
    }

    fn field(&mut self, index: usize, node: &RawNode) -> Option<RawField> {
        let label = match node {
            RawNode::Mapping { entries, .. } => {
                let get = |name: &str| {
                    entries
                        .iter()
                        .find(|(k, _)| k.text == name)
                        .and_then(|(_, v)| match v {
                            RawNode::Scalar(s) => Some(s.text.as_str()),
                            _ => None,
                        })
                };
                field_label(get("erp"), get("crm"), index)
            }
            _ => field_label(None, None, index),
        };
        let label = Some(label.as_str());
        let entries = self.entries(node, "a field mapping", FIELD_KEYS, label)?;
        let mut f = RawField {
            line: node.line(),
            index,
            ..RawField::default()
        };
        for (k, v) in entries {
            match k.text.as_str() {
                "erp" => f.erp = self.scalar(k, v, label),
                "crm" => f.crm = self.scalar(k, v, label),
                "dir" => f.dir = self.scalar(k, v, label),
                "type" => f.ty = self.scalar(k, v, label),
                "erp_type" => f.erp_type = self.scalar(k, v, label),
                "crm_type" => f.crm_type = self.scalar(k, v, label),
                "default" => f.default = self.scalar(k, v, label),
                "source_of_truth" => f.source_of_truth = self.scalar(k, v, label),
                "lookup" => f.lookup = self.names(k, v, label),
                "value_map" => f.value_map = self.value_map(k, v, label),
                "to_crm" => f.to_crm = self.steps(k, v, label),
                "to_erp" => f.to_erp = self.steps(k, v, label),
                _ => unreachable!("entries() only returns allowed keys"),
            }
        }
        Some(f)
    }

    fn value_map(
        &mut self,
        key: &RawScalar,
        node: &RawNode,
        field: Option<&str>,
    ) -> Option<Located<Vec<(RawScalar, RawScalar)>>> {
        let RawNode::Mapping { entries, .. } = node else {
            self.report(
                key.line,
                field,
                format!("`value_map` must map F&O values to Dataverse values (`{{ \"No\": false }}`), not {}", node.kind()),
            );
            return None;
        };
        let mut pairs = Vec::new();
        for (k, v) in entries {
            match v {
                RawNode::Scalar(s) => pairs.push((k.clone(), s.clone())),
                other => self.report(
                    k.line,
                    field,
                    format!(
                        "the value_map entry `{}` must map to a single value, not {}",
                        k.text,
                        other.kind()
                    ),
                ),
            }
        }
        Some(Located {
            line: key.line,
            value: pairs,
        })
    }

    fn steps(
        &mut self,
        key: &RawScalar,
        node: &RawNode,
        field: Option<&str>,
    ) -> Option<Located<Vec<RawStep>>> {
        let items: Vec<&RawNode> = match node {
            RawNode::List { items, .. } => items.iter().collect(),
            single => vec![single],
        };
        let mut steps = Vec::new();
        for item in items {
            match item {
                RawNode::Scalar(s) => steps.push(RawStep { line: s.line, name: s.clone(), arg: None }),
                RawNode::Mapping { entries, line } if entries.len() == 1 => {
                    let (name, arg) = &entries[0];
                    steps.push(RawStep { line: *line, name: name.clone(), arg: Some(arg.clone()) });
                }
                other => self.report(
                    other.line(),
                    field,
                    format!(
                        "each step of `{}` must be a word (`trim`) or a one-key mapping (`{{truncate: 100}}`), not {}",
                        key.text,
                        other.kind()
                    ),
                ),
            }
        }
        Some(Located {
            line: key.line,
            value: steps,
        })
    }
}

/// The allowed word nearest to `word` (edit distance at most 2), for "did you mean" hints.
pub fn closest<'a>(word: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(word, a), *a))
        .filter(|(d, _)| *d <= 2.max(word.chars().count().div_ceil(3)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
name: customers
direction: bidirectional
erp:
  entity: CustomersV3
  key: [CustomerAccount]
crm:
  entity_set: accounts
  logical_name: account
  key: accountnumber
fields:
  - { erp: CustomerAccount, crm: accountnumber, dir: \"=\" }
  - erp: CreditLimitIsMandatory
    crm: msdyn_creditlimitismandatory
    dir: \"><\"
    value_map: { \"No\": false, \"Yes\": true }
    to_crm: [trim, {truncate: 20}]
";

    #[test]
    fn keeps_the_line_of_every_key_and_field() {
        let (raw, diags) = parse_map_file("m.yaml", MAP);
        assert!(diags.is_empty(), "{diags:?}");
        let raw = raw.unwrap();
        assert_eq!(raw.name_text(), Some("customers"));
        assert_eq!(raw.direction.as_ref().unwrap().line, 2);
        let erp = &raw.erp.as_ref().unwrap().value;
        assert_eq!(erp.key.as_ref().unwrap().line, 5);
        let crm = &raw.crm.as_ref().unwrap().value;
        assert_eq!(
            crm.key.as_ref().unwrap().value[0].text,
            "accountnumber",
            "a single name is a list of one"
        );
        let fields = &raw.fields.as_ref().unwrap().value;
        assert_eq!(fields.len(), 2);
        assert_eq!((fields[0].line, fields[1].line), (11, 12));
        let second = &fields[1];
        assert_eq!(second.dir.as_ref().unwrap().line, 14);
        assert_eq!(second.dir.as_ref().unwrap().value.text, "><");
        let vm = second.value_map.as_ref().unwrap();
        assert_eq!(vm.line, 15);
        assert_eq!(vm.value[1].0.text, "Yes");
        assert!(vm.value[1].1.plain, "false is written plain");
        assert!(!vm.value[1].0.plain, "\"Yes\" is quoted");
        let steps = &second.to_crm.as_ref().unwrap().value;
        assert_eq!(steps[0].name.text, "trim");
        assert_eq!(steps[1].name.text, "truncate");
        assert!(matches!(&steps[1].arg, Some(RawNode::Scalar(s)) if s.text == "20"));
    }

    #[test]
    fn reports_every_unknown_key_with_its_line_and_a_hint() {
        let text = "name: m\ndirecton: bidirectional\nerp:\n  entity: X\n  kee: [A]\ncrm: {}\nfields:\n  - erp: A\n    dirr: \"=\"\n    colour: red\n";
        let (raw, diags) = parse_map_file("m.yaml", text);
        assert!(raw.is_some());
        let got: Vec<(usize, &str)> = diags.iter().map(|d| (d.line, d.message.as_str())).collect();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].0, 2);
        assert!(
            got[0].1.contains("unknown key `directon`")
                && got[0].1.contains("did you mean `direction`")
        );
        assert_eq!(got[1].0, 5);
        assert!(got[1].1.contains("`kee`") && got[1].1.contains("`erp` section"));
        assert_eq!((got[2].0, diags[2].field.as_deref()), (9, Some("A")));
        assert!(got[2].1.contains("did you mean `dir`"));
        assert_eq!(got[3].0, 10);
        assert!(got[3].1.contains("`colour`") && !got[3].1.contains("did you mean"));
        assert!(diags.iter().all(|d| d.map.as_deref() == Some("m")));
    }

    #[test]
    fn yaml_syntax_errors_have_line_and_column() {
        let (raw, diags) = parse_map_file("bad.yaml", "name: m\nerp: {entity: X\ncrm: y\n");
        assert!(raw.is_none());
        assert_eq!(diags.len(), 1);
        assert!(
            diags[0].message.contains("YAML syntax error at column"),
            "{}",
            diags[0]
        );
        assert!(diags[0].line >= 2, "{}", diags[0]);

        let (_, diags) = parse_map_file("dup.yaml", "name: a\nerp: {}\nname: b\n");
        assert_eq!(diags[0].line, 3);
        assert!(
            diags[0].message.contains("key `name` appears twice")
                && diags[0].message.contains("line 1")
        );

        let (_, diags) = parse_map_file("list.yaml", "- a\n- b\n");
        assert!(diags[0].message.contains("must be a YAML mapping"));

        let (_, diags) = parse_map_file("empty.yaml", "# nothing\n\n");
        assert!(diags[0].message.contains("the file is empty"));
    }

    #[test]
    fn wrong_shapes_are_reported() {
        let text = "name: m\ndescription: [a, b]\nerp: CustomersV3\nfields:\n  - { erp: A, value_map: [1, 2], to_crm: [{a: 1, b: 2}] }\n  - just a word\n";
        let (_, diags) = parse_map_file("m.yaml", text);
        let messages: Vec<String> = diags.iter().map(ToString::to_string).collect();
        assert_eq!(diags.len(), 5, "{messages:#?}");
        assert!(
            messages[0].starts_with(
                "m.yaml:2: map \"m\": `description` must be a single value, not a list"
            )
        );
        assert!(
            messages[1].contains("the `erp` section must be a mapping of keys, not a single value")
        );
        assert!(messages[2].contains("field \"A\": `value_map` must map F&O values"));
        assert!(messages[3].contains("one-key mapping"));
        assert!(
            messages[4].starts_with(
                "m.yaml:6: map \"m\", field \"#2\": a field mapping must be a mapping"
            )
        );
    }

    #[test]
    fn the_json_schema_knows_exactly_the_keys_the_parser_accepts() {
        let schema: serde_json::Value = serde_json::from_str(include_str!(
            "../../../../maps/schema/table-map.schema.json"
        ))
        .unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        let sorted = |k: &[&str]| -> Vec<String> {
            let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&schema), sorted(MAP_KEYS));
        assert_eq!(keys(&schema["properties"]["erp"]), sorted(ERP_KEYS));
        assert_eq!(keys(&schema["properties"]["crm"]), sorted(CRM_KEYS));
        assert_eq!(keys(&schema["$defs"]["field"]), sorted(FIELD_KEYS));
        assert_eq!(
            schema["additionalProperties"],
            serde_json::Value::Bool(false)
        );
    }

    #[test]
    fn closest_suggests_near_words_only() {
        assert_eq!(closest("compnay_field", CRM_KEYS), Some("company_field"));
        assert_eq!(closest("xyz", CRM_KEYS), None);
    }
}
