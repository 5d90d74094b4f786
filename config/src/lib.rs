//! rblk's configuration: a TOML file parsed into typed structs, with a default for every
//! option, validated before anything uses it.
//!
//! Precedence: built-in defaults < the config file < command-line flags. This crate gives the
//! first two (`Config::default`, `Config::load`); the `run` crate applies flags on top of the
//! loaded `Config` and calls `Config::validate` again. A file need only name what it changes
//! (`examples/minimal.toml`); `examples/rblk.toml` lists every option at its default, and
//! `Config::to_toml_string` writes the full effective configuration (`rblk serve
//! --print-config`) in a form that loads back to the same `Config`.
//!
//! Sections, with defaults:
//!
//! - `[volume]` — what is served. `image = "rblk.img"` (regular file or block device),
//!   `root_device = ""` (optional separate device for the three root blocks; `""` keeps them
//!   on the image), `size = "1G"` (client-visible size when `rblk serve` formats a missing
//!   image; a multiple of 4096), `log_size = "64M"` (Raft log ring at format; a multiple of
//!   4096, at least 64K). `size` and `log_size` matter only at format: an existing image
//!   keeps the geometry it was formatted with.
//! - `[server]` — the endpoints and what bounds NBD clients. `socket = "rblk.sock"`,
//!   `listen` (none; `"HOST:PORT"` or `"HOST"` for port 10809: TCP beside the socket),
//!   `vhost_user_socket = ""` (none; a unix socket path: a vhost-user-blk session for virtual
//!   machines beside the NBD socket, on the same volume; at most 107 bytes),
//!   `max_connections = 64` (more clients wait in the backlog), `read_only = false`,
//!   `max_inflight = "64M"` bytes of requests in flight in all and `max_inflight_per_connection
//!   = "32M"` per connection (write payloads and read replies; at the limit a connection stops
//!   reading its socket), `handshake_timeout = "10s"`, `stall_timeout = "30s"` (a request half
//!   sent or replies unread for that long drop the connection; 0 never), `idle_timeout =
//!   "60s"` (a connection silent between requests that long is closed, but only while other
//!   clients wait for a slot; 0 never).
//! - `[checkpoint]` — when committed writes are folded into a new root, which bounds replay
//!   at restart. `log_bytes = "8M"` of log since the last checkpoint (at least 4K; the
//!   storage caps it at a quarter of the ring), or `interval = "30s"` after the last one with
//!   something applied.
//! - `[cache]` — memory. `nodes = 16384` block-map nodes (about 3 KiB each), `bitmaps = 256`
//!   allocator bitmap blocks (4 KiB each); 0 caches nothing. `page_cache = true`: data and
//!   tree blocks go through the kernel's page cache (written back by each checkpoint's
//!   flush; reads hash-checked); the log and the roots always bypass it.
//! - `[raft]` — the embedded Raft node. `tick = "100ms"`, `election_ticks = 10`,
//!   `heartbeat_ticks = 3` (election must exceed heartbeat), `max_batch = "512K"` bytes of
//!   proposals persisted by one log append (the group-commit bound), `write_once_min =
//!   "64K"`: whole-block writes at least this large are written once, straight to their
//!   blocks, and the log names them; smaller ones are carried in the log (0: all of them).
//! - `[supervisor]` — keeping the driver alive. The driver beats every `heartbeat = "500ms"`;
//!   after `heartbeat_timeout = "5s"` of silence the supervisor kills and restarts it,
//!   A driver that was ready (recovered and served) is restarted at once whatever killed it;
//!   while incarnations die before they are ready it backs off from `restart_backoff =
//!   "100ms"`, doubling up to `restart_backoff_max = "5s"`, and after `max_failed_starts = 5`
//!   of them in a row it gives up. Started as root, the driver runs as `user = "nobody"`, `group = "nogroup"`
//!   (names or numeric ids, e.g. `"65534"`).
//! - `[tls]` — `mode = "off"` (or `"on"`: STARTTLS offered; `"require"`: TLS only),
//!   `certificates = ""` (a directory with `server-cert.pem`, `server-key.pem` and, for
//!   `verify_peer = false`, `ca-cert.pem`: QEMU's and nbdkit's layout).
//! - `[log]` — `level = "info"`: one of trace, debug, info, warning, error, critical. The
//!   `RBLK_LOG` environment variable overrides it (parse it with `LogLevel::from_str`).
//!   `format = "text"` (one line per event, RFC 3339 UTC timestamps) or `"json"` (one JSON
//!   object per line: `ts`, `level`, `msg` and the event's keys).
//! - `[metrics]` — `listen = ""` (off): where the supervisor serves Prometheus metrics (`GET
//!   /metrics`) and the live status (`GET /status`, JSON) over HTTP: `"HOST:PORT"` (e.g.
//!   `"127.0.0.1:9898"`; port 0 takes a free one, printed at start) or a unix socket path
//!   (it must contain a `/`, e.g. `"./metrics.sock"`; at most 107 bytes). See docs/metrics.md.
//!
//! Sizes are whole bytes, written as a TOML integer (`4096`) or a string with a binary unit
//! (`"64K"`, `"16M"`, `"1G"`, `"2T"`); durations are strings with a unit (`"500ms"`, `"30s"`,
//! `"5m"`, `"1h"`); see `parse_size` and `parse_duration`. Relative paths are used as written,
//! that is relative to the working directory of the process, not to the config file.
//!
//! Errors name the key and what is wrong, and where in the file:
//! `rblk.toml:12:12: checkpoint.interval: expected a duration like 30s, 500ms or 5m, got
//! "fast"`. Unknown keys and sections are errors (a misspelt key silently left at its
//! default would be worse).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod error;
mod units;

pub use error::{ConfigError, Location};
pub use units::{format_duration, format_size, parse_duration, parse_size};
use units::{serde_duration, serde_size};

/// The block size of the store: sizes of on-disk regions are multiples of it.
pub const BLOCK: u64 = 4096;
/// The smallest Raft log ring (16 blocks; the storage refuses fewer).
pub const MIN_LOG_SIZE: u64 = 64 << 10;
/// The port IANA assigned to NBD, used when `server.listen` names only a host.
pub const NBD_PORT: u16 = 10809;

/// Splits a `server.listen` address into host and port: `HOST:PORT`, `HOST` (port 10809),
/// `[V6]:PORT` or `[V6]`. The host is not resolved here (the supervisor binds it).
pub fn parse_listen(s: &str) -> Result<(String, u16), String> {
    let expected = || format!("expected HOST:PORT, HOST, or [IPV6]:PORT, got {s:?}");
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("the port must be 1 to 65535, got {p:?}")),
        Ok(n) => Ok(n),
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(expected)?;
        if host.is_empty() || host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(expected());
        }
        return match after {
            "" => Ok((host.to_owned(), NBD_PORT)),
            _ => Ok((host.to_owned(), port(after.strip_prefix(':').ok_or_else(expected)?)?)),
        };
    }
    match s.split_once(':') {
        None if !s.is_empty() && !s.contains(char::is_whitespace) => Ok((s.to_owned(), NBD_PORT)),
        Some((host, p)) if !host.is_empty() && !p.contains(':') && !host.contains(char::is_whitespace) => {
            Ok((host.to_owned(), port(p)?))
        }
        _ => Err(expected()),
    }
}

/// The longest unix socket path `bind` takes on Linux (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// NBD proto.md: an export name is at most 4096 bytes.
pub const MAX_EXPORT_NAME: usize = 4096;

/// The whole configuration; see the crate docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub volume: VolumeConfig,
    pub server: ServerConfig,
    pub checkpoint: CheckpointConfig,
    pub cache: CacheConfig,
    pub raft: RaftConfig,
    pub supervisor: SupervisorConfig,
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
}

/// `[volume]`: the image served and how `rblk serve` formats a missing one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeConfig {
    /// Path of the image: a regular file or a block device. Default `rblk.img`.
    #[serde(with = "serde_path")]
    pub image: PathBuf,
    /// Separate device holding the three root blocks; `None` (written `""`) keeps them in the
    /// image's first three blocks. Default none.
    #[serde(with = "serde_optional_path")]
    pub root_device: Option<PathBuf>,
    /// Size the clients see, in bytes, when `rblk serve` formats a missing image (a positive
    /// multiple of 4096; may exceed the image: the volume is thin). Default 1 GiB.
    #[serde(with = "serde_size")]
    pub size: u64,
    /// Length of the Raft log ring in bytes, at format (a multiple of 4096, at least 64 KiB).
    /// Default 64 MiB.
    #[serde(with = "serde_size")]
    pub log_size: u64,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self { image: PathBuf::from("rblk.img"), root_device: None, size: 1 << 30, log_size: 64 << 20 }
    }
}

/// `[server]`: the endpoints (NBD, and vhost-user-blk for virtual machines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Path of the unix socket NBD clients connect to (at most 107 bytes); `""` serves TCP
    /// only (with `listen`). Default `rblk.sock`.
    #[serde(with = "serde_path")]
    pub socket: PathBuf,
    /// A TCP address to serve NBD on as well, for remote clients: `HOST:PORT`, or `HOST`
    /// for the NBD port 10809 (IPv6 literals in brackets: `[::1]:10809`). The supervisor
    /// binds it and holds it like the unix socket. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Path of a unix socket where vhost-user-blk front-ends (QEMU's `vhost-user-blk-pci`,
    /// cloud-hypervisor) connect: the same volume as the NBD socket, served to virtual
    /// machines through shared memory. The supervisor binds it and holds it like the NBD
    /// socket, so a front-end that reconnects while the driver restarts waits in its backlog.
    /// At most 107 bytes; must differ from `socket`. Default `""`: no vhost-user session.
    #[serde(with = "serde_optional_path")]
    pub vhost_user_socket: Option<PathBuf>,
    /// The name the volume is exported under (NBD_OPT_LIST, NBD_OPT_INFO); the default
    /// export "" reaches it too, any other name is refused. At most 4096 bytes of UTF-8, not
    /// empty. Default `rblk`.
    pub export_name: String,
    /// Client connections served at once (at least 1); further clients wait in the listening
    /// backlog until a slot frees. Default 64.
    pub max_connections: usize,
    /// Refuse writes, trims and zeroing. Default false.
    pub read_only: bool,
    /// Bytes of requests in flight across all connections: write payloads until applied,
    /// read replies until sent (at least 1M). At the limit connections stop reading their
    /// sockets (backpressure). Default 64 MiB.
    #[serde(with = "serde_size")]
    pub max_inflight: u64,
    /// The same, per connection (at least 4K, at most `max_inflight`). A request larger than
    /// the budget is served alone. Default 32 MiB (one request of the largest size).
    #[serde(with = "serde_size")]
    pub max_inflight_per_connection: u64,
    /// The handshake must finish within this (positive). Default 10 s.
    #[serde(with = "serde_duration")]
    pub handshake_timeout: Duration,
    /// A request half sent, or replies the client does not read, for this long drop the
    /// connection (0: never). Default 30 s.
    #[serde(with = "serde_duration")]
    pub stall_timeout: Duration,
    /// A connection silent between requests for this long is closed while other clients wait
    /// for a slot (0: never). An idle client is never closed otherwise. Default 60 s.
    #[serde(with = "serde_duration")]
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("rblk.sock"),
            listen: None,
            vhost_user_socket: None,
            export_name: "rblk".to_string(),
            max_connections: 64,
            read_only: false,
            max_inflight: 64 << 20,
            max_inflight_per_connection: 32 << 20,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// `[checkpoint]`: when applied writes are made durable in a new root (maps onto
/// `VolumeOptions::checkpoint_log_bytes` and `checkpoint_interval`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpoint once this many bytes of log were written since the last checkpoint (at least
    /// 4 KiB; the storage caps it at a quarter of the ring). Default 8 MiB: recovery replays at most that, which keeps a restart near 100 ms.
    #[serde(with = "serde_size")]
    pub log_bytes: u64,
    /// Checkpoint once this long has passed since the last one and something was applied
    /// (0 checkpoints after every apply). Default 30 s.
    #[serde(with = "serde_duration")]
    pub interval: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { log_bytes: 8 << 20, interval: Duration::from_secs(30) }
    }
}

/// `[cache]`: clean metadata kept in memory (maps onto `VolumeOptions::node_cache` and
/// `bitmap_cache`). 0 caches nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Block-map nodes (about 3 KiB each). Default 16384 (about 48 MiB; the whole map of a 4 GiB volume).
    pub nodes: usize,
    /// Allocator bitmap blocks (4 KiB each). Default 256 (1 MiB).
    pub bitmaps: usize,
    /// Data and tree blocks go through the kernel's page cache (a second, buffered descriptor
    /// of the image): written there, made durable by the fdatasync every checkpoint does
    /// before its root (the log already holds every write), and client reads of hot data
    /// come from it. Safe because a data block never changes while a tree reaches it and
    /// every read is checked against its hash (a failed check is retried from the media).
    /// The log and the roots always bypass the page cache. Default true; false: O_DIRECT
    /// for everything.
    pub page_cache: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { nodes: 16384, bitmaps: 256, page_cache: true }
    }
}

/// `[raft]`: the embedded single-node Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Length of one Raft tick (positive). Default 100 ms.
    #[serde(with = "serde_duration")]
    pub tick: Duration,
    /// Ticks without a leader before an election (more than `heartbeat_ticks`). Default 10.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats (at least 1). Default 3.
    pub heartbeat_ticks: usize,
    /// Bytes of proposals persisted by one log append at most: the group-commit bound (at
    /// least 4 KiB; a single larger proposal still goes alone). Default 512 KiB: what a batch
    /// holds, every other client's write waits behind (with 1 MiB a light client's p99 beside
    /// a flood was twice as long, for no throughput fio could tell apart).
    #[serde(with = "serde_size")]
    pub max_batch: u64,
    /// Whole-block writes of at least this many bytes are written once: straight to fresh
    /// data blocks, flushed, and then the log record names those blocks (a second durable
    /// write per batch, but every byte written once instead of twice). Smaller writes are
    /// carried in the log record itself. 0 carries every write in the log; else a multiple
    /// of 4 KiB. Default 64 KiB.
    #[serde(with = "serde_size")]
    pub write_once_min: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 3,
            max_batch: 512 << 10,
            write_once_min: 64 << 10,
        }
    }
}

/// `[supervisor]`: liveness, restart policy and the driver's privileges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// The driver beats this often (positive). Default 500 ms.
    #[serde(with = "serde_duration")]
    pub heartbeat: Duration,
    /// Silence after which the supervisor kills and restarts the driver (longer than
    /// `heartbeat`). Default 5 s.
    #[serde(with = "serde_duration")]
    pub heartbeat_timeout: Duration,
    /// Wait before the first restart, doubled for each further one (positive). Default 100 ms.
    #[serde(with = "serde_duration")]
    pub restart_backoff: Duration,
    /// The longest wait between restarts (at least `restart_backoff`). Default 5 s.
    #[serde(with = "serde_duration")]
    pub restart_backoff_max: Duration,
    /// Give up after this many incarnations in a row died before they were ready (at least
    /// 1): recovery itself keeps failing. A driver that recovered and served is restarted
    /// at once whatever killed it, and resets the count. Default 5.
    pub max_failed_starts: u32,
    /// User (name or numeric uid) the driver runs as when started as root. Default `nobody`.
    pub user: String,
    /// Group (name or numeric gid) the driver runs as when started as root. Default `nogroup`.
    pub group: String,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(5),
            restart_backoff: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(5),
            max_failed_starts: 5,
            user: "nobody".to_owned(),
            group: "nogroup".to_owned(),
        }
    }
}

/// `[tls]`: TLS for NBD clients (STARTTLS), as nbdkit and qemu-nbd spell it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// `off`: STARTTLS is refused (plaintext only); `on`: offered, plaintext clients are served
    /// too; `require`: a client must start TLS before anything else. Default `off`.
    pub mode: TlsMode,
    /// A directory in QEMU's `tls-creds-x509` layout (also nbdkit's `--tls-certificates`):
    /// `server-cert.pem` (the chain), `server-key.pem`, and `ca-cert.pem` for `verify_peer`.
    /// Required unless `mode` is `off`. Default none.
    #[serde(with = "serde_optional_path")]
    pub certificates: Option<PathBuf>,
    /// Require a client certificate signed by `ca-cert.pem`. Default false.
    pub verify_peer: bool,
}

/// Whether TLS is refused, offered or required.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Off,
    On,
    Require,
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "require" => Ok(Self::Require),
            _ => Err(format!("expected off, on or require, got {s:?}")),
        }
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// The least severe level logged. Default `info`. `RBLK_LOG` overrides it.
    pub level: LogLevel,
    /// How each event is written on stderr. Default `text`.
    pub format: LogFormat,
}

/// `[metrics]`: the supervisor's HTTP endpoint for metrics and live status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `""` (off), `"HOST:PORT"` (TCP; port 0 picks a free one) or a unix socket path (it
    /// must contain a `/`). Default off.
    pub listen: String,
}

/// Where `[metrics] listen` says to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl MetricsConfig {
    /// The endpoint, `None` when metrics are off; an error names what is wrong.
    pub fn endpoint(&self) -> Result<Option<MetricsListen>, String> {
        let l = self.listen.trim();
        if l.is_empty() {
            return Ok(None);
        }
        if let Ok(addr) = l.parse::<std::net::SocketAddr>() {
            return Ok(Some(MetricsListen::Tcp(addr)));
        }
        if l.contains('/') {
            if l.len() > MAX_SOCKET_PATH {
                return Err(format!("is {} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}", l.len()));
            }
            return Ok(Some(MetricsListen::Unix(PathBuf::from(l))));
        }
        Err(format!(
            "expected \"\" (off), HOST:PORT with a numeric address like \"127.0.0.1:9898\", \
             or a unix socket path containing a '/' like \"./metrics.sock\", got {l:?}"
        ))
    }
}

/// How log events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event: RFC 3339 timestamp, level, message, `key: value` pairs.
    #[default]
    Text,
    /// One JSON object per line (`ts`, `level`, `msg`, then the keys), for log collectors.
    Json,
}

/// A log level, least to most severe (slog's levels). Written in lower case; `warn` is
/// accepted for `warning`, and case does not matter when parsing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warning,
    Error,
    Critical,
}

impl LogLevel {
    pub const ALL: [LogLevel; 6] =
        [LogLevel::Trace, LogLevel::Debug, LogLevel::Info, LogLevel::Warning, LogLevel::Error, LogLevel::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

impl std::fmt::Display for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogLevel {
    type Err = String;

    /// Parses `info`, `WARN`, ... (for the file and for `RBLK_LOG`).
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "warn" {
            return Ok(Self::Warning);
        }
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == lower)
            .ok_or_else(|| format!("expected one of trace, debug, info, warning, error, critical, got {s:?}"))
    }
}

impl Serialize for LogLevel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Parses and validates a configuration; keys it does not name keep their defaults.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::parse(text, None)
    }

    /// Reads, parses and validates the file at `path`; errors name the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, Some(path))
    }

    fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::syntax(&e, text, file))?;
        let config = Config::deserialize(de).map_err(|e| ConfigError::value(&e, text, file))?;
        config.validate().map_err(|e| e.locate(text, file))?;
        Ok(config)
    }

    /// The full effective configuration as TOML, every key written; `from_toml_str` reads it
    /// back to an equal `Config`. Paths that are not UTF-8 (possible only from command-line
    /// flags) are written lossily.
    pub fn to_toml_string(&self) -> String {
        // Every value is a string, integer or bool inside a table, so serializing cannot fail.
        toml::to_string(self).expect("a Config always serializes to TOML")
    }

    /// Checks the rules each option states (see the field docs); the error names the first key
    /// that breaks one. Both loaders call it; call it again after applying command-line flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::invalid(key, message));
        let size = format_size;
        let dur = format_duration;

        let v = &self.volume;
        if v.image.as_os_str().is_empty() {
            return invalid("volume.image", "must not be empty".into());
        }
        if let Some(root) = &v.root_device {
            if root.as_os_str().is_empty() {
                return invalid("volume.root_device", "must be a path, or \"\" for none".into());
            }
            if *root == v.image {
                return invalid(
                    "volume.root_device",
                    "must differ from volume.image (\"\" keeps the roots on the image)".into(),
                );
            }
        }
        if v.size == 0 || !v.size.is_multiple_of(BLOCK) {
            return invalid("volume.size", format!("must be a positive multiple of 4096, got {}", size(v.size)));
        }
        if !v.log_size.is_multiple_of(BLOCK) || v.log_size < MIN_LOG_SIZE {
            return invalid(
                "volume.log_size",
                format!("must be a multiple of 4096 and at least 64K, got {}", size(v.log_size)),
            );
        }

        let s = &self.server;
        let socket_len = s.socket.as_os_str().len();
        if socket_len == 0 && s.listen.is_none() {
            return invalid("server.socket", "must not be empty unless server.listen is set (TCP only)".into());
        }
        if socket_len > MAX_SOCKET_PATH {
            return invalid(
                "server.socket",
                format!("is {socket_len} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}"),
            );
        }
        if let Some(listen) = &s.listen {
            if let Err(e) = parse_listen(listen) {
                return invalid("server.listen", e);
            }
        }
        if let Some(vhost) = &s.vhost_user_socket {
            let len = vhost.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return invalid(
                    "server.vhost_user_socket",
                    format!("is {len} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}"),
                );
            }
            if *vhost == s.socket {
                return invalid("server.vhost_user_socket", "must differ from server.socket".into());
            }
        }
        // NBD proto.md: names are UTF-8 of at most 4096 bytes; "" is the default export.
        if s.export_name.is_empty() || s.export_name.len() > MAX_EXPORT_NAME {
            return invalid(
                "server.export_name",
                format!("must be 1 to {MAX_EXPORT_NAME} bytes long, got {}", s.export_name.len()),
            );
        }
        if s.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1, got 0".into());
        }
        if s.max_inflight < 1 << 20 {
            return invalid("server.max_inflight", format!("must be at least 1M, got {}", size(s.max_inflight)));
        }
        if s.max_inflight_per_connection < BLOCK || s.max_inflight_per_connection > s.max_inflight {
            return invalid(
                "server.max_inflight_per_connection",
                format!(
                    "must be at least 4K and at most server.max_inflight ({}), got {}",
                    size(s.max_inflight),
                    size(s.max_inflight_per_connection)
                ),
            );
        }
        if s.handshake_timeout.is_zero() {
            return invalid("server.handshake_timeout", "must be positive, got 0s".into());
        }

        let c = &self.checkpoint;
        if c.log_bytes < BLOCK {
            return invalid("checkpoint.log_bytes", format!("must be at least 4K, got {}", size(c.log_bytes)));
        }

        let r = &self.raft;
        if r.tick.is_zero() {
            return invalid("raft.tick", "must be positive, got 0s".into());
        }
        if r.heartbeat_ticks == 0 {
            return invalid("raft.heartbeat_ticks", "must be at least 1, got 0".into());
        }
        if r.election_ticks <= r.heartbeat_ticks {
            return invalid(
                "raft.election_ticks",
                format!("must be greater than raft.heartbeat_ticks ({}), got {}", r.heartbeat_ticks, r.election_ticks),
            );
        }
        if !r.write_once_min.is_multiple_of(BLOCK) {
            return invalid(
                "raft.write_once_min",
                format!("must be 0 or a multiple of 4K, got {}", size(r.write_once_min)),
            );
        }
        if r.max_batch < BLOCK {
            return invalid("raft.max_batch", format!("must be at least 4K, got {}", size(r.max_batch)));
        }

        let t = &self.tls;
        if t.mode != TlsMode::Off && t.certificates.is_none() {
            return invalid("tls.certificates", "must name a directory when tls.mode is on or require".into());
        }
        if t.verify_peer && t.mode == TlsMode::Off {
            return invalid("tls.verify_peer", "needs tls.mode on or require".into());
        }

        let sv = &self.supervisor;
        if sv.heartbeat.is_zero() {
            return invalid("supervisor.heartbeat", "must be positive, got 0s".into());
        }
        if sv.heartbeat_timeout <= sv.heartbeat {
            return invalid(
                "supervisor.heartbeat_timeout",
                format!(
                    "must be longer than supervisor.heartbeat ({}), got {}",
                    dur(sv.heartbeat),
                    dur(sv.heartbeat_timeout)
                ),
            );
        }
        if sv.restart_backoff.is_zero() {
            return invalid("supervisor.restart_backoff", "must be positive, got 0s".into());
        }
        if sv.restart_backoff_max < sv.restart_backoff {
            return invalid(
                "supervisor.restart_backoff_max",
                format!(
                    "must be at least supervisor.restart_backoff ({}), got {}",
                    dur(sv.restart_backoff),
                    dur(sv.restart_backoff_max)
                ),
            );
        }
        if sv.max_failed_starts == 0 {
            return invalid("supervisor.max_failed_starts", "must be at least 1, got 0".into());
        }
        for (key, name, what) in [("supervisor.user", &sv.user, "user"), ("supervisor.group", &sv.group, "group")] {
            if !is_principal(name) {
                return invalid(key, format!("expected a {what} name or numeric id like \"65534\", got {name:?}"));
            }
        }

        match self.metrics.endpoint() {
            Err(message) => return invalid("metrics.listen", message),
            Ok(Some(MetricsListen::Unix(path))) if path == self.server.socket => {
                return invalid("metrics.listen", "must differ from server.socket".into());
            }
            Ok(Some(MetricsListen::Unix(path))) if Some(&path) == self.server.vhost_user_socket.as_ref() => {
                return invalid("metrics.listen", "must differ from server.vhost_user_socket".into());
            }
            Ok(_) => {}
        }
        Ok(())
    }
}

/// A plausible user or group name or id: not empty, no separators `/etc/passwd` could not
/// hold. Whether it exists is checked when the supervisor drops privileges.
fn is_principal(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c == ':' || c == '/' || c.is_whitespace() || c.is_control())
}

/// Paths are written as strings; a path that is not UTF-8 is written lossily (TOML holds
/// only UTF-8).
mod serde_path {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&path.to_string_lossy())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        String::deserialize(d).map(PathBuf::from)
    }
}

/// An optional path, `""` meaning none (TOML has no null).
mod serde_optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&path.as_deref().map(|p| p.to_string_lossy()).unwrap_or_default())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let s = String::deserialize(d)?;
        Ok((!s.is_empty()).then(|| PathBuf::from(s)))
    }
}
