//! Service binaries as child processes for the integration and fleet tests.
//!
//! The binaries are built once per test process with `cargo build --workspace --bins` into the
//! target directory of the running test executable (`cargo test` alone only builds a package's own
//! binaries). Set `TANDEM_TEST_BIN_DIR` to test binaries built elsewhere (e.g. a release build).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    process::{Child, Command},
};

use crate::{nats_url, unique};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The directory holding the service binaries, built on first use.
pub fn bin_dir() -> anyhow::Result<&'static Path> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn build_binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TANDEM_TEST_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // A test runs from target/<profile>/deps/<name>-<hash>, a binary (the bench) from
    // target/<profile>/<name>: either way the binaries go to target/<profile>.
    let exe = std::env::current_exe().context("current_exe")?;
    let exe_dir = exe.parent().context("executable has no directory")?;
    let profile_dir = if exe_dir.file_name().and_then(|n| n.to_str()) == Some("deps") {
        exe_dir
            .parent()
            .context("no profile directory above deps")?
    } else {
        exe_dir
    }
    .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .context("no target directory above the profile directory")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--workspace",
            "--bins",
            "--quiet",
            "--profile",
            &profile,
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build --workspace --bins")?;
    ensure!(
        status.success(),
        "cargo build --workspace --bins failed: {status}"
    );
    Ok(profile_dir)
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A service process with its stderr captured in a file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

impl Proc {
    /// Starts `bin` with a clean environment plus `env`.
    pub fn start(bin: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let path = bin_dir()?.join(bin);
        ensure!(path.exists(), "{} is missing", path.display());
        let tag = unique(bin);
        let stderr_path = std::env::temp_dir().join(format!("{tag}.stderr"));
        let stdout_path = std::env::temp_dir().join(format!("{tag}.stdout"));
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path)?)
            .stderr(std::fs::File::create(&stderr_path)?)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", path.display()))?;
        Ok(Self {
            name: bin.to_owned(),
            child,
            stderr_path,
            stdout_path,
        })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// `kill -9`: no chance to drain, as a crash.
    pub async fn sigkill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("kill -9")?;
        Ok(())
    }

    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "{} did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                )
            }
        }
    }

    /// Polls `GET path` until it answers `want`; fails early if the process exits.
    pub async fn wait_for_status(
        &mut self,
        port: u16,
        path: &str,
        want: u16,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before {path} answered {want}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            match http_get(port, path).await {
                Ok((code, body)) if code == want => return Ok(body),
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} {path} did not answer {want} within {READY_TIMEOUT:?} (last: {last}); stderr:\n{}",
            self.name,
            self.stderr()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.stderr_path);
        let _ = std::fs::remove_file(&self.stdout_path);
    }
}

/// A minimal HTTP/1.1 GET: (status code, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw)).await??;
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {raw:?}"))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Removes the streams a test prefix created.
pub async fn delete_streams(prefix: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url()).await?;
    let js = async_nats::jetstream::new(client);
    let prefix = tandem_bus::Prefix::new(prefix)?;
    for name in tandem_bus::StreamNames::new(&prefix).all() {
        // Absent when the service never got that far.
        let _ = js.delete_stream(name).await;
    }
    Ok(())
}
