//! `rblk-driver`: serves one volume on one listening unix socket until SIGTERM/SIGINT (then
//! it checkpoints and exits 0) or a fatal error (exit 1; the supervisor restarts it).
//!
//! ```text
//! rblk-driver --image PATH [--root-device PATH] --socket PATH [--config FILE]
//! rblk-driver --image-fd N [--root-fd N] --socket-fd N [--config FILE]
//! ```
//! With descriptors, the parent opened the image and bound the socket; the driver opens
//! nothing itself.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use raft_state::device::{Device, FileDevice};

#[derive(Debug, Default)]
struct Args {
    image: Option<PathBuf>,
    image_fd: Option<RawFd>,
    root: Option<PathBuf>,
    root_fd: Option<RawFd>,
    socket: Option<PathBuf>,
    socket_fd: Option<RawFd>,
    config: Option<PathBuf>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let fd = |v: String| v.parse::<RawFd>().map_err(|_| format!("{v:?} is not a file descriptor number"));
        match flag.as_str() {
            "--image" => a.image = Some(value()?.into()),
            "--image-fd" => a.image_fd = Some(fd(value()?)?),
            "--root-device" => a.root = Some(value()?.into()),
            "--root-fd" => a.root_fd = Some(fd(value()?)?),
            "--socket" => a.socket = Some(value()?.into()),
            "--socket-fd" => a.socket_fd = Some(fd(value()?)?),
            "--config" => a.config = Some(value()?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

const USAGE: &str = "usage: rblk-driver (--image PATH | --image-fd N) [--root-device PATH | --root-fd N] \
                     (--socket PATH | --socket-fd N) [--config FILE]";

/// Takes ownership of an inherited descriptor.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the parent handed this descriptor over for the driver's exclusive use; nothing
    // else in this process refers to it, so owning (and eventually closing) it is sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn device(path: Option<PathBuf>, fd: Option<RawFd>, what: &str) -> Result<Option<Arc<dyn Device>>, String> {
    let dev = match (path, fd) {
        (Some(p), None) => FileDevice::open(&p).map_err(|e| format!("{what} {}: {e}", p.display()))?,
        (None, Some(fd)) => {
            FileDevice::from_fd(owned(fd), format!("{what} fd {fd}")).map_err(|e| format!("{what} fd {fd}: {e}"))?
        }
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err(format!("give the {what} as a path or a descriptor, not both")),
    };
    Ok(Some(Arc::new(dev)))
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match &args.config {
        Some(path) => match config::Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rblk-driver: {e}");
                return ExitCode::from(2);
            }
        },
        None => config::Config::default(),
    };
    let log = driver::logger(cfg.log.level.as_str());
    let stop = match driver::stop_on_signals(&log) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rblk-driver: signals: {}", driver::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let opened = (|| -> Result<_, String> {
        let dev =
            device(args.image.clone(), args.image_fd, "image")?.ok_or("no image given (--image or --image-fd)")?;
        let root = device(args.root.clone(), args.root_fd, "root device")?;
        let listener = match (&args.socket, args.socket_fd) {
            (Some(p), None) => UnixListener::bind(p).map_err(|e| format!("socket {}: {e}", p.display()))?,
            (None, Some(fd)) => UnixListener::from(owned(fd)),
            _ => return Err(format!("give the socket as --socket PATH or --socket-fd N\n{USAGE}")),
        };
        Ok((dev, root, listener))
    })();
    let (dev, root, listener) = match opened {
        Ok(o) => o,
        Err(e) => {
            eprintln!("rblk-driver: {e}");
            return ExitCode::from(2);
        }
    };
    match driver::run(dev, root, listener, driver::driver_config(&cfg), stop, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rblk-driver: {}", driver::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
