//! `tandemctl up`: the whole fleet on this machine, in one command.
//!
//! 1. PostgreSQL and NATS: used as they are when they accept connections; otherwise (`--deps
//!    auto`) started with docker compose when a Docker engine answers (an embedded compose file,
//!    project `tandem-up`, PostgreSQL on 127.0.0.1:55432), else by `ops/ensure-services.sh`
//!    (embedded here), which starts the system's services and installs them with apt-get when
//!    they are missing. `--deps system|docker` forces one way.
//! 2. `migrate`.
//! 3. The api, 2 schedulers, the sweeper, the gate-notifier and 2 workers, as child processes of
//!    this command (logs in a temporary directory, printed at start).
//! 4. A demo: `demo-pipeline` (four task nodes) and `demo-approval` (tasks, then a gate whose
//!    ladder reminds after 3 s and 6 s, escalates after 9 s and cancels after 30 s), a few runs
//!    of each, more every `--trigger-every-secs`.
//! 5. Live progress (runs by status, pending approvals, recent events from NATS) until Ctrl-C
//!    (or `--for-secs`), then SIGTERM to every child and a wait for each to exit.
//!
//! `--smoke` (for CI): exit 0 as soon as a demo run completed and a reminder event arrived on
//! NATS (after a clean shutdown), 1 if that did not happen within `--for-secs` (default 120).

use std::{
    collections::{BTreeMap, VecDeque},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::http::Api;
use crate::ops;

const ENSURE_SERVICES: &str = include_str!("../../../ops/ensure-services.sh");

/// Options of `up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Address of the API.
    #[arg(long = "api-addr", default_value = "127.0.0.1:39731")]
    pub api_addr: String,
    /// Runs of each demo automation triggered at start.
    #[arg(long = "runs", default_value_t = 3)]
    pub runs: usize,
    /// Trigger another run of each demo automation this often (0: never).
    #[arg(long = "trigger-every-secs", default_value_t = 20)]
    pub trigger_every_secs: u64,
    /// Stop after this many seconds (default: run until Ctrl-C; 120 with --smoke).
    #[arg(long = "for-secs")]
    pub for_secs: Option<u64>,
    /// CI smoke test: stop once a demo run completed and a reminder arrived on NATS.
    #[arg(long)]
    pub smoke: bool,
    /// Do not start or install PostgreSQL and NATS.
    #[arg(long = "no-ensure")]
    pub no_ensure: bool,
    /// How to get PostgreSQL and NATS when they are not reachable.
    #[arg(long, value_enum, default_value_t = Deps::Auto)]
    pub deps: Deps,
    /// Directory of the service binaries (default: next to tandemctl).
    #[arg(long = "bin-dir")]
    pub bin_dir: Option<PathBuf>,
    #[command(flatten)]
    pub nats: tandem_runtime::NatsArgs,
}

/// Environment variables of a child.
type Env = Vec<(&'static str, String)>;

struct Service {
    name: String,
    child: Child,
    log: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['/', '?', ',']).next()?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    match rest.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((rest.to_owned(), default_port)),
    }
}

async fn reachable(url: &str, default_port: u16) -> bool {
    let Some((host, port)) = host_port(url, default_port) else {
        return false;
    };
    let host = if host.is_empty() {
        "127.0.0.1".into()
    } else {
        host
    };
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// How `up` gets PostgreSQL and NATS when they are not reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Deps {
    /// Docker compose when a Docker engine answers, else the system's packages.
    Auto,
    /// Start (and install with apt-get when missing) the system's PostgreSQL and NATS.
    System,
    /// `docker compose` with the embedded file below (project `tandem-up`).
    Docker,
}

/// What [`ensure_dependencies`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DepsPlan {
    UseAsTheyAre,
    System,
    Docker,
}

fn deps_plan(mode: Deps, reachable: bool, docker_engine: bool) -> DepsPlan {
    match mode {
        _ if reachable => DepsPlan::UseAsTheyAre,
        Deps::System => DepsPlan::System,
        Deps::Docker => DepsPlan::Docker,
        Deps::Auto if docker_engine => DepsPlan::Docker,
        Deps::Auto => DepsPlan::System,
    }
}

/// PostgreSQL and NATS (JetStream) for `up --deps docker`, published on the loopback only.
/// PostgreSQL's host port is not 5432 so it cannot collide with a system PostgreSQL.
const COMPOSE_DEPS: &str = r#"name: tandem-up
services:
  postgres:
    image: postgres:16
    environment:
      POSTGRES_USER: postgres
      POSTGRES_PASSWORD: tandem
      POSTGRES_DB: tandem
    ports:
      - "127.0.0.1:55432:5432"
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres -d tandem"]
      interval: 2s
      timeout: 3s
      retries: 30
  nats:
    image: nats:2.10-alpine
    command: ["-js", "-sd", "/data", "-m", "8222"]
    ports:
      - "127.0.0.1:4222:4222"
    volumes:
      - natsdata:/data
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "-", "http://127.0.0.1:8222/healthz?js-enabled-only=true"]
      interval: 2s
      timeout: 3s
      retries: 30
volumes:
  pgdata:
  natsdata:
"#;
const COMPOSE_DB_URL: &str = "postgres://postgres:tandem@127.0.0.1:55432/tandem";
const COMPOSE_NATS_URL: &str = "nats://127.0.0.1:4222";

async fn docker_engine_answers() -> bool {
    let ok = |args: &'static [&'static str]| async move {
        tokio::time::timeout(
            Duration::from_secs(10),
            Command::new("docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
        )
        .await
        .is_ok_and(|s| s.is_ok_and(|s| s.success()))
    };
    ok(&["info"]).await && ok(&["compose", "version"]).await
}

/// Makes PostgreSQL and NATS reachable; returns the URLs to use (the compose ones when it
/// started them with Docker).
async fn ensure_dependencies(
    mode: Deps,
    db_url: &str,
    nats_url: &str,
) -> anyhow::Result<(String, String)> {
    let pg = reachable(db_url, 5432).await;
    let nats = reachable(nats_url, 4222).await;
    let docker = !(pg && nats) && mode != Deps::System && docker_engine_answers().await;
    match deps_plan(mode, pg && nats, docker) {
        DepsPlan::UseAsTheyAre => {
            step("PostgreSQL and NATS are reachable");
            Ok((db_url.to_owned(), nats_url.to_owned()))
        }
        DepsPlan::Docker => {
            compose_up().await?;
            Ok((COMPOSE_DB_URL.to_owned(), COMPOSE_NATS_URL.to_owned()))
        }
        DepsPlan::System => {
            system_up(pg, nats).await?;
            Ok((db_url.to_owned(), nats_url.to_owned()))
        }
    }
}

/// Stands for the embedded file's path in [`run_embedded`]'s arguments.
const FILE: &str = "{file}";

/// Writes an embedded file to a temporary path, runs `program` with `args` ([`FILE`] replaced by
/// that path), and removes the file.
async fn run_embedded(
    name: &str,
    contents: &str,
    program: &str,
    args: &[&str],
) -> anyhow::Result<std::process::ExitStatus> {
    let path = std::env::temp_dir().join(format!("tandem-up-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    let status = Command::new(program)
        .args(args.iter().map(|a| {
            if *a == FILE {
                path.as_os_str().to_owned()
            } else {
                (*a).into()
            }
        }))
        .stdin(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {program}"));
    let _ = std::fs::remove_file(&path);
    status
}

async fn compose_up() -> anyhow::Result<()> {
    step(
        "starting PostgreSQL and NATS with docker compose (project tandem-up; images are pulled on first use)",
    );
    let status = run_embedded(
        "compose.yml",
        COMPOSE_DEPS,
        "docker",
        &[
            "compose", "-f", FILE, "up", "-d", "--wait", "postgres", "nats",
        ],
    )
    .await?;
    if !status.success() {
        bail!(
            "`docker compose up` failed ({status}); `--deps system` uses the system's packages instead"
        );
    }
    step(
        "PostgreSQL (127.0.0.1:55432) and NATS (127.0.0.1:4222) run in Docker; they keep running after `up` stops (`docker compose -p tandem-up down` removes them)",
    );
    Ok(())
}

async fn system_up(pg: bool, nats: bool) -> anyhow::Result<()> {
    step(&format!(
        "starting{}{} (installing with apt-get when missing; this can take a minute)",
        if pg { "" } else { " PostgreSQL" },
        if nats { "" } else { " NATS" }
    ));
    let status = run_embedded("ensure-services.sh", ENSURE_SERVICES, "bash", &[FILE]).await?;
    if !status.success() {
        bail!(
            "could not start PostgreSQL and NATS ({status}). With a Docker engine running, \
             `tandemctl up --deps docker` starts both in containers."
        );
    }
    Ok(())
}

fn bin_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().context("locating tandemctl")?;
    Ok(exe
        .parent()
        .context("tandemctl has no directory")?
        .to_path_buf())
}

const BINARIES: [&str; 5] = [
    "tandem-api",
    "tandem-scheduler",
    "tandem-sweeper",
    "tandem-gate-notifier",
    "tandem-worker",
];

/// Builds the service binaries next to tandemctl when some are missing and this tandemctl was
/// built from a workspace that is still there (`cargo run -p tandemctl -- up`).
async fn build_if_missing(dir: &Path) -> anyhow::Result<()> {
    if BINARIES.iter().all(|b| dir.join(b).exists()) {
        return Ok(());
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    if !manifest.exists() {
        return Ok(()); // `spawn` names what is missing
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(p) => p.to_owned(),
    };
    let target = dir.parent().context("no target directory")?;
    step("building the service binaries (cargo build --workspace --bins; first time: minutes)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--workspace", "--bins", "--profile", &profile])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target)
        .stdin(Stdio::null())
        .status()
        .await
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --workspace --bins failed: {status}");
    }
    Ok(())
}

fn spawn(
    dir: &Path,
    logs: &Path,
    bin: &str,
    name: &str,
    env: &[(&str, String)],
) -> anyhow::Result<Service> {
    let path = dir.join(bin);
    if !path.exists() {
        bail!(
            "{} is missing: build the fleet first (`cargo build --workspace --bins`) or pass --bin-dir",
            path.display()
        );
    }
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log)?;
    let child = Command::new(&path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    Ok(Service {
        name: name.to_owned(),
        child,
        log,
    })
}

fn demo_automations() -> Vec<Value> {
    let task = |id: &str, deps: &[&str], ms: u64| {
        json!({"node_id": id, "agent_id": "demo-agent", "objective": format!("demo step {id}"),
               "depends_on": deps, "metadata": {"worker": {"handler": "sleep", "ms": ms}}})
    };
    vec![
        json!({
            "automation_id": "demo-pipeline", "name": "Demo pipeline", "creator_id": "tandemctl-up",
            "flow": {"nodes": [
                task("collect", &[], 400), task("analyze", &["collect"], 700),
                task("summarize", &["collect"], 500), task("report", &["analyze", "summarize"], 300)
            ]}
        }),
        json!({
            "automation_id": "demo-approval", "name": "Demo approval", "creator_id": "tandemctl-up",
            "flow": {"nodes": [
                task("draft", &[], 500),
                {"node_id": "approval", "agent_id": "reviewer", "objective": "Approve the draft",
                 "depends_on": ["draft"], "stage_kind": "approval",
                 "gate": {"required": true, "decisions": ["approve", "rework", "cancel"],
                          "rework_targets": ["draft"],
                          "instructions": "Approve with `tandemctl gates approve <run>`.",
                          "expiry_policy": {"escalate_to": "on-call", "steps": [
                              {"after_ms": 3000, "action": "remind"},
                              {"after_ms": 6000, "action": "remind"},
                              {"after_ms": 9000, "action": "escalate"},
                              {"after_ms": 30000, "action": "cancel"}]}}},
                task("publish", &["approval"], 200)
            ]}
        }),
    ]
}

async fn wait_ready(api: &Api, services: &mut [Service], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for s in services.iter_mut() {
            if let Some(status) = s.child.try_wait()? {
                bail!(
                    "{} exited with {status} during startup; see {}",
                    s.name,
                    s.log.display()
                );
            }
        }
        if let Ok((200, _)) = api.call("GET", "/readyz", None).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the API was not ready within {timeout:?}");
        }
        eprint!(".");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn trigger(api: &Api, n: usize) -> anyhow::Result<()> {
    for _ in 0..n {
        for id in ["demo-pipeline", "demo-approval"] {
            ops::run_now(api, id, Some("tandemctl up demo")).await?;
        }
    }
    Ok(())
}

async fn stop_all(services: &mut Vec<Service>) -> bool {
    step("stopping the fleet");
    for s in services.iter() {
        if let Some(pid) = s.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
    }
    let mut clean = true;
    for s in services.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(20), s.child.wait()).await {
            Ok(Ok(status)) if status.success() => eprintln!("    {} stopped", s.name),
            Ok(Ok(status)) => {
                clean = false;
                eprintln!(
                    "    {} exited with {status} (see {})",
                    s.name,
                    s.log.display()
                );
            }
            _ => {
                clean = false;
                let _ = s.child.kill().await;
                eprintln!("    {} did not stop in 20 s: killed", s.name);
            }
        }
    }
    services.clear();
    clean
}

/// Runs `tandemctl up`.
pub async fn up(mut args: UpArgs, db_url: &str, token: Option<String>) -> anyhow::Result<bool> {
    let (db_url, nats_url) = if args.no_ensure {
        (db_url.to_owned(), args.nats.nats_url.clone())
    } else {
        ensure_dependencies(args.deps, db_url, &args.nats.nats_url).await?
    };
    let db_url = db_url.as_str();
    // The demo's own NATS client follows wherever the services went.
    args.nats.nats_url = nats_url.clone();
    step("migrating the database");
    crate::migrate(db_url, Duration::from_secs(60)).await?;

    let dir = bin_dir(&args)?;
    build_if_missing(&dir).await?;
    let logs = std::env::temp_dir().join(format!("tandem-up-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let token = token.unwrap_or_else(|| format!("dev-{}", std::process::id()));
    let prefix = args.nats.nats_prefix.to_string();
    let base = |health: u16| -> Vec<(&'static str, String)> {
        vec![
            ("TANDEM_DATABASE_URL", db_url.to_owned()),
            ("TANDEM_NATS_URL", nats_url.clone()),
            ("TANDEM_NATS_PREFIX", prefix.clone()),
            ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{health}")),
            ("TANDEM_API_TOKEN", token.clone()),
        ]
    };
    step(&format!("starting the fleet (logs in {})", logs.display()));
    let mut services = Vec::new();
    let plan: [(&str, &str, Env); 7] = [
        (
            "tandem-api",
            "api",
            vec![("TANDEM_API_ADDR", args.api_addr.clone())],
        ),
        ("tandem-scheduler", "scheduler-1", vec![]),
        ("tandem-scheduler", "scheduler-2", vec![]),
        ("tandem-sweeper", "sweeper", vec![]),
        (
            "tandem-gate-notifier",
            "gate-notifier",
            vec![("TANDEM_GATE_NOTIFIER_POLL_MS", "500".into())],
        ),
        ("tandem-worker", "worker-1", vec![]),
        ("tandem-worker", "worker-2", vec![]),
    ];
    for (bin, name, extra) in plan {
        let mut env = base(free_port()?);
        env.extend(extra);
        match spawn(&dir, &logs, bin, name, &env) {
            Ok(s) => {
                eprintln!("    {name} started");
                services.push(s);
            }
            Err(e) => {
                stop_all(&mut services).await;
                return Err(e);
            }
        }
    }
    let api = Api::new(&format!("http://{}", args.api_addr), Some(token.clone()))?;
    eprint!("==> waiting for the API");
    if let Err(e) = wait_ready(&api, &mut services, Duration::from_secs(90)).await {
        eprintln!();
        stop_all(&mut services).await;
        return Err(e);
    }
    eprintln!(" ready");
    let result = run_demo(&args, &api, &token, &mut services).await;
    let clean = stop_all(&mut services).await;
    let ok = result?;
    if clean {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(ok && clean)
}

async fn run_demo(
    args: &UpArgs,
    api: &Api,
    token: &str,
    services: &mut [Service],
) -> anyhow::Result<bool> {
    step("loading the demo automations");
    for spec in demo_automations() {
        api.ok("POST", "/automations/v2", Some(&spec)).await?;
    }
    // Events: subscribe before triggering, so the first ones are seen.
    let client = tandem_bus::connect(&args.nats.options(), "tandemctl-up")
        .await
        .context("connecting to NATS")?;
    let subject = args.nats.nats_prefix.subject("tandem.events.>");
    let mut events = client.subscribe(subject).await?;
    step(&format!("triggering {} runs of each demo", args.runs));
    trigger(api, args.runs).await?;

    let started = Instant::now();
    let limit = args
        .for_secs
        .or(args.smoke.then_some(120))
        .map(Duration::from_secs);
    let mut recent: VecDeque<String> = VecDeque::new();
    let mut reminders = 0usize;
    let mut last_trigger = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(!args.smoke),
            msg = events.next() => {
                let Some(msg) = msg else { bail!("the NATS subscription closed") };
                let line = ops::format_event(msg.subject.as_str(), &msg.payload);
                if line.contains("approval.gate.reminder_due") {
                    reminders += 1;
                }
                recent.push_back(line);
                while recent.len() > 12 {
                    recent.pop_front();
                }
            }
            _ = tick.tick() => {
                for s in services.iter_mut() {
                    if let Some(status) = s.child.try_wait()? {
                        bail!("{} exited with {status}; see {}", s.name, s.log.display());
                    }
                }
                let (_, runs) = api.call("GET", "/automations/v2/runs?limit=500", None).await?;
                let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
                for r in runs["runs"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    let st = r["status"].as_str().unwrap_or("?").to_owned();
                    *by_status.entry(st).or_default() += 1;
                }
                let completed = by_status.get("completed").copied().unwrap_or(0);
                if !args.smoke {
                    print!("\x1b[2J\x1b[H");
                }
                println!(
                    "Tandem Fleet: api http://{}  (token: {token})   up {}s   Ctrl-C stops everything",
                    args.api_addr,
                    started.elapsed().as_secs()
                );
                let counts: Vec<String> = by_status.iter().map(|(k, n)| format!("{k}={n}")).collect();
                println!("\nruns: {}", counts.join("  "));
                println!("\npending approvals:");
                let _ = ops::gates_pending(api).await;
                println!("\nrecent events (reminders so far: {reminders}):");
                for l in &recent {
                    println!("  {l}");
                }
                if args.smoke && completed > 0 && reminders > 0 {
                    println!("\nsmoke: {completed} runs completed, {reminders} reminder events");
                    return Ok(true);
                }
                if limit.is_some_and(|l| started.elapsed() >= l) {
                    if args.smoke {
                        println!("\nsmoke FAILED: {completed} runs completed, {reminders} reminder events");
                    }
                    return Ok(!args.smoke);
                }
                if args.trigger_every_secs > 0
                    && last_trigger.elapsed() >= Duration::from_secs(args.trigger_every_secs)
                {
                    trigger(api, 1).await?;
                    last_trigger = Instant::now();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deps_plan_prefers_what_runs_then_docker_then_the_system() {
        use DepsPlan as P;
        assert_eq!(deps_plan(Deps::Auto, true, true), P::UseAsTheyAre);
        assert_eq!(deps_plan(Deps::Docker, true, false), P::UseAsTheyAre);
        assert_eq!(deps_plan(Deps::Auto, false, true), P::Docker);
        assert_eq!(deps_plan(Deps::Auto, false, false), P::System);
        assert_eq!(deps_plan(Deps::System, false, true), P::System);
        assert_eq!(deps_plan(Deps::Docker, false, false), P::Docker);
    }

    #[test]
    fn compose_file_publishes_what_the_urls_say() {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(COMPOSE_DEPS).expect("yaml");
        let ports = |svc: &str| {
            doc["services"][svc]["ports"][0]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert_eq!(ports("postgres"), "127.0.0.1:55432:5432");
        assert_eq!(ports("nats"), "127.0.0.1:4222:4222");
        let password = doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
            .as_str()
            .unwrap_or("missing");
        assert_eq!(
            COMPOSE_DB_URL,
            format!("postgres://postgres:{password}@127.0.0.1:55432/tandem")
        );
        assert_eq!(COMPOSE_NATS_URL, "nats://127.0.0.1:4222");
        let nats_cmd = format!("{:?}", doc["services"]["nats"]["command"]);
        assert!(nats_cmd.contains("-js"), "JetStream on: {nats_cmd}");
        for svc in ["postgres", "nats"] {
            assert!(doc["services"][svc]["healthcheck"].is_mapping(), "{svc}");
        }
    }
}
