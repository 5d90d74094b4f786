//! `rblk-driver`: serves one volume on its listening sockets (NBD on a unix socket and/or TCP,
//! and vhost-user-blk when given one) until SIGTERM/SIGINT (then it checkpoints and exits 0)
//! or a fatal error (exit 1; the supervisor restarts it).
//!
//! ```text
//! rblk-driver --image PATH [--root-device PATH] --socket PATH [--vhost-user PATH] [--config FILE]
//! rblk-driver --image-fd N [--cache-fd N] [--root-fd N] --socket-fd N [--tcp-fd N] [--vhost-user-fd N] [--tls-fd N] [--heartbeat-fd N] [--metrics-fd N] [--config-toml TEXT]
//! ```
//! `--vhost-user-fd` (from the supervisor) or `--vhost-user PATH` (bound here, for running the
//! driver by hand) is the listening socket of the vhost-user-blk session (`[server]
//! vhost_user_socket`), served beside the NBD socket on the same volume.
//! `--metrics-fd` is the supervisor's metrics page (`driver::metrics`), mapped before the
//! sandbox is entered; a page that is not one (wrong size or version) is logged and ignored.
//! With descriptors, the supervisor opened the image and bound the socket; the driver opens
//! nothing itself. Before serving it enters its sandbox (`driver::sandbox`): started as root
//! it becomes the configured unprivileged user; always no_new_privs and seccomp.
//!
//! Test hook: with `RBLK_DRIVER_OPEN_PROBE=PATH` the driver tries to open PATH once it is
//! sandboxed and logs whether it could (it must not).

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use raft_state::device::{Device, FileDevice};

use crate as driver;

#[derive(Debug, Default)]
struct Args {
    image: Option<PathBuf>,
    image_fd: Option<RawFd>,
    cache_fd: Option<RawFd>,
    root: Option<PathBuf>,
    root_fd: Option<RawFd>,
    socket: Option<PathBuf>,
    socket_fd: Option<RawFd>,
    tcp_fd: Option<RawFd>,
    vhost_user: Option<PathBuf>,
    vhost_user_fd: Option<RawFd>,
    tls_fd: Option<RawFd>,
    heartbeat_fd: Option<RawFd>,
    metrics_fd: Option<RawFd>,
    config: Option<PathBuf>,
    config_toml: Option<String>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let fd = |v: String| v.parse::<RawFd>().map_err(|_| format!("{v:?} is not a file descriptor number"));
        match flag.as_str() {
            "--image" => a.image = Some(value()?.into()),
            "--image-fd" => a.image_fd = Some(fd(value()?)?),
            "--cache-fd" => a.cache_fd = Some(fd(value()?)?),
            "--root-device" => a.root = Some(value()?.into()),
            "--root-fd" => a.root_fd = Some(fd(value()?)?),
            "--socket" => a.socket = Some(value()?.into()),
            "--socket-fd" => a.socket_fd = Some(fd(value()?)?),
            "--tcp-fd" => a.tcp_fd = Some(fd(value()?)?),
            "--vhost-user" => a.vhost_user = Some(value()?.into()),
            "--vhost-user-fd" => a.vhost_user_fd = Some(fd(value()?)?),
            "--tls-fd" => a.tls_fd = Some(fd(value()?)?),
            "--heartbeat-fd" => a.heartbeat_fd = Some(fd(value()?)?),
            "--metrics-fd" => a.metrics_fd = Some(fd(value()?)?),
            "--config" => a.config = Some(value()?.into()),
            "--config-toml" => a.config_toml = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

const USAGE: &str =
    "usage: rblk-driver (--image PATH | --image-fd N [--cache-fd N]) [--root-device PATH | --root-fd N] \
                     (--socket PATH | --socket-fd N | --tcp-fd N) [--tcp-fd N] [--vhost-user PATH | --vhost-user-fd N] \
                     [--tls-fd N] [--heartbeat-fd N] [--metrics-fd N] [--config FILE | --config-toml TEXT]";

/// Closes every descriptor above stderr that is not in `keep` (and not owned by this process
/// yet: call it before anything else is opened).
fn close_others(keep: &[RawFd]) -> Result<(), String> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("listing /proc/self/fd: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // The directory's own descriptor is already closed: EBADF is fine.
            let _ = nix::unistd::close(fd);
        }
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the parent handed this descriptor over for the driver's exclusive use; nothing
    // else in this process refers to it, so owning (and eventually closing) it is sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn device(path: Option<PathBuf>, fd: Option<RawFd>, what: &str) -> Result<Option<FileDevice>, String> {
    let dev = match (path, fd) {
        (Some(p), None) => FileDevice::open(&p).map_err(|e| format!("{what} {}: {e}", p.display()))?,
        (None, Some(fd)) => {
            FileDevice::from_fd(owned(fd), format!("{what} fd {fd}")).map_err(|e| format!("{what} fd {fd}: {e}"))?
        }
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err(format!("give the {what} as a path or a descriptor, not both")),
    };
    Ok(Some(dev))
}

/// The image device, with its page-cache descriptor when configured: the supervisor's
/// `--cache-fd`, or the image path opened again read-write (never O_DIRECT).
fn image(args: &Args, cfg: &config::Config) -> Result<Arc<dyn Device>, String> {
    let dev = device(args.image.clone(), args.image_fd, "image")?.ok_or("no image given (--image or --image-fd)")?;
    let read = match (&args.image, args.cache_fd) {
        (_, Some(fd)) => Some(std::fs::File::from(owned(fd))),
        (Some(p), None) if cfg.cache.page_cache => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| format!("image {}: {e}", p.display()))?,
        ),
        _ => None,
    };
    let dev = match read {
        Some(file) if cfg.cache.page_cache => dev.with_page_cache(file).map_err(|e| format!("cache fd: {e}"))?,
        _ => dev,
    };
    Ok(Arc::new(dev))
}

/// Keeps malloc from holding on to freed request buffers. By default glibc raises its mmap
/// threshold as large blocks are freed and keeps them in each of its per-thread arenas (up to
/// 8 per core): under 64 flooding connections that held the driver's peak memory near 300 MiB
/// while the bytes in flight were bounded by a 64 MiB budget. Here buffers above 2 MiB (the
/// largest requests) are mapped and unmapped one by one, and two arenas serve all threads:
/// about 160 MiB in the same flood. A lower threshold (256 KiB) bounded memory further but
/// cost a third of the 1 MiB write throughput (a fresh mapping per entry buffer).
fn return_large_buffers_at_once() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread
    // exists, and a failure (return 0) leaves the defaults in place, which is harmless.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, (2 << 20) + (64 << 10));
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

/// The `rblk-driver` program (its binary lives in the `run` package, beside `rblk`).
pub fn main() -> ExitCode {
    return_large_buffers_at_once();
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let loaded = match (&args.config, &args.config_toml) {
        (Some(path), None) => config::Config::load(path),
        (None, Some(text)) => config::Config::from_toml_str(text),
        (None, None) => Ok(config::Config::default()),
        (Some(_), Some(_)) => {
            eprintln!("rblk-driver: give --config or --config-toml, not both");
            return ExitCode::from(2);
        }
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rblk-driver: {e}");
            return ExitCode::from(2);
        }
    };
    raft_state::failpoints_from_env();
    let log = driver::logger(&cfg.log);
    // Said either way, so that `rblk chaos` can tell a driver without failpoints from one
    // whose failpoints have not fired yet.
    if let Some(spec) = std::env::var_os("FAILPOINTS").filter(|s| !s.is_empty()) {
        if raft_state::FAILPOINTS_BUILT {
            slog::info!(log, "failpoints armed"; "FAILPOINTS" => %spec.to_string_lossy());
        } else {
            slog::warn!(log, "FAILPOINTS ignored: this rblk-driver was built without the failpoints feature");
        }
    }
    let stop = match driver::stop_on_signals(&log) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rblk-driver: signals: {}", driver::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let opened = (|| -> Result<_, String> {
        // Nothing but what was handed over stays open (a parent may leak descriptors). First,
        // before the devices open descriptors of their own (their io_uring rings).
        let keep = [
            args.image_fd,
            args.cache_fd,
            args.root_fd,
            args.socket_fd,
            args.tcp_fd,
            args.vhost_user_fd,
            args.tls_fd,
            args.heartbeat_fd,
            args.metrics_fd,
        ];
        if args.socket_fd.is_some() || args.tcp_fd.is_some() || args.vhost_user_fd.is_some() {
            close_others(&keep.into_iter().flatten().collect::<Vec<_>>())?;
        }
        let dev = image(&args, &cfg)?;
        let root = device(args.root.clone(), args.root_fd, "root device")?.map(|d| Arc::new(d) as Arc<dyn Device>);
        let unix = match (&args.socket, args.socket_fd) {
            (Some(p), None) => Some(UnixListener::bind(p).map_err(|e| format!("socket {}: {e}", p.display()))?),
            (None, Some(fd)) => Some(UnixListener::from(owned(fd))),
            (None, None) if args.tcp_fd.is_some() => None,
            _ => return Err(format!("give the socket as --socket PATH or --socket-fd N (or --tcp-fd N)\n{USAGE}")),
        };
        let vhost = match (&args.vhost_user, args.vhost_user_fd) {
            (Some(p), None) => {
                Some(UnixListener::bind(p).map_err(|e| format!("vhost-user socket {}: {e}", p.display()))?)
            }
            (None, Some(fd)) => Some(UnixListener::from(owned(fd))),
            (None, None) => None,
            (Some(_), Some(_)) => return Err("give the vhost-user socket as a path or a descriptor, not both".into()),
        };
        let listeners = driver::Listeners { unix, tcp: args.tcp_fd.map(|fd| TcpListener::from(owned(fd))), vhost };
        let heartbeat = match args.heartbeat_fd {
            Some(fd) => {
                let file = std::fs::File::from(owned(fd));
                // A beat must never block the node thread.
                let flags = nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), nix::fcntl::FcntlArg::F_GETFL)
                    .map_err(|e| format!("heartbeat fd: {e}"))?;
                let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
                nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), nix::fcntl::FcntlArg::F_SETFL(flags))
                    .map_err(|e| format!("heartbeat fd: {e}"))?;
                Some(driver::Heartbeat::new(file, cfg.supervisor.heartbeat))
            }
            None => None,
        };
        if let Some(fd) = args.metrics_fd {
            // Mapped now: the sandbox allows mmap, but the page must be in place before any
            // request is counted. The descriptor is not needed once mapped.
            let fd = owned(fd);
            match driver::metrics::Mapped::open(std::os::fd::AsFd::as_fd(&fd)) {
                Ok(page) => driver::metrics::install(page),
                Err(e) => slog::warn!(log, "metrics page refused: counting without it"; "error" => e),
            }
        }
        let tls = match (cfg.tls.mode, args.tls_fd) {
            (config::TlsMode::Off, _) => None,
            (mode, Some(fd)) => {
                // Read from the start whatever an earlier incarnation did with the offset
                // (the supervisor passes the same sealed memfd to each).
                let file = std::fs::File::from(owned(fd));
                let mut bundle = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = std::os::unix::fs::FileExt::read_at(&file, &mut chunk, bundle.len() as u64)
                        .map_err(|e| format!("TLS credentials: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    bundle.extend_from_slice(&chunk[..n]);
                }
                let required = mode == config::TlsMode::Require;
                let server = driver::tls::TlsServer::new(&bundle, required, cfg.tls.verify_peer)
                    .map_err(|e| format!("TLS credentials: {}", driver::error_chain(&e)))?;
                Some(server)
            }
            (_, None) => return Err("tls.mode is on or require, but no --tls-fd gives the credentials".into()),
        };
        let identity = driver::sandbox::resolve(&cfg.supervisor.user, &cfg.supervisor.group)
            .map_err(|e| driver::error_chain(&e))?;
        Ok((dev, root, listeners, heartbeat, identity, tls))
    })();
    let (dev, root, listeners, heartbeat, identity, tls) = match opened {
        Ok(o) => o,
        Err(e) => {
            eprintln!("rblk-driver: {e}");
            return ExitCode::from(2);
        }
    };
    match driver::sandbox::enter(identity) {
        Ok(s) => {
            slog::info!(log, "sandboxed"; "uid" => s.uid, "gid" => s.gid, "dropped_root" => s.dropped_root, "seccomp" => true)
        }
        Err(e) => {
            eprintln!("rblk-driver: entering the sandbox: {}", driver::error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    if args.heartbeat_fd.is_some() {
        // Supervised: die with the supervisor, so no orphan keeps serving its socket. Set
        // after the identity change, which clears it.
        let gone = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
            || nix::unistd::getppid().as_raw() == 1;
        if gone {
            eprintln!("rblk-driver: cannot follow the supervisor (or it is gone already)");
            return ExitCode::FAILURE;
        }
    }
    if let Some(probe) = std::env::var_os("RBLK_DRIVER_OPEN_PROBE") {
        match std::fs::File::open(&probe) {
            Ok(_) => slog::error!(log, "open probe: opened a file inside the sandbox"; "path" => ?probe),
            Err(e) => slog::info!(log, "open probe: denied"; "path" => ?probe, "error" => %e),
        }
    }
    let mut driver_cfg = driver::driver_config(&cfg);
    driver_cfg.tls = tls;
    match driver::run(dev, root, listeners, driver_cfg, stop, heartbeat, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rblk-driver: {}", driver::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
