//! Helpers the integration tests share.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const MIB: u64 = 1 << 20;

/// Whether `tool` can run; a missing one fails under `RBLK_REQUIRE_CLIENTS=1`, else skips.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var_os("RBLK_REQUIRE_CLIENTS").is_none(), "{tool} is required but missing");
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// A scratch directory removed at the end.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rblk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `rblk serve` on an image in a scratch directory, its log in a file.
pub struct Serve {
    pub child: Child,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl Serve {
    pub fn start(dir: &Scratch, config: &str, env: &[(&str, &str)]) -> Serve {
        Serve::start_sized(dir, "64M", config, env)
    }

    /// Formats a volume of `size` (if missing) and serves it.
    pub fn start_sized(dir: &Scratch, size: &str, config: &str, env: &[(&str, &str)]) -> Serve {
        let cfg = dir.path("rblk.toml");
        std::fs::write(&cfg, config).expect("config");
        let log = dir.path("serve.log");
        let socket = dir.path("s.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rblk"));
        cmd.arg("serve").arg(dir.path("v.img")).arg("--socket").arg(&socket).arg("--config").arg(&cfg);
        cmd.arg("--size").arg(size).env("RBLK_LOG", "info").env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let file = std::fs::File::create(&log).expect("log");
        let mut child = cmd.stdout(Stdio::piped()).stderr(file).spawn().expect("rblk serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("uri");
        Serve { child, log, socket }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `what` `count` times.
    pub fn wait_for(&self, what: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log().matches(what).count() < count {
            assert!(Instant::now() < deadline, "waited for {count} × {what:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current driver's pid (the supervisor's only child).
    pub fn driver_pid(&self) -> i32 {
        let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", self.child.id(), self.child.id()))
            .expect("children");
        children.split_whitespace().next().expect("a driver is running").parse().expect("pid")
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}
