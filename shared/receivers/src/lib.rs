//! Webhook receivers: Dataverse webhooks, F&O data and business events into change events.
//!
//! Free of any HTTP framework, store or runtime: a receiver takes a plain [`WebhookRequest`]
//! and answers a plain [`WebhookResponse`], writing only through the core's
//! [`WorkQueue`](dualwrite_core::ports::WorkQueue) port. `dualwrite serve` wraps [`receive`]
//! in axum; the Lambda functions wrap it unchanged. The parse functions
//! ([`parse_dataverse`], [`parse_data_event`], [`parse_business_event`], [`parse_fno`]) are
//! pure.
//!
//! Codemap: [`request`] the plain types, [`config`] credentials/limits/coverage, [`auth`]
//! secret checks, `context` RemoteExecutionContext decoding (WCF dates, typed values),
//! [`dataverse`] and [`fno`] the per-source parsers, [`receive`](mod@receive) the entry point and
//! counters, [`screen`] the port that recognises settled changes (echoes) before they are
//! queued, [`error`] what a 400 names.

pub mod auth;
pub mod config;
mod context;
pub mod dataverse;
pub mod error;
pub mod fno;
mod json;
pub mod receive;
pub mod request;
pub mod screen;

pub use auth::{AuthError, constant_time_eq};
pub use config::{
    BusinessEventRoute, Coverage, CrmCoverage, DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
    ErpCoverage, ReceiverConfig, SourceAuth,
};
pub use context::parse_wcf_date;
pub use dataverse::parse_dataverse;
pub use error::PayloadError;
pub use fno::{parse_business_event, parse_data_event, parse_fno};
pub use receive::{
    Accepted, Incomplete, Parsed, ReceiverStats, StatsSnapshot, credentials_ok, receive,
    receive_incomplete, receive_oversized, receive_screened,
};
pub use request::{SourceKind, WebhookRequest, WebhookResponse};
pub use screen::{EventScreen, NoScreen};
