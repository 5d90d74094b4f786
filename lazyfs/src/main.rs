//! `lazyfs BACKING MOUNTPOINT [--mode tear|reorder|drop|keep] [--seed N] [--control SOCKET] [--cached]`
//!
//! Mounts BACKING at MOUNTPOINT (see the library's documentation for what survives a cut),
//! prints `mounted` on stdout once the mount is up and the control socket listens, and serves
//! until unmounted (`fusermount3 -u MOUNTPOINT`). The control socket takes one command per
//! line and answers each with one line:
//!
//! - `cut`: cut the power now; answers the counters after the cut (`cut writes=… kept=… dropped=…`)
//! - `arm N`: cut when the N-th FUSE_FSYNC from now arrives, before it is served
//! - `status`: the counters (`live …` or `cut …`)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;

use lazyfs::{Layer, Mode, Options};

const USAGE: &str =
    "usage: lazyfs BACKING MOUNTPOINT [--mode tear|reorder|drop|keep] [--seed N] [--control SOCKET] [--cached]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut options = Options { mode: Mode::Drop, seed: 0, cached: false };
    let mut control: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} wants a value\n{USAGE}"));
        match arg.as_str() {
            "--mode" => options.mode = value()?.parse()?,
            "--seed" => options.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--control" => control = Some(PathBuf::from(value()?)),
            "--cached" => options.cached = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ if arg.starts_with("--") => return Err(format!("unknown option {arg}\n{USAGE}")),
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [backing, mountpoint] = positional.as_slice() else { return Err(USAGE.into()) };
    let mounted = lazyfs::mount(backing, mountpoint, options).map_err(|e| format!("mount: {e}"))?;
    if let Some(path) = &control {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let layer = mounted.layer().clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let layer = layer.clone();
                std::thread::spawn(move || serve_control(stream, &layer));
            }
        });
    }
    println!("mounted");
    let _ = std::io::stdout().flush();
    let result = mounted.wait().map_err(|e| format!("session: {e}"));
    if let Some(path) = &control {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn serve_control(stream: UnixStream, layer: &Layer) {
    let Ok(mut out) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(out, "{}", layer.command(&line)).is_err() {
            return;
        }
    }
}
