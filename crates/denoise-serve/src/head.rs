//! The first request head of a connection, read and checked before hyper sees it, so a request
//! hyper could not parse (a raw `<` in the path, a malformed header line) gets the API's JSON
//! error instead of hyper's empty 400. The bytes read are handed on to hyper untouched
//! ([`Replay`]); hyper parses them again and applies its own limits.
//!
//! Only a connection's first head is checked: later requests on a kept-alive connection go to
//! hyper directly.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A head longer than this is refused (431) rather than buffered further.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header lines the check accepts; more are left for hyper to refuse.
const MAX_HEADERS: usize = 128;

/// What reading the first head found.
pub enum Head {
    /// A whole head that parses, or one the check leaves to hyper: the bytes read so far.
    Ready(Vec<u8>),
    /// A head that cannot be parsed: the JSON answer has been sent and the connection is done.
    Refused,
    /// The client closed, failed, or did not finish its head within the timeout.
    Gone,
}

/// Reads until the first request head is complete (or refused), within `timeout`.
pub async fn read_first(stream: &mut TcpStream, timeout: Duration) -> Head {
    let mut bytes = Vec::with_capacity(4096);
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(()),
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
            match check(&bytes) {
                Check::Incomplete if bytes.len() <= MAX_HEAD_BYTES => continue,
                Check::Incomplete => {
                    let message = format!("the request head is over {MAX_HEAD_BYTES} bytes");
                    return Ok(Some((431, "Request Header Fields Too Large", message)));
                }
                Check::Bad(message) => return Ok(Some((400, "Bad Request", message))),
                Check::Ready => return Ok(None),
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(None)) => Head::Ready(bytes),
        Ok(Ok(Some((status, reason, message)))) => {
            let _ = stream
                .write_all(&json_error(status, reason, &message))
                .await;
            let _ = stream.shutdown().await;
            Head::Refused
        }
        Ok(Err(())) | Err(_) => Head::Gone,
    }
}

enum Check {
    Ready,
    Incomplete,
    Bad(String),
}

fn check(bytes: &[u8]) -> Check {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        // Hyper then parses the target as a URI, which refuses more than httparse does.
        Ok(httparse::Status::Complete(_)) => {
            match request.path.map(|path| path.parse::<axum::http::Uri>()) {
                Some(Err(e)) => Check::Bad(format!("malformed HTTP request: {e}{ENCODE}")),
                _ => Check::Ready,
            }
        }
        Ok(httparse::Status::Partial) => Check::Incomplete,
        // Hyper answers these itself (431), with its own header limit.
        Err(httparse::Error::TooManyHeaders) => Check::Ready,
        Err(e) => Check::Bad(format!("malformed HTTP request: {e}{ENCODE}")),
    }
}

const ENCODE: &str = " (characters such as < > \" { } | \\ ^ ` and spaces must be \
                      percent-encoded in a URL)";

/// A complete response carrying `{"error": message}`, closing the connection.
fn json_error(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A stream that first yields bytes already read from it, then reads on.
pub struct Replay<S> {
    read: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(read: Vec<u8>, inner: S) -> Self {
        Self { read, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.read.len() {
            let n = buf.remaining().min(self.read.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.read[at..at + n]);
            self.at += n;
            if self.at == self.read.len() {
                self.read = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_ready_incomplete_or_bad() {
        assert!(matches!(
            check(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"),
            Check::Ready
        ));
        assert!(matches!(
            check(b"GET /healthz HTTP/1.1\r\nHo"),
            Check::Incomplete
        ));
        for bad in [
            &b"GET /<script> HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
        ] {
            match check(bad) {
                Check::Bad(message) => assert!(message.starts_with("malformed HTTP request")),
                _ => panic!("{:?} passed", String::from_utf8_lossy(bad)),
            }
        }
        let answer = String::from_utf8(json_error(400, "Bad Request", "no \"good\"")).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap()["error"],
            "no \"good\""
        );
    }

    #[tokio::test]
    async fn replay_yields_what_was_read_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut replay = Replay::new(b"hello".to_vec(), b);
        let mut all = String::new();
        replay.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
