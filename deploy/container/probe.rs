//! `gatehouse-probe [URL]`: exit 0 when `GET URL` answers `200`, 1 otherwise (with the reason on
//! stderr). It is the container health check of the distroless Gatehouse image, which has no
//! shell and no HTTP client: ECS runs it inside the sidecar container against the admin port.
//!
//! Deliberately tiny and dependency-free (built with plain `rustc` in the Containerfile): plain
//! HTTP/1.1 to a literal `IP:port` (the loopback admin listener), no TLS, no DNS, no redirects.
//! Default URL: `http://127.0.0.1:9901/readyz`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:9901/readyz";
const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    match probe(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("gatehouse-probe: {url}: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// `GET` the URL and succeed only on status 200.
fn probe(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http://IP:PORT/PATH URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| format!("`{authority}` is not a literal IP:PORT"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("socket: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: gatehouse-probe\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;

    // Enough of the response for the status line: "HTTP/1.1 200".
    let mut head = [0u8; 32];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    // Drain a little of the rest so the server sees an orderly close, not a reset.
    let _ = stream.take(64 * 1024).read_to_end(&mut Vec::new());
    let line = String::from_utf8_lossy(&head[..len]);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/1.") => Ok(()),
        (Some(version), Some(status)) if version.starts_with("HTTP/1.") => {
            Err(format!("status {status}"))
        }
        _ => Err("the answer is not HTTP/1.x".to_owned()),
    }
}
