//! A small HTTP/1.1 client for the Tandem API (plain `http://` only: put a TLS-terminating proxy
//! or `kubectl port-forward` in front of a remote API).

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Where the API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Api {
    host: String,
    port: u16,
    base_path: String,
    token: Option<String>,
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("TANDEM_API_URL must start with http:// (got {url})"))?;
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse()
                    .with_context(|| format!("bad port in TANDEM_API_URL {url}"))?,
            ),
            None => (authority.to_owned(), 80),
        };
        Ok(Self {
            host,
            port,
            base_path: if path == "/" { String::new() } else { path },
            token: token.filter(|t| !t.trim().is_empty()),
        })
    }

    /// `(status, JSON body)`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.base_path, self.host, self.port
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if method != "GET" {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let io = async {
            let mut s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            s.write_all(head.as_bytes()).await?;
            s.write_all(body.as_bytes()).await?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(60), io)
            .await
            .context("the API did not answer within 60 s")?
            .with_context(|| {
                format!(
                    "cannot reach the API at {}:{} (TANDEM_API_URL)",
                    self.host, self.port
                )
            })?;
        let text = String::from_utf8_lossy(&raw);
        let Some((headers, body)) = text.split_once("\r\n\r\n") else {
            bail!("not an HTTP response from the API");
        };
        let status: u16 = headers
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = if headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        Ok((status, value))
    }

    /// As [`Self::call`], but a non-2xx answer is an error showing the API's message and code.
    pub async fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = v["error"].as_str().unwrap_or("").to_owned();
        let code = v["code"].as_str().unwrap_or("").to_owned();
        let mut text = format!("{method} {path}: HTTP {status} {code}: {msg}");
        if let Some(w) = v.get("winningDecision") {
            text.push_str(&format!(" (winning decision: {w})"));
        }
        if let Some(p) = v
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        {
            text.push_str(&format!(" (at {p})"));
        }
        bail!(text)
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
