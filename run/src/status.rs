//! `rblk status TARGET [--json]`: the live state of a running `rblk serve`, asked from its
//! metrics endpoint (`[metrics] listen`, `GET /status`; see docs/metrics.md).
//!
//! TARGET is `http://HOST:PORT[/...]`, `HOST:PORT`, or the path of the unix socket.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

/// How long the server may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer taken.
const MAX_ANSWER: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("connecting to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("asking {target}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{target} is an NBD endpoint; rblk status asks the metrics endpoint ([metrics] listen: HOST:PORT or a \
         socket path)"
    )]
    Nbd { target: String },
    #[error("{target} answered {answer:?}, not a status")]
    Answer { target: String, answer: String },
}

/// Where TARGET points.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Tcp(String),
    Unix(String),
}

fn parse_target(target: &str) -> Target {
    if let Some(rest) = target.strip_prefix("http://") {
        return Target::Tcp(rest.split('/').next().unwrap_or(rest).to_owned());
    }
    if target.contains('/') || !target.contains(':') {
        Target::Unix(target.to_owned())
    } else {
        Target::Tcp(target.to_owned())
    }
}

/// Asks `target` for its status: the JSON, or with `json` false the human-readable text.
pub fn run(target: &str, json: bool) -> Result<String, StatusError> {
    let status = fetch(target)?;
    if json {
        Ok(format!("{status:#}\n"))
    } else {
        Ok(human(&status))
    }
}

/// `GET /status` from `target`, parsed.
pub fn fetch(target: &str) -> Result<Value, StatusError> {
    let io = |source| StatusError::Io { target: target.to_owned(), source };
    let connect = |source| StatusError::Connect { target: target.to_owned(), source };
    let mut raw = Vec::new();
    let request = b"GET /status HTTP/1.1\r\nHost: rblk\r\nConnection: close\r\n\r\n";
    if ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"].iter().any(|p| target.starts_with(p)) {
        return Err(StatusError::Nbd { target: target.to_owned() });
    }
    // An NBD server greets first and drops what is not NBD: say so rather than "reset".
    let answered = |read: std::io::Result<usize>, raw: &[u8]| match read {
        _ if raw.starts_with(b"NBDMAGIC") => Err(StatusError::Nbd { target: target.to_owned() }),
        Err(source) => Err(io(source)),
        Ok(_) => Ok(()),
    };
    match parse_target(target) {
        Target::Tcp(hostport) => {
            let addr = hostport
                .to_socket_addrs()
                .map_err(connect)?
                .next()
                .ok_or_else(|| connect(std::io::Error::other("no address")))?;
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(connect)?;
            s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
            s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
            let sent = s.write_all(request);
            answered(s.take(MAX_ANSWER).read_to_end(&mut raw).and(sent.map(|()| 0)), &raw)?;
        }
        Target::Unix(path) => {
            let mut s = UnixStream::connect(&path).map_err(connect)?;
            s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
            s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
            let sent = s.write_all(request);
            answered(s.take(MAX_ANSWER).read_to_end(&mut raw).and(sent.map(|()| 0)), &raw)?;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let bad = || StatusError::Answer { target: target.to_owned(), answer: text.chars().take(200).collect() };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    if head.lines().next().and_then(|l| l.split_whitespace().nth(1)) != Some("200") {
        return Err(bad());
    }
    let value: Value = serde_json::from_str(body).map_err(|_| bad())?;
    if value.get("incarnation").is_none() {
        return Err(bad());
    }
    Ok(value)
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The status for people.
pub fn human(v: &Value) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mut out = String::new();
    let ready = if v["ready"].as_bool() == Some(true) { "ready" } else { "not ready" };
    out += &format!(
        "supervisor: up {}\ndriver:     incarnation {} (pid {}), {ready}, up {}\n",
        duration(v["uptime_seconds"].as_f64().unwrap_or(0.0)),
        n(&v["incarnation"]),
        n(&v["pid"]),
        duration(v["incarnation_uptime_seconds"].as_f64().unwrap_or(0.0)),
    );
    match v["last_recovery"].as_object() {
        Some(r) => {
            out += &format!(
                "recovery:   {} ms, {} entries replayed\n",
                r.get("ms").map_or(0, n),
                r.get("replayed").map_or(0, n)
            )
        }
        None => out += "recovery:   none yet\n",
    }
    let restarts = &v["restarts"];
    out += &format!("restarts:   {}", n(&restarts["total"]));
    if let Some(causes) = restarts["by_cause"].as_object().filter(|c| !c.is_empty()) {
        let list: Vec<String> = causes.iter().map(|(c, k)| format!("{c} {}", n(k))).collect();
        out += &format!(" ({})", list.join(", "));
    }
    if let Some(last) = restarts["last_cause"].as_str() {
        out += &format!("; last: {last}");
    }
    out += "\n";
    if let Some(requests) = v["requests"].as_object() {
        let list: Vec<String> = requests
            .iter()
            .filter(|(_, k)| n(k) > 0)
            .map(|(kind, k)| format!("{kind} {} ({})", n(k), bytes(n(&v["bytes"][kind]))))
            .collect();
        out += &format!("requests:   {}\n", if list.is_empty() { "none".to_owned() } else { list.join(", ") });
        let errors: Vec<String> = v["errors"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, k)| n(k) > 0)
            .map(|(e, k)| format!("{e} {}", n(k)))
            .collect();
        out += &format!("errors:     {}\n", if errors.is_empty() { "none".to_owned() } else { errors.join(", ") });
        let vol = &v["volume"];
        out += &format!(
            "volume:     {} of {} blocks used, {} free for data; applied index {}\n",
            n(&vol["used_blocks"]),
            n(&vol["data_blocks"]),
            n(&vol["free_blocks"]),
            n(&vol["applied_index"])
        );
        out += &format!(
            "log:        {} of {} in use; {} checkpoints\n",
            bytes(n(&v["log"]["used_bytes"])),
            bytes(n(&v["log"]["size_bytes"])),
            n(&v["checkpoints"])
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("http://127.0.0.1:9898/metrics"), Target::Tcp("127.0.0.1:9898".into()));
        assert_eq!(parse_target("localhost:9898"), Target::Tcp("localhost:9898".into()));
        assert_eq!(parse_target("./m.sock"), Target::Unix("./m.sock".into()));
        assert_eq!(parse_target("m.sock"), Target::Unix("m.sock".into()));
    }

    #[test]
    fn human_names_what_matters() {
        let v = serde_json::json!({
            "uptime_seconds": 3700.0, "incarnation": 3, "pid": 42, "ready": true,
            "incarnation_uptime_seconds": 5.0,
            "last_recovery": {"ms": 12, "replayed": 40},
            "restarts": {"total": 2, "by_cause": {"signal_SIGKILL": 2}, "last_cause": "killed by signal 9 (SIGKILL)"},
            "requests": {"read": 0, "write": 3}, "bytes": {"read": 0, "write": 12288},
            "errors": {"EIO": 0}, "checkpoints": 1,
            "volume": {"used_blocks": 5, "data_blocks": 100, "free_blocks": 90, "applied_index": 9},
            "log": {"used_bytes": 8192, "size_bytes": 65536},
        });
        let text = human(&v);
        for want in [
            "up 1h 1m",
            "incarnation 3 (pid 42), ready",
            "12 ms, 40 entries replayed",
            "restarts:   2 (signal_SIGKILL 2); last: killed by signal 9 (SIGKILL)",
            "write 3 (12.0 KiB)",
            "errors:     none",
            "5 of 100 blocks used",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("read 0"), "idle types are left out:\n{text}");
    }
}
