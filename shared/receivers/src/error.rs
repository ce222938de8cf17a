//! Why a payload was refused (answered 400): each variant names the part that is wrong.

/// A body the receivers cannot turn into a change event. Answered with 400 and this message;
/// the sender logs it (Dataverse System Job, F&O business-event error log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The body is not JSON at all.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// A required field is absent (path like `InputParameters[0].value.Attributes`).
    #[error("missing field \"{0}\"")]
    Missing(String),
    /// A field has the wrong JSON type.
    #[error("field \"{field}\": expected {expected}")]
    WrongType {
        /// Path of the field.
        field: String,
        /// What it should be (`a number`, `a string`, `a list of {key, value}`…).
        expected: &'static str,
    },
    /// A field of the right JSON type holding a value it cannot hold (an option value that is
    /// not a 32-bit whole number, a Money beyond 28 digits, a negative `Depth`, a null key
    /// attribute). Refused rather than defaulted: a made-up value would be synced as real.
    #[error("field \"{field}\": {value} is not {expected}")]
    BadValue {
        /// Path of the field.
        field: String,
        /// The value found, as sent.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// An EntityReference with neither an `Id` (or only the empty GUID) nor `KeyAttributes`.
    #[error(
        "field \"{field}\": the EntityReference has neither an Id nor KeyAttributes, so it names no record"
    )]
    UnidentifiedReference {
        /// Path of the reference.
        field: String,
    },
    /// A Dataverse/data-event context without the `Target` input parameter.
    #[error("InputParameters: no \"Target\" entry")]
    NoTarget,
    /// A WCF date that does not parse.
    #[error("field \"{field}\": \"{value}\" is not a WCF date like /Date(1506384247000-0700)/")]
    BadDate {
        /// Path of the field.
        field: String,
        /// The text found.
        value: String,
    },
    /// A date-time in ISO 8601 that does not parse.
    #[error("field \"{field}\": \"{value}\" is not an ISO 8601 date-time")]
    BadIsoDate {
        /// Path of the field.
        field: String,
        /// The text found.
        value: String,
    },
    /// A message the receiver does not handle.
    #[error("MessageName \"{found}\" is not handled here: expected one of {expected}")]
    UnsupportedMessage {
        /// The message in the body.
        found: String,
        /// The messages this endpoint accepts.
        expected: &'static str,
    },
    /// A `x-ms-dynamics-*` header disagrees with the body.
    #[error("header {header} is \"{header_value}\" but the body's {field} is \"{body_value}\"")]
    HeaderMismatch {
        /// The header name.
        header: &'static str,
        /// Its value.
        header_value: String,
        /// The body field it must agree with.
        field: &'static str,
        /// The body's value.
        body_value: String,
    },
    /// An F&O record whose key cannot be built from the payload.
    #[error(
        "{entity}: key field \"{field}\" is missing from the payload (looked in {looked_in}); the record key cannot be built"
    )]
    MissingKey {
        /// The F&O entity.
        entity: String,
        /// The key field.
        field: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// An F&O body that is neither kind of event.
    #[error(
        "body is neither an F&O business event (no \"BusinessEventId\") nor a data event (no \"MessageName\")"
    )]
    UnknownFnoPayload,
}
