//! OData `$batch` in its multipart form (Dataverse and F&O): building a batch — one atomic
//! changeset of writes ([`build_changeset_batch`]), or independent parts, each read a top-level
//! request and each write a changeset of its own ([`build_batch`]) — sending independent parts
//! with `Prefer: odata.continue-on-error` ([`send_parts`]), and splitting the multipart answer
//! back into one response per request ([`parse_batch_response`]).

use std::fmt::Write as _;

use dualwrite_core::Side;
use dualwrite_core::ports::{
    CallResult, ConnectorCall, ConnectorError, ConnectorErrorKind, WriteOutcome,
};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tracing::debug;

use crate::dataverse::wire::id_from_entity_url;
use crate::http::{HttpResponse, ODataClient, ODataRequest};

/// One request inside a `$batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    /// `GET`, `POST`, `PATCH`, `DELETE`.
    pub method: String,
    /// Absolute URL of the request.
    pub url: String,
    /// Extra headers (`If-Match`, `Prefer`).
    pub headers: Vec<(String, String)>,
    /// JSON body, when the request has one.
    pub body: Option<String>,
}

impl From<ODataRequest> for BatchRequest {
    /// The same request inside a batch (its body, if any, is JSON).
    fn from(request: ODataRequest) -> Self {
        BatchRequest {
            method: request.method.to_string(),
            url: request.url,
            headers: request.headers,
            body: request.body.map(|(_, body)| body),
        }
    }
}

/// A top-level part of a `$batch` of independent calls: each part is answered exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchPart {
    /// A request on its own (reads: a `GET` may not be inside a changeset).
    Request(BatchRequest),
    /// A write in a changeset of its own: atomic alone, and independent of the other parts.
    Changeset(BatchRequest),
}

/// One answer from a `$batch` response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    /// The `Content-ID` of the request it answers, when the server echoed it.
    pub content_id: Option<String>,
    /// HTTP status of the inner response.
    pub status: u16,
    /// Inner response headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Inner response body.
    pub body: String,
}

impl BatchResponse {
    /// An inner header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The inner response as the answer of a request sent on its own (status, headers and
    /// body), so it is read by the same code as a single call's answer. Headers that are not
    /// valid HTTP are left out.
    pub fn into_http(self) -> HttpResponse {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        HttpResponse {
            status: self.status,
            headers,
            body: self.body,
        }
    }
}

/// Writes one request as a multipart part (`Content-ID` when given).
fn write_request(out: &mut String, content_id: Option<usize>, r: &BatchRequest) {
    // Writing to a String cannot fail.
    out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(id) = content_id {
        let _ = write!(out, "Content-ID: {id}\r\n");
    }
    let _ = write!(out, "\r\n{} {} HTTP/1.1\r\n", r.method, r.url);
    if r.body.is_some() {
        out.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in &r.headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("\r\n");
    if let Some(body) = &r.body {
        out.push_str(body);
    }
    out.push_str("\r\n");
}

/// Writes a changeset holding `requests` as one part of batch `batch`; Content-IDs count on
/// from `next_id`.
fn write_changeset(
    out: &mut String,
    batch: &str,
    changeset: &str,
    requests: &[&BatchRequest],
    next_id: &mut usize,
) {
    let _ = write!(
        out,
        "--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
    );
    for r in requests {
        let _ = write!(out, "--{changeset}\r\n");
        write_request(out, Some(*next_id), r);
        *next_id += 1;
    }
    let _ = write!(out, "--{changeset}--\r\n");
}

/// Builds a `$batch` body holding `requests` in one changeset (all or nothing). Returns the
/// request's `Content-Type` header and body. Content-IDs are 1-based request positions.
pub fn build_changeset_batch(id: &str, requests: &[BatchRequest]) -> (String, String) {
    let batch = format!("batch_{id}");
    let mut out = String::new();
    let all: Vec<&BatchRequest> = requests.iter().collect();
    write_changeset(&mut out, &batch, &format!("changeset_{id}"), &all, &mut 1);
    let _ = write!(out, "--{batch}--\r\n");
    (format!("multipart/mixed; boundary={batch}"), out)
}

/// Builds a `$batch` body of independent `parts`, in order: each [`BatchPart::Request`] a
/// top-level request, each [`BatchPart::Changeset`] a changeset of its own (boundary
/// `changeset_<id>_<n>`, Content-ID numbered over the batch). Returns the request's
/// `Content-Type` header and body.
pub fn build_batch(id: &str, parts: &[BatchPart]) -> (String, String) {
    let batch = format!("batch_{id}");
    let mut out = String::new();
    let mut next_id = 1;
    for (n, part) in parts.iter().enumerate() {
        match part {
            BatchPart::Request(r) => {
                let _ = write!(out, "--{batch}\r\n");
                write_request(&mut out, None, r);
            }
            BatchPart::Changeset(r) => {
                let changeset = format!("changeset_{id}_{}", n + 1);
                write_changeset(&mut out, &batch, &changeset, &[r], &mut next_id);
            }
        }
    }
    let _ = write!(out, "--{batch}--\r\n");
    (format!("multipart/mixed; boundary={batch}"), out)
}

/// The `boundary` parameter of a multipart content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').map(str::trim).find_map(|p| {
        p.strip_prefix("boundary=")
            .map(|b| b.trim_matches('"').to_string())
    })
}

fn split_head(part: &str) -> (&str, &str) {
    if let Some(i) = part.find("\r\n\r\n") {
        (&part[..i], &part[i + 4..])
    } else if let Some(i) = part.find("\n\n") {
        (&part[..i], &part[i + 2..])
    } else {
        (part, "")
    }
}

fn headers_of(head: &str) -> Vec<(String, String)> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

/// Splits a multipart `$batch` answer (nested changesets included) into its responses, in
/// order. `content_type` is the answer's `Content-Type` header.
pub fn parse_batch_response(content_type: &str, body: &str) -> Result<Vec<BatchResponse>, String> {
    let boundary = boundary_of(content_type).ok_or_else(|| {
        format!("the $batch answer has no multipart boundary (Content-Type {content_type})")
    })?;
    let mut out = Vec::new();
    let delimiter = format!("--{boundary}");
    for part in body.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.trim_start_matches(['\r', '\n']);
        let (head, content) = split_head(part);
        let headers = headers_of(head);
        let part_type = headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if part_type.starts_with("multipart/mixed") {
            out.extend(parse_batch_response(part_type, content)?);
            continue;
        }
        let content_id = headers
            .iter()
            .find(|(n, _)| n == "content-id")
            .map(|(_, v)| v.clone());
        let (inner_head, inner_body) = split_head(content);
        let mut lines = inner_head.lines();
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("unreadable status line in $batch answer: {status_line:?}"))?;
        let inner_headers = headers_of(&lines.collect::<Vec<_>>().join("\n"));
        out.push(BatchResponse {
            content_id,
            status,
            headers: inner_headers,
            body: inner_body.trim_end_matches(['\r', '\n']).to_string(),
        });
    }
    Ok(out)
}

/// True for a `multipart/mixed` answer: the answer of a `$batch`, whatever its status.
pub(crate) fn is_multipart(answer: &HttpResponse) -> bool {
    answer.header("Content-Type").is_some_and(|t| {
        t.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/mixed")
    })
}

/// True for an inner answer that [`ODataClient::send`] would count as a failure had it come on
/// its own: anything but 2xx and 304.
fn part_failed(part: &BatchResponse) -> bool {
    !(200..300).contains(&part.status) && part.status != 304
}

/// Reads the answer to a `$batch` sent about `entity`: its parts, in order, or the failure of
/// the whole request.
///
/// Without `Prefer: odata.continue-on-error` Dataverse stops a batch at the first failing part
/// and answers the whole batch 400 with a multipart body holding the parts it processed, the
/// failing one last. That 400 says nothing of its own: the failing part's status, headers
/// (`Retry-After`) and server message are the failure, so a multipart answer is split into its
/// parts whatever its status, and the caller classifies each part like a single answer (412 is
/// re-read, 429 waits `Retry-After`, 5xx backs off). A non-multipart failure (401, a 429 or 5xx
/// of the whole request, a gateway error) is the failure of every part.
///
/// Each failing part is counted in the client's counters as a failed single request would be
/// ([`ODataClient::send`] leaves multipart answers to this function), so throttling and
/// conflicts inside a batch show in the counters as they do outside one.
///
/// # Errors
/// The answer's own error when it is not multipart and not 2xx; a transient error when the
/// body cannot be read as multipart; the answer's status (with a message saying so) when a
/// non-2xx multipart answer holds no failing part.
pub(crate) fn read_batch_answer(
    client: &ODataClient,
    entity: &str,
    answer: &HttpResponse,
) -> Result<Vec<BatchResponse>, ConnectorError> {
    if !answer.is_success() && !is_multipart(answer) {
        return Err(answer.to_error(client.side(), entity));
    }
    let content_type = answer.header("Content-Type").unwrap_or_default();
    let parts = parse_batch_response(content_type, &answer.body)
        .map_err(|e| client.bad_answer(entity, e))?;
    let mut failed = 0;
    for part in parts.iter().filter(|p| part_failed(p)) {
        failed += 1;
        let error = part.clone().into_http().to_error(client.side(), entity);
        client.stats().failure(&error.kind);
    }
    if !answer.is_success() && failed == 0 {
        let mut error = answer.to_error(client.side(), entity);
        client.stats().failure(&error.kind);
        error.message = format!(
            "the $batch answered {} with {} part(s), none of them failing, so nothing says what \
             went wrong",
            answer.status,
            parts.len()
        );
        return Err(error);
    }
    Ok(parts)
}

/// One result per item from the parts of a changeset answer: one part per item when it
/// committed; one error part for all when it was rolled back.
///
/// A rolled-back changeset fails every item, but not for the same reason. When the failing
/// part names its request (`Content-ID`, the item's 1-based position) and its failure belongs
/// to that record (400, 404, 412), that item gets it and every other item a transient error
/// saying it was rolled back with it: retried alone, they are written, where the failing
/// item's permanent error would have dead-lettered good records. A failure of the request as a
/// whole (401, 403, 429, 5xx), or a part that does not say which item it is, is every item's.
pub(crate) fn batch_outcomes(
    side: Side,
    entity: &str,
    items: usize,
    parts: &[BatchResponse],
) -> Result<Vec<Result<WriteOutcome, ConnectorError>>, ConnectorError> {
    let to_error = |p: &BatchResponse| p.clone().into_http().to_error(side, entity);
    if parts.len() == items {
        return Ok(parts
            .iter()
            .map(|p| {
                if (200..300).contains(&p.status) {
                    Ok(WriteOutcome {
                        id: p.header("odata-entityid").and_then(id_from_entity_url),
                        etag: p.header("etag").map(str::to_string),
                        version: None,
                        created: p.status == 201,
                    })
                } else {
                    Err(to_error(p))
                }
            })
            .collect());
    }
    match parts.iter().find(|p| !(200..300).contains(&p.status)) {
        Some(failed) => {
            let own = to_error(failed);
            let position = failed
                .content_id
                .as_deref()
                .and_then(|id| id.trim().parse::<usize>().ok())
                .filter(|n| (1..=items).contains(n));
            let item_specific = matches!(
                own.kind,
                ConnectorErrorKind::BadRequest
                    | ConnectorErrorKind::NotFound
                    | ConnectorErrorKind::PreconditionFailed
            );
            match position {
                Some(n) if item_specific => Ok((1..=items)
                    .map(|i| {
                        if i == n {
                            Err(own.clone())
                        } else {
                            Err(ConnectorError {
                                side,
                                entity: entity.to_string(),
                                kind: ConnectorErrorKind::Transient,
                                status: None,
                                message: format!(
                                    "not written: the changeset was rolled back because item \
                                     {n} of {items} failed (HTTP {}): {}",
                                    failed.status, own.message
                                ),
                            })
                        }
                    })
                    .collect()),
                _ => {
                    let mut e = own;
                    e.message = format!("the changeset was rolled back: {}", e.message);
                    Ok((0..items).map(|_| Err(e.clone())).collect())
                }
            }
        }
        None => Err(ConnectorError {
            side,
            entity: entity.to_string(),
            kind: ConnectorErrorKind::Transient,
            status: None,
            message: format!(
                "the $batch answer holds {} responses for {items} requests",
                parts.len()
            ),
        }),
    }
}

/// The results of a `call_many` from one slot per call: a slot left empty (which would be a
/// bug of the connector) becomes a transient error of that call, never a missing result.
pub(crate) fn collect_results(
    side: Side,
    calls: &[ConnectorCall],
    slots: Vec<Option<CallResult>>,
) -> Vec<CallResult> {
    debug_assert!(slots.iter().all(Option::is_some), "a call got no result");
    calls
        .iter()
        .zip(slots)
        .map(|(call, slot)| {
            slot.unwrap_or_else(|| {
                call.failed(ConnectorError {
                    side,
                    entity: call.entity().to_string(),
                    kind: ConnectorErrorKind::Transient,
                    status: None,
                    message: "the call got no result from its $batch; it is retried".into(),
                })
            })
        })
        .collect()
}

/// What [`send_parts`] names as the entity of a failure of a whole `$batch`; see
/// [`for_call`].
pub const WHOLE_BATCH: &str = "$batch";

/// A failure of the `$batch` that carried a call, as that call's own error: about `entity`,
/// with the same kind, status and server message (prefixed so the log tells it came through a
/// batch).
pub fn for_call(error: &ConnectorError, entity: &str) -> ConnectorError {
    ConnectorError {
        entity: entity.to_string(),
        message: format!("the $batch carrying this call failed: {}", error.message),
        ..error.clone()
    }
}

/// Sends independent `parts` to the `$batch` endpoint `url`, at most `max_parts` per request,
/// each with `Prefer: odata.continue-on-error` so one failing part does not stop the others.
/// Returns one result per part, in order: the part's own answer (any status, read like a single
/// request's answer), or — when the whole `$batch` failed (401 after the one token refresh,
/// 429, 5xx, a transport failure, an unreadable answer) — that failure, with entity
/// [`WHOLE_BATCH`] (see [`for_call`]), for each part it carried.
///
/// A server that ignores `odata.continue-on-error` stops at the first failing part and answers
/// the parts up to it only; the parts it did not process are sent again in a new `$batch` (they
/// were never executed, so this is no retry).
pub async fn send_parts(
    client: &ODataClient,
    url: &str,
    parts: &[BatchPart],
    max_parts: usize,
) -> Vec<Result<HttpResponse, ConnectorError>> {
    let mut results = Vec::with_capacity(parts.len());
    for chunk in parts.chunks(max_parts.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match send_once(client, url, rest).await {
                Ok(answers) => {
                    let answered = answers.len();
                    if answered < rest.len() {
                        debug!(
                            side = %client.side(),
                            answered,
                            sent = rest.len(),
                            "the $batch stopped at a failing part; sending the rest again"
                        );
                    }
                    results.extend(answers.into_iter().map(|a| Ok(a.into_http())));
                    rest = &rest[answered..];
                }
                Err(e) => {
                    results.extend(rest.iter().map(|_| Err(e.clone())));
                    rest = &[];
                }
            }
        }
    }
    results
}

/// Sends `parts` as one `$batch`; the answers of the parts the server processed, in order (at
/// least one), or the failure of the whole request.
async fn send_once(
    client: &ODataClient,
    url: &str,
    parts: &[BatchPart],
) -> Result<Vec<BatchResponse>, ConnectorError> {
    let id = format!("{:016x}", rand::random::<u64>());
    let (content_type, body) = build_batch(&id, parts);
    let request = ODataRequest::new(Method::POST, url)
        .header("Prefer", "odata.continue-on-error")
        .body(content_type, body);
    let answer = client.send(WHOLE_BATCH, request).await?;
    let answers = read_batch_answer(client, WHOLE_BATCH, &answer)?;
    if answers.is_empty() || answers.len() > parts.len() {
        return Err(client.bad_answer(
            WHOLE_BATCH,
            format!(
                "the $batch answer holds {} responses for {} requests",
                answers.len(),
                parts.len()
            ),
        ));
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changeset_batch_is_multipart_with_content_ids() {
        let (ct, body) = build_changeset_batch(
            "abc",
            &[
                BatchRequest {
                    method: "PATCH".into(),
                    url: "https://x/data/E(k='1')".into(),
                    headers: vec![("If-Match".into(), "*".into())],
                    body: Some("{\"a\":1}".into()),
                },
                BatchRequest {
                    method: "POST".into(),
                    url: "https://x/data/E".into(),
                    headers: vec![],
                    body: Some("{}".into()),
                },
            ],
        );
        assert_eq!(ct, "multipart/mixed; boundary=batch_abc");
        assert!(body.starts_with(
            "--batch_abc\r\nContent-Type: multipart/mixed; boundary=changeset_abc\r\n\r\n"
        ));
        assert!(body.contains("Content-ID: 1\r\n\r\nPATCH https://x/data/E(k='1') HTTP/1.1\r\nContent-Type: application/json\r\nIf-Match: *\r\n\r\n{\"a\":1}\r\n"));
        assert!(body.contains("Content-ID: 2\r\n\r\nPOST https://x/data/E HTTP/1.1\r\n"));
        assert!(body.ends_with("--changeset_abc--\r\n--batch_abc--\r\n"));
    }

    #[test]
    fn independent_parts_are_top_level_reads_and_one_changeset_per_write() {
        let get = BatchRequest {
            method: "GET".into(),
            url: "https://x/data/E(k='1')?cross-company=true".into(),
            headers: vec![],
            body: None,
        };
        let patch = BatchRequest {
            method: "PATCH".into(),
            url: "https://x/data/E(k='2')".into(),
            headers: vec![("If-Match".into(), "W/\"4\"".into())],
            body: Some("{}".into()),
        };
        let (ct, body) = build_batch(
            "b1",
            &[
                BatchPart::Request(get.clone()),
                BatchPart::Changeset(patch.clone()),
                BatchPart::Changeset(patch),
                BatchPart::Request(get),
            ],
        );
        assert_eq!(ct, "multipart/mixed; boundary=batch_b1");
        assert!(body.starts_with(
            "--batch_b1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
GET https://x/data/E(k='1')?cross-company=true HTTP/1.1\r\n\r\n\r\n"
        ));
        assert!(body.contains(
            "--batch_b1\r\nContent-Type: multipart/mixed; boundary=changeset_b1_2\r\n\r\n\
--changeset_b1_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
PATCH https://x/data/E(k='2') HTTP/1.1\r\nContent-Type: application/json\r\nIf-Match: W/\"4\"\r\n\r\n{}\r\n\
--changeset_b1_2--\r\n"
        ));
        assert!(body.contains("boundary=changeset_b1_3\r\n"));
        assert!(body.contains("Content-ID: 2\r\n"));
        assert!(body.ends_with("HTTP/1.1\r\n\r\n\r\n--batch_b1--\r\n"));
        assert_eq!(body.matches("GET ").count(), 2);
    }

    fn part(content_id: Option<&str>, status: u16, message: &str) -> BatchResponse {
        BatchResponse {
            content_id: content_id.map(str::to_string),
            status,
            headers: vec![("retry-after".into(), "2".into())],
            body: format!(r#"{{"error":{{"code":"","message":"{message}"}}}}"#),
        }
    }

    #[test]
    fn a_rolled_back_changeset_blames_only_the_item_that_failed() {
        let out = batch_outcomes(
            Side::Erp,
            "CustomersV3",
            3,
            &[part(Some("2"), 400, "Field 'CreditLimit' is not valid.")],
        )
        .unwrap();
        assert_eq!(out.len(), 3);
        let failed = out[1].as_ref().unwrap_err();
        assert_eq!(failed.kind, ConnectorErrorKind::BadRequest);
        assert_eq!(failed.status, Some(400));
        assert_eq!(failed.message, "Field 'CreditLimit' is not valid.");
        for i in [0, 2] {
            let e = out[i].as_ref().unwrap_err();
            assert_eq!(e.kind, ConnectorErrorKind::Transient, "item {i}");
            assert_eq!(e.status, None);
            assert_eq!(
                e.message,
                "not written: the changeset was rolled back because item 2 of 3 failed \
                 (HTTP 400): Field 'CreditLimit' is not valid."
            );
        }
    }

    #[test]
    fn a_changeset_failing_as_a_whole_or_unnamed_fails_every_item_alike() {
        for failing in [
            part(Some("2"), 429, "slow down"),
            part(Some("2"), 503, "unavailable"),
            part(None, 400, "bad"),
            part(Some("7"), 400, "bad"),
            part(Some("x"), 404, "gone"),
        ] {
            let own = failing.clone().into_http().to_error(Side::Crm, "accounts");
            let out =
                batch_outcomes(Side::Crm, "accounts", 3, std::slice::from_ref(&failing)).unwrap();
            assert_eq!(out.len(), 3);
            for r in &out {
                let e = r.as_ref().unwrap_err();
                assert_eq!((&e.kind, e.status), (&own.kind, own.status), "{failing:?}");
                assert_eq!(
                    e.message,
                    format!("the changeset was rolled back: {}", own.message)
                );
            }
        }
    }

    #[test]
    fn an_inner_answer_reads_like_a_single_answer() {
        let answer = BatchResponse {
            content_id: Some("1".into()),
            status: 429,
            headers: vec![
                ("retry-after".into(), "3".into()),
                ("etag".into(), "W/\"5\"".into()),
                ("bad header".into(), "x".into()),
            ],
            body: r#"{"error":{"code":"0x80072322","message":"slow down"}}"#.into(),
        }
        .into_http();
        assert_eq!(answer.header("ETag"), Some("W/\"5\""));
        let e = answer.to_error(Side::Crm, "accounts");
        assert_eq!(
            e.kind,
            ConnectorErrorKind::Throttled {
                retry_after_ms: 3000
            }
        );
        assert_eq!(e.message, "0x80072322: slow down");
    }

    #[test]
    fn nested_changeset_answers_are_split() {
        let body = "--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
HTTP/1.1 204 No Content\r\nOData-EntityId: https://x/api/data/v9.2/accounts(1)\r\n\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nETag: W/\"5\"\r\n\r\n{\"id\":2}\r\n\
--changesetresponse_2--\r\n--batchresponse_1--\r\n";
        let r = parse_batch_response("multipart/mixed; boundary=batchresponse_1", body).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].status, 204);
        assert_eq!(r[0].content_id.as_deref(), Some("1"));
        assert_eq!(
            r[0].header("OData-EntityId"),
            Some("https://x/api/data/v9.2/accounts(1)")
        );
        assert_eq!(r[1].status, 201);
        assert_eq!(r[1].header("etag"), Some("W/\"5\""));
        assert_eq!(r[1].body, "{\"id\":2}");
    }

    #[test]
    fn a_failed_changeset_answers_once() {
        let body = "--batchresponse_9\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"0x80060882\",\"message\":\"stale\"}}\r\n--batchresponse_9--\r\n";
        let r =
            parse_batch_response("multipart/mixed; boundary=\"batchresponse_9\"", body).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, 412);
        assert!(r[0].body.contains("stale"));
        assert!(parse_batch_response("application/json", "{}").is_err());
    }
}
