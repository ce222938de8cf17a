//! Record filters: the subset of OData `$filter` that table maps use, parsed and evaluated here.
//!
//! Grammar (OData precedence: `not` binds tighter than `and`, which binds tighter than `or`;
//! `and`/`or` associate to the left):
//!
//! ```text
//! or      := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | primary
//! primary := "(" or ")" | func "(" field "," 'text' ")" | field op literal
//! op      := eq | ne | gt | ge | lt | le
//! literal := null | true | false | number | 'text' | 2026-05-01T00:00:00Z | 2026-05-01
//!          | Qualified.EnumType'Symbol'
//! ```
//!
//! An enum literal is OData's: the enum type's qualified name followed at once by the quoted
//! symbol (F&O: `Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'`). F&O refuses
//! a plain text compared with an enum field, so F&O filters on enums other than `NoYes` name
//! the type this way (the connector writes `NoYes` itself for `'Yes'` / `'No'`).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, SecondsFormat, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::record::Record;
use crate::value::Value;

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    /// `field op literal`.
    Compare {
        field: String,
        op: CompareOp,
        value: Literal,
    },
    /// `startswith(field,'x')`, `contains(field,'x')`, `endswith(field,'x')`.
    Text {
        func: TextFunc,
        field: String,
        value: String,
    },
}

/// Comparison operators: `eq ne gt ge lt le`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

/// String functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFunc {
    StartsWith,
    Contains,
    EndsWith,
}

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Literal {
    Null,
    Text(String),
    Number(Decimal),
    Boolean(bool),
    /// `2026-05-01T00:00:00Z` (unquoted, as OData writes it).
    DateTime(chrono::DateTime<chrono::FixedOffset>),
    /// `Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'`: an enum symbol with
    /// its type's qualified name. Compares like a text with an enum symbol.
    Enum {
        /// The qualified enum type name.
        ty: String,
        /// The symbol.
        symbol: String,
    },
}

/// Why a filter text could not be parsed: where, what the parser expected and what it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: expected {expected}, found {found}")]
pub struct FilterError {
    /// 1-based character column in the filter text.
    pub column: usize,
    /// What would have been valid here, e.g. `a comparison operator (eq ne gt ge lt le)`.
    pub expected: String,
    /// What is there instead, e.g. `"equals"` or `the end of the filter`.
    pub found: String,
}

/// Parses an OData `$filter` text of the subset described in `docs/MAP_FORMAT.md`.
pub fn parse_filter(text: &str) -> Result<Filter, FilterError> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        end_column: text.chars().count() + 1,
    };
    let filter = parser.or_expr()?;
    match parser.peek() {
        None => Ok(filter),
        Some(t) => Err(FilterError {
            column: t.column,
            expected: "`and`, `or` or the end of the filter".into(),
            found: t.kind.describe(),
        }),
    }
}

impl CompareOp {
    /// The OData word: `eq`, `ne`, …
    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
        }
    }

    fn from_word(word: &str) -> Option<CompareOp> {
        Some(match word {
            "eq" => CompareOp::Eq,
            "ne" => CompareOp::Ne,
            "gt" => CompareOp::Gt,
            "ge" => CompareOp::Ge,
            "lt" => CompareOp::Lt,
            "le" => CompareOp::Le,
            _ => return None,
        })
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            CompareOp::Eq => ord == Ordering::Equal,
            CompareOp::Ne => ord != Ordering::Equal,
            CompareOp::Gt => ord == Ordering::Greater,
            CompareOp::Ge => ord != Ordering::Less,
            CompareOp::Lt => ord == Ordering::Less,
            CompareOp::Le => ord != Ordering::Greater,
        }
    }
}

impl TextFunc {
    /// The OData function name: `startswith`, `contains`, `endswith`.
    pub fn as_str(self) -> &'static str {
        match self {
            TextFunc::StartsWith => "startswith",
            TextFunc::Contains => "contains",
            TextFunc::EndsWith => "endswith",
        }
    }

    fn from_word(word: &str) -> Option<TextFunc> {
        Some(match word {
            "startswith" => TextFunc::StartsWith,
            "contains" => TextFunc::Contains,
            "endswith" => TextFunc::EndsWith,
            _ => return None,
        })
    }

    fn holds(self, haystack: &str, needle: &str) -> bool {
        match self {
            TextFunc::StartsWith => haystack.starts_with(needle),
            TextFunc::Contains => haystack.contains(needle),
            TextFunc::EndsWith => haystack.ends_with(needle),
        }
    }
}

impl fmt::Display for Literal {
    /// The OData rendering: `null`, `'it''s'`, `12.5`, `true`, `2026-05-01T00:00:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Null => f.write_str("null"),
            Literal::Text(s) => write_quoted(f, s),
            Literal::Number(d) => write!(f, "{d}"),
            Literal::Boolean(b) => write!(f, "{b}"),
            Literal::DateTime(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Literal::Enum { ty, symbol } => {
                f.write_str(ty)?;
                write_quoted(f, symbol)
            }
        }
    }
}

fn write_quoted(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    f.write_char('\'')?;
    f.write_str(&s.replace('\'', "''"))?;
    f.write_char('\'')
}

impl Filter {
    /// True when `record` passes the filter. A field the record does not carry is null.
    ///
    /// Text compares case-sensitively with [`Value::Text`] and case-insensitively with
    /// [`Value::Enum`] symbols; numbers compare with integers, decimals and choices; date-times
    /// compare with date-times and dates (a date is its midnight UTC); a lookup compares its id
    /// with a text (GUIDs, case-insensitively). Values of incomparable types are unequal and
    /// unordered (`ne` holds, `gt`/`lt`/… do not).
    pub fn matches(&self, record: &Record) -> bool {
        match self {
            Filter::And(a, b) => a.matches(record) && b.matches(record),
            Filter::Or(a, b) => a.matches(record) || b.matches(record),
            Filter::Not(a) => !a.matches(record),
            Filter::Compare { field, op, value } => {
                let actual = record.get(field).unwrap_or(&Value::Null);
                match compare(actual, value) {
                    Some(ord) => op.holds(ord),
                    None => *op == CompareOp::Ne,
                }
            }
            Filter::Text { func, field, value } => match record.get(field) {
                Some(Value::Text(s)) => func.holds(s, value),
                Some(Value::Enum(s)) => func.holds(&s.to_lowercase(), &value.to_lowercase()),
                _ => false,
            },
        }
    }

    /// The filter as an OData `$filter` string, which [`parse_filter`] reads back to an equal
    /// filter. Parentheses are written only where precedence needs them (and around the operand
    /// of `not`, which OData binds tighter than `eq`).
    pub fn to_odata(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }

    fn render(&self, out: &mut String) {
        match self {
            Filter::Or(a, b) => {
                a.render(out);
                out.push_str(" or ");
                render_grouped(b, out, matches!(**b, Filter::Or(..)));
            }
            Filter::And(a, b) => {
                render_grouped(a, out, matches!(**a, Filter::Or(..)));
                out.push_str(" and ");
                render_grouped(b, out, matches!(**b, Filter::Or(..) | Filter::And(..)));
            }
            Filter::Not(a) => {
                out.push_str("not ");
                render_grouped(
                    a,
                    out,
                    !matches!(**a, Filter::Text { .. } | Filter::Not(..)),
                );
            }
            Filter::Compare { field, op, value } => {
                out.push_str(&format!("{field} {} {value}", op.as_str()));
            }
            Filter::Text { func, field, value } => {
                out.push_str(&format!("{}({field},", func.as_str()));
                // Writing to a String cannot fail.
                let _ = write_quoted(out, value);
                out.push(')');
            }
        }
    }
}

fn render_grouped(filter: &Filter, out: &mut String, parens: bool) {
    if parens {
        out.push('(');
        filter.render(out);
        out.push(')');
    } else {
        filter.render(out);
    }
}

/// Orders `a` and `b` as their lower-cased characters (as `to_lowercase` does, but character by
/// character and without building either text): filters compare enum symbols and ids without
/// case once per record.
fn cmp_ignoring_case(a: &str, b: &str) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        a.bytes()
            .map(|c| c.to_ascii_lowercase())
            .cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
    } else {
        a.chars()
            .flat_map(char::to_lowercase)
            .cmp(b.chars().flat_map(char::to_lowercase))
    }
}

/// Orders a record value against a literal; `None` when they are not comparable.
fn compare(actual: &Value, literal: &Literal) -> Option<Ordering> {
    match (actual, literal) {
        (Value::Null, Literal::Null) => Some(Ordering::Equal),
        (Value::Null, _) | (_, Literal::Null) => None,
        (Value::Text(s), Literal::Text(t)) => Some(s.as_str().cmp(t.as_str())),
        (Value::Enum(s), Literal::Text(t)) => Some(cmp_ignoring_case(s, t)),
        (Value::Enum(s), Literal::Enum { symbol, .. }) => Some(cmp_ignoring_case(s, symbol)),
        (Value::Text(s), Literal::Enum { symbol, .. }) => Some(cmp_ignoring_case(s, symbol)),
        (Value::Lookup(l), Literal::Text(t)) => l.id.as_ref().map(|id| cmp_ignoring_case(id, t)),
        (Value::Integer(i) | Value::Choice(i), Literal::Number(n)) => {
            Some(Decimal::from(*i).cmp(n))
        }
        (Value::Decimal(d), Literal::Number(n)) => Some(d.cmp(n)),
        (Value::Boolean(b), Literal::Boolean(l)) => Some(b.cmp(l)),
        (Value::DateTime(t), Literal::DateTime(l)) => Some(t.cmp(l)),
        (Value::Date(d), Literal::DateTime(l)) => {
            let midnight = Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?);
            Some(midnight.cmp(&l.with_timezone(&Utc)))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    Word(String),
    Text(String),
    Number(Decimal),
    DateTime(DateTime<FixedOffset>),
    Open,
    Close,
    Comma,
}

impl TokenKind {
    fn describe(&self) -> String {
        match self {
            TokenKind::Word(w) => format!("`{w}`"),
            TokenKind::Text(t) => format!("the text '{t}'"),
            TokenKind::Number(n) => format!("the number {n}"),
            TokenKind::DateTime(t) => format!("the date-time {}", t.to_rfc3339()),
            TokenKind::Open => "`(`".into(),
            TokenKind::Close => "`)`".into(),
            TokenKind::Comma => "`,`".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    column: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '.'
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let kind = match c {
            '(' => {
                i += 1;
                TokenKind::Open
            }
            ')' => {
                i += 1;
                TokenKind::Close
            }
            ',' => {
                i += 1;
                TokenKind::Comma
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(FilterError {
                                column,
                                expected:
                                    "a closing quote `'` (write `''` for a quote inside a text)"
                                        .into(),
                                found: "the end of the filter".into(),
                            });
                        }
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            s.push(other);
                            i += 1;
                        }
                    }
                }
                TokenKind::Text(s)
            }
            c if c.is_ascii_digit() || c == '-' || c == '+' => {
                let start = i;
                i += 1;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || matches!(chars[i], '.' | ':' | '-' | '+'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                literal_token(&word, column)?
            }
            c if is_word_char(c) => {
                let start = i;
                while i < chars.len() && is_word_char(chars[i]) {
                    i += 1;
                }
                TokenKind::Word(chars[start..i].iter().collect())
            }
            other => {
                return Err(FilterError {
                    column,
                    expected: "a field name, a literal, `(` or `)`".into(),
                    found: format!("the character `{other}`"),
                });
            }
        };
        tokens.push(Token { kind, column });
    }
    Ok(tokens)
}

/// A token that starts with a digit or sign: a number, a date-time or a date.
fn literal_token(word: &str, column: usize) -> Result<TokenKind, FilterError> {
    let looks_like_date = word.len() >= 10 && word.as_bytes()[4] == b'-';
    if looks_like_date {
        if let Ok(t) = DateTime::parse_from_rfc3339(word) {
            return Ok(TokenKind::DateTime(t));
        }
        if let Ok(d) = NaiveDate::parse_from_str(word, "%Y-%m-%d")
            && let Some(midnight) = d.and_hms_opt(0, 0, 0)
        {
            return Ok(TokenKind::DateTime(
                Utc.from_utc_datetime(&midnight).fixed_offset(),
            ));
        }
        return Err(FilterError {
            column,
            expected: "an ISO date-time such as 2026-05-01T00:00:00Z or a date such as 2026-05-01"
                .into(),
            found: format!("`{word}`"),
        });
    }
    Decimal::from_str(word)
        .map(TokenKind::Number)
        .map_err(|_| FilterError {
            column,
            expected: "a number such as 42 or -1.5".into(),
            found: format!("`{word}`"),
        })
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    end_column: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token { kind: TokenKind::Word(w), .. }) if w == word)
    }

    fn next(&mut self, expected: &str) -> Result<Token, FilterError> {
        match self.tokens.get(self.pos) {
            Some(t) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => Err(self.error_at_end(expected)),
        }
    }

    fn error_at_end(&self, expected: &str) -> FilterError {
        FilterError {
            column: self.end_column,
            expected: expected.into(),
            found: "the end of the filter".into(),
        }
    }

    fn expect(&mut self, kind: TokenKind, expected: &str) -> Result<(), FilterError> {
        let t = self.next(expected)?;
        if t.kind == kind {
            Ok(())
        } else {
            Err(FilterError {
                column: t.column,
                expected: expected.into(),
                found: t.kind.describe(),
            })
        }
    }

    fn or_expr(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and_expr()?;
        while self.peek_word("or") {
            self.pos += 1;
            let right = self.and_expr()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Filter, FilterError> {
        const START: &str =
            "a condition: `field eq value`, `startswith(field,'x')`, `not …` or `(`";
        let token = self.next(START)?;
        match token.kind {
            TokenKind::Open => {
                let inner = self.or_expr()?;
                self.expect(TokenKind::Close, "`)`, `and` or `or`")?;
                Ok(inner)
            }
            TokenKind::Word(word) if is_keyword(&word) => Err(FilterError {
                column: token.column,
                expected: START.into(),
                found: format!("`{word}`"),
            }),
            TokenKind::Word(word) => match TextFunc::from_word(&word) {
                Some(func)
                    if matches!(
                        self.peek(),
                        Some(Token {
                            kind: TokenKind::Open,
                            ..
                        })
                    ) =>
                {
                    self.pos += 1;
                    let field = self.field_name()?;
                    self.expect(TokenKind::Comma, "`,` between the field and the text")?;
                    let t = self.next("a quoted text such as 'abc'")?;
                    let TokenKind::Text(value) = t.kind else {
                        return Err(FilterError {
                            column: t.column,
                            expected: "a quoted text such as 'abc'".into(),
                            found: t.kind.describe(),
                        });
                    };
                    self.expect(TokenKind::Close, "`)` closing the function call")?;
                    Ok(Filter::Text { func, field, value })
                }
                _ => {
                    let op_expected = "a comparison operator (eq ne gt ge lt le)";
                    let t = self.next(op_expected)?;
                    let op = match &t.kind {
                        TokenKind::Word(w) => CompareOp::from_word(w),
                        _ => None,
                    };
                    let Some(op) = op else {
                        return Err(FilterError {
                            column: t.column,
                            expected: op_expected.into(),
                            found: t.kind.describe(),
                        });
                    };
                    let value = self.literal()?;
                    Ok(Filter::Compare {
                        field: word,
                        op,
                        value,
                    })
                }
            },
            other => Err(FilterError {
                column: token.column,
                expected: START.into(),
                found: other.describe(),
            }),
        }
    }

    fn field_name(&mut self) -> Result<String, FilterError> {
        let t = self.next("a field name")?;
        match t.kind {
            TokenKind::Word(w) if !is_keyword(&w) => Ok(w),
            other => Err(FilterError {
                column: t.column,
                expected: "a field name".into(),
                found: other.describe(),
            }),
        }
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        const EXPECTED: &str = "a value: null, true, false, a number, a quoted text, a date-time \
                                or an enum literal such as Namespace.EnumType'Symbol'";
        let t = self.next(EXPECTED)?;
        // A qualified type name followed at once by a quoted text is an enum literal.
        if let TokenKind::Word(w) = &t.kind
            && w.contains('.')
            && let Some(Token {
                kind: TokenKind::Text(symbol),
                column,
            }) = self.peek()
            && *column == t.column + w.chars().count()
        {
            let literal = Literal::Enum {
                ty: w.clone(),
                symbol: symbol.clone(),
            };
            self.pos += 1;
            return Ok(literal);
        }
        Ok(match t.kind {
            TokenKind::Text(s) => Literal::Text(s),
            TokenKind::Number(n) => Literal::Number(n),
            TokenKind::DateTime(d) => Literal::DateTime(d),
            TokenKind::Word(w) if w == "null" => Literal::Null,
            TokenKind::Word(w) if w == "true" => Literal::Boolean(true),
            TokenKind::Word(w) if w == "false" => Literal::Boolean(false),
            other => {
                return Err(FilterError {
                    column: t.column,
                    expected: EXPECTED.into(),
                    found: other.describe(),
                });
            }
        })
    }
}

/// Words that cannot be field names.
fn is_keyword(word: &str) -> bool {
    matches!(word, "and" | "or" | "not" | "null" | "true" | "false")
        || CompareOp::from_word(word).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    use crate::value::LookupRef;

    fn cmp(field: &str, op: CompareOp, value: Literal) -> Filter {
        Filter::Compare {
            field: field.into(),
            op,
            value,
        }
    }

    fn text(s: &str) -> Literal {
        Literal::Text(s.into())
    }

    fn num(s: &str) -> Literal {
        Literal::Number(Decimal::from_str(s).unwrap())
    }

    #[test]
    fn parses_a_comparison_with_each_literal_kind() {
        assert_eq!(
            parse_filter("PartyType eq 'Organization'").unwrap(),
            cmp("PartyType", CompareOp::Eq, text("Organization"))
        );
        assert_eq!(
            parse_filter("customertypecode eq 3").unwrap(),
            cmp("customertypecode", CompareOp::Eq, num("3"))
        );
        assert_eq!(
            parse_filter("CreditLimit ge -12.50").unwrap(),
            cmp("CreditLimit", CompareOp::Ge, num("-12.5"))
        );
        assert_eq!(
            parse_filter("x ne null").unwrap(),
            cmp("x", CompareOp::Ne, Literal::Null)
        );
        assert_eq!(
            parse_filter("x eq false").unwrap(),
            cmp("x", CompareOp::Eq, Literal::Boolean(false))
        );
        assert_eq!(
            parse_filter("Name eq 'it''s'").unwrap(),
            cmp("Name", CompareOp::Eq, text("it's"))
        );
        let t = DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z").unwrap();
        assert_eq!(
            parse_filter("modifiedon gt 2026-05-01T00:00:00Z").unwrap(),
            cmp("modifiedon", CompareOp::Gt, Literal::DateTime(t))
        );
        assert_eq!(
            parse_filter("modifiedon lt 2026-05-01").unwrap(),
            cmp("modifiedon", CompareOp::Lt, Literal::DateTime(t))
        );
    }

    #[test]
    fn an_enum_literal_names_its_type_and_compares_with_the_symbol() {
        let f = parse_filter(
            "PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'",
        )
        .unwrap();
        let organization = Literal::Enum {
            ty: "Microsoft.Dynamics.DataEntities.DirPartyBaseType".into(),
            symbol: "Organization".into(),
        };
        assert_eq!(f, cmp("PartyType", CompareOp::Eq, organization));
        assert_eq!(
            f.to_odata(),
            "PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization'"
        );
        let party = |v: Value| Record::new("CustomersV3").with("PartyType", v);
        assert!(f.matches(&party(Value::Enum("Organization".into()))));
        assert!(f.matches(&party(Value::Enum("organization".into()))));
        assert!(!f.matches(&party(Value::Enum("Person".into()))));
        assert!(f.matches(&party(Value::Text("Organization".into()))));
        // The type and the quote must touch: a space makes two tokens, which is an error.
        let e = parse_filter("PartyType eq Microsoft.Dynamics.DataEntities.DirPartyBaseType 'x'")
            .unwrap_err();
        assert!(e.expected.contains("enum literal"), "{e}");
        // An unqualified word before a text is not an enum literal.
        assert!(parse_filter("PartyType eq Organization'x'").is_err());
    }

    #[test]
    fn not_binds_tighter_than_and_which_binds_tighter_than_or() {
        let f = parse_filter("not a eq 1 or b eq 2 and c eq 3").unwrap();
        let expected = Filter::Or(
            Box::new(Filter::Not(Box::new(cmp("a", CompareOp::Eq, num("1"))))),
            Box::new(Filter::And(
                Box::new(cmp("b", CompareOp::Eq, num("2"))),
                Box::new(cmp("c", CompareOp::Eq, num("3"))),
            )),
        );
        assert_eq!(f, expected);
        let grouped = parse_filter("(a eq 1 or b eq 2) and startswith(name,'Con')").unwrap();
        assert_eq!(
            grouped,
            Filter::And(
                Box::new(Filter::Or(
                    Box::new(cmp("a", CompareOp::Eq, num("1"))),
                    Box::new(cmp("b", CompareOp::Eq, num("2"))),
                )),
                Box::new(Filter::Text {
                    func: TextFunc::StartsWith,
                    field: "name".into(),
                    value: "Con".into()
                }),
            )
        );
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let e = parse_filter("PartyType equals 'Organization'").unwrap_err();
        assert_eq!(e.column, 11);
        assert!(e.expected.contains("comparison operator"), "{e}");
        assert!(e.found.contains("equals"), "{e}");

        let e = parse_filter("Name eq 'open").unwrap_err();
        assert_eq!(e.column, 9);
        assert!(e.expected.contains("closing quote"), "{e}");

        let e = parse_filter("(a eq 1").unwrap_err();
        assert_eq!(e.column, 8);
        assert!(e.expected.contains("`)`"), "{e}");
        assert_eq!(e.found, "the end of the filter");

        let e = parse_filter("a eq 1 b eq 2").unwrap_err();
        assert_eq!(e.column, 8);
        assert!(e.expected.contains("`and`, `or`"), "{e}");

        let e = parse_filter("a eq 2026-13-45").unwrap_err();
        assert_eq!(e.column, 6);
        assert!(e.expected.contains("date-time"), "{e}");

        let e = parse_filter("a eq 1 and").unwrap_err();
        assert_eq!(e.column, 11);
        assert_eq!(
            e.to_string(),
            format!(
                "at column 11: expected {}, found the end of the filter",
                e.expected
            )
        );

        let e = parse_filter("contains(name 'x')").unwrap_err();
        assert_eq!(e.column, 15);
        assert!(e.expected.contains("`,`"), "{e}");

        assert!(parse_filter("").is_err());
        assert!(parse_filter("a eq #").is_err());
    }

    fn record() -> Record {
        Record::new("CustomersV3")
            .with("PartyType", Value::Enum("Organization".into()))
            .with("name", Value::Text("Contoso Ltd".into()))
            .with(
                "CreditLimit",
                Value::Decimal(Decimal::from_str("1500.50").unwrap()),
            )
            .with("customertypecode", Value::Choice(3))
            .with("count", Value::Integer(7))
            .with("active", Value::Boolean(true))
            .with("empty", Value::Null)
            .with(
                "modifiedon",
                Value::DateTime(DateTime::parse_from_rfc3339("2026-05-01T10:00:00+02:00").unwrap()),
            )
            .with(
                "created",
                Value::Date(NaiveDate::from_ymd_opt(2026, 5, 1).unwrap()),
            )
            .with(
                "parent",
                Value::Lookup(Arc::new(LookupRef {
                    entity_set: "accounts".into(),
                    id: Some("ABC-1".into()),
                    key: None,
                })),
            )
    }

    fn check(filter: &str) -> bool {
        parse_filter(filter).unwrap().matches(&record())
    }

    #[test]
    fn evaluates_typed_values() {
        assert!(
            check("PartyType eq 'organization'"),
            "enum symbols compare case-insensitively"
        );
        assert!(!check("PartyType eq 'Person'"));
        assert!(check("name eq 'Contoso Ltd'"));
        assert!(
            !check("name eq 'contoso ltd'"),
            "text compares case-sensitively"
        );
        assert!(check("name gt 'A' and name lt 'D'"));
        assert!(check("CreditLimit gt 1500 and CreditLimit le 1500.5"));
        assert!(!check("CreditLimit lt 1500.5"));
        assert!(check("customertypecode eq 3 and count ge 7 and count ne 8"));
        assert!(check("active eq true") && !check("active eq false"));
        assert!(
            check("modifiedon eq 2026-05-01T08:00:00Z"),
            "instants compare across offsets"
        );
        assert!(check("modifiedon gt 2026-05-01T07:59:59Z"));
        assert!(check("created eq 2026-05-01") && check("created lt 2026-05-01T00:00:01Z"));
        assert!(check("parent eq 'abc-1'"));
        assert!(check(
            "startswith(name,'Con') and contains(name,'so L') and endswith(name,'Ltd')"
        ));
        assert!(check("startswith(PartyType,'org')"));
        assert!(!check("endswith(count,'7')"), "text functions need text");
    }

    #[test]
    fn missing_and_null_fields_are_null() {
        assert!(check("missing eq null") && check("empty eq null"));
        assert!(!check("missing ne null") && check("name ne null"));
        assert!(!check("name eq null"));
        assert!(!check("missing eq 'x'") && check("missing ne 'x'"));
        assert!(!check("missing gt 1") && !check("missing lt 1"));
        assert!(!check("startswith(missing,'a')"));
        assert!(check("not (missing gt 1)"));
    }

    #[test]
    fn incomparable_types_are_unequal_and_unordered() {
        assert!(!check("count eq '7'") && check("count ne '7'"));
        assert!(!check("name gt 5") && !check("name lt 5"));
        assert!(check("active ne 1"));
    }

    #[test]
    fn renders_minimal_odata() {
        let cases = [
            "PartyType eq 'Organization'",
            "a eq 1 or b eq 2 and c eq 3",
            "(a eq 1 or b eq 2) and c eq 3",
            "a eq 1 and (b eq 2 and c eq 3)",
            "a eq 1 or (b eq 2 or c eq 3)",
            "not (a eq 1) and not startswith(n,'it''s')",
            "not (a eq 1 and b eq null)",
            "t ge 2026-05-01T00:00:00Z and t lt 2026-05-01T10:30:00.500+02:00",
            "x eq -1.25 and y eq true",
        ];
        for case in cases {
            let parsed = parse_filter(case).unwrap();
            assert_eq!(parsed.to_odata(), case, "rendering of {case}");
            assert_eq!(parse_filter(&parsed.to_odata()).unwrap(), parsed);
        }
        let redundant = parse_filter("((a eq 1) and (b eq 2))").unwrap();
        assert_eq!(redundant.to_odata(), "a eq 1 and b eq 2");
    }

    fn field_name() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_]{0,8}".prop_filter("not a keyword", |w| {
            !is_keyword(w) && TextFunc::from_word(w).is_none()
        })
    }

    fn literal() -> impl Strategy<Value = Literal> {
        prop_oneof![
            Just(Literal::Null),
            any::<String>().prop_map(Literal::Text),
            (any::<i64>(), 0u32..10).prop_map(|(m, s)| Literal::Number(Decimal::new(m, s))),
            any::<bool>().prop_map(Literal::Boolean),
            (0i64..4_000_000_000, -14 * 60..=14i32 * 60).prop_map(|(secs, off)| {
                let offset = FixedOffset::east_opt(off * 60).unwrap();
                Literal::DateTime(Utc.timestamp_opt(secs, 0).unwrap().with_timezone(&offset))
            }),
            (
                "[A-Z][a-z]{1,6}(\\.[A-Z][A-Za-z]{1,8}){1,3}",
                any::<String>()
            )
                .prop_map(|(ty, symbol)| Literal::Enum { ty, symbol }),
        ]
    }

    fn filter() -> impl Strategy<Value = Filter> {
        let op = prop_oneof![
            Just(CompareOp::Eq),
            Just(CompareOp::Ne),
            Just(CompareOp::Gt),
            Just(CompareOp::Ge),
            Just(CompareOp::Lt),
            Just(CompareOp::Le)
        ];
        let func = prop_oneof![
            Just(TextFunc::StartsWith),
            Just(TextFunc::Contains),
            Just(TextFunc::EndsWith)
        ];
        let leaf =
            prop_oneof![
                (field_name(), op, literal()).prop_map(|(field, op, value)| Filter::Compare {
                    field,
                    op,
                    value
                }),
                (func, field_name(), any::<String>())
                    .prop_map(|(func, field, value)| Filter::Text { func, field, value }),
            ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Filter::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Filter::Or(Box::new(a), Box::new(b))),
                inner.prop_map(|a| Filter::Not(Box::new(a))),
            ]
        })
    }

    proptest! {
        #[test]
        fn to_odata_parses_back_to_the_same_filter(f in filter()) {
            let text = f.to_odata();
            let parsed = parse_filter(&text);
            prop_assert_eq!(parsed, Ok(f), "text: {}", text);
        }

        #[test]
        fn caseless_order_is_the_order_of_the_lower_cased_texts(
            a in "[A-Za-z0-9 éÉßü_-]{0,8}",
            b in "[A-Za-z0-9 éÉßü_-]{0,8}",
        ) {
            prop_assert_eq!(cmp_ignoring_case(&a, &b), a.to_lowercase().cmp(&b.to_lowercase()));
        }
    }
}
