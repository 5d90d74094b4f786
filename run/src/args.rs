//! The command line, declared with clap's derive: `--help` text, man pages and shell
//! completions all come from these definitions. `main.rs` runs the parsed commands.

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use clap::builder::{OsStringValueParser, PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// `rblk --version`: the program's version and the on-disk format versions it reads and
/// writes (an image of another format version is refused with a message saying which).
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (on-disk format: log {}, roots {}, tree nodes {})",
        env!("CARGO_PKG_VERSION"),
        raft_state::log::LOG_FORMAT_VERSION,
        raft_state::roots::ROOT_FORMAT_VERSION,
        raft_state::tree::NODE_FORMAT_VERSION,
    )
});

/// `format --log-size`'s default: the config's.
static DEFAULT_LOG_SIZE: LazyLock<String> =
    LazyLock::new(|| config::format_size(config::Config::default().volume.log_size));

/// A restartable NBD block device.
///
/// A volume is a Raft log and a copy-on-write block tree in one image; `rblk serve` keeps an
/// unprivileged driver serving it over NBD and restarts the driver when it dies or hangs,
/// without losing an acknowledged write.
///
/// Sizes take binary K, M, G, T suffixes (64K, 10G). Exit status: 0 success, 1 runtime
/// error (or a failed chaos run), 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "rblk", version = VERSION.as_str(), propagate_version = true, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Format(FormatArgs),
    Serve(ServeArgs),
    Inspect(InspectArgs),
    Chaos(ChaosArgs),
    Status(StatusArgs),
    Generate(GenerateArgs),
}

/// Format an image (a file or a block device) as an empty volume.
///
/// A regular file is created if missing and left sparse unless --preallocate is given.
/// Refuses to format over an existing rblk volume without --force.
#[derive(Debug, Args)]
pub struct FormatArgs {
    /// The image: a regular file (created if missing) or a block device.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Size the clients see (a positive multiple of 4096; may exceed the file: the volume
    /// is thin).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub size: u64,
    /// Length of the Raft log ring (a multiple of 4096, at least 64K).
    #[arg(long, value_name = "SIZE", value_parser = size, default_value = DEFAULT_LOG_SIZE.as_str())]
    pub log_size: u64,
    /// A separate device for the three root blocks (default: the image's first blocks).
    #[arg(long, value_name = "PATH")]
    pub root_device: Option<PathBuf>,
    /// Format over an existing rblk volume, destroying it.
    #[arg(long)]
    pub force: bool,
    /// Write zeros over the data region too, so that no later write allocates file-system
    /// blocks (the file is no longer thin).
    #[arg(long)]
    pub preallocate: bool,
}

/// Serve a volume over NBD, under a supervisor that restarts the driver.
///
/// Settings: built-in defaults < the --config file < these flags. Without arguments it
/// serves ./rblk.img (formatted with the configured size, 1 GiB by default, when missing)
/// on ./rblk.sock and prints the NBD URI to attach. With --vhost-user it also serves the
/// volume to virtual machines as a vhost-user-blk backend. Under systemd socket activation
/// (LISTEN_FDS) it serves the inherited socket instead of binding one (and a second one named
/// vhost-user in LISTEN_FDNAMES as the vhost-user-blk socket). SIGTERM or SIGINT
/// stop it cleanly.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The image to serve (overrides `[volume] image`); formatted when missing.
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// The unix socket to listen on (overrides `[server] socket`); "" binds none, for TCP
    /// only (with --listen).
    #[arg(long, value_name = "PATH", value_parser = any_path())]
    pub socket: Option<PathBuf>,
    /// Serve NBD over TCP as well, on HOST:PORT, or HOST for port 10809 (IPv6 in brackets:
    /// [::1]:10809); overrides `[server] listen`.
    #[arg(long, value_name = "HOST:PORT", value_parser = listen)]
    pub listen: Option<String>,
    /// Serve the volume to virtual machines as well, as a vhost-user-blk backend on the unix
    /// socket PATH (QEMU: -chardev socket,path=PATH,reconnect=1 -device vhost-user-blk-pci);
    /// beside the NBD socket, on the same volume. Overrides `[server] vhost_user_socket`; ""
    /// serves none.
    #[arg(long, value_name = "PATH", value_parser = any_path())]
    pub vhost_user: Option<PathBuf>,
    /// STARTTLS: off refuses it, on offers it, require serves only TLS clients (overrides
    /// `[tls] mode`).
    #[arg(long, value_name = "MODE", value_parser = tls_mode())]
    pub tls: Option<config::TlsMode>,
    /// The certificate directory in QEMU's tls-creds-x509 layout: server-cert.pem,
    /// server-key.pem, and ca-cert.pem for --tls-verify-peer (overrides `[tls] certificates`).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require client certificates signed by the directory's ca-cert.pem (sets `[tls]
    /// verify_peer`).
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// A TOML configuration file (see config/examples/rblk.toml for every option).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Size of the volume when a missing image is formatted (overrides `[volume] size`).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub size: Option<u64>,
    /// Export the volume read-only: writes, trims and zeroing are refused (sets `[server]
    /// read_only`).
    #[arg(long)]
    pub read_only: bool,
    /// The name the volume is exported under (overrides `[server] export_name`); the
    /// default export "" reaches it too.
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// Print the effective configuration (defaults, file and flags) as TOML and exit
    /// without serving; the output is itself a valid --config file.
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    /// Puts the flags given over the configuration (file or defaults).
    pub fn apply(&self, cfg: &mut config::Config) {
        if let Some(image) = &self.image {
            cfg.volume.image.clone_from(image);
        }
        if let Some(socket) = &self.socket {
            cfg.server.socket.clone_from(socket);
        }
        if let Some(listen) = &self.listen {
            cfg.server.listen = Some(listen.clone());
        }
        if let Some(vhost) = &self.vhost_user {
            cfg.server.vhost_user_socket = (!vhost.as_os_str().is_empty()).then(|| vhost.clone());
        }
        if let Some(mode) = self.tls {
            cfg.tls.mode = mode;
        }
        if let Some(dir) = &self.tls_certificates {
            cfg.tls.certificates = Some(dir.clone());
        }
        if self.tls_verify_peer {
            cfg.tls.verify_peer = true;
        }
        if let Some(size) = self.size {
            cfg.volume.size = size;
        }
        if self.read_only {
            cfg.server.read_only = true;
        }
        if let Some(name) = &self.export_name {
            cfg.server.export_name.clone_from(name);
        }
    }
}

/// Print a volume's state, read offline from the image.
///
/// Roots and their roles, log use, tree and allocator statistics.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image to read (a regular file or a block device); nothing is written to it.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The separate root device the image was formatted with, if any.
    #[arg(long, value_name = "PATH")]
    pub root_device: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Run a fault-injection scenario against a supervisor and its driver.
///
/// A supervisor on a fresh image, a verifying workload, the driver killed as the scenario
/// says, and every block verified at the end.
///
/// Exits 0 when the run passed and 1 when it failed (the seed is printed and the run
/// directory kept). Needs an rblk-driver built with the `failpoints` feature for scenarios
/// that name failpoints ($RBLK_DRIVER, or the rblk-driver beside rblk).
#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// The scenario file (see run/scenarios/).
    #[arg(value_name = "SCENARIO")]
    pub scenario: PathBuf,
    /// Seed of the run's random choices (default: from the clock); replays a failed run.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// How long to run (overrides the scenario's duration), e.g. 30s, 10m.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub duration: Option<Duration>,
    /// The run directory (default: a new directory under the temp dir). Emptied first.
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
}

/// Print the live state of a running server, from its metrics endpoint.
///
/// Asks `GET /status` of the `[metrics] listen` address of a running `rblk serve`:
/// incarnation, uptime, readiness, the last recovery, requests and restarts (docs/metrics.md).
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The server's `[metrics] listen`: http://HOST:PORT, HOST:PORT, or a unix socket path.
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// Print the status as JSON (the endpoint's own answer) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Write man pages or print shell completions.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: Generate,
}

#[derive(Debug, Subcommand)]
pub enum Generate {
    /// Write rblk.1 and a page per subcommand (rblk-serve.1, ...) into DIR.
    Man {
        /// The directory to write into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions {
        /// The shell: bash, zsh or fish.
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
}

/// The shells completions are generated for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl From<Shell> for clap_complete::Shell {
    fn from(shell: Shell) -> clap_complete::Shell {
        match shell {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// A path that may be empty (clap's own path parser refuses "").
fn any_path() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().map(PathBuf::from)
}

/// A TCP address as `[server] listen` takes it.
fn listen(s: &str) -> Result<String, String> {
    config::parse_listen(s).map(|_| s.to_string())
}

/// `off`, `on` or `require` (listed in the help and the completions).
fn tls_mode() -> impl TypedValueParser<Value = config::TlsMode> {
    PossibleValuesParser::new(["off", "on", "require"]).try_map(|s| s.parse::<config::TlsMode>())
}

/// Sizes with binary units, as in the config file.
fn size(s: &str) -> Result<u64, String> {
    config::parse_size(s)
}

/// The whole command definition (for man pages and completions).
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// `--help` and the man pages describe every argument of every subcommand.
    #[test]
    fn every_argument_is_described() {
        fn check(cmd: &clap::Command, path: &str) {
            assert!(cmd.get_about().is_some(), "{path} has no description");
            // clap's own --help and --version describe themselves.
            for arg in cmd.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
                let described = arg.get_help().is_some_and(|h| h.to_string().len() > 10);
                assert!(described, "{path} {} has no description", arg.get_id());
            }
            // clap's own `help` subcommands describe themselves.
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        check(&cmd, "rblk");
    }
}
