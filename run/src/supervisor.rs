//! The supervisor behind `rblk serve`: small, long-lived, trusted; no storage logic.
//!
//! It holds the image (and root device) and the LISTENING sockets (NBD, and vhost-user-blk
//! when configured), and starts `rblk-driver` with exactly those descriptors plus the write
//! end of a heartbeat pipe and, with `[metrics]` on, the metrics page (a memfd the driver
//! maps; see `metrics.rs`), and nothing else (all the supervisor has open is close-on-exec).
//! Every unrequested death is counted by cause for `/metrics`. Because the listening sockets
//! outlive every driver incarnation, a client that connects during a restart waits in the
//! backlog.
//!
//! It restarts the driver at once when it exits or is killed after it became ready (that
//! incarnation made progress), backs off exponentially while incarnations die before they
//! are ready, and gives up (non-zero exit) only after `max_failed_starts` such failures in a
//! row. The driver reports `ready ms=.. replayed=..` after recovery and then
//! beats; after `heartbeat_timeout` of silence it is killed (SIGKILL) and restarted. Every
//! restart is logged with its cause, the incarnation and the recovery time. SIGTERM/SIGINT
//! stop the driver cleanly (it checkpoints) and end the supervisor with exit 0.
//!
//! Under systemd (see `systemd.rs`) it says `READY=1` once the first incarnation serves,
//! keeps `STATUS=` current (incarnation, recovery, restarts), and pings the watchdog only
//! while there is progress: a driver beating, a driver recovering within its allowance, or a
//! backoff between starts. A hung driver that the supervisor fails to replace thus stops the
//! pings, and systemd's own watchdog takes over.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use slog::{error, info, warn, Logger};

use crate::systemd::{Notifier, DRIVER_ENV_REMOVED};

/// What the supervisor holds for the driver.
#[derive(Debug)]
pub struct Held {
    pub image: File,
    /// The image again, opened buffered, for the page cache (`--cache-fd`).
    pub image_cached: Option<File>,
    pub root: Option<File>,
    /// The unix socket (none when only TCP is served).
    pub listener: Option<UnixListener>,
    /// The TCP listener (`[server] listen`), if any.
    pub tcp: Option<TcpListener>,
    /// The vhost-user-blk listening socket (`[server] vhost_user_socket`), if any: held like
    /// the NBD socket, so a front-end reconnecting during a restart waits in its backlog.
    pub vhost: Option<UnixListener>,
    /// The TLS credentials (`[tls]`) in a sealed memfd, if TLS is on.
    pub tls: Option<File>,
    /// What `/metrics` and `/status` show, and the metrics page each driver gets.
    pub live: std::sync::Arc<crate::metrics::Live>,
}

/// Why the supervisor stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The driver could not be started at all (a missing binary, no processes left).
    #[error("starting {}", driver.display())]
    Start {
        driver: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Incarnations kept dying before they recovered: restarting cannot fix that.
    #[error(
        "driver crash loop: {failed_starts} starts in a row died before becoming ready, last cause: {last_cause}; \
         giving up"
    )]
    CrashLoop { failed_starts: u32, last_cause: String },
}

/// How long a stopping driver gets to checkpoint before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// How long a starting driver may take to recover before its silence counts.
const RECOVERY_ALLOWANCE: Duration = Duration::from_secs(300);

/// Supervises drivers until `stop` (Ok) or until recovery itself keeps failing (Err).
///
/// The policy follows progress, not the clock: an incarnation that reported `ready` (it
/// recovered and served) is restarted at once, however often that happens — a client that
/// crashes the driver again and again must not end the service for everyone. Only
/// incarnations that die before they are ready count as failures; after
/// `max_failed_starts` of them in a row (backing off between them) the supervisor gives up,
/// since restarting cannot fix a recovery that fails every time.
pub fn supervise(
    driver: &PathBuf,
    held: &Held,
    cfg: &config::Config,
    stop: &AtomicBool,
    notify: &mut Notifier,
    log: &Logger,
) -> Result<(), SupervisorError> {
    let s = &cfg.supervisor;
    let mut failed_starts = 0u32;
    let mut backoff = s.restart_backoff;
    for incarnation in 1u64.. {
        let started = Instant::now();
        let (mut child, beats) =
            spawn(driver, held, cfg).map_err(|source| SupervisorError::Start { driver: driver.clone(), source })?;
        info!(log, "driver started"; "incarnation" => incarnation, "pid" => child.id());
        held.live.started(incarnation, child.id());
        notify.notify(&format!("STATUS=incarnation {incarnation}: recovering"));
        let mut seen = Seen { notify: &mut *notify, incarnation, live: &held.live };
        let end = watch(&mut child, beats, cfg, stop, &mut seen, log);
        let Some(Death { cause, label, ready }) = end else {
            info!(log, "stopped"; "incarnation" => incarnation);
            return Ok(());
        };
        notify.notify(&format!("STATUS=incarnation {incarnation} died ({cause}); restarting"));
        held.live.died(&label, &cause);
        let uptime_ms = started.elapsed().as_millis() as u64;
        warn!(log, "driver died"; "incarnation" => incarnation, "cause" => &cause, "uptime_ms" => uptime_ms, "was_ready" => ready);
        if ready {
            failed_starts = 0;
            backoff = s.restart_backoff;
            info!(log, "restarting at once"; "why" => "the driver had recovered and served");
            continue;
        }
        failed_starts += 1;
        if failed_starts >= s.max_failed_starts {
            let give_up = SupervisorError::CrashLoop { failed_starts, last_cause: cause };
            error!(log, "giving up"; "why" => give_up.to_string());
            notify.notify(&format!("STATUS={give_up}"));
            return Err(give_up);
        }
        info!(log, "backing off"; "ms" => backoff.as_millis() as u64, "failed_starts" => failed_starts,
            "why" => "the incarnation ended before it was ready");
        if sleep_unless(stop, backoff, notify) {
            return Ok(());
        }
        backoff = (backoff * 2).min(s.restart_backoff_max);
    }
    Ok(())
}

/// How an incarnation ended, unless it was stopped on request.
struct Death {
    cause: String,
    /// The cause's short name, a metrics label: `exit_status_N`, `signal_SIGNAME`,
    /// `heartbeat_timeout`.
    label: String,
    /// It had reported `ready`: it recovered and was serving.
    ready: bool,
}

/// What `watch` tells the service manager as an incarnation makes progress.
struct Seen<'a> {
    notify: &'a mut Notifier,
    incarnation: u64,
    live: &'a crate::metrics::Live,
}

impl Seen<'_> {
    fn ready(&mut self, recovery: &str) {
        self.live.ready(recovery);
        self.notify.ready(&format!("STATUS=serving: incarnation {}, recovery {recovery}", self.incarnation));
    }
}

/// Sleeps `d` in small steps (the backoff is progress: the watchdog is fed); true if `stop`
/// was set meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration, notify: &mut Notifier) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        if notify.watchdog_due() {
            notify.watchdog();
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    stop.load(Ordering::SeqCst)
}

/// Starts the driver with the held descriptors, under their own numbers, and a heartbeat pipe.
fn spawn(driver: &PathBuf, held: &Held, cfg: &config::Config) -> std::io::Result<(Child, File)> {
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let mut inherit: Vec<(&'static str, std::os::fd::BorrowedFd<'_>)> =
        vec![("--image-fd", held.image.as_fd()), ("--heartbeat-fd", write_end.as_fd())];
    if let Some(listener) = &held.listener {
        inherit.push(("--socket-fd", listener.as_fd()));
    }
    if let Some(root) = &held.root {
        inherit.push(("--root-fd", root.as_fd()));
    }
    if let Some(tcp) = &held.tcp {
        inherit.push(("--tcp-fd", tcp.as_fd()));
    }
    if let Some(vhost) = &held.vhost {
        inherit.push(("--vhost-user-fd", vhost.as_fd()));
    }
    if let Some(tls) = &held.tls {
        inherit.push(("--tls-fd", tls.as_fd()));
    }
    if let Some(cached) = &held.image_cached {
        inherit.push(("--cache-fd", cached.as_fd()));
    }
    if let Some(page) = held.live.page_fd() {
        inherit.push(("--metrics-fd", page));
    }
    let mut cmd = Command::new(driver);
    for (flag, fd) in &inherit {
        cmd.arg(flag).arg(fd.as_raw_fd().to_string());
    }
    cmd.arg("--config-toml").arg(cfg.to_toml_string()).stdin(Stdio::null());
    for name in DRIVER_ENV_REMOVED {
        cmd.env_remove(name);
    }
    // Exactly these descriptors cross the exec: close-on-exec is cleared on them for the spawn
    // only (std opens everything else with it set).
    for (_, fd) in &inherit {
        set_cloexec(fd.as_raw_fd(), false)?;
    }
    let spawned = cmd.spawn();
    for (_, fd) in &inherit {
        set_cloexec(fd.as_raw_fd(), true)?;
    }
    drop(write_end);
    Ok((spawned?, File::from(read_end)))
}

fn set_cloexec(fd: i32, on: bool) -> std::io::Result<()> {
    let flags = if on { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Watches one incarnation: `None` after a requested stop, else how it ended.
fn watch(
    child: &mut Child,
    mut beats: File,
    cfg: &config::Config,
    stop: &AtomicBool,
    seen: &mut Seen<'_>,
    log: &Logger,
) -> Option<Death> {
    let incarnation = seen.incarnation;
    let timeout = cfg.supervisor.heartbeat_timeout;
    let mut last = Instant::now();
    let mut ready = false;
    let mut pending = Vec::new();
    let mut open = true;
    // A line from the driver since the watchdog's last ping.
    let mut progressed = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            seen.notify.notify("STOPPING=1");
            stop_driver(child, log);
            return None;
        }
        // Recovering within its allowance counts as progress; serving counts only with beats.
        if seen.notify.watchdog_due() && (progressed || !ready) {
            seen.notify.watchdog();
            progressed = false;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Death { cause: describe(status), label: label(status), ready });
        }
        let allowed = if ready { timeout } else { RECOVERY_ALLOWANCE.max(timeout) };
        if last.elapsed() > allowed {
            let _ = child.kill();
            let _ = child.wait();
            let cause = format!("no heartbeat for {} ms: killed", last.elapsed().as_millis());
            return Some(Death { cause, label: "heartbeat_timeout".into(), ready });
        }
        if !open {
            // The driver is exiting: poll often, a restart waits for its reaping.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut fds = [PollFd::new(beats.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u8)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(_) => continue,
        }
        let mut buf = [0u8; 512];
        match beats.read(&mut buf) {
            Ok(0) => open = false, // the driver closed it: it is exiting
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(at) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=at).collect();
                    let line = String::from_utf8_lossy(&line[..at]).into_owned();
                    last = Instant::now();
                    progressed = true;
                    if let Some(rest) = line.strip_prefix("ready ") {
                        ready = true;
                        info!(log, "driver ready"; "incarnation" => incarnation, "recovery" => rest);
                        seen.ready(rest);
                    }
                }
            }
            Err(_) => open = false,
        }
    }
}

/// SIGTERM, then SIGKILL if it does not finish its checkpoint in time.
fn stop_driver(child: &mut Child, log: &Logger) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let until = Instant::now() + STOP_GRACE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    warn!(log, "driver stopped with an error"; "status" => describe(status));
                }
                return;
            }
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                warn!(log, "driver did not stop in time: killed");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map_or("?", |s| s.as_str());
            format!("killed by signal {sig} ({name})")
        }
        _ => status.to_string(),
    }
}

/// The metrics label of an exit: `exit_status_N` or `signal_SIGNAME`.
fn label(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit_status_{code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal_{}", s.as_str()),
            Err(_) => format!("signal_{sig}"),
        },
        _ => "unknown".into(),
    }
}
