//! The systemd conventions `rblk serve` follows, without libsystemd (as nbdkit and qemu-nbd do):
//!
//! - **Socket activation** (sd_listen_fds(3)): when `LISTEN_PID` names this process and
//!   `LISTEN_FDS` is 1, descriptor 3 is the NBD socket to serve instead of binding one. A
//!   second descriptor may come, named `vhost-user` in `LISTEN_FDNAMES` (a socket unit's
//!   `FileDescriptorName=vhost-user`): the vhost-user-blk socket, served instead of binding
//!   `[server] vhost_user_socket`. Each must be a listening unix stream socket; anything else
//!   (another count, a second unnamed socket, a name twice) is refused, not guessed at.
//! - **Notification** (sd_notify(3)): datagrams to `NOTIFY_SOCKET` (a path, or `@name` for
//!   an abstract socket): `READY=1` once the first driver incarnation serves, `STATUS=` lines
//!   with the incarnation and its recovery, `STOPPING=1` on a requested stop.
//! - **Watchdog**: with `WATCHDOG_USEC` set (and `WATCHDOG_PID`, if set, naming this
//!   process), `WATCHDOG=1` at half the interval while the service makes progress. The
//!   supervisor decides what progress is (the driver's heartbeat), so a hung driver that the
//!   supervisor fails to replace lets systemd's watchdog fire.
//!
//! None of these variables reach the driver (`DRIVER_ENV_REMOVED`): they describe the
//! supervisor's process, not the driver's.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The environment of the supervisor's own service manager, removed from the driver's.
pub const DRIVER_ENV_REMOVED: &[&str] =
    &["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Why an inherited socket or the notification settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{name}={value:?} is not a number")]
    NotANumber { name: &'static str, value: String },
    #[error(
        "LISTEN_FDS={0}: rblk takes one NBD socket and at most one more named vhost-user \
         (LISTEN_FDNAMES, FileDescriptorName=vhost-user)"
    )]
    FdCount(u32),
    #[error("LISTEN_FDNAMES={names:?}: more than one {what} socket")]
    FdNames { names: String, what: &'static str },
    #[error("the inherited descriptor {fd} is not usable")]
    Inspect {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("the inherited descriptor {fd} is not a listening unix stream socket ({what})")]
    NotAListener { fd: RawFd, what: &'static str },
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor @abstract")]
    NotifySocket(String),
}

fn env_number(name: &'static str) -> Result<Option<u64>, SystemdError> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(value) => value.trim().parse().map(Some).map_err(|_| SystemdError::NotANumber { name, value }),
    }
}

/// The name (`FileDescriptorName=`) that marks the vhost-user-blk socket among the inherited.
const VHOST_USER_FDNAME: &str = "vhost-user";

/// The listening sockets systemd passed to this process, if any.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The NBD socket (the descriptor not named `vhost-user`).
    pub nbd: Option<UnixListener>,
    /// The vhost-user-blk socket (named `vhost-user`).
    pub vhost: Option<UnixListener>,
}

/// The listening sockets systemd passed, if it passed any to this process. Takes ownership of
/// descriptors 3 and 4 (as many as `LISTEN_FDS` says), marks them close-on-exec (the
/// supervisor hands them to each driver explicitly) and removes the `LISTEN_*` variables, as
/// sd_listen_fds(1) does.
pub fn listen_fds() -> Result<Inherited, SystemdError> {
    let ours = env_number("LISTEN_PID")? == Some(u64::from(std::process::id()));
    let count = env_number("LISTEN_FDS")?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let count = match (ours, count) {
        (true, Some(n)) if n > 0 => n,
        _ => return Ok(Inherited::default()),
    };
    if count > 2 {
        return Err(SystemdError::FdCount(count as u32));
    }
    let mut inherited = Inherited::default();
    let mut named = names.split(':');
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count as RawFd {
        let listener = take_listener(fd)?;
        let (slot, what) = match named.next() {
            Some(VHOST_USER_FDNAME) => (&mut inherited.vhost, "vhost-user"),
            _ => (&mut inherited.nbd, "NBD (not named vhost-user)"),
        };
        if slot.replace(listener).is_some() {
            return Err(SystemdError::FdNames { names, what });
        }
    }
    Ok(inherited)
}

/// Takes inherited descriptor `fd`, which must be a listening unix stream socket.
fn take_listener(fd: RawFd) -> Result<UnixListener, SystemdError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|source| SystemdError::Inspect { fd, source })?;
    // SAFETY: systemd passed descriptors 3.. to this process (LISTEN_PID is ours) and nothing
    // else in rblk opens or owns them: each is taken exactly once, here, before any file is
    // opened.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let inspect = |source| SystemdError::Inspect { fd, source };
    let family = match nix::sys::socket::getsockname::<SockaddrStorage>(fd) {
        Err(nix::Error::ENOTSOCK) => return Err(SystemdError::NotAListener { fd, what: "not a socket" }),
        other => other.map_err(inspect)?.family(),
    };
    if family != Some(AddressFamily::Unix) {
        return Err(SystemdError::NotAListener { fd, what: "not a unix socket" });
    }
    if getsockopt(&owned, sockopt::SockType).map_err(inspect)? != SockType::Stream {
        return Err(SystemdError::NotAListener { fd, what: "not a stream socket" });
    }
    if !getsockopt(&owned, sockopt::AcceptConn).map_err(inspect)? {
        return Err(SystemdError::NotAListener { fd, what: "not listening" });
    }
    Ok(UnixListener::from(owned))
}

/// Where the service manager listens for notifications, and the watchdog interval.
/// Without `NOTIFY_SOCKET` every call does nothing.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half the watchdog interval (sd_watchdog_enabled(3) advises pinging at least that often).
    ping_every: Option<Duration>,
    last_ping: Instant,
    /// `READY=1` was sent: readiness is said once, later incarnations update `STATUS=` only.
    ready_said: bool,
}

impl Notifier {
    /// A notifier that says nothing (not started by a service manager).
    pub fn none() -> Notifier {
        Notifier { target: None, ping_every: None, last_ping: Instant::now(), ready_said: false }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, then removes them.
    pub fn from_env() -> Result<Notifier, SystemdError> {
        let socket = std::env::var("NOTIFY_SOCKET").ok();
        let usec = env_number("WATCHDOG_USEC")?;
        let pid = env_number("WATCHDOG_PID")?;
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(name);
        }
        let mut n = Notifier::none();
        let Some(socket) = socket else { return Ok(n) };
        let addr = if let Some(name) = socket.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(PathBuf::from(&socket))
        } else {
            return Err(SystemdError::NotifySocket(socket));
        }
        .map_err(|_| SystemdError::NotifySocket(socket.clone()))?;
        let sock = UnixDatagram::unbound().map_err(|_| SystemdError::NotifySocket(socket.clone()))?;
        // A datagram to a socket whose queue is full waits for room: a manager (or anything
        // at NOTIFY_SOCKET) that stops reading must not stop the supervisor, so a send that
        // would wait is dropped instead.
        sock.set_nonblocking(true).map_err(|_| SystemdError::NotifySocket(socket))?;
        n.target = Some((sock, addr));
        let ours = pid.is_none_or(|p| p == u64::from(std::process::id()));
        n.ping_every = usec.filter(|&u| u > 0 && ours).map(|u| Duration::from_micros(u) / 2);
        Ok(n)
    }

    /// Sends one notification (newline-separated `KEY=value` lines). Best effort: a service
    /// manager that went away, or stopped reading, must not stop the service.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            let _ = sock.send_to_addr(state.as_bytes(), addr);
        }
    }

    /// The service serves: `READY=1` with `status` the first time, `status` alone after.
    pub fn ready(&mut self, status: &str) {
        if self.ready_said {
            self.notify(status);
        } else {
            self.ready_said = true;
            self.notify(&format!("READY=1\n{status}"));
        }
    }

    /// Whether the watchdog is on and due for a ping.
    pub fn watchdog_due(&self) -> bool {
        self.ping_every.is_some_and(|every| self.last_ping.elapsed() >= every)
    }

    /// Pings the watchdog (the caller saw progress since the last ping).
    pub fn watchdog(&mut self) {
        if self.ping_every.is_some() {
            self.notify("WATCHDOG=1");
            self.last_ping = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notifier_sends_each_state_as_one_datagram_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("rblk-notify-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), SocketAddr::from_pathname(&path).unwrap())),
            ping_every: None,
            last_ping: Instant::now(),
            ready_said: false,
        };
        n.notify("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let got = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1\nSTATUS=serving");
        assert!(!n.watchdog_due(), "no watchdog without WATCHDOG_USEC");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_watchdog_is_due_at_half_its_interval() {
        let mut n = Notifier::none();
        n.ping_every = Some(Duration::from_millis(20));
        assert!(!n.watchdog_due());
        std::thread::sleep(Duration::from_millis(25));
        assert!(n.watchdog_due());
        n.watchdog();
        assert!(!n.watchdog_due());
    }
}
