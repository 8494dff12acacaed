//! The Tandem API client of `tandemctl`: `http://` or `https://` (system trust roots), bearer
//! token, JSON in and out.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Where the API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let parsed = reqwest::Url::parse(url)
            .with_context(|| format!("TANDEM_API_URL is not a URL (got {url})"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("TANDEM_API_URL must start with http:// or https:// (got {url})");
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.trim().is_empty()),
            client,
        })
    }

    /// `(status, JSON body)`; a body that is not JSON comes back as a JSON string.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .with_context(|| format!("bad HTTP method {method}"))?;
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {} (TANDEM_API_URL)", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.context("reading the API's answer")?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_are_http_or_https() {
        assert!(Api::new("http://127.0.0.1:39731", None).is_ok());
        let api = Api::new("https://tandem.example.com/api/", Some(" ".into())).expect("https");
        assert_eq!(api.base, "https://tandem.example.com/api");
        assert!(api.token.is_none(), "a blank token is no token");
        for bad in ["ftp://host", "127.0.0.1:39731", "not a url"] {
            assert!(Api::new(bad, None).is_err(), "{bad}");
        }
    }
}
