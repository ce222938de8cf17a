//! The OData v4 query subset both simulators understand: `$filter` expressions, key segments
//! (`(guid)` / `(a='x',b=1)`), `$select` and `$orderby`, evaluated against JSON rows.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};

use crate::common::{is_guid, norm_guid};

/// A JSON row.
pub(crate) type Row = Map<String, Value>;

/// One literal or field reference in a filter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Term {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Date(DateTime<Utc>),
    Guid(String),
    Field(String),
    /// `Namespace.Type'Symbol'`.
    Enum {
        ty: String,
        symbol: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    /// The operator's name in ODataLib's messages (`BinaryOperatorKind`).
    fn kind_name(self) -> &'static str {
        match self {
            CmpOp::Eq => "Equal",
            CmpOp::Ne => "NotEqual",
            CmpOp::Gt => "GreaterThan",
            CmpOp::Ge => "GreaterThanOrEqual",
            CmpOp::Lt => "LessThan",
            CmpOp::Le => "LessThanOrEqual",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrFn {
    Contains,
    StartsWith,
    EndsWith,
}

/// A parsed `$filter` expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Cmp(Term, CmpOp, Term),
    Func(StrFn, Term, Term),
    /// A bare boolean term (`isactive`, `true`).
    Bare(Term),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Comma,
    Str(String),
    Word(String),
    /// `Namespace.Type'Symbol'`: the qualified type and the symbol.
    Enum(String, String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '\'' => {
                let (lit, next) = read_quoted(&chars, i)?;
                out.push(Tok::Str(lit));
                i = next;
            }
            _ => {
                let start = i;
                while i < chars.len() && !matches!(chars[i], ' ' | '(' | ')' | ',' | '\'' | '\t') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if i < chars.len() && chars[i] == '\'' {
                    // Enum literal: Namespace.Type'Value'
                    let (lit, next) = read_quoted(&chars, i)?;
                    out.push(Tok::Enum(word, lit));
                    i = next;
                } else {
                    out.push(Tok::Word(word));
                }
            }
        }
    }
    Ok(out)
}

/// Reads a single-quoted literal starting at `chars[start] == '\''`, with `''` as an escaped quote.
fn read_quoted(chars: &[char], start: usize) -> Result<(String, usize), String> {
    let mut i = start + 1;
    let mut lit = String::new();
    loop {
        match chars.get(i) {
            None => return Err("a string literal is not closed with a single quote".into()),
            Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                lit.push('\'');
                i += 2;
            }
            Some('\'') => return Ok((lit, i + 1)),
            Some(c) => {
                lit.push(*c);
                i += 1;
            }
        }
    }
}

/// Parses a datetime or date literal (unquoted in OData).
pub(crate) fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|n| n.and_utc());
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

fn word_term(w: &str) -> Term {
    match w {
        "null" => Term::Null,
        "true" => Term::Bool(true),
        "false" => Term::Bool(false),
        _ if is_guid(w) => Term::Guid(norm_guid(w)),
        _ if w.len() >= 10 && w.as_bytes()[4] == b'-' && w.as_bytes()[0].is_ascii_digit() => {
            parse_datetime(w).map_or_else(|| Term::Field(w.to_owned()), Term::Date)
        }
        _ => match w
            .trim_end_matches(['m', 'M', 'd', 'D', 'L', 'l'])
            .parse::<f64>()
        {
            Ok(n) if w.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') => {
                Term::Num(n)
            }
            _ => Term::Field(w.to_owned()),
        },
    }
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, String> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        if self.toks.get(self.pos) == Some(&Tok::LParen) {
            self.pos += 1;
            let inner = self.or()?;
            if self.toks.get(self.pos) != Some(&Tok::RParen) {
                return Err("a '(' is not closed".into());
            }
            self.pos += 1;
            return Ok(inner);
        }
        // Function call?
        if let (Some(Tok::Word(w)), Some(Tok::LParen)) =
            (self.toks.get(self.pos), self.toks.get(self.pos + 1))
        {
            let f = match w.to_ascii_lowercase().as_str() {
                "contains" => StrFn::Contains,
                "startswith" => StrFn::StartsWith,
                "endswith" => StrFn::EndsWith,
                other => {
                    return Err(format!(
                        "the function '{other}' is not supported; use contains, startswith or endswith"
                    ));
                }
            };
            self.pos += 2;
            let a = self.term()?;
            if self.toks.get(self.pos) != Some(&Tok::Comma) {
                return Err("a function call needs two arguments separated by ','".into());
            }
            self.pos += 1;
            let b = self.term()?;
            if self.toks.get(self.pos) != Some(&Tok::RParen) {
                return Err("a function call is not closed with ')'".into());
            }
            self.pos += 1;
            return Ok(Filter::Func(f, a, b));
        }
        let left = self.term()?;
        let op = match self.toks.get(self.pos) {
            Some(Tok::Word(w)) => match w.to_ascii_lowercase().as_str() {
                "eq" => Some(CmpOp::Eq),
                "ne" => Some(CmpOp::Ne),
                "gt" => Some(CmpOp::Gt),
                "ge" => Some(CmpOp::Ge),
                "lt" => Some(CmpOp::Lt),
                "le" => Some(CmpOp::Le),
                "and" | "or" => None,
                other => {
                    return Err(format!(
                        "the operator '{other}' is not supported; use eq, ne, gt, ge, lt, le, and, or, not"
                    ));
                }
            },
            _ => None,
        };
        match op {
            Some(op) => {
                self.pos += 1;
                let right = self.term()?;
                Ok(Filter::Cmp(left, op, right))
            }
            None => Ok(Filter::Bare(left)),
        }
    }

    fn term(&mut self) -> Result<Term, String> {
        let t = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or("the expression ends where a value was expected")?;
        self.pos += 1;
        match t {
            Tok::Str(s) => Ok(Term::Str(s)),
            Tok::Enum(ty, symbol) => Ok(Term::Enum { ty, symbol }),
            Tok::Word(w) => Ok(word_term(&w)),
            other => Err(format!("unexpected {other:?} where a value was expected")),
        }
    }
}

/// The namespace of F&O's enum types in `$metadata`.
pub(crate) const FNO_ENUM_NAMESPACE: &str = "Microsoft.Dynamics.DataEntities";

/// Checks the comparisons of `f` the way F&O's OData does for enum fields (`enum_fields`:
/// field → enum type name, unqualified): an enum field compares only with a literal of its
/// own type (or null). The error is OData's "A binary operator with incompatible types was
/// detected."
pub(crate) fn check_enum_types(
    f: &Filter,
    enum_fields: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let type_of = |t: &Term| -> Option<String> {
        Some(match t {
            Term::Null => return None,
            Term::Bool(_) => "Edm.Boolean".into(),
            Term::Num(n) if n.fract() == 0.0 => "Edm.Int32".into(),
            Term::Num(_) => "Edm.Decimal".into(),
            Term::Str(_) => "Edm.String".into(),
            Term::Date(_) => "Edm.DateTimeOffset".into(),
            Term::Guid(_) => "Edm.Guid".into(),
            Term::Enum { ty, .. } => ty.clone(),
            Term::Field(name) => match enum_fields.get(name) {
                Some(ty) => format!("{FNO_ENUM_NAMESPACE}.{ty}"),
                // A field that is no enum: only an enum literal is out of place against it.
                None => return None,
            },
        })
    };
    match f {
        Filter::And(a, b) | Filter::Or(a, b) => {
            check_enum_types(a, enum_fields)?;
            check_enum_types(b, enum_fields)
        }
        Filter::Not(a) => check_enum_types(a, enum_fields),
        Filter::Cmp(a, op, b) => {
            let is_enum_side = |t: &Term| match t {
                Term::Enum { .. } => true,
                Term::Field(name) => enum_fields.contains_key(name),
                _ => false,
            };
            if !is_enum_side(a) && !is_enum_side(b) {
                return Ok(());
            }
            // Only fields declared as enums are checked: the simulator does not know the
            // types of the others (nor which of them are NoYes enums).
            let declared = |t: &Term| matches!(t, Term::Field(n) if enum_fields.contains_key(n));
            if !declared(a) && !declared(b) {
                return Ok(());
            }
            let (ta, tb) = (type_of(a), type_of(b));
            let incompatible = matches!((&ta, &tb), (Some(x), Some(y)) if x != y);
            if incompatible {
                let name = |t: Option<String>| t.unwrap_or_else(|| "Edm.String".into());
                return Err(format!(
                    "A binary operator with incompatible types was detected. Found operand types \
                     '{}' and '{}' for operator kind '{}'",
                    name(ta),
                    name(tb),
                    op.kind_name()
                ));
            }
            Ok(())
        }
        Filter::Func(..) | Filter::Bare(_) => Ok(()),
    }
}

/// Parses a `$filter` expression.
pub(crate) fn parse_filter(s: &str) -> Result<Filter, String> {
    let toks = tokenize(s)?;
    let mut p = Parser { toks, pos: 0 };
    let f = p.or()?;
    if p.pos != p.toks.len() {
        return Err(format!(
            "unexpected text after position {} of the filter",
            p.pos
        ));
    }
    Ok(f)
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Date(DateTime<Utc>),
}

fn json_operand(v: Option<&Value>) -> Operand {
    match v {
        None | Some(Value::Null) => Operand::Null,
        Some(Value::Bool(b)) => Operand::Bool(*b),
        Some(Value::Number(n)) => Operand::Num(n.as_f64().unwrap_or(0.0)),
        Some(Value::String(s)) => Operand::Str(s.clone()),
        Some(other) => Operand::Str(other.to_string()),
    }
}

fn operand(t: &Term, row: &Row) -> Operand {
    match t {
        Term::Null => Operand::Null,
        Term::Bool(b) => Operand::Bool(*b),
        Term::Num(n) => Operand::Num(*n),
        Term::Str(s) | Term::Guid(s) => Operand::Str(s.clone()),
        Term::Enum { symbol, .. } => Operand::Str(symbol.clone()),
        Term::Date(d) => Operand::Date(*d),
        Term::Field(f) => json_operand(row.get(f.as_str())),
    }
}

/// Compares two operands the way SQL Server would (strings case-insensitively).
fn compare(a: &Operand, b: &Operand) -> Option<Ordering> {
    match (a, b) {
        (Operand::Null, Operand::Null) => Some(Ordering::Equal),
        (Operand::Null, _) | (_, Operand::Null) => None,
        (Operand::Num(x), Operand::Num(y)) => x.partial_cmp(y),
        (Operand::Num(x), Operand::Str(s)) => s.parse::<f64>().ok().and_then(|y| x.partial_cmp(&y)),
        (Operand::Str(s), Operand::Num(y)) => s.parse::<f64>().ok().and_then(|x| x.partial_cmp(y)),
        (Operand::Bool(x), Operand::Bool(y)) => Some(x.cmp(y)),
        (Operand::Date(x), Operand::Date(y)) => Some(x.cmp(y)),
        (Operand::Str(s), Operand::Date(y)) => parse_datetime(s).map(|x| x.cmp(y)),
        (Operand::Date(x), Operand::Str(s)) => parse_datetime(s).map(|y| x.cmp(&y)),
        (Operand::Str(x), Operand::Str(y)) => Some(x.to_lowercase().cmp(&y.to_lowercase())),
        _ => None,
    }
}

/// `*` wildcard match (F&O), case-insensitive.
fn wildcard(value: &str, pattern: &str) -> bool {
    let v = value.to_lowercase();
    let parts: Vec<String> = pattern
        .to_lowercase()
        .split('*')
        .map(str::to_owned)
        .collect();
    let mut pos = 0;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        if i == 0 {
            if !v.starts_with(part.as_str()) {
                return false;
            }
            pos = part.len();
        } else if i == parts.len() - 1 {
            return v.len() >= pos + part.len() && v[pos..].ends_with(part.as_str());
        } else {
            match v[pos..].find(part.as_str()) {
                Some(at) => pos += at + part.len(),
                None => return false,
            }
        }
    }
    true
}

/// Evaluates `f` against a row. `wildcards` enables F&O's `*` inside `eq` strings.
pub(crate) fn eval(f: &Filter, row: &Row, wildcards: bool) -> bool {
    match f {
        Filter::And(a, b) => eval(a, row, wildcards) && eval(b, row, wildcards),
        Filter::Or(a, b) => eval(a, row, wildcards) || eval(b, row, wildcards),
        Filter::Not(a) => !eval(a, row, wildcards),
        Filter::Bare(t) => operand(t, row) == Operand::Bool(true),
        Filter::Func(func, a, b) => {
            let (Operand::Str(x), Operand::Str(y)) = (operand(a, row), operand(b, row)) else {
                return false;
            };
            let (x, y) = (x.to_lowercase(), y.to_lowercase());
            match func {
                StrFn::Contains => x.contains(&y),
                StrFn::StartsWith => x.starts_with(&y),
                StrFn::EndsWith => x.ends_with(&y),
            }
        }
        Filter::Cmp(a, op, b) => {
            let (x, y) = (operand(a, row), operand(b, row));
            if wildcards
                && matches!(op, CmpOp::Eq | CmpOp::Ne)
                && let (Operand::Str(v), Term::Str(p)) = (&x, b)
                && p.contains('*')
            {
                return wildcard(v, p) == (*op == CmpOp::Eq);
            }
            let ord = compare(&x, &y);
            match op {
                CmpOp::Eq => ord == Some(Ordering::Equal),
                CmpOp::Ne => ord != Some(Ordering::Equal),
                CmpOp::Gt => ord == Some(Ordering::Greater),
                CmpOp::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
                CmpOp::Lt => ord == Some(Ordering::Less),
                CmpOp::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
            }
        }
    }
}

/// Orders two rows by an `$orderby` list of `(field, descending)`.
pub(crate) fn order_rows(a: &Row, b: &Row, order: &[(String, bool)]) -> Ordering {
    for (field, desc) in order {
        let x = json_operand(a.get(field.as_str()));
        let y = json_operand(b.get(field.as_str()));
        let o = match (&x, &y) {
            (Operand::Null, Operand::Null) => Ordering::Equal,
            (Operand::Null, _) => Ordering::Less,
            (_, Operand::Null) => Ordering::Greater,
            _ => compare(&x, &y).unwrap_or(Ordering::Equal),
        };
        let o = if *desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Parses `$orderby=a asc,b desc`.
pub(crate) fn parse_orderby(s: &str) -> Result<Vec<(String, bool)>, String> {
    s.split(',')
        .map(|part| {
            let mut it = part.split_whitespace();
            let field = it.next().ok_or("an $orderby item is empty")?.to_owned();
            let desc = match it.next().map(str::to_ascii_lowercase).as_deref() {
                None | Some("asc") => false,
                Some("desc") => true,
                Some(other) => return Err(format!("'{other}' is not asc or desc in $orderby")),
            };
            Ok((field, desc))
        })
        .collect()
}

/// One value of a key segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyPart {
    /// Attribute name; `None` for the single-value form `(guid)`.
    pub name: Option<String>,
    /// The value as text (quotes removed, GUIDs lower case).
    pub value: String,
    /// Whether the value was a quoted string.
    pub quoted: bool,
}

/// Parses the inside of a key segment: `guid`, `'x'`, or `a='x',b=2`.
pub(crate) fn parse_key(inner: &str) -> Result<Vec<KeyPart>, String> {
    let chars: Vec<char> = inner.chars().collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i] == ' ' {
            i += 1;
        }
        let start = i;
        while i < chars.len() && !matches!(chars[i], '=' | ',' | '\'') {
            i += 1;
        }
        let first: String = chars[start..i].iter().collect::<String>().trim().to_owned();
        let name = if chars.get(i) == Some(&'=') {
            i += 1;
            Some(first)
        } else {
            i = start;
            None
        };
        let (value, quoted) = if chars.get(i) == Some(&'\'') {
            let (lit, next) = read_quoted(&chars, i)?;
            i = next;
            (lit, true)
        } else {
            let vs = i;
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            let raw: String = chars[vs..i].iter().collect::<String>().trim().to_owned();
            if raw.is_empty() {
                return Err("a key value is empty".into());
            }
            (if is_guid(&raw) { norm_guid(&raw) } else { raw }, false)
        };
        parts.push(KeyPart {
            name,
            value,
            quoted,
        });
        while i < chars.len() && chars[i] == ' ' {
            i += 1;
        }
        if i < chars.len() {
            if chars[i] != ',' {
                return Err(format!("expected ',' between key values at position {i}"));
            }
            i += 1;
        }
    }
    if parts.is_empty() {
        return Err("the key segment is empty".into());
    }
    if parts.len() > 1 && parts.iter().any(|p| p.name.is_none()) {
        return Err("in a compound key every value needs a name (name=value)".into());
    }
    Ok(parts)
}

/// Splits `set(key)` into `("set", Some("key"))`; `set` into `("set", None)`.
pub(crate) fn split_key_segment(seg: &str) -> Result<(&str, Option<&str>), String> {
    match seg.find('(') {
        None => Ok((seg, None)),
        Some(open) => {
            if !seg.ends_with(')') {
                return Err(format!("the key segment '{seg}' does not end with ')'"));
            }
            Ok((&seg[..open], Some(&seg[open + 1..seg.len() - 1])))
        }
    }
}

/// The text form of a JSON value used for key comparisons (strings raw, others as JSON).
pub(crate) fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if is_guid(s) => Some(norm_guid(s)),
        Value::String(s) => Some(s.to_lowercase()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(v: Value) -> Row {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn filter_comparisons_and_logic() {
        let r = row(
            json!({"name": "Contoso Ltd", "revenue": 100, "modifiedon": "2026-05-02T10:00:00Z", "city": null}),
        );
        let t = |f: &str| {
            eval(
                &parse_filter(f).unwrap_or_else(|e| panic!("{f}: {e}")),
                &r,
                false,
            )
        };
        assert!(t("name eq 'contoso ltd'"));
        assert!(t("revenue gt 50 and revenue le 100"));
        assert!(!t("revenue lt 100"));
        assert!(t("not (revenue eq 1) or name eq 'x'"));
        assert!(t(
            "contains(name,'toso') and startswith(name,'Con') and endswith(name,'ltd')"
        ));
        assert!(t("modifiedon ge 2026-05-01T00:00:00Z"));
        assert!(!t("modifiedon ge 2026-06-01"));
        assert!(t("city eq null"));
        assert!(t("name ne null"));
    }

    #[test]
    fn filter_enum_literals_wildcards_and_quotes() {
        let r = row(json!({"Blocked": "Yes", "Name": "O'Brien", "Acct": "US-001"}));
        assert!(eval(
            &parse_filter("Blocked eq Microsoft.Dynamics.DataEntities.NoYes'Yes'").unwrap(),
            &r,
            true
        ));
        assert!(eval(&parse_filter("Name eq 'O''Brien'").unwrap(), &r, true));
        assert!(eval(&parse_filter("Acct eq 'US-*'").unwrap(), &r, true));
        assert!(!eval(&parse_filter("Acct eq 'US-*'").unwrap(), &r, false));
    }

    #[test]
    fn filter_errors_are_reported() {
        assert!(parse_filter("name like 'x'").is_err());
        assert!(parse_filter("name eq 'x").is_err());
        assert!(parse_filter("substringof('a',name)").is_err());
    }

    #[test]
    fn keys_parse_compound_and_escaped() {
        let k = parse_key(
            "accountnumber='A''1',_msdyn_company_value=6D81597F-0F9F-E711-8122-000D3AA2331C,n=5",
        )
        .unwrap();
        assert_eq!(
            k[0],
            KeyPart {
                name: Some("accountnumber".into()),
                value: "A'1".into(),
                quoted: true
            }
        );
        assert_eq!(k[1].value, "6d81597f-0f9f-e711-8122-000d3aa2331c");
        assert_eq!(k[2].value, "5");
        let single = parse_key("6d81597f-0f9f-e711-8122-000d3aa2331c").unwrap();
        assert_eq!(single[0].name, None);
        assert!(parse_key("a='x',b").is_err());
    }
}
