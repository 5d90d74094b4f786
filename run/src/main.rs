//! `rblk`: format a volume, serve it, inspect it, run chaos scenarios. The command line is
//! declared in `args.rs` (clap); `rblk --help` and `rblk help SUBCOMMAND` describe every
//! option. Exit status: 0 success, 1 runtime error, 2 usage error.

mod args;
mod chaos;
mod format;
mod inspect;
mod metrics;
mod progress;
mod socket;
mod status;
mod supervisor;
mod systemd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use args::{ChaosArgs, Command, FormatArgs, Generate, GenerateArgs, InspectArgs, ServeArgs, StatusArgs};
use raft_state::device::{Device, DeviceError, FileDevice};

/// Why a command failed. Printed as `rblk: ` and the error with its sources, `: `-joined.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The command line is wrong (the message may carry the usage text).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error("{}", image.display())]
    Inspect {
        image: PathBuf,
        #[source]
        source: inspect::InspectError,
    },
    #[error(transparent)]
    Chaos(#[from] chaos::ChaosError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// An image or root device cannot be opened as a device.
    #[error("{}", path.display())]
    Device {
        path: PathBuf,
        #[source]
        source: DeviceError,
    },
    /// A file or directory the command needs cannot be opened or made.
    #[error("{}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the stop signals")]
    Signals(#[source] driver::DriverError),
    #[error("locating rblk-driver")]
    LocateDriver(#[source] std::io::Error),
    #[error(transparent)]
    Socket(#[from] socket::BindError),
    #[error("TLS credentials in {}", dir.display())]
    Tls {
        dir: PathBuf,
        #[source]
        source: driver::tls::TlsError,
    },
    #[error("systemd")]
    Systemd(#[from] systemd::SystemdError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("metrics")]
    Metrics(#[source] std::io::Error),
    #[error("binding {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// The exit status: 2 for a command line that is wrong, 1 for everything else.
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn main() -> ExitCode {
    // Help and version go to stdout with status 0; usage errors to stderr with status 2.
    let cli = args::Cli::parse();
    let result = match cli.command {
        Command::Format(a) => cmd_format(a),
        Command::Serve(a) => cmd_serve(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Chaos(a) => cmd_chaos(a),
        Command::Status(a) => cmd_status(a),
        Command::Generate(a) => cmd_generate(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rblk: {}", driver::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

fn cmd_format(a: FormatArgs) -> Result<ExitCode, CliError> {
    let spec = format::Spec { size: a.size, log_size: a.log_size, force: a.force, preallocate: a.preallocate };
    let summary = format::format(&a.image, a.root_device.as_deref(), &spec).map_err(|e| match e {
        // Sizes the flags gave that no volume can have: the command line is wrong.
        format::FormatError::BadSize(_) | format::FormatError::BadLogSize(_) => CliError::Usage(e.to_string()),
        e => CliError::Format(e),
    })?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn cmd_inspect(a: InspectArgs) -> Result<ExitCode, CliError> {
    let image = a.image;
    let dev = open_device(&image)?;
    let root_dev = a.root_device.as_deref().map(open_device).transpose()?;
    let report =
        inspect::inspect(dev, root_dev).map_err(|source| CliError::Inspect { image: image.clone(), source })?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_chaos(a: ChaosArgs) -> Result<ExitCode, CliError> {
    let ChaosArgs { scenario: path, seed, duration, dir } = a;
    let mut scenario = chaos::Scenario::load(&path)?;
    if let Some(d) = duration {
        scenario.duration = d;
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let dir = dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("rblk-chaos-{}-{}", scenario.name, std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| CliError::File { path: dir.clone(), source })?;
    let driver = driver_binary()?;
    eprintln!("chaos {}: seed {seed}, {:?}, in {}", scenario.name, scenario.duration, dir.display());
    match chaos::run(&scenario, &dir, &driver, seed) {
        Ok(report) => {
            println!("chaos {}: passed (seed {seed}): {report}", scenario.name);
            if std::env::var_os("RBLK_CHAOS_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let chain = driver::error_chain(&e);
            println!(
                "chaos {}: FAILED (seed {seed}; the run directory {} is kept): {chain}",
                scenario.name,
                dir.display()
            );
            if let Some(log) = e.server_log() {
                println!("server log:\n{log}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn cmd_status(a: StatusArgs) -> Result<ExitCode, CliError> {
    print!("{}", status::run(&a.target, a.json)?);
    Ok(ExitCode::SUCCESS)
}

fn open_device(path: &Path) -> Result<Arc<dyn Device>, CliError> {
    Ok(Arc::new(FileDevice::open(path).map_err(|source| CliError::Device { path: path.to_path_buf(), source })?))
}

fn cmd_serve(a: ServeArgs) -> Result<ExitCode, CliError> {
    // First, before any file is opened: what a service manager handed over.
    let inherited = systemd::listen_fds()?;
    let socket_activated = inherited.nbd.is_some();
    let vhost_activated = inherited.vhost.is_some();
    let mut notify = systemd::Notifier::from_env()?;
    let mut cfg = match &a.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    a.apply(&mut cfg);
    // Flags may have changed what the file said: the same rules apply.
    cfg.validate()?;
    if a.print_config {
        print!("{}", cfg.to_toml_string());
        return Ok(ExitCode::SUCCESS);
    }
    let log = driver::logger(&cfg.log);
    let stop = driver::stop_on_signals(&log).map_err(CliError::Signals)?;
    let image = cfg.volume.image.clone();
    let root = cfg.volume.root_device.clone();
    if !image.exists() {
        let spec =
            format::Spec { size: cfg.volume.size, log_size: cfg.volume.log_size, force: false, preallocate: false };
        let summary = format::format(&image, root.as_deref(), &spec)?;
        slog::info!(log, "{summary}");
    }
    let open_rw = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|source| CliError::File { path: p.to_path_buf(), source })
    };
    let endpoint = cfg.metrics.endpoint().map_err(|e| CliError::Usage(format!("metrics.listen: {e}")))?;
    let live = std::sync::Arc::new(metrics::Live::new(endpoint.is_some()).map_err(CliError::Metrics)?);
    // Dropped (a unix socket's file removed) when serving ends.
    let _metrics = match &endpoint {
        Some(at) => Some(metrics::serve(at, live.clone(), log.clone()).map_err(CliError::Metrics)?),
        None => None,
    };
    let held = supervisor::Held {
        image: open_rw(&image)?,
        image_cached: if cfg.cache.page_cache { Some(open_rw(&image)?) } else { None },
        root: root.as_deref().map(open_rw).transpose()?,
        listener: match inherited.nbd {
            Some(listener) => Some(listener),
            // `socket = ""` with `listen` set: TCP only.
            None if cfg.server.socket.as_os_str().is_empty() => None,
            None => Some(socket::bind(&cfg.server.socket)?),
        },
        tcp: cfg.server.listen.as_deref().map(bind_tcp).transpose()?,
        // The one systemd passed (named vhost-user), else the configured path, bound here.
        vhost: match inherited.vhost {
            Some(listener) => Some(listener),
            None => cfg.server.vhost_user_socket.as_deref().map(socket::bind).transpose()?,
        },
        tls: match (&cfg.tls.certificates, cfg.tls.mode) {
            (Some(dir), mode) if mode != config::TlsMode::Off => Some(tls_credentials(dir, cfg.tls.verify_peer)?),
            _ => None,
        },
        live,
    };
    // An inherited socket belongs to the service manager (it removes its file); one we bound
    // is removed when we stop.
    let (path, ours) = match &held.listener {
        Some(listener) if socket_activated => {
            let addr = listener.local_addr().map_err(|source| CliError::File { path: "LISTEN_FDS".into(), source })?;
            (addr.as_pathname().map(Path::to_path_buf), false)
        }
        Some(_) => (Some(cfg.server.socket.clone()), true),
        None => (None, false),
    };
    // The URIs to attach, one per line. Whoever started us may have closed stdout already
    // (a script that read the first line, a service manager): that must not stop serving.
    let mut uris = String::new();
    if let Some(path) = &path {
        let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        uris.push_str(&format!("nbd+unix:///?socket={}\n", absolute.display()));
    }
    if let Some(tcp) = &held.tcp {
        let addr = tcp.local_addr().map_err(|source| CliError::File { path: "the TCP listener".into(), source })?;
        let scheme = if cfg.tls.mode == config::TlsMode::Require { "nbds" } else { "nbd" };
        uris.push_str(&format!("{scheme}://{addr}/\n"));
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout(), uris.as_bytes());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // The vhost-user-blk socket, likewise: the manager's, or ours to remove at the end.
    let vhost_ours = match (&held.vhost, vhost_activated) {
        (Some(listener), true) => {
            let addr = listener.local_addr().map_err(|source| CliError::File { path: "LISTEN_FDS".into(), source })?;
            slog::info!(log, "vhost-user-blk socket inherited"; "path" => ?addr.as_pathname());
            None
        }
        (Some(_), false) => cfg.server.vhost_user_socket.clone(),
        (None, _) => None,
    };
    if let Some(vhost) = &vhost_ours {
        let absolute = std::fs::canonicalize(vhost).unwrap_or_else(|_| vhost.clone());
        slog::info!(log, "vhost-user-blk socket bound"; "path" => %absolute.display());
    }
    let driver = driver_binary()?;
    let result = supervisor::supervise(&driver, &held, &cfg, &stop, &mut notify, &log);
    if let (true, Some(path)) = (ours, &path) {
        let _ = std::fs::remove_file(path);
    }
    if let Some(vhost) = &vhost_ours {
        let _ = std::fs::remove_file(vhost);
    }
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("rblk: {}", driver::error_chain(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Writes man pages or prints a completion script.
fn cmd_generate(a: GenerateArgs) -> Result<ExitCode, CliError> {
    match a.what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|source| CliError::File { path: dir.clone(), source })?;
            clap_mangen::generate_to(args::command(), &dir).map_err(|source| CliError::File { path: dir, source })?;
        }
        Generate::Completions { shell } => {
            let mut cmd = args::command();
            clap_complete::generate(clap_complete::Shell::from(shell), &mut cmd, "rblk", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The `rblk-driver` to start: `$RBLK_DRIVER`, else the one beside this `rblk`.
fn driver_binary() -> Result<PathBuf, CliError> {
    match std::env::var_os("RBLK_DRIVER") {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(std::env::current_exe().map_err(CliError::LocateDriver)?.with_file_name("rblk-driver")),
    }
}

/// Reads the certificate directory (QEMU's tls-creds-x509 layout) into a sealed memfd for the
/// drivers, checking it first the way a driver will, so a bad certificate stops `serve` here
/// with a clear error instead of failing every driver start.
fn tls_credentials(dir: &Path, verify_peer: bool) -> Result<std::fs::File, CliError> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| CliError::File { path, source })
    };
    let ca = if verify_peer { read("ca-cert.pem")? } else { Vec::new() };
    let bundle = driver::tls::encode_credentials(&read("server-cert.pem")?, &read("server-key.pem")?, &ca);
    driver::tls::TlsServer::new(&bundle, false, verify_peer)
        .map_err(|source| CliError::Tls { dir: dir.to_path_buf(), source })?;
    let memfd_err =
        |source: nix::Error| CliError::File { path: "a memfd for the TLS credentials".into(), source: source.into() };
    let fd = memfd_create(c"rblk-tls", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
        .map_err(memfd_err)?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, &bundle)
        .map_err(|source| CliError::File { path: "a memfd for the TLS credentials".into(), source })?;
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
    fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), FcntlArg::F_ADD_SEALS(seals)).map_err(memfd_err)?;
    Ok(file)
}

/// Binds the TCP address `[server] listen` names (validated already): the first of its
/// resolved addresses that binds.
fn bind_tcp(listen: &str) -> Result<std::net::TcpListener, CliError> {
    let bind_err = |source| CliError::Bind { path: listen.into(), source };
    let (host, port) = config::parse_listen(listen).map_err(CliError::Usage)?;
    let mut last = None;
    for addr in std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port)).map_err(bind_err)? {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(bind_err(last.unwrap_or_else(|| std::io::Error::other("the host resolves to no address"))))
}
