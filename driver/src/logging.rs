//! The log every rblk process writes on stderr: text or JSON lines (`[log] format`), RFC 3339
//! UTC timestamps, the level from `[log] level` or `RBLK_LOG`.
//!
//! raft-rs logs its routine events (a node created, an election won, a configuration
//! applied) at INFO on every start; for a single-node group they say nothing an operator
//! needs, so `raft_logger` hands raft-rs a logger that writes its INFO at DEBUG. Its warnings
//! and errors keep their level.

use std::io::Write;

use config::{LogConfig, LogFormat};
use slog::{Drain, Logger, OwnedKVList, Record};

/// Writes the current UTC time as RFC 3339 with milliseconds (`2026-12-02T13:04:05.123Z`).
/// UTC needs no time-zone file, which the sandboxed driver could not open.
fn rfc3339(out: &mut dyn Write) -> std::io::Result<()> {
    out.write_all(now_rfc3339().as_bytes())
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

/// A logger to stderr as `cfg` says; the environment variable `RBLK_LOG` overrides the level.
pub fn logger(cfg: &LogConfig) -> Logger {
    let level = match std::env::var("RBLK_LOG") {
        Ok(env) => env.parse::<config::LogLevel>().unwrap_or(cfg.level),
        Err(_) => cfg.level,
    };
    let level = level.as_str().parse::<slog::Level>().unwrap_or(slog::Level::Info);
    match cfg.format {
        LogFormat::Text => {
            let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
            let drain = slog_term::FullFormat::new(decorator).use_custom_timestamp(rfc3339).build();
            Logger::root(drain.filter_level(level).fuse(), slog::o!())
        }
        LogFormat::Json => {
            // Each record is collected and written with one write: the supervisor and the
            // driver share stderr, and pieces of their lines must not interleave.
            let drain = slog_json::Json::new(OneWrite(Vec::new()))
                .set_flush(true)
                .add_key_value(slog::o!(
                    // slog serializes these last to first: `ts`, `level`, `msg` lead each line.
                    "msg" => slog::PushFnValue(|r: &Record, ser| ser.emit(r.msg())),
                    "level" => slog::FnValue(|r: &Record| r.level().as_str()),
                    "ts" => slog::FnValue(|_: &Record| now_rfc3339()),
                ))
                .build();
            // One event is one write of one line: a mutex keeps threads' lines whole.
            Logger::root(std::sync::Mutex::new(drain).filter_level(level).fuse(), slog::o!())
        }
    }
}

/// Collects what is written and hands it to stderr in one `write_all` at `flush` (the JSON
/// drain flushes after each record).
struct OneWrite(Vec<u8>);

impl Write for OneWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let line = std::mem::take(&mut self.0);
        let written = std::io::stderr().lock().write_all(&line);
        self.0 = line;
        self.0.clear();
        written
    }
}

/// The logger to give raft-rs: `log`, with raft-rs's INFO events written at DEBUG.
pub fn raft_logger(log: &Logger) -> Logger {
    Logger::root(Demote(log.clone()), slog::o!())
}

/// Passes records on, INFO ones as DEBUG.
struct Demote(Logger);

impl Drain for Demote {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        if record.level() != slog::Level::Info {
            return Drain::log(&self.0, record, values);
        }
        let demoted = slog::RecordStatic { location: record.location(), tag: record.tag(), level: slog::Level::Debug };
        Drain::log(&self.0, &Record::new(&demoted, record.msg(), record.kv()), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), "2026-12-02T13:04:05.123Z".len(), "{ts}");
        assert!(time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339).is_ok(), "{ts}");
    }
}
