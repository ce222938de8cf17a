//! Record filters: the subset of OData `$filter` that table maps use, parsed and evaluated here.

use rust_decimal::Decimal;
use serde::Serialize;

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    /// `field op literal`.
    Compare { field: String, op: CompareOp, value: Literal },
    /// `startswith(field,'x')`, `contains(field,'x')`, `endswith(field,'x')`.
    Text { func: TextFunc, field: String, value: String },
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
}
