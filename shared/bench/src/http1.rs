//! The load generator's HTTP/1.1 client: requests prepared once as bytes, sent over kept-alive
//! connections, answers read just far enough to know the status.
//!
//! `bench live` shares the machine with the pipeline it measures; a general-purpose client
//! (redirects, proxies, header maps, URL parsing per request) spent ≈ 15 µs of CPU per webhook
//! that the pipeline then did not get. This one writes the prepared bytes and reads the status
//! line, the headers it needs (`Content-Length`, `Transfer-Encoding: chunked`, `Connection:
//! close`) and the body.

use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A POST of `body` to `path` (with its query) on `addr`, with `headers`, as bytes.
pub fn post_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

/// One kept-alive connection and what was read past the last answer.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    /// Connects to `addr` (no Nagle delay).
    pub async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads its answer; returns the status and whether the connection
    /// may be used again.
    pub async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, bool)> {
        self.stream.write_all(request).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| invalid("an answer head that is not UTF-8"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("an answer without a status"))?;
        let mut length = 0usize;
        let (mut chunked, mut keep) = (false, true);
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| invalid("a bad Content-Length"))?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                keep = !value.eq_ignore_ascii_case("close");
            }
        }
        self.buf.drain(..head_end);
        if chunked {
            self.skip_chunks().await?;
        } else {
            while self.buf.len() < length {
                self.fill().await?;
            }
            self.buf.drain(..length);
        }
        Ok((status, keep))
    }

    /// Reads a chunked body up to its last (empty) chunk and trailer.
    async fn skip_chunks(&mut self) -> std::io::Result<()> {
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[..line_end])
                .map_err(|_| invalid("a bad chunk size"))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid("a bad chunk size"))?;
            // The size line, the chunk and its CRLF (the last chunk: its empty trailer's CRLF).
            let need = line_end + 2 + size + 2;
            while self.buf.len() < need {
                self.fill().await?;
            }
            self.buf.drain(..need);
            if size == 0 {
                return Ok(());
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Idle kept-alive connections to one address.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<Connection>>,
}

impl Pool {
    /// A pool for `addr`, empty.
    pub fn new(addr: SocketAddr) -> Self {
        Pool {
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` on an idle connection (or a new one) and reads the answer's status; the
    /// connection goes back to the pool unless the server closes it or it failed.
    pub async fn exchange(&self, request: &[u8]) -> std::io::Result<u16> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut conn = match idle {
            Some(c) => c,
            None => Connection::open(self.addr).await?,
        };
        let (status, keep) = conn.exchange(request).await?;
        if keep {
            self.idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(conn);
        }
        Ok(status)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("HTTP: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answering each request on one connection with the given raw answers in turn.
    async fn server(answers: Vec<&'static str>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                // Read one request: its head, then its Content-Length body.
                loop {
                    if let Some(end) = find(&seen, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + len {
                            seen.drain(..end + 4 + len);
                            break;
                        }
                    }
                    let mut chunk = [0u8; 1024];
                    let n = socket.read(&mut chunk).await.unwrap();
                    seen.extend_from_slice(&chunk[..n]);
                }
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_with_length_chunked_and_close_are_read_whole() {
        let addr = server(vec![
            "HTTP/1.1 202 Accepted\r\ncontent-length: 14\r\n\r\n{\"accepted\":1}",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        ])
        .await;
        let request = post_request(addr, "/w?code=k", &[("x-ms-a".into(), "b".into())], b"{}");
        assert!(String::from_utf8_lossy(&request).starts_with("POST /w?code=k HTTP/1.1\r\n"));
        let mut conn = Connection::open(addr).await.unwrap();
        assert_eq!(conn.exchange(&request).await.unwrap(), (202, true));
        assert_eq!(conn.exchange(&request).await.unwrap(), (200, true));
        assert_eq!(conn.exchange(&request).await.unwrap(), (400, false));
        assert!(conn.exchange(&request).await.is_err(), "the server is gone");
    }
}
