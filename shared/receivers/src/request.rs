//! The plain request and response types every receiver takes and returns (no HTTP framework).

use serde_json::json;

/// Which kind of sender a request comes from, decided by the endpoint it was posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// A Dataverse webhook (a `serviceendpoint` with contract 8, message format JSON).
    Dataverse,
    /// Finance & Operations: a data event (RemoteExecutionContext with `OnExternal*` messages)
    /// or a business event (JSON envelope with `BusinessEventId`); told apart by the body.
    Fno,
}

impl SourceKind {
    /// The kind for an endpoint path: the last path segment `dataverse`/`crm` or `fno`/`erp`
    /// (`/webhooks/dataverse`, `/webhooks/fno`). `None` for any other path.
    pub fn from_path(path: &str) -> Option<SourceKind> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let last = path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default();
        match last.to_ascii_lowercase().as_str() {
            "dataverse" | "crm" => Some(SourceKind::Dataverse),
            "fno" | "erp" => Some(SourceKind::Fno),
            _ => None,
        }
    }

    /// `dataverse` or `fno`, for logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Dataverse => "dataverse",
            SourceKind::Fno => "fno",
        }
    }
}

/// One webhook call as the HTTP layer (axum, a Lambda function URL, a test) received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// Which endpoint the request was posted to.
    pub source: SourceKind,
    /// Query parameters, already percent-decoded, in request order.
    pub query: Vec<(String, String)>,
    /// Request headers in request order; names are looked up case-insensitively.
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: Vec<u8>,
}

impl WebhookRequest {
    /// A request with no query and no headers.
    pub fn new(source: SourceKind, body: impl Into<Vec<u8>>) -> Self {
        WebhookRequest {
            source,
            query: Vec::new(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds a query parameter (builder style).
    pub fn with_query(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((name.into(), value.into()));
        self
    }

    /// The first header named `name`, compared ASCII case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first query parameter named `name` (case-sensitive, as in URLs).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What to answer the sender: a status and a small JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookResponse {
    /// HTTP status: 202 accepted, 200 ignored or settled, 400 bad payload, 401 bad
    /// credentials, 413 too large, 503 queue unavailable (the sender retries).
    pub status: u16,
    /// JSON: `{"accepted":1}`, `{"ignored":1}`, `{"settled":1,"reason":"echo"}` or
    /// `{"error":"…"}`.
    pub body: String,
}

impl WebhookResponse {
    /// 202 `{"accepted":1}`: the event is durably queued.
    pub fn accepted() -> Self {
        WebhookResponse {
            status: 202,
            body: json!({ "accepted": 1 }).to_string(),
        }
    }

    /// 200 `{"ignored":1}`: well-formed, but no enabled map covers the entity.
    pub fn ignored() -> Self {
        WebhookResponse {
            status: 200,
            body: json!({ "ignored": 1 }).to_string(),
        }
    }

    /// 200 `{"settled":1,"reason":…}`: well-formed, and its effect is already recorded (the
    /// echo of dualwrite's own write, a duplicate, a stale change): nothing to queue.
    pub fn settled(reason: &str) -> Self {
        WebhookResponse {
            status: 200,
            body: json!({ "settled": 1, "reason": reason }).to_string(),
        }
    }

    /// An error answer with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        WebhookResponse {
            status,
            body: json!({ "error": message.into() }).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup_ignores_case() {
        let req = WebhookRequest::new(SourceKind::Dataverse, "{}")
            .with_header("X-MS-Dynamics-Entity-Name", "contact");
        assert_eq!(req.header("x-ms-dynamics-entity-name"), Some("contact"));
        assert_eq!(req.header("x-ms-dynamics-request-name"), None);
    }

    #[test]
    fn source_kind_from_path() {
        assert_eq!(
            SourceKind::from_path("/webhooks/dataverse"),
            Some(SourceKind::Dataverse)
        );
        assert_eq!(
            SourceKind::from_path("/webhooks/fno/"),
            Some(SourceKind::Fno)
        );
        assert_eq!(
            SourceKind::from_path("/webhooks/erp?code=x"),
            Some(SourceKind::Fno)
        );
        assert_eq!(SourceKind::from_path("/webhooks/other"), None);
    }

    #[test]
    fn error_body_is_json_with_the_message() {
        let r = WebhookResponse::error(400, "field \"Depth\": expected a number");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "field \"Depth\": expected a number");
    }
}
