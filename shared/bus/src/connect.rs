//! Connecting to NATS with the configured authentication and TLS options.

use std::{fmt, path::PathBuf, time::Duration};

use async_nats::{Client, ConnectOptions, Event, jetstream};

use crate::BusError;

/// Default NATS server URL.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// How to reach and authenticate to NATS. At most one of user/password, token, credentials file
/// and nkey may be set (credentials may also be given in the URL: `nats://user:pass@host:4222`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// One URL or a comma-separated list of URLs.
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey seed), as issued by `nsc`.
    pub creds_file: Option<PathBuf>,
    /// An nkey seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// PEM file of root certificates to trust.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (with `tls_key`) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsOptions")
            .field("url", &redact_url(&self.url))
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &secret(&self.nkey_seed))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

impl NatsOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Checks that the options are consistent, naming the variables involved.
    pub fn validate(&self) -> Result<(), BusError> {
        let bad = |m: &str| Err(BusError::InvalidOptions(m.into()));
        if self.url.trim().is_empty() {
            return bad("TANDEM_NATS_URL is empty");
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("TANDEM_NATS_USER and TANDEM_NATS_PASSWORD must be set together");
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
            self.nkey_seed.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return bad(
                "set only one of TANDEM_NATS_USER/TANDEM_NATS_PASSWORD, TANDEM_NATS_TOKEN, \
                 TANDEM_NATS_CREDS and TANDEM_NATS_NKEY",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("TANDEM_NATS_TLS_CERT and TANDEM_NATS_TLS_KEY must be set together");
        }
        Ok(())
    }

    async fn connect_options(&self, name: &str) -> Result<ConnectOptions, BusError> {
        let mut o = match &self.creds_file {
            Some(path) => ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| {
                    BusError::InvalidOptions(format!(
                        "TANDEM_NATS_CREDS: cannot read {}: {e}",
                        path.display()
                    ))
                })?,
            None => ConnectOptions::new(),
        };
        if let (Some(user), Some(pass)) = (&self.user, &self.password) {
            o = o.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &self.token {
            o = o.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            o = o.nkey(seed.clone());
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required {
            o = o.require_tls(true);
        }
        Ok(o.name(name)
            .connection_timeout(Duration::from_secs(5))
            // After the first connection, reconnect forever (the client backs off by itself).
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    Event::Connected => tracing::info!("NATS connection established"),
                    Event::Closed => tracing::info!("NATS connection closed"),
                    Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                    Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
                    Event::SlowConsumer(sid) => tracing::warn!(sid, "NATS slow consumer"),
                    other => tracing::warn!(event = %other, "NATS client event"),
                }
            }))
    }
}

/// Connects once (the caller retries with backoff). The client then reconnects by itself.
pub async fn connect(opts: &NatsOptions, name: &str) -> Result<Client, BusError> {
    opts.validate()?;
    let options = opts.connect_options(name).await?;
    let urls: Vec<&str> = opts
        .url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let result = if urls.len() > 1 {
        let addrs = urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BusError::InvalidOptions(format!("TANDEM_NATS_URL: {e}")))?;
        options.connect(addrs).await
    } else {
        options.connect(opts.url.trim()).await
    };
    result.map_err(|source| BusError::Connect {
        url: redact_url(&opts.url),
        source,
    })
}

/// A JetStream context with a 5 s request/PubAck timeout.
pub fn jetstream(client: Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client)
}

/// Hides the password of `scheme://user:password@host/…` URLs, and a lone NATS token in
/// `nats://token@host` (also in comma-separated lists).
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let Some(scheme_end) = one.find("://") else {
                return one.to_owned();
            };
            let rest = &one[scheme_end + 3..];
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let authority = &rest[..authority_end];
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    let user = userinfo.split(':').next().unwrap_or_default();
                    let scheme = &one[..scheme_end];
                    let masked = if userinfo.contains(':') {
                        format!("{user}:***")
                    } else if scheme.starts_with("postgres") {
                        user.to_owned() // a user name alone is not a secret in a database URL
                    } else {
                        "***".to_owned() // `nats://token@host`: the lone user info is a token
                    };
                    format!(
                        "{}{masked}{}",
                        &one[..scheme_end + 3],
                        &one[scheme_end + 3 + at..]
                    )
                }
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("postgres://postgres:pw@127.0.0.1:5432/tandem?sslmode=disable"),
            "postgres://postgres:***@127.0.0.1:5432/tandem?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/tandem"),
            "postgres://postgres@127.0.0.1/tandem"
        );
    }

    #[test]
    fn options_are_validated() {
        assert!(NatsOptions::new(DEFAULT_NATS_URL).validate().is_ok());
        let mut o = NatsOptions::new(DEFAULT_NATS_URL);
        o.user = Some("u".into());
        assert!(o.validate().is_err());
        o.password = Some("p".into());
        assert!(o.validate().is_ok());
        o.token = Some("t".into());
        assert!(o.validate().is_err());
        let mut o = NatsOptions::new(DEFAULT_NATS_URL);
        o.tls_cert = Some("c.pem".into());
        assert!(o.validate().is_err());
        assert!(NatsOptions::new(" ").validate().is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let mut o = NatsOptions::new("nats://u:pw@h:4222");
        o.token = Some("tok".into());
        let s = format!("{o:?}");
        assert!(!s.contains("pw") && !s.contains("tok\""), "{s}");
    }
}
