//! Metrics and live status, served by the supervisor (see docs/metrics.md).
//!
//! `Live` is what the supervisor knows: its own bookkeeping (incarnation, readiness, the last
//! recovery, restarts by cause) and the driver's metrics page (`driver::metrics`), a memfd
//! it created and hands to every incarnation. `serve` answers `GET /metrics` (Prometheus text
//! format 0.0.4) and `GET /status` (JSON) on `[metrics] listen`, from a small thread of its
//! own: one request per connection, a bounded request, read and write timeouts, and at most
//! `MAX_CLIENTS` connections at once (more are closed at once), so a slow or silent client
//! never holds up the next scrape, nor the supervisor.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use config::MetricsListen;
use driver::metrics::{Histogram, Mapped, Page, BUCKETS, ERRNOS, KINDS};
use slog::{info, warn, Logger};

/// Connections served at once; more are closed without an answer.
pub const MAX_CLIENTS: usize = 8;
/// The longest request head read (request line and headers).
const MAX_REQUEST: usize = 8 << 10;
/// A client must send its request within this, and take the answer within it too.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the supervisor knows, for `/metrics` and `/status`.
#[derive(Debug)]
pub struct Live {
    page: Option<(OwnedFd, Mapped)>,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    incarnation: u64,
    pid: u32,
    incarnation_started: Option<Instant>,
    ready: bool,
    recovery_ms: Option<u64>,
    replayed: Option<u64>,
    /// Unrequested driver deaths by cause label.
    restarts: BTreeMap<String, u64>,
    last_cause: Option<String>,
}

impl Live {
    /// Without metrics configured there is no page (the driver counts into its own memory).
    pub fn new(with_page: bool) -> std::io::Result<Live> {
        let page = if with_page { Some(Mapped::create()?) } else { None };
        Ok(Live { page, started: Instant::now(), state: Mutex::new(State::default()) })
    }

    /// The page's descriptor, to hand to a driver.
    pub fn page_fd(&self) -> Option<BorrowedFd<'_>> {
        self.page.as_ref().map(|(fd, _)| fd.as_fd())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An incarnation was started.
    pub fn started(&self, incarnation: u64, pid: u32) {
        let mut s = self.state();
        s.incarnation = incarnation;
        s.pid = pid;
        s.incarnation_started = Some(Instant::now());
        s.ready = false;
    }

    /// It reported `ready ms=.. replayed=..` (`rest` is what follows `ready `).
    pub fn ready(&self, rest: &str) {
        let field = |name: &str| {
            rest.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok())
        };
        let mut s = self.state();
        s.ready = true;
        s.recovery_ms = field("ms");
        s.replayed = field("replayed");
    }

    /// It died unasked: `label` is the cause's short name (a Prometheus label value), `cause`
    /// the words.
    pub fn died(&self, label: &str, cause: &str) {
        let mut s = self.state();
        s.ready = false;
        *s.restarts.entry(label.to_owned()).or_default() += 1;
        s.last_cause = Some(cause.to_owned());
    }

    fn page(&self) -> Option<&Page> {
        self.page.as_ref().map(|(_, m)| &**m)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render_metrics(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        let o = &mut out;
        let s = self.state();
        let now = Instant::now();
        head(o, "rblk_uptime_seconds", "gauge", "Seconds since the supervisor started.");
        let _ = writeln!(o, "rblk_uptime_seconds {}", secs(now - self.started));
        head(o, "rblk_driver_incarnation", "gauge", "The driver incarnation running (1 for the first).");
        let _ = writeln!(o, "rblk_driver_incarnation {}", s.incarnation);
        head(o, "rblk_driver_ready", "gauge", "1 while the driver has recovered and serves, else 0.");
        let _ = writeln!(o, "rblk_driver_ready {}", u8::from(s.ready));
        head(o, "rblk_driver_uptime_seconds", "gauge", "Seconds since the running incarnation started.");
        let _ = writeln!(o, "rblk_driver_uptime_seconds {}", s.incarnation_started.map_or(0.0, |t| secs(now - t)));
        head(o, "rblk_driver_restarts_total", "counter", "Driver deaths the supervisor restarted from, by cause.");
        for (cause, n) in &s.restarts {
            let _ = writeln!(o, "rblk_driver_restarts_total{{cause=\"{}\"}} {n}", escape(cause));
        }
        if let (Some(ms), Some(replayed)) = (s.recovery_ms, s.replayed) {
            head(
                o,
                "rblk_last_recovery_seconds",
                "gauge",
                "Start to serving of the latest incarnation that became ready.",
            );
            let _ = writeln!(o, "rblk_last_recovery_seconds {}", ms as f64 / 1e3);
            head(o, "rblk_last_recovery_replayed_entries", "gauge", "Log entries the latest recovery replayed.");
            let _ = writeln!(o, "rblk_last_recovery_replayed_entries {replayed}");
        }
        drop(s);
        let Some(p) = self.page() else { return out };
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        head(o, "rblk_requests_total", "counter", "NBD requests received, by type.");
        for (k, name) in KINDS.iter().enumerate() {
            let _ = writeln!(o, "rblk_requests_total{{type=\"{name}\"}} {}", ld(&p.requests[k]));
        }
        head(o, "rblk_request_bytes_total", "counter", "Bytes the NBD requests named (length), by type.");
        for (k, name) in KINDS.iter().enumerate() {
            let _ = writeln!(o, "rblk_request_bytes_total{{type=\"{name}\"}} {}", ld(&p.bytes[k]));
        }
        head(o, "rblk_errors_total", "counter", "NBD error replies, by errno.");
        for (k, (_, name)) in ERRNOS.iter().enumerate() {
            let _ = writeln!(o, "rblk_errors_total{{errno=\"{name}\"}} {}", ld(&p.errors[k]));
        }
        head(
            o,
            "rblk_request_duration_seconds",
            "histogram",
            "Request header read to reply, by type; for write, trim and write_zeroes the acknowledged (durable) latency.",
        );
        for (k, name) in KINDS.iter().enumerate() {
            histogram(o, "rblk_request_duration_seconds", &format!("type=\"{name}\","), &p.latency[k], 1e6);
        }
        head(o, "rblk_raft_batch_entries", "histogram", "Entries per Raft log append (one group commit).");
        histogram(o, "rblk_raft_batch_entries", "", &p.batch_entries, 1.0);
        head(o, "rblk_raft_appended_bytes_total", "counter", "Bytes of entries appended to the Raft log.");
        let _ = writeln!(o, "rblk_raft_appended_bytes_total {}", ld(&p.batch_bytes));
        head(o, "rblk_checkpoint_duration_seconds", "histogram", "Checkpoints, sealing to installed root.");
        histogram(o, "rblk_checkpoint_duration_seconds", "", &p.checkpoint_ms, 1e3);
        let gauges: [(&str, &str, u64); 6] = [
            ("rblk_log_used_bytes", "Bytes of the Raft log ring in use.", ld(&p.log_used_bytes)),
            ("rblk_log_size_bytes", "Bytes of the Raft log ring.", ld(&p.log_size_bytes)),
            ("rblk_volume_data_blocks", "4 KiB blocks of the data region.", ld(&p.data_blocks)),
            (
                "rblk_volume_used_blocks",
                "Data-region blocks in use (data, tree, bitmaps, awaiting release).",
                ld(&p.used_blocks),
            ),
            ("rblk_volume_free_blocks", "Data-region blocks a data write may still take.", ld(&p.free_blocks)),
            ("rblk_volume_applied_index", "The Raft index the volume has applied.", ld(&p.applied_index)),
        ];
        for (name, help, value) in gauges {
            head(o, name, "gauge", help);
            let _ = writeln!(o, "{name} {value}");
        }
        out
    }

    /// The live status as JSON (`GET /status`, `rblk status --json`).
    pub fn status_json(&self) -> serde_json::Value {
        use serde_json::json;
        let s = self.state();
        let now = Instant::now();
        let restarts: u64 = s.restarts.values().sum();
        let mut v = json!({
            "version": 1,
            "uptime_seconds": secs(now - self.started),
            "incarnation": s.incarnation,
            "pid": s.pid,
            "ready": s.ready,
            "incarnation_uptime_seconds": s.incarnation_started.map_or(0.0, |t| secs(now - t)),
            "last_recovery": match (s.recovery_ms, s.replayed) {
                (Some(ms), Some(replayed)) => json!({ "ms": ms, "replayed": replayed }),
                _ => serde_json::Value::Null,
            },
            "restarts": { "total": restarts, "by_cause": s.restarts, "last_cause": s.last_cause },
        });
        drop(s);
        if let Some(p) = self.page() {
            let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let by_kind = |a: &[std::sync::atomic::AtomicU64]| -> serde_json::Map<String, serde_json::Value> {
                KINDS.iter().zip(a).map(|(k, n)| ((*k).to_owned(), ld(n).into())).collect()
            };
            let errors: serde_json::Map<String, serde_json::Value> =
                ERRNOS.iter().zip(&p.errors).map(|((_, name), n)| ((*name).to_owned(), ld(n).into())).collect();
            v["requests"] = by_kind(&p.requests).into();
            v["bytes"] = by_kind(&p.bytes).into();
            v["errors"] = errors.into();
            v["checkpoints"] = ld(&p.checkpoint_ms.count).into();
            v["log"] = json!({ "used_bytes": ld(&p.log_used_bytes), "size_bytes": ld(&p.log_size_bytes) });
            v["volume"] = json!({
                "data_blocks": ld(&p.data_blocks),
                "used_blocks": ld(&p.used_blocks),
                "free_blocks": ld(&p.free_blocks),
                "applied_index": ld(&p.applied_index),
            });
        }
        v
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One histogram's series; bucket bounds are powers of two of the stored unit, `per_unit` of
/// which make the exposed unit (1e6 for µs to seconds; dividing keeps bounds like 0.000004
/// exact in decimal). `labels` is empty or ends with a comma.
fn histogram(o: &mut String, name: &str, labels: &str, h: &Histogram, per_unit: f64) {
    let mut cumulative = 0u64;
    for k in 0..BUCKETS {
        cumulative += h.buckets[k].load(Ordering::Relaxed);
        let le = (1u64 << k) as f64 / per_unit;
        let _ = writeln!(o, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
    }
    // The counts are read one by one while the driver adds: +Inf never below a bucket.
    let count = h.count.load(Ordering::Relaxed).max(cumulative);
    let labels = labels.trim_end_matches(',');
    let _ = writeln!(o, "{name}_bucket{{{labels}{}le=\"+Inf\"}} {count}", if labels.is_empty() { "" } else { "," });
    let braces = |l: &str| if l.is_empty() { String::new() } else { format!("{{{l}}}") };
    let _ = writeln!(o, "{name}_sum{} {}", braces(labels), h.sum.load(Ordering::Relaxed) as f64 / per_unit);
    let _ = writeln!(o, "{name}_count{} {count}", braces(labels));
}

/// The metrics endpoint while it runs; a unix socket's file is removed when it is dropped.
#[derive(Debug)]
pub struct Endpoint {
    unix_path: Option<PathBuf>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connection of either kind.
trait Client: Read + Write + Send {
    fn timeouts(&self, d: Duration) -> std::io::Result<()>;
}

impl Client for TcpStream {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Client for UnixStream {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// Binds `at` and serves `/metrics` and `/status` from `live` on a thread of its own, for the
/// life of the process. A unix socket file nobody listens on is replaced, a live one refused,
/// and so is anything at the path that is not a socket.
pub fn serve(at: &MetricsListen, live: Arc<Live>, log: Logger) -> std::io::Result<Endpoint> {
    let active = Arc::new(AtomicUsize::new(0));
    match at {
        MetricsListen::Tcp(addr) => {
            let listener = TcpListener::bind(addr)?;
            let shown = format!("http://{}", listener.local_addr()?);
            info!(log, "serving metrics"; "url" => &shown);
            spawn_accept(move || listener.accept().map(|(s, _)| Box::new(s) as Box<dyn Client>), live, active, log)?;
            Ok(Endpoint { unix_path: None })
        }
        MetricsListen::Unix(path) => {
            let listener = crate::socket::bind(path).map_err(std::io::Error::other)?;
            let shown = path.display().to_string();
            info!(log, "serving metrics"; "socket" => &shown);
            spawn_accept(move || listener.accept().map(|(s, _)| Box::new(s) as Box<dyn Client>), live, active, log)?;
            Ok(Endpoint { unix_path: Some(path.clone()) })
        }
    }
}

fn spawn_accept(
    mut accept: impl FnMut() -> std::io::Result<Box<dyn Client>> + Send + 'static,
    live: Arc<Live>,
    active: Arc<AtomicUsize>,
    log: Logger,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("rblk-metrics".into()).spawn(move || loop {
        let client = match accept() {
            Ok(c) => c,
            Err(e) => {
                warn!(log, "metrics: accept failed"; "error" => %e);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Over the limit: closed at once (dropped), never queued behind the others.
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (live, active2) = (live.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("rblk-metrics-client".into()).spawn(move || {
            let _ = answer(client, &live);
            active2.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    })?;
    Ok(())
}

/// Reads one request head and answers it; the connection then closes.
fn answer(mut client: Box<dyn Client>, live: &Live) -> std::io::Result<()> {
    client.timeouts(CLIENT_TIMEOUT)?;
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        // A client trickling bytes gets no more than the deadline in all.
        if head.len() >= MAX_REQUEST || Instant::now() >= deadline {
            break false;
        }
        match client.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e),
        }
    };
    let (status, kind, body) = if !complete {
        ("431 Request Header Fields Too Large", "text/plain", "request too large or too slow\n".to_owned())
    } else {
        let text = String::from_utf8_lossy(&head);
        let mut words = text.lines().next().unwrap_or("").split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", live.render_metrics()),
            ("GET", "/status") => ("200 OK", "application/json", format!("{}\n", live.status_json())),
            ("GET", _) => ("404 Not Found", "text/plain", "try /metrics or /status\n".to_owned()),
            _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes())?;
    client.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervisor_state_shows_in_both_forms() {
        let live = Live::new(true).expect("page");
        live.started(1, 100);
        live.ready("ms=42 replayed=7");
        live.died("signal_SIGKILL", "killed by signal 9 (SIGKILL)");
        live.started(2, 101);
        let m = live.render_metrics();
        assert!(m.contains("rblk_driver_restarts_total{cause=\"signal_SIGKILL\"} 1\n"), "{m}");
        assert!(m.contains("rblk_driver_incarnation 2\n"), "{m}");
        assert!(m.contains("rblk_last_recovery_replayed_entries 7\n"), "{m}");
        assert!(m.contains("rblk_last_recovery_seconds 0.042\n"), "{m}");
        let j = live.status_json();
        assert_eq!(j["incarnation"], 2);
        assert_eq!(j["restarts"]["total"], 1);
        assert_eq!(j["last_recovery"]["replayed"], 7);
        assert_eq!(j["ready"], false, "the new incarnation is not ready yet");
    }

    #[test]
    fn histograms_are_cumulative_and_end_in_inf() {
        let h = Histogram {
            buckets: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            sum: Default::default(),
            count: Default::default(),
        };
        for v in [1, 3, 3, 1 << 30] {
            h.observe(v);
        }
        let mut o = String::new();
        histogram(&mut o, "x", "type=\"read\",", &h, 1.0);
        assert!(o.contains("x_bucket{type=\"read\",le=\"1\"} 1\n"), "{o}");
        assert!(o.contains("x_bucket{type=\"read\",le=\"4\"} 3\n"), "{o}");
        assert!(o.contains("x_bucket{type=\"read\",le=\"8388608\"} 3\n"), "{o}");
        assert!(o.contains("x_bucket{type=\"read\",le=\"+Inf\"} 4\n"), "{o}");
        assert!(o.contains("x_count{type=\"read\"} 4\n"), "{o}");
        let mut o = String::new();
        histogram(&mut o, "y", "", &h, 1.0);
        assert!(o.contains("y_bucket{le=\"+Inf\"} 4\ny_sum 1073741831\ny_count 4\n"), "{o}");
    }
}
