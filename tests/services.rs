//! The service binaries as separate processes against the real PostgreSQL and NATS: each starts,
//! reports ready, serves /healthz /readyz /metrics and exits 0 on SIGTERM; a service refuses an
//! unmigrated database and an invalid lifecycle setting; `tandemctl migrate` is idempotent.
//!
//! The binaries are built once per test process with `cargo build --workspace --bins` into the
//! target directory of this test executable (`cargo test` alone only builds a package's own
//! binaries). Set `TANDEM_TEST_BIN_DIR` to test binaries built elsewhere (e.g. a release build).

use std::{
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::ensure;
use tandem_tests::procs::{EXIT_TIMEOUT, Proc, delete_streams, free_port, http_get};
use tandem_tests::{TestDb, nats_url, unique};

fn base_env(db_url: &str, prefix: &str, health_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("TANDEM_DATABASE_URL", db_url.to_owned()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", prefix.to_owned()),
        ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{health_port}")),
    ]
}

/// Start against a fresh migrated database, wait for ready, check the endpoints, SIGTERM, exit 0.
async fn lifecycle(bin: &str) -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    drop(pool);
    let prefix = unique("t");
    let port = free_port()?;
    let mut env = base_env(&db.url, &prefix, port);
    let api_port = free_port()?;
    if bin == "tandem-api" {
        env.push(("TANDEM_API_ADDR", format!("127.0.0.1:{api_port}")));
    }
    let result = async {
        let mut svc = Proc::start(bin, &[], &env)?;
        let body = svc.wait_for_status(port, "/readyz", 200).await?;
        ensure!(body.contains("\"status\":\"ready\""), "readyz body: {body}");
        let (code, _) = http_get(port, "/healthz").await?;
        ensure!(code == 200, "/healthz answered {code}");
        let (code, metrics) = http_get(port, "/metrics").await?;
        ensure!(code == 200, "/metrics answered {code}");
        ensure!(metrics.contains("tandem_ready"), "metrics: {metrics}");
        if bin == "tandem-api" {
            svc.wait_for_status(api_port, "/readyz", 200).await?;
        }
        ensure!(
            svc.stderr().contains("ready"),
            "no ready log line:\n{}",
            svc.stderr()
        );
        svc.sigterm()?;
        let status = svc.wait(EXIT_TIMEOUT).await?;
        ensure!(
            status.success(),
            "{bin} exited with {status} after SIGTERM; stderr:\n{}",
            svc.stderr()
        );
        Ok(())
    }
    .await;
    delete_streams(&prefix).await?;
    result?;
    db.drop_db().await
}

#[tokio::test]
async fn api_starts_ready_and_stops_on_sigterm() -> anyhow::Result<()> {
    lifecycle("tandem-api").await
}

#[tokio::test]
async fn scheduler_starts_ready_and_stops_on_sigterm() -> anyhow::Result<()> {
    lifecycle("tandem-scheduler").await
}

#[tokio::test]
async fn sweeper_starts_ready_and_stops_on_sigterm() -> anyhow::Result<()> {
    lifecycle("tandem-sweeper").await
}

#[tokio::test]
async fn gate_notifier_starts_ready_and_stops_on_sigterm() -> anyhow::Result<()> {
    lifecycle("tandem-gate-notifier").await
}

#[tokio::test]
async fn worker_starts_ready_and_stops_on_sigterm() -> anyhow::Result<()> {
    lifecycle("tandem-worker").await
}

#[tokio::test]
async fn service_refuses_an_unmigrated_database() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let prefix = unique("t");
    let env = base_env(&db.url, &prefix, free_port()?);
    let mut svc = Proc::start("tandem-scheduler", &[], &env)?;
    let status = svc.wait(EXIT_TIMEOUT).await?;
    let stderr = svc.stderr();
    ensure!(
        !status.success(),
        "started on an unmigrated database:\n{stderr}"
    );
    ensure!(stderr.contains("tandemctl migrate"), "stderr:\n{stderr}");
    delete_streams(&prefix).await?;
    db.drop_db().await
}

#[tokio::test]
async fn invalid_lifecycle_setting_stops_startup_naming_the_variable() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    drop(pool);
    let prefix = unique("t");
    let mut env = base_env(&db.url, &prefix, free_port()?);
    env.push(("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY", "explode".into()));
    let mut svc = Proc::start("tandem-gate-notifier", &[], &env)?;
    let status = svc.wait(EXIT_TIMEOUT).await?;
    let stderr = svc.stderr();
    ensure!(status.code() == Some(2), "exit {status}; stderr:\n{stderr}");
    ensure!(
        stderr.contains("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY") && stderr.contains("explode"),
        "stderr:\n{stderr}"
    );
    db.drop_db().await
}

#[tokio::test]
async fn scheduler_refuses_a_pool_too_small_for_its_claim_passes() -> anyhow::Result<()> {
    let prefix = unique("t");
    // Checked before anything is contacted: no database is needed.
    let mut env = base_env("postgres://127.0.0.1:1/none", &prefix, free_port()?);
    env.push(("TANDEM_DATABASE_POOL_SIZE", "2".into()));
    env.push(("TANDEM_SCHEDULER_CLAIM_CONCURRENCY", "2".into()));
    let mut svc = Proc::start("tandem-scheduler", &[], &env)?;
    let status = svc.wait(EXIT_TIMEOUT).await?;
    let stderr = svc.stderr();
    ensure!(status.code() == Some(2), "exit {status}; stderr:\n{stderr}");
    ensure!(
        stderr.contains("TANDEM_DATABASE_POOL_SIZE") && stderr.contains("CLAIM_CONCURRENCY"),
        "stderr:\n{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn service_waits_for_nats_and_stops_cleanly_meanwhile() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    drop(pool);
    let port = free_port()?;
    let closed = free_port()?; // nothing listens there
    let mut env = base_env(&db.url, &unique("t"), port);
    env.retain(|(k, _)| *k != "TANDEM_NATS_URL");
    env.push(("TANDEM_NATS_URL", format!("nats://127.0.0.1:{closed}")));
    let mut svc = Proc::start("tandem-sweeper", &[], &env)?;
    svc.wait_for_status(port, "/healthz", 200).await?;
    let body = svc.wait_for_status(port, "/readyz", 503).await?;
    ensure!(body.contains("nats"), "readyz body: {body}");
    // Give it time to log at least one retry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !svc.stderr().contains("retrying") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        svc.stderr().contains("retrying"),
        "stderr:\n{}",
        svc.stderr()
    );
    svc.sigterm()?;
    let status = svc.wait(EXIT_TIMEOUT).await?;
    ensure!(status.success(), "exit {status}; stderr:\n{}", svc.stderr());
    db.drop_db().await
}

#[tokio::test]
async fn help_documents_the_environment() -> anyhow::Result<()> {
    for bin in [
        "tandem-api",
        "tandem-scheduler",
        "tandem-sweeper",
        "tandem-gate-notifier",
        "tandem-worker",
    ] {
        let mut p = Proc::start(bin, &["--help"], &[])?;
        let status = p.wait(EXIT_TIMEOUT).await?;
        let out = p.stdout();
        ensure!(status.success(), "{bin} --help: {status}");
        for var in [
            "TANDEM_DATABASE_URL",
            "TANDEM_NATS_URL",
            "TANDEM_HEALTH_ADDR",
        ] {
            ensure!(out.contains(var), "{bin} --help lacks {var}:\n{out}");
        }
    }
    let mut p = Proc::start("tandemctl", &["--help"], &[])?;
    ensure!(p.wait(EXIT_TIMEOUT).await?.success(), "tandemctl --help");
    ensure!(p.stdout().contains("migrate"), "{}", p.stdout());
    Ok(())
}

async fn tandemctl(db_url: &str, args: &[&str]) -> anyhow::Result<(ExitStatus, String, String)> {
    let mut p = Proc::start(
        "tandemctl",
        args,
        &[("TANDEM_DATABASE_URL", db_url.to_owned())],
    )?;
    let status = p.wait(Duration::from_secs(60)).await?;
    Ok((status, p.stdout(), p.stderr()))
}

#[tokio::test]
async fn tandemctl_migrate_applies_once() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let (status, out, _) = tandemctl(&db.url, &["schema"]).await?;
    ensure!(
        !status.success(),
        "schema on an empty database must fail: {out}"
    );
    ensure!(out.contains("tandemctl migrate"), "{out}");

    let (status, out, err) = tandemctl(&db.url, &["migrate"]).await?;
    ensure!(status.success(), "first migrate: {status}\n{out}\n{err}");
    ensure!(
        out.contains("applied V1__"),
        "first migrate printed:\n{out}"
    );

    let (status, out, err) = tandemctl(&db.url, &["migrate"]).await?;
    ensure!(status.success(), "second migrate: {status}\n{out}\n{err}");
    ensure!(
        out.contains("nothing to apply"),
        "second migrate printed:\n{out}"
    );
    ensure!(
        !out.contains("applied V"),
        "second migrate applied something:\n{out}"
    );

    let (status, out, _) = tandemctl(&db.url, &["schema"]).await?;
    ensure!(status.success() && out.contains("status: current"), "{out}");
    db.drop_db().await
}

#[tokio::test]
async fn tandemctl_migrate_creates_a_missing_database() -> anyhow::Result<()> {
    let name = unique("tandem_test");
    let url = tandem_tests::url_with_db(&tandem_tests::admin_url(), &name);
    let db = TestDb { name, url };
    let result = async {
        let (status, out, err) = tandemctl(&db.url, &["migrate"]).await?;
        ensure!(status.success(), "{status}\n{out}\n{err}");
        ensure!(
            out.contains("created database") && out.contains("applied V1__"),
            "{out}"
        );
        Ok(())
    }
    .await;
    db.drop_db().await?;
    result
}
