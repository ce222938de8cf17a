//! OData `$batch` in its multipart form (Dataverse and F&O): one atomic changeset of writes
//! built as `multipart/mixed`, and the multipart answer split back into one response per
//! request.

use std::fmt::Write as _;

/// One request inside a changeset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    /// `POST`, `PATCH`, `DELETE`.
    pub method: String,
    /// Absolute URL of the request.
    pub url: String,
    /// Extra headers (`If-Match`, `Prefer`).
    pub headers: Vec<(String, String)>,
    /// JSON body, when the request has one.
    pub body: Option<String>,
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
}

/// Builds a `$batch` body holding `requests` in one changeset (all or nothing). Returns the
/// request's `Content-Type` header and body. Content-IDs are 1-based request positions.
pub fn build_changeset_batch(id: &str, requests: &[BatchRequest]) -> (String, String) {
    let batch = format!("batch_{id}");
    let changeset = format!("changeset_{id}");
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
    );
    for (i, r) in requests.iter().enumerate() {
        let _ = write!(
            out,
            "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {}\r\n\r\n",
            i + 1
        );
        let _ = write!(out, "{} {} HTTP/1.1\r\n", r.method, r.url);
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
    let _ = write!(out, "--{changeset}--\r\n--{batch}--\r\n");
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
