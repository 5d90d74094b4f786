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
        Serve::launch(dir, &dir.path("v.img"), Some(size), config, "serve", env)
    }

    /// Serves `image` (formatted at `size` if given and missing), with its socket and log
    /// named after `name` in `dir`.
    pub fn launch(
        dir: &Scratch,
        image: &std::path::Path,
        size: Option<&str>,
        config: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Serve {
        let cfg = dir.path("rblk.toml");
        std::fs::write(&cfg, config).expect("config");
        let log = dir.path(&format!("{name}.log"));
        let socket = dir.path(&format!("{name}.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rblk"));
        cmd.arg("serve").arg(image).arg("--socket").arg(&socket).arg("--config").arg(&cfg);
        if let Some(size) = size {
            cmd.arg("--size").arg(size);
        }
        cmd.env("RBLK_LOG", "info").env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"));
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

    /// The last 30 lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The current driver's pid (the supervisor's only child).
    pub fn driver_pid(&self) -> i32 {
        self.try_driver_pid().expect("a driver is running")
    }

    /// The current driver's pid, if one is running.
    pub fn try_driver_pid(&self) -> Option<i32> {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// SIGKILL for the supervisor and its driver; returns once neither holds the image.
    pub fn kill_all(mut self) {
        let driver = self.try_driver_pid();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = driver {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            // Gone, or a zombie (which holds no descriptors).
            while let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'))
                    || Instant::now() > deadline
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
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
