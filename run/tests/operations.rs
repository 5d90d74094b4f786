//! What operators see: the log as operators and collectors read it (`[log] format = "json"`
//! gives one JSON object per line with an RFC 3339 timestamp, text lines start with one too,
//! raft-rs's routine start-up events are at debug, not info), and progress bars drawn on a
//! terminal only.

use std::process::Command;
use std::time::Duration;

mod common;
use common::{have, Scratch, Serve};

fn is_rfc3339_utc(ts: &str) -> bool {
    // 2026-12-02T13:04:05.123Z
    let b = ts.as_bytes();
    b.len() == 24
        && ts.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && ts[..4].parse::<u32>().is_ok_and(|y| y >= 2024)
}

/// Runs a server until it serves, stops it, and returns its log.
fn serve_log(name: &str, config: &str, env: &[(&str, &str)]) -> String {
    let dir = Scratch::new(name);
    let serve = Serve::start(&dir, config, env);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let log_path = serve.log.clone();
    assert!(serve.stop().success());
    std::fs::read_to_string(log_path).expect("log")
}

#[test]
fn json_lines_from_supervisor_and_driver() {
    let log = serve_log("log-json", "[log]\nformat = \"json\"\n", &[]);
    let mut events = Vec::new();
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let ts = v["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
        assert!(is_rfc3339_utc(ts), "{ts}");
        assert!(v["level"].is_string(), "{line}");
        events.push(v["msg"].as_str().unwrap_or_else(|| panic!("no msg: {line}")).to_string());
    }
    // The supervisor's and the driver's events, each with its keys.
    for msg in ["driver started", "sandboxed", "volume recovered", "serving", "driver ready", "stopped"] {
        assert!(events.iter().any(|e| e == msg), "no {msg:?} event in\n{log}");
    }
    assert!(events.iter().any(|e| e.starts_with("formatted ")), "the image made at start is an event:\n{log}");
    // Nothing else.
    let other: Vec<&str> = log.lines().filter(|l| !l.starts_with('{')).collect();
    assert!(other.is_empty(), "lines that are not JSON: {other:?}");
}

#[test]
fn text_lines_start_with_an_rfc3339_timestamp_and_raft_routine_is_debug() {
    let log = serve_log("log-text", "", &[("RBLK_LOG", "info")]);
    for line in log.lines() {
        let ts = line.split(' ').next().unwrap_or_default();
        assert!(is_rfc3339_utc(ts), "{line}");
    }
    for routine in ["became leader", "RawNode created", "newRaft"] {
        assert!(!log.contains(routine), "raft-rs's {routine:?} logged at info:\n{log}");
    }
    let debug = serve_log("log-debug", "", &[("RBLK_LOG", "debug")]);
    assert!(debug.contains("DEBG became leader"), "raft-rs's events are kept at debug:\n{debug}");
}

/// `format --preallocate` draws a progress bar on a terminal (a pty from `script`) and
/// writes nothing on stderr when it is a file.
#[test]
fn progress_only_on_a_terminal() {
    let dir = Scratch::new("progress");
    let image = dir.path("plain.img");
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("format")
        .arg(&image)
        .args(["--size", "256M", "--preallocate"])
        .output()
        .expect("rblk format");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "stderr is not a terminal, yet: {:?}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("formatted "), "{out:?}");
    if !have("script") {
        return;
    }
    let tty = dir.path("tty.img");
    let command = format!("'{}' format '{}' --size 256M --preallocate", env!("CARGO_BIN_EXE_rblk"), tty.display());
    let out = Command::new("script").args(["-qec", &command, "/dev/null"]).output().expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("zeroing [") && text.contains("formatted "), "no progress bar on a terminal: {text:?}");
}
