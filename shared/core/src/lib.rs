//! dualwrite-core: the part of dualwrite that does no I/O.
//!
//! It knows what a record is ([`record`], [`value`]), what a table map says ([`map`]), how a
//! record of one side becomes a record of the other ([`map`]'s transforms), when a change must
//! be written, skipped, parked or treated as a conflict ([`decision`]), and which services the
//! engine needs from the outside world ([`ports`]). Adapters (SQLite, SQS/DynamoDB, HTTP
//! connectors, simulators) live in other crates and implement the port traits.
//!
//! Invariant: this crate never touches the network, the file system or a clock; it has no
//! AWS, SQLite or HTTP dependency.

pub mod decision;
pub mod error_policy;
pub mod event;
pub mod fields;
pub mod hash;
pub mod map;
pub mod ports;
pub mod record;
pub mod value;

pub use event::{ChangeEvent, Operation};
pub use fields::Fields;
pub use record::{IntegrationKey, Record, RecordKey, Side, SourceVersion};
/// Field names and text values: short strings (the usual field name or value) are kept inline,
/// so copying a record does not allocate per field.
pub use smol_str::{SmolStr, ToSmolStr, format_smolstr};
pub use value::{LookupRef, Value, ValueType};
