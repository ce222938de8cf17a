//! OData `$batch` in `multipart/mixed` form: parsing requests and change sets, running them with
//! all-or-nothing change sets and `$n` Content-ID references, and writing the multipart answer.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use bytes::Bytes;

use crate::common::{SimRequest, SimResponse, new_guid};

/// One request inside a batch.
#[derive(Debug, Clone)]
pub(crate) struct Inner {
    pub content_id: Option<String>,
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A top-level part of a batch.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    Single(Inner),
    ChangeSet(Vec<Inner>),
}

/// The boundary parameter of a multipart content type.
pub(crate) fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn split_head(s: &str) -> (&str, &str) {
    if let Some(i) = s.find("\r\n\r\n") {
        (&s[..i], &s[i + 4..])
    } else if let Some(i) = s.find("\n\n") {
        (&s[..i], &s[i + 2..])
    } else {
        (s, "")
    }
}

fn headers_of(block: &str) -> Vec<(String, String)> {
    block
        .lines()
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect()
}

fn parts_of<'a>(body: &'a str, boundary: &str) -> Result<Vec<&'a str>, String> {
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    let mut pieces = body.split(delim.as_str());
    pieces.next(); // preamble
    let mut closed = false;
    for piece in pieces {
        if piece.starts_with("--") {
            closed = true;
            break;
        }
        out.push(piece.trim_start_matches(['\r', '\n']));
    }
    if !closed {
        return Err(format!(
            "the multipart body does not end with --{boundary}--"
        ));
    }
    Ok(out)
}

fn parse_http(part: &str, content_id: Option<String>) -> Result<Inner, String> {
    let (_, http) = split_head(part);
    let (head, body) = split_head(http);
    let mut lines = head.lines();
    let request_line = lines.next().ok_or("a batch part has no request line")?;
    let mut words = request_line.split_whitespace();
    let method = words.next().ok_or("a batch part has no method")?;
    let url = words.next().ok_or("a batch part has no URL")?;
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("'{method}' is not an HTTP method"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    let body = body.trim_end_matches(['\r', '\n']);
    Ok(Inner {
        content_id,
        method,
        url: url.to_owned(),
        headers,
        body: Bytes::copy_from_slice(body.as_bytes()),
    })
}

/// Parses a `multipart/mixed` batch body.
pub(crate) fn parse_batch(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
    let boundary = boundary_of(content_type)
        .ok_or("the Content-Type of a $batch request must be multipart/mixed with a boundary")?;
    let body = std::str::from_utf8(body).map_err(|_| "the $batch body is not UTF-8".to_owned())?;
    let mut out = Vec::new();
    for part in parts_of(body, &boundary)? {
        let (head, rest) = split_head(part);
        let h = headers_of(head);
        let ct = h
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let cid = h
            .iter()
            .find(|(k, _)| k == "content-id")
            .map(|(_, v)| v.clone());
        if ct.to_ascii_lowercase().starts_with("multipart/mixed") {
            let cs_boundary = boundary_of(ct).ok_or("a change set has no boundary")?;
            let mut reqs = Vec::new();
            for p in parts_of(rest, &cs_boundary)? {
                let (ph, _) = split_head(p);
                let ph = headers_of(ph);
                let cid = ph
                    .iter()
                    .find(|(k, _)| k == "content-id")
                    .map(|(_, v)| v.clone());
                let inner = parse_http(p, cid)?;
                if inner.method == Method::GET {
                    return Err("a change set cannot contain a GET request".into());
                }
                reqs.push(inner);
            }
            out.push(Part::ChangeSet(reqs));
        } else {
            out.push(Part::Single(parse_http(part, cid)?));
        }
    }
    Ok(out)
}

impl Part {
    pub fn len(&self) -> usize {
        match self {
            Part::Single(_) => 1,
            Part::ChangeSet(r) => r.len(),
        }
    }
}

/// What a simulator provides to run a batch.
pub(crate) trait BatchTarget {
    /// Runs one request (path is absolute, e.g. `/api/data/v9.2/accounts`).
    fn exec(&mut self, req: SimRequest) -> SimResponse;
    /// Starts recording an undo log for a change set.
    fn begin(&mut self);
    /// Keeps the change set's writes.
    fn commit(&mut self);
    /// Undoes the change set's writes.
    fn rollback(&mut self);
}

/// The result of one top-level part.
#[derive(Debug)]
pub(crate) enum PartResult {
    Single(Option<String>, SimResponse),
    ChangeSet(Vec<(Option<String>, SimResponse)>),
}

fn to_request(inner: &Inner, prefix: &str, ids: &HashMap<String, String>) -> SimRequest {
    let mut url = inner.url.clone();
    if let Some(rest) = url.strip_prefix('$') {
        let digits: String = rest
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        if let Some(loc) = ids.get(&digits) {
            url = format!("{loc}{}", &rest[digits.len()..]);
        }
    }
    let path_and_query = if let Some(i) = url.find("://") {
        let after = &url[i + 3..];
        after.find('/').map_or("/", |p| &after[p..]).to_owned()
    } else if url.starts_with('/') {
        url
    } else {
        format!("{prefix}{url}")
    };
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((&path_and_query, ""));
    let mut body = inner.body.clone();
    if !ids.is_empty() && body.contains(&b'$') {
        let mut text = String::from_utf8_lossy(&body).into_owned();
        for (id, loc) in ids {
            text = text.replace(&format!("\"${id}\""), &format!("\"{loc}\""));
        }
        body = Bytes::from(text);
    }
    SimRequest {
        method: inner.method.clone(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: inner.headers.clone(),
        body,
    }
}

fn location(resp: &SimResponse) -> Option<String> {
    resp.headers
        .iter()
        .find(|(k, _)| {
            k.as_str().eq_ignore_ascii_case("odata-entityid")
                || k.as_str().eq_ignore_ascii_case("location")
        })
        .and_then(|(_, v)| v.to_str().ok().map(str::to_owned))
}

/// Runs the parts; returns the results and whether processing stopped at an error.
pub(crate) fn run<T: BatchTarget>(
    target: &mut T,
    parts: Vec<Part>,
    prefix: &str,
    continue_on_error: bool,
) -> (Vec<PartResult>, bool) {
    let mut results = Vec::new();
    let mut ids: HashMap<String, String> = HashMap::new();
    for part in parts {
        match part {
            Part::Single(inner) => {
                let resp = target.exec(to_request(&inner, prefix, &ids));
                let failed = !resp.is_success();
                results.push(PartResult::Single(inner.content_id.clone(), resp));
                if failed && !continue_on_error {
                    return (results, true);
                }
            }
            Part::ChangeSet(reqs) => {
                target.begin();
                let mut done = Vec::new();
                let mut failure = None;
                for inner in &reqs {
                    let resp = target.exec(to_request(inner, prefix, &ids));
                    if !resp.is_success() {
                        failure = Some((inner.content_id.clone(), resp));
                        break;
                    }
                    if let (Some(cid), Some(loc)) = (&inner.content_id, location(&resp)) {
                        ids.insert(cid.clone(), loc);
                    }
                    done.push((inner.content_id.clone(), resp));
                }
                match failure {
                    Some(f) => {
                        target.rollback();
                        for (cid, _) in &done {
                            if let Some(cid) = cid {
                                ids.remove(cid);
                            }
                        }
                        results.push(PartResult::Single(f.0, f.1));
                        if !continue_on_error {
                            return (results, true);
                        }
                    }
                    None => {
                        target.commit();
                        results.push(PartResult::ChangeSet(done));
                    }
                }
            }
        }
    }
    (results, false)
}

fn write_http(out: &mut String, content_id: Option<&str>, resp: &SimResponse) {
    out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(cid) = content_id {
        out.push_str(&format!("Content-ID: {cid}\r\n"));
    }
    out.push_str("\r\n");
    let reason = resp.status.canonical_reason().unwrap_or("");
    out.push_str(&format!(
        "HTTP/1.1 {} {reason}\r\nOData-Version: 4.0\r\n",
        resp.status.as_u16()
    ));
    for (k, v) in &resp.headers {
        out.push_str(&format!("{}: {}\r\n", k.as_str(), v.to_str().unwrap_or("")));
    }
    out.push_str("\r\n");
    out.push_str(&String::from_utf8_lossy(&resp.body));
    out.push_str("\r\n");
}

/// Writes the multipart answer; `status` is the status of the whole batch.
pub(crate) fn write_response(results: &[PartResult], status: StatusCode) -> SimResponse {
    let boundary = format!("batchresponse_{}", new_guid());
    let mut out = String::new();
    for r in results {
        out.push_str(&format!("--{boundary}\r\n"));
        match r {
            PartResult::Single(cid, resp) => write_http(&mut out, cid.as_deref(), resp),
            PartResult::ChangeSet(items) => {
                let cs = format!("changesetresponse_{}", new_guid());
                out.push_str(&format!(
                    "Content-Type: multipart/mixed; boundary={cs}\r\n\r\n"
                ));
                for (cid, resp) in items {
                    out.push_str(&format!("--{cs}\r\n"));
                    write_http(&mut out, cid.as_deref(), resp);
                }
                out.push_str(&format!("--{cs}--\r\n"));
            }
        }
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    let mut resp = SimResponse {
        status,
        headers: Vec::new(),
        body: Bytes::from(out),
    };
    if let Ok(v) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
        resp.headers.push((axum::http::header::CONTENT_TYPE, v));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_changesets_and_singles() {
        let body = "--batch_1\r\nContent-Type: multipart/mixed; boundary=changeset_a\r\n\r\n--changeset_a\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\nPOST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"name\":\"a\"}\r\n--changeset_a--\r\n\r\n--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET accounts?$select=name HTTP/1.1\r\n\r\n\r\n--batch_1--\r\n";
        let parts = parse_batch("multipart/mixed; boundary=\"batch_1\"", body.as_bytes()).unwrap();
        assert_eq!(parts.len(), 2);
        let Part::ChangeSet(cs) = &parts[0] else {
            panic!("expected a change set")
        };
        assert_eq!(cs[0].content_id.as_deref(), Some("1"));
        assert_eq!(cs[0].method, Method::POST);
        assert_eq!(&cs[0].body[..], b"{\"name\":\"a\"}");
        let Part::Single(s) = &parts[1] else {
            panic!("expected a single request")
        };
        assert_eq!(s.url, "accounts?$select=name");
        let req = to_request(s, "/api/data/v9.2/", &HashMap::new());
        assert_eq!(req.path, "/api/data/v9.2/accounts");
        assert_eq!(req.query, "$select=name");
    }

    #[test]
    fn unterminated_batch_is_rejected() {
        assert!(
            parse_batch(
                "multipart/mixed; boundary=b",
                b"--b\r\n\r\nGET x HTTP/1.1\r\n"
            )
            .is_err()
        );
    }
}
