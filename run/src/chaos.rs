//! `rblk chaos SCENARIO`: a fault-injection run. It starts the supervisor on a fresh image,
//! drives a verifying workload through the reconnecting session client, and kills the driver
//! over and over — with SIGKILL at random intervals, at named failpoints, or by hanging it
//! (SIGSTOP, so it stops beating) — then verifies every block against the oracle, stops the
//! server cleanly, restarts it and verifies again.
//!
//! The oracle: every 4 KiB block is an independent register. Each writer thread owns a
//! region and keeps one request in flight, so after a call returns the block holds exactly
//! the last acknowledged value; a payload is stamped ⟨block, write id, checksum⟩, so a read
//! tells which write it came from and garbage is caught. Reads during the run are checked
//! too. A scenario that expects a crash loop checks that the supervisor gives up cleanly.
//!
//! Scenario files (TOML) live in `run/scenarios/`:
//! ```toml
//! duration = "10s"            # workload time
//! size = "64M"                # volume size
//! writers = 4                 # threads, one region each
//! kill_every = ["300ms", "1500ms"]   # SIGKILL the driver at random intervals in this range
//! hang_at = "3s"              # SIGSTOP the driver once at this time (it must be replaced)
//! failpoints = "log::after_append=1%return"   # FAILPOINTS for every driver incarnation
//! expect = "survive"          # or "give-up": the supervisor must give up (crash loop)
//! min_restarts = 30           # fail the run if the driver died fewer times
//! all_failpoints = true       # fail the run unless every configured failpoint fired
//! config = '''                # server configuration over the chaos defaults (TOML)
//! [checkpoint]
//! log_bytes = "1M"
//! '''
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use raft_state::rng::Rng;
use run::stamp::{decode, stamp, BLOCK};
use session::SessionError;

/// Why a scenario file was refused, or a run failed. Failures that the server's doings explain
/// carry its log ([`ChaosError::server_log`]), shown after the message.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// A file of the run (the scenario, the server's configuration or log) cannot be read or
    /// written.
    #[error("{}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", path.display())]
    ScenarioSyntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A key of the scenario is unknown, or its value is not what the key takes.
    #[error("{}: {key}: {why}", path.display())]
    ScenarioKey { path: PathBuf, key: String, why: String },
    /// The chaos defaults or the scenario's `config` are not TOML.
    #[error("{what}")]
    ServerConfig {
        what: &'static str,
        #[source]
        source: toml::de::Error,
    },
    /// `rblk serve` could not be started, or waited for.
    #[error("{what}")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rblk serve has no stdout")]
    NoStdout,
    #[error("rblk serve exited with {status} after SIGTERM")]
    StopFailed { status: ExitStatus, log: String },
    /// A request of the workload or the verification failed outright.
    #[error("{what}")]
    Request {
        what: &'static str,
        #[source]
        source: SessionError,
    },
    /// A block read back is garbage or another block's, in the stamp's own words.
    #[error(transparent)]
    BadStamp(#[from] run::stamp::BadStamp),
    /// A read during the workload saw another write than the last acknowledged one.
    #[error("block {block}: read write {read}, acknowledged was {acknowledged}")]
    ReadMismatch { block: u64, read: u64, acknowledged: u64 },
    /// A block verified after the workload holds another write than the last acknowledged one.
    #[error("block {block}: holds write {holds}, acknowledged was {acknowledged}")]
    VerifyMismatch { block: u64, holds: u64, acknowledged: u64 },
    #[error("a writer panicked")]
    WriterPanicked,
    #[error("the report lock is poisoned (a writer panicked)")]
    ReportLock,
    /// A writer failed; the tail of the server log shows what the server did meanwhile.
    #[error("the workload failed")]
    Workload {
        #[source]
        source: Box<ChaosError>,
        log_tail: String,
    },
    #[error("expected the supervisor to give up, it exited with {status}")]
    NoGiveUp { status: ExitStatus, log: String },
    #[error("the supervisor did not give up within a minute")]
    GiveUpLate { log: String },
    #[error("only {restarts} driver restarts, the scenario wants {wanted}")]
    TooFewRestarts { restarts: u64, wanted: u64 },
    #[error(
        "the scenario sets failpoints, but {} was built without them: build one with `cargo build \
         --release --features failpoints --target-dir target/failpoints` and set \
         RBLK_DRIVER=target/failpoints/release/rblk-driver",
        driver.display()
    )]
    NoFailpoints { driver: PathBuf },
    #[error("failpoint {name} never fired ({report})")]
    FailpointSilent { name: String, report: String },
    #[error("the hung driver was not detected")]
    HangUndetected { log_tail: String },
}

impl ChaosError {
    /// The server log (or its tail) that explains the failure, if the failure carries it.
    pub fn server_log(&self) -> Option<&str> {
        match self {
            ChaosError::StopFailed { log, .. } | ChaosError::NoGiveUp { log, .. } | ChaosError::GiveUpLate { log } => {
                Some(log)
            }
            ChaosError::Workload { log_tail, .. } | ChaosError::HangUndetected { log_tail } => Some(log_tail),
            _ => None,
        }
    }
}

/// A scenario, as read from its file.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub duration: Duration,
    pub size: u64,
    pub writers: u64,
    pub kill_every: Option<(Duration, Duration)>,
    pub hang_at: Option<Duration>,
    pub failpoints: String,
    pub expect_give_up: bool,
    /// Server configuration (TOML) merged over the chaos defaults.
    pub config: String,
    pub min_restarts: u64,
    pub all_failpoints: bool,
}

fn field<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    table.get(key)
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ChaosError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ChaosError::File { path: path.to_path_buf(), source })?;
        let table: toml::Table =
            text.parse().map_err(|source| ChaosError::ScenarioSyntax { path: path.to_path_buf(), source })?;
        let bad = |key: &str, why: String| ChaosError::ScenarioKey { path: path.to_path_buf(), key: key.into(), why };
        let string = |key: &str| -> Result<Option<String>, ChaosError> {
            match field(&table, key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(key, format!("expected a string, got {other}"))),
            }
        };
        let duration = |key: &str, v: &str| config::parse_duration(v).map_err(|e| bad(key, e));
        for key in table.keys() {
            let known = [
                "duration",
                "size",
                "writers",
                "kill_every",
                "hang_at",
                "failpoints",
                "expect",
                "config",
                "min_restarts",
                "all_failpoints",
            ];
            if !known.contains(&key.as_str()) {
                return Err(bad(key, "unknown key".into()));
            }
        }
        let kill_every = match field(&table, "kill_every") {
            None => None,
            Some(toml::Value::Array(a)) if a.len() == 2 => {
                let lo = a[0].as_str().ok_or_else(|| bad("kill_every", "expected two durations".into()))?;
                let hi = a[1].as_str().ok_or_else(|| bad("kill_every", "expected two durations".into()))?;
                Some((duration("kill_every", lo)?, duration("kill_every", hi)?))
            }
            Some(_) => return Err(bad("kill_every", "expected [\"min\", \"max\"]".into())),
        };
        let expect = string("expect")?.unwrap_or_else(|| "survive".into());
        if expect != "survive" && expect != "give-up" {
            return Err(bad("expect", format!("expected \"survive\" or \"give-up\", got {expect:?}")));
        }
        let writers = match field(&table, "writers") {
            None => 4,
            Some(toml::Value::Integer(n)) if (1..=64).contains(n) => *n as u64,
            Some(other) => return Err(bad("writers", format!("expected 1..=64, got {other}"))),
        };
        Ok(Scenario {
            name: path.file_stem().map_or("scenario".into(), |s| s.to_string_lossy().into_owned()),
            duration: duration("duration", &string("duration")?.unwrap_or_else(|| "10s".into()))?,
            size: config::parse_size(&string("size")?.unwrap_or_else(|| "64M".into())).map_err(|e| bad("size", e))?,
            writers,
            kill_every,
            hang_at: string("hang_at")?.map(|v| duration("hang_at", &v)).transpose()?,
            failpoints: string("failpoints")?.unwrap_or_default(),
            expect_give_up: expect == "give-up",
            config: string("config")?.unwrap_or_default(),
            min_restarts: match field(&table, "min_restarts") {
                None => 0,
                Some(toml::Value::Integer(n)) if *n >= 0 => *n as u64,
                Some(other) => return Err(bad("min_restarts", format!("expected a count, got {other}"))),
            },
            all_failpoints: match field(&table, "all_failpoints") {
                None => false,
                Some(toml::Value::Boolean(b)) => *b,
                Some(other) => return Err(bad("all_failpoints", format!("expected true or false, got {other}"))),
            },
        })
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub writes: u64,
    pub reads: u64,
    pub trims: u64,
    pub kills: u64,
    pub restarts: u64,
    pub reconnects: u64,
    pub verified_blocks: u64,
    /// How often each failpoint killed the driver.
    pub failpoints: std::collections::BTreeMap<String, u64>,
    /// From each driver death to the next incarnation's first answered request, in ms.
    pub restart_ms: Vec<u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acknowledged writes {}, reads {}, trims {}, kills {}, driver restarts {}, client reconnects {}, \
             blocks verified {}, violations 0",
            self.writes, self.reads, self.trims, self.kills, self.restarts, self.reconnects, self.verified_blocks
        )?;
        let mut ms = self.restart_ms.clone();
        ms.sort_unstable();
        if let (Some(median), Some(max)) = (ms.get(ms.len() / 2), ms.last()) {
            write!(f, ", restart to first served request: median {median} ms, max {max} ms")?;
        }
        for (name, n) in &self.failpoints {
            write!(f, ", {name} ×{n}")?;
        }
        Ok(())
    }
}

struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, scenario: &Scenario, driver: &Path) -> Result<Server, ChaosError> {
        let file = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChaosError::File { path, source }
        };
        let serve = |what| move |source| ChaosError::Serve { what, source };
        let cfg = dir.join("chaos.toml");
        std::fs::write(&cfg, server_config(&scenario.config)?).map_err(file(&cfg))?;
        let log = dir.join("serve.log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(file(&log))?;
        let exe = std::env::current_exe().map_err(serve("locating the rblk executable"))?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg(dir.join("chaos.img"))
            .arg("--socket")
            .arg(dir.join("chaos.sock"))
            .arg("--config")
            .arg(&cfg)
            .arg("--size")
            .arg(scenario.size.to_string())
            .env("RBLK_DRIVER", driver)
            .env("FAILPOINTS", &scenario.failpoints)
            .env("RBLK_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(serve("starting rblk serve"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or(ChaosError::NoStdout)?;
        BufReader::new(stdout).read_line(&mut line).map_err(serve("reading the first line of rblk serve"))?;
        let server = Server { child, log };
        if !scenario.failpoints.is_empty() {
            server.check_failpoints(driver)?;
        }
        Ok(server)
    }

    /// The driver says at start whether it armed FAILPOINTS or ignored them (a build without
    /// the `failpoints` feature): a scenario with failpoints needs the former.
    fn check_failpoints(&self, driver: &Path) -> Result<(), ChaosError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let log = self.log();
            if log.contains("FAILPOINTS ignored") {
                return Err(ChaosError::NoFailpoints { driver: driver.to_path_buf() });
            }
            if log.contains("failpoints armed") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Neither line: whatever keeps the driver from starting shows up in the run itself.
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn driver_pid(&self) -> Option<i32> {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    fn stop(mut self) -> Result<(), ChaosError> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let status =
            self.child.wait().map_err(|source| ChaosError::Serve { what: "waiting for rblk serve", source })?;
        if !status.success() {
            return Err(ChaosError::StopFailed { status, log: self.log() });
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One writer: its region, the last acknowledged write id of every block, a client.
fn writer(
    client: &session::Client,
    region: (u64, u64),
    seed: u64,
    next_id: &AtomicU64,
    until: Instant,
    report: &Arc<std::sync::Mutex<Report>>,
) -> Result<Vec<u64>, ChaosError> {
    let (first, blocks) = region;
    let mut model = vec![0u64; blocks as usize];
    let mut rng = Rng::new(seed);
    let (mut writes, mut reads, mut trims) = (0, 0, 0);
    let err = |what| move |source| ChaosError::Request { what, source };
    while Instant::now() < until {
        let n = 1 + rng.below(16.min(blocks));
        let at = rng.below(blocks - n + 1);
        let offset = (first + at) * BLOCK;
        match rng.below(10) {
            0..=5 => {
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let mut data = Vec::with_capacity((n * BLOCK) as usize);
                for b in 0..n {
                    data.extend_from_slice(&stamp(first + at + b, id));
                }
                client.write(offset, &data, rng.chance(1, 8)).map_err(err("write"))?;
                model[at as usize..(at + n) as usize].fill(id);
                writes += 1;
            }
            6 => {
                client.trim(offset, (n * BLOCK) as u32).map_err(err("trim"))?;
                model[at as usize..(at + n) as usize].fill(0);
                trims += 1;
            }
            7 => client.flush().map_err(err("flush"))?,
            _ => {
                let got = client.read(offset, (n * BLOCK) as u32).map_err(err("read"))?;
                for b in 0..n {
                    let block = first + at + b;
                    let id =
                        decode(block, &got[(b * BLOCK) as usize..][..BLOCK as usize]).map_err(ChaosError::BadStamp)?;
                    let acknowledged = model[(at + b) as usize];
                    if id != acknowledged {
                        return Err(ChaosError::ReadMismatch { block, read: id, acknowledged });
                    }
                }
                reads += 1;
            }
        }
    }
    if let Ok(mut r) = report.lock() {
        r.writes += writes;
        r.reads += reads;
        r.trims += trims;
    }
    Ok(model)
}

/// Reads every region back and checks it against the models.
fn verify(client: &session::Client, regions: &[(u64, u64)], models: &[Vec<u64>]) -> Result<u64, ChaosError> {
    let mut verified = 0;
    for (&(first, blocks), model) in regions.iter().zip(models) {
        for chunk in (0..blocks).step_by(256) {
            let n = 256.min(blocks - chunk);
            let got = client
                .read((first + chunk) * BLOCK, (n * BLOCK) as u32)
                .map_err(|source| ChaosError::Request { what: "verify read", source })?;
            for b in 0..n {
                let block = first + chunk + b;
                let id = decode(block, &got[(b * BLOCK) as usize..][..BLOCK as usize]).map_err(ChaosError::BadStamp)?;
                let acknowledged = model[(chunk + b) as usize];
                if id != acknowledged {
                    return Err(ChaosError::VerifyMismatch { block, holds: id, acknowledged });
                }
                verified += 1;
            }
        }
    }
    Ok(verified)
}

/// Runs `scenario` in `dir` with the given seed.
pub fn run(scenario: &Scenario, dir: &Path, driver: &Path, seed: u64) -> Result<Report, ChaosError> {
    let server = Server::start(dir, scenario, driver)?;
    let socket = dir.join("chaos.sock");
    if scenario.expect_give_up {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut server = server;
        loop {
            let exited = server
                .child
                .try_wait()
                .map_err(|source| ChaosError::Serve { what: "waiting for rblk serve", source })?;
            if let Some(status) = exited {
                let log = server.log();
                if status.success() || !log.contains("giving up") {
                    return Err(ChaosError::NoGiveUp { status, log });
                }
                let restarts = log.matches("driver died").count() as u64;
                return Ok(Report { restarts, ..Report::default() });
            }
            if Instant::now() > deadline {
                return Err(ChaosError::GiveUpLate { log: server.log() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Retry soon and often: the socket stays with the supervisor, so a connection made while
    // the driver restarts waits in the backlog rather than failing.
    let options = session::Options {
        reconnect: Some(session::Reconnect {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
            give_up_after: Duration::from_secs(120),
        }),
    };
    let client = session::Client::connect_with(&socket, "", &options)
        .map_err(|source| ChaosError::Request { what: "connect", source })?;
    let blocks = scenario.size / BLOCK / scenario.writers;
    let regions: Vec<(u64, u64)> = (0..scenario.writers).map(|w| (w * blocks, blocks)).collect();
    let report = Arc::new(std::sync::Mutex::new(Report::default()));
    let next_id = AtomicU64::new(1);
    let until = Instant::now() + scenario.duration;
    let done = AtomicBool::new(false);
    let mut rng = Rng::new(seed);
    let mut kills = 0u64;
    let models: Result<Vec<Vec<u64>>, ChaosError> = std::thread::scope(|scope| {
        let workers: Vec<_> = regions
            .iter()
            .enumerate()
            .map(|(w, &region)| {
                let (client, report, next_id) = (&client, &report, &next_id);
                scope.spawn(move || {
                    writer(client, region, seed ^ ((w as u64 + 1) * 0x1234_5678), next_id, until, report)
                })
            })
            .collect();
        // The killer runs on this thread.
        let started = Instant::now();
        let mut hung = scenario.hang_at.is_none();
        let mut next_kill = scenario.kill_every.map(|(lo, hi)| Instant::now() + pick(&mut rng, lo, hi));
        let bar = crate::progress::millis(scenario.duration.as_millis() as u64, &scenario.name);
        while !workers.iter().all(|w| w.is_finished()) {
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!("{}: {kills} kills", scenario.name));
            if !hung && scenario.hang_at.is_some_and(|at| started.elapsed() >= at) {
                if let Some(pid) = server.driver_pid() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
                    hung = true;
                }
            }
            if let (Some(at), Some((lo, hi))) = (next_kill, scenario.kill_every) {
                if Instant::now() >= at {
                    if let Some(pid) = server.driver_pid() {
                        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                            kills += 1;
                        }
                    }
                    next_kill = Some(Instant::now() + pick(&mut rng, lo, hi));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bar.finish_and_clear();
        done.store(true, Ordering::SeqCst);
        workers.into_iter().map(|w| w.join().map_err(|_| ChaosError::WriterPanicked)?).collect()
    });
    let models = models.map_err(|e| ChaosError::Workload { source: Box::new(e), log_tail: tail(&server.log()) })?;
    let mut report = std::mem::take(&mut *report.lock().map_err(|_| ChaosError::ReportLock)?);
    report.kills = kills;
    report.verified_blocks = verify(&client, &regions, &models)?;
    report.reconnects = client.reconnects();
    drop(client);
    let log = server.log();
    report.restarts = log.matches("driver died").count() as u64;
    for line in log.lines() {
        if let Some(name) = line.strip_prefix("failpoint ").and_then(|l| l.strip_suffix(": dying here")) {
            *report.failpoints.entry(name.to_string()).or_default() += 1;
        }
    }
    report.restart_ms = restart_times(&log);
    if report.restarts < scenario.min_restarts {
        return Err(ChaosError::TooFewRestarts { restarts: report.restarts, wanted: scenario.min_restarts });
    }
    if scenario.all_failpoints {
        for spec in scenario.failpoints.split(';').filter(|s| !s.is_empty()) {
            let name = spec.split('=').next().unwrap_or(spec);
            if !report.failpoints.contains_key(name) {
                return Err(ChaosError::FailpointSilent { name: name.to_string(), report: report.to_string() });
            }
        }
    }
    if scenario.hang_at.is_some() && !log.contains("no heartbeat") {
        return Err(ChaosError::HangUndetected { log_tail: tail(&log) });
    }
    server.stop()?;
    // After a clean stop and a new start (failpoints off), everything is still there.
    let calm = Scenario { failpoints: String::new(), ..scenario.clone() };
    let server = Server::start(dir, &calm, driver)?;
    let client = session::Client::connect_with(&socket, "", &options)
        .map_err(|source| ChaosError::Request { what: "connect", source })?;
    report.verified_blocks += verify(&client, &regions, &models)?;
    drop(client);
    server.stop()?;
    Ok(report)
}

/// The chaos defaults (quick heartbeats and restarts, a generous crash-loop limit), with the
/// scenario's configuration merged over them section by section.
fn server_config(scenario: &str) -> Result<String, ChaosError> {
    const DEFAULTS: &str = "[supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"1s\"\n\
        restart_backoff = \"10ms\"\nrestart_backoff_max = \"200ms\"\nmax_failed_starts = 1000\n";
    let mut merged: toml::Table =
        DEFAULTS.parse().map_err(|source| ChaosError::ServerConfig { what: "chaos defaults", source })?;
    let extra: toml::Table =
        scenario.parse().map_err(|source| ChaosError::ServerConfig { what: "scenario config", source })?;
    for (section, values) in extra {
        match (merged.get_mut(&section), values) {
            (Some(toml::Value::Table(base)), toml::Value::Table(over)) => base.extend(over),
            (_, values) => {
                merged.insert(section, values);
            }
        }
    }
    Ok(merged.to_string())
}

/// Milliseconds from a driver's death to the first request the next incarnation served (an
/// incarnation killed before serving anything restarts the clock), from the timestamps of the
/// server log (`Mon DD HH:MM:SS.mmm LEVEL message`).
fn restart_times(log: &str) -> Vec<u64> {
    let ms_of = |line: &str| -> Option<u64> {
        let t = line.split_whitespace().nth(2)?;
        let (hms, millis) = t.split_once('.')?;
        let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
        let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
        Some(((h * 60 + m) * 60 + s) * 1000 + millis.parse::<u64>().ok()?)
    };
    let mut out = Vec::new();
    let mut died: Option<u64> = None;
    for line in log.lines() {
        if line.contains("driver died") {
            died = ms_of(line);
        } else if line.contains("first request served") {
            if let (Some(d), Some(t)) = (died.take(), ms_of(line)) {
                out.push((t + 86_400_000 - d) % 86_400_000);
            }
        }
    }
    out
}

fn pick(rng: &mut Rng, lo: Duration, hi: Duration) -> Duration {
    let span = hi.saturating_sub(lo).as_millis() as u64;
    lo + Duration::from_millis(rng.below(span + 1))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
