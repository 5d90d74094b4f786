//! The configuration as its users meet it: example files, defaults, every validation rule,
//! malformed values, and the error text that names the key and the place.

use std::path::PathBuf;
use std::time::Duration;

use config::{
    format_duration, format_size, parse_duration, parse_listen, parse_size, Config, ConfigError, Location, LogLevel,
    MAX_SOCKET_PATH,
};

const RBLK_TOML: &str = include_str!("../examples/rblk.toml");
const MINIMAL_TOML: &str = include_str!("../examples/minimal.toml");

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

/// Parses `text`, expects an error, and checks that it names `key` (both in `key()` and in
/// the message) and says `fragment`.
#[track_caller]
fn rejects(text: &str, key: &str, fragment: &str) -> ConfigError {
    let e = match Config::from_toml_str(text) {
        Ok(c) => panic!("{text:?} was accepted: {c:?}"),
        Err(e) => e,
    };
    let shown = e.to_string();
    assert_eq!(e.key(), Some(key), "{text:?} => {shown}");
    assert!(shown.contains(key), "{text:?} => {shown}");
    assert!(shown.contains(fragment), "{text:?} => {shown} (wanted {fragment:?})");
    e
}

#[test]
fn defaults_validate() {
    let c = Config::default();
    c.validate().unwrap();
    assert_eq!(c.volume.image, PathBuf::from("rblk.img"));
    assert_eq!(c.volume.root_device, None);
    assert_eq!(c.volume.size, 1 << 30);
    assert_eq!(c.volume.log_size, 64 << 20);
    assert_eq!(c.server.socket, PathBuf::from("rblk.sock"));
    assert_eq!(c.server.vhost_user_socket, None);
    assert_eq!(c.server.export_name, "rblk");
    assert_eq!(c.server.max_connections, 64);
    assert_eq!(c.server.max_inflight, 64 << 20);
    assert_eq!(c.server.max_inflight_per_connection, 32 << 20);
    assert_eq!(c.server.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.server.stall_timeout, Duration::from_secs(30));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
    assert!(!c.server.read_only);
    assert_eq!(c.checkpoint.log_bytes, 8 << 20);
    assert_eq!(c.checkpoint.interval, Duration::from_secs(30));
    assert_eq!((c.cache.nodes, c.cache.bitmaps), (16384, 256));
    assert_eq!(c.raft.tick, Duration::from_millis(100));
    assert_eq!((c.raft.election_ticks, c.raft.heartbeat_ticks), (10, 3));
    assert_eq!(c.raft.max_batch, 512 << 10);
    assert_eq!(c.supervisor.heartbeat, Duration::from_millis(500));
    assert_eq!(c.supervisor.heartbeat_timeout, Duration::from_secs(5));
    assert_eq!(c.supervisor.restart_backoff, Duration::from_millis(100));
    assert_eq!(c.supervisor.restart_backoff_max, Duration::from_secs(5));
    assert_eq!(c.supervisor.max_failed_starts, 5);
    assert_eq!((c.supervisor.user.as_str(), c.supervisor.group.as_str()), ("nobody", "nogroup"));
    assert_eq!(c.log.level, LogLevel::Info);
}

#[test]
fn empty_text_is_the_defaults() {
    assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    assert_eq!(Config::from_toml_str("# nothing\n\n[volume]\n").unwrap(), Config::default());
}

#[test]
fn full_example_states_exactly_the_defaults() {
    assert_eq!(Config::from_toml_str(RBLK_TOML).unwrap(), Config::default());
    assert_eq!(Config::load(example("rblk.toml")).unwrap(), Config::default());
}

#[test]
fn full_example_names_every_option() {
    // Every key the effective config writes appears, uncommented, in the example.
    let full = Config::default().to_toml_string();
    for line in full.lines().filter(|l| l.contains(" = ")) {
        assert!(RBLK_TOML.lines().any(|l| l == line), "examples/rblk.toml lacks `{line}`");
    }
    for line in full.lines().filter(|l| l.starts_with('[')) {
        assert!(RBLK_TOML.lines().any(|l| l == line), "examples/rblk.toml lacks section {line}");
    }
}

#[test]
fn minimal_example_sets_image_and_socket_and_defaults_the_rest() {
    let c = Config::load(example("minimal.toml")).unwrap();
    assert_eq!(c, Config::from_toml_str(MINIMAL_TOML).unwrap());
    assert_eq!(c.volume.image, PathBuf::from("rblk.img"));
    assert_eq!(c.server.socket, PathBuf::from("rblk.sock"));
    assert_eq!(c, Config::default());
}

#[test]
fn a_file_changes_only_what_it_names() {
    let c = Config::from_toml_str(
        "[volume]\nimage = \"/dev/vdb\"\nroot_device = \"/dev/vdc\"\nsize = 1073741824\n\
         [checkpoint]\ninterval = \"5m\"\n[log]\nlevel = \"WARN\"\n",
    )
    .unwrap();
    let mut want = Config::default();
    want.volume.image = "/dev/vdb".into();
    want.volume.root_device = Some("/dev/vdc".into());
    want.checkpoint.interval = Duration::from_secs(300);
    want.log.level = LogLevel::Warning;
    assert_eq!(c, want);
}

#[test]
fn sizes_take_integers_and_strings() {
    let c =
        Config::from_toml_str("[volume]\nsize = 8192\nlog_size = \"128K\"\n[raft]\nmax_batch = \"2 MiB\"\n").unwrap();
    assert_eq!((c.volume.size, c.volume.log_size, c.raft.max_batch), (8192, 128 << 10, 2 << 20));
    // Dotted keys and inline tables are the same TOML.
    let dotted = Config::from_toml_str("volume.size = \"2G\"\n").unwrap();
    let inline = Config::from_toml_str("volume = { size = \"2G\" }\n").unwrap();
    assert_eq!(dotted, inline);
    assert_eq!(dotted.volume.size, 2 << 30);
}

#[test]
fn round_trip_through_to_toml_string() {
    assert_eq!(Config::from_toml_str(&Config::default().to_toml_string()).unwrap(), Config::default());

    let mut c = Config::default();
    c.volume.image = "/var/lib/rblk/vol 1.img".into();
    c.volume.root_device = Some("/dev/disk/by-id/roots".into());
    c.volume.size = (1 << 40) + 4096;
    c.volume.log_size = 3 * (64 << 10);
    c.server.socket = "/run/rblk/\"quoted\".sock".into();
    c.server.vhost_user_socket = Some("/run/rblk/vhost user.sock".into());
    c.server.max_connections = 1;
    c.server.read_only = true;
    c.checkpoint.log_bytes = 12345 * 4096;
    c.checkpoint.interval = Duration::ZERO;
    c.cache.nodes = 0;
    c.cache.bitmaps = 1;
    c.raft.tick = Duration::from_micros(1500);
    c.raft.election_ticks = 100;
    c.raft.heartbeat_ticks = 99;
    c.raft.max_batch = 4097;
    c.supervisor.heartbeat = Duration::new(1, 1);
    c.supervisor.heartbeat_timeout = Duration::from_secs(7200);
    c.supervisor.restart_backoff = Duration::from_millis(1);
    c.supervisor.restart_backoff_max = Duration::from_secs(90);
    c.supervisor.max_failed_starts = u32::MAX;
    c.supervisor.user = "65534".into();
    c.supervisor.group = "rblk-users".into();
    c.log.level = LogLevel::Critical;
    c.validate().unwrap();
    let text = c.to_toml_string();
    assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
    assert!(text.contains("size = \"1073741828K\""), "{text}");
    assert!(text.contains("tick = \"1500us\""), "{text}");
}

#[test]
fn every_rule_rejects_naming_the_key() {
    let long_socket = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
    let cases: Vec<(String, &str, &str)> = vec![
        ("[volume]\nimage = \"\"".into(), "volume.image", "must not be empty"),
        ("[volume]\nroot_device = \"rblk.img\"".into(), "volume.root_device", "must differ from volume.image"),
        ("[volume]\nsize = 0".into(), "volume.size", "positive multiple of 4096, got 0"),
        ("[volume]\nsize = 4097".into(), "volume.size", "positive multiple of 4096, got 4097"),
        ("[volume]\nsize = \"1000\"".into(), "volume.size", "multiple of 4096"),
        ("[volume]\nlog_size = \"60K\"".into(), "volume.log_size", "at least 64K, got 60K"),
        ("[volume]\nlog_size = 65537".into(), "volume.log_size", "multiple of 4096"),
        ("[server]\nsocket = \"\"".into(), "server.socket", "must not be empty"),
        (format!("[server]\nsocket = \"{long_socket}\""), "server.socket", "at most 107"),
        ("[server]\nexport_name = \"\"".into(), "server.export_name", "1 to 4096 bytes long, got 0"),
        (format!("[server]\nexport_name = \"{}\"", "e".repeat(4097)), "server.export_name", "got 4097"),
        ("[server]\nmax_connections = 0".into(), "server.max_connections", "at least 1"),
        ("[server]\nmax_inflight = \"512K\"".into(), "server.max_inflight", "at least 1M"),
        (
            "[server]\nmax_inflight_per_connection = \"128M\"".into(),
            "server.max_inflight_per_connection",
            "at most server.max_inflight (64M)",
        ),
        ("[server]\nhandshake_timeout = \"0s\"".into(), "server.handshake_timeout", "must be positive"),
        ("[checkpoint]\nlog_bytes = 4095".into(), "checkpoint.log_bytes", "at least 4K"),
        ("[raft]\ntick = \"0ms\"".into(), "raft.tick", "must be positive"),
        ("[raft]\nheartbeat_ticks = 0".into(), "raft.heartbeat_ticks", "at least 1"),
        ("[raft]\nelection_ticks = 3".into(), "raft.election_ticks", "greater than raft.heartbeat_ticks (3), got 3"),
        ("[raft]\nelection_ticks = 1\nheartbeat_ticks = 2".into(), "raft.election_ticks", "greater than"),
        ("[raft]\nmax_batch = 100".into(), "raft.max_batch", "at least 4K"),
        ("[supervisor]\nheartbeat = \"0s\"".into(), "supervisor.heartbeat", "must be positive"),
        (
            "[supervisor]\nheartbeat_timeout = \"500ms\"".into(),
            "supervisor.heartbeat_timeout",
            "longer than supervisor.heartbeat (500ms), got 500ms",
        ),
        ("[supervisor]\nheartbeat = \"10s\"".into(), "supervisor.heartbeat_timeout", "longer than"),
        ("[supervisor]\nrestart_backoff = \"0s\"".into(), "supervisor.restart_backoff", "must be positive"),
        (
            "[supervisor]\nrestart_backoff_max = \"50ms\"".into(),
            "supervisor.restart_backoff_max",
            "at least supervisor.restart_backoff (100ms), got 50ms",
        ),
        ("[supervisor]\nmax_failed_starts = 0".into(), "supervisor.max_failed_starts", "at least 1"),
        ("[supervisor]\nuser = \"\"".into(), "supervisor.user", "user name or numeric id"),
        ("[supervisor]\nuser = \"no body\"".into(), "supervisor.user", "user name or numeric id"),
        ("[supervisor]\ngroup = \"a:b\"".into(), "supervisor.group", "group name or numeric id"),
        ("[metrics]\nlisten = \"localhost:9898\"".into(), "metrics.listen", "HOST:PORT with a numeric address"),
        ("[metrics]\nlisten = \"9898\"".into(), "metrics.listen", "unix socket path containing a '/'"),
        (format!("[metrics]\nlisten = \"{long_socket}\""), "metrics.listen", "at most 107"),
        (
            "[server]\nsocket = \"/run/x.sock\"\n[metrics]\nlisten = \"/run/x.sock\"".into(),
            "metrics.listen",
            "must differ from server.socket",
        ),
        (format!("[server]\nvhost_user_socket = \"{long_socket}\""), "server.vhost_user_socket", "at most 107"),
        (
            "[server]\nsocket = \"/run/x.sock\"\nvhost_user_socket = \"/run/x.sock\"".into(),
            "server.vhost_user_socket",
            "must differ from server.socket",
        ),
        (
            "[server]\nvhost_user_socket = \"/run/v.sock\"\n[metrics]\nlisten = \"/run/v.sock\"".into(),
            "metrics.listen",
            "must differ from server.vhost_user_socket",
        ),
    ];
    for (text, key, fragment) in &cases {
        let e = rejects(text, key, fragment);
        assert!(matches!(e, ConfigError::Invalid { .. }), "{text:?} => {e:?}");
    }
}

#[test]
fn rules_accept_their_boundaries() {
    let longest_socket = format!("[server]\nsocket = \"/{}\"", "s".repeat(MAX_SOCKET_PATH - 1));
    let longest_vhost = format!("[server]\nvhost_user_socket = \"/{}\"", "v".repeat(MAX_SOCKET_PATH - 1));
    let ok = [
        "[volume]\nsize = 4096\nlog_size = \"64K\"",
        &longest_socket,
        &longest_vhost,
        "[server]\nvhost_user_socket = \"\"",
        "[server]\nmax_connections = 1",
        "[checkpoint]\nlog_bytes = \"4K\"\ninterval = \"0s\"",
        "[cache]\nnodes = 0\nbitmaps = 0",
        "[raft]\nelection_ticks = 2\nheartbeat_ticks = 1\nmax_batch = 4096",
        "[supervisor]\nheartbeat_timeout = \"501ms\"\nrestart_backoff_max = \"100ms\"\nmax_failed_starts = 1",
        "[supervisor]\nuser = \"65534\"\ngroup = \"65534\"",
        "[metrics]\nlisten = \"127.0.0.1:0\"",
        "[metrics]\nlisten = \"[::1]:9898\"",
        "[metrics]\nlisten = \"./metrics.sock\"",
    ];
    for text in ok {
        Config::from_toml_str(text).unwrap_or_else(|e| panic!("{text:?} rejected: {e}"));
    }
}

#[test]
fn metrics_listen_names_tcp_or_unix_or_off() {
    use config::{MetricsConfig, MetricsListen};
    let of = |l: &str| MetricsConfig { listen: l.into() }.endpoint();
    assert_eq!(of(""), Ok(None));
    assert_eq!(of("127.0.0.1:9898"), Ok(Some(MetricsListen::Tcp("127.0.0.1:9898".parse().unwrap()))));
    assert_eq!(of("/run/rblk/m.sock"), Ok(Some(MetricsListen::Unix("/run/rblk/m.sock".into()))));
    assert!(of("nowhere").is_err());
    assert_eq!(Config::default().metrics.endpoint(), Ok(None), "off by default");
}

#[test]
fn validate_checks_what_only_code_can_set() {
    let mut c = Config::default();
    c.volume.root_device = Some(PathBuf::new());
    let e = c.validate().unwrap_err();
    assert_eq!(e.key(), Some("volume.root_device"));
    assert_eq!(e.location(), Some(&Location::default()), "no text, no place");
    assert_eq!(e.to_string(), "volume.root_device: must be a path, or \"\" for none");
}

#[test]
fn unknown_keys_and_sections_are_named() {
    let e = rejects("[volume]\nimage = \"a\"\nimgae = \"b\"\n", "volume.imgae", "unknown key in [volume]");
    assert!(e.to_string().contains("`image`"), "lists what is allowed: {e}");
    assert_eq!(e.location().and_then(|l| l.line), Some(3));
    for section in ["server", "checkpoint", "cache", "raft", "supervisor", "log"] {
        rejects(
            &format!("[{section}]\nbogus = 1\n"),
            &format!("{section}.bogus"),
            &format!("unknown key in [{section}]"),
        );
    }
    rejects("[volumes]\nimage = \"a\"\n", "volumes", "unknown section");
    rejects("image = \"a\"\n", "image", "unknown top-level key");
    rejects("checkpoint.every = \"1s\"\n", "checkpoint.every", "unknown key in [checkpoint]");
}

#[test]
fn wrong_types_are_named() {
    let cases = [
        (
            "[checkpoint]\ninterval = \"fast\"",
            "checkpoint.interval",
            "expected a duration like 30s, 500ms or 5m, got \"fast\"",
        ),
        ("[checkpoint]\ninterval = 30", "checkpoint.interval", "a unit is required"),
        ("[raft]\ntick = true", "raft.tick", "expected a duration like 30s"),
        ("[volume]\nsize = \"big\"", "volume.size", "expected a size like 4096, 64K or 1G, got \"big\""),
        ("[volume]\nsize = -4096", "volume.size", "cannot be negative"),
        ("[volume]\nsize = 1.5", "volume.size", "floating point"),
        ("[volume]\nlog_size = \"1.5G\"", "volume.log_size", "1536M"),
        ("[volume]\nimage = 5", "volume.image", "expected a string"),
        ("[server]\nread_only = \"yes\"", "server.read_only", "expected true or false"),
        ("[server]\nmax_connections = \"64\"", "server.max_connections", "expected a non-negative integer"),
        ("[cache]\nnodes = -1", "cache.nodes", "expected a non-negative integer"),
        ("[supervisor]\nmax_failed_starts = 5000000000", "supervisor.max_failed_starts", "non-negative integer"),
        ("[supervisor]\nuser = 65534", "supervisor.user", "expected a string"),
        ("[log]\nlevel = \"loud\"", "log.level", "expected one of trace, debug, info, warning, error, critical"),
        ("volume = 5", "volume", "expected a table"),
        ("[[volume]]\nimage = \"a\"", "volume", "not an array of tables"),
    ];
    for (text, key, fragment) in cases {
        let e = rejects(text, key, fragment);
        assert!(matches!(e, ConfigError::Value { .. }), "{text:?} => {e:?}");
    }
}

#[test]
fn errors_say_where() {
    let text = "# comment\n[checkpoint]\nlog_bytes = \"16M\"\ninterval = \"fast\"\n";
    let e = Config::from_toml_str(text).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 4, column 12: checkpoint.interval: expected a duration like 30s, 500ms or 5m, got \"fast\""
    );

    // A rule broken by a written key points at it; one broken by a default has no line.
    let e = Config::from_toml_str("[raft]\n\nelection_ticks = 2\n").unwrap_err();
    assert_eq!(e.location().and_then(|l| l.line), Some(3));
    let e = Config::from_toml_str("[raft]\nheartbeat_ticks = 10\n").unwrap_err();
    assert_eq!(e.key(), Some("raft.election_ticks"));
    assert_eq!(e.location().and_then(|l| l.line), None);

    let e = Config::from_toml_str("[volume]\nsize = 1G\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
    assert!(e.to_string().starts_with("line 2, column 8: not valid TOML"), "{e}");
    let e = Config::from_toml_str("[volume]\nimage = \"a\"\nimage = \"b\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("rblk-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[server]\nmax_connections = 0\n").unwrap();
    let e = Config::load(&path).unwrap_err();
    assert_eq!(e.to_string(), format!("{}:2:19: server.max_connections: must be at least 1, got 0", path.display()));
    assert_eq!(e.location().and_then(|l| l.file.clone()), Some(path.clone()));

    std::fs::write(&path, "[server]\nmax_conections = 1\n").unwrap();
    let e = Config::load(&path).unwrap_err();
    assert!(e.to_string().starts_with(&format!("{}:2:1: server.max_conections: unknown key", path.display())), "{e}");

    std::fs::write(&path, "[server\n").unwrap();
    let e = Config::load(&path).unwrap_err();
    assert!(e.to_string().starts_with(&format!("{}:1:", path.display())), "{e}");

    let missing = dir.join("missing.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(&e, ConfigError::Read { path, .. } if *path == missing), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
    assert!(std::error::Error::source(&e).is_some(), "the I/O error is the source");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn parse_size_table() {
    let ok: &[(&str, u64)] = &[
        ("0", 0),
        ("512", 512),
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("512M", 512 << 20),
        ("64 M", 64 << 20),
        ("16MiB", 16 << 20),
        ("1G", 1 << 30),
        ("1gib", 1 << 30),
        ("1T", 1 << 40),
        ("100B", 100),
        (" 8K ", 8192),
        ("18446744073709551615", u64::MAX),
        ("16777215T", 16777215 << 40),
    ];
    for &(s, want) in ok {
        assert_eq!(parse_size(s), Ok(want), "{s:?}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "expected a size"),
        ("K", "expected a size"),
        ("fast", "expected a size"),
        ("-1", "expected a size"),
        ("+1", "expected a size"),
        ("1X", "expected a size"),
        ("1KB", "units are binary"),
        ("1MB", "units are binary"),
        ("1.5G", "1536M"),
        ("1 G B", "expected a size"),
        ("0x1000", "expected a size"),
        ("1_000", "expected a size"),
        ("1P", "expected a size"),
        ("18446744073709551616", "too large"),
        ("16777216T", "too large"),
        ("17179869184G", "too large"),
        ("99999999999999999999999K", "too large"),
    ];
    for &(s, fragment) in bad {
        let e = parse_size(s).expect_err(s);
        assert!(e.contains(fragment), "{s:?} => {e}");
    }
}

#[test]
fn parse_duration_table() {
    let ok: &[(&str, Duration)] = &[
        ("0s", Duration::ZERO),
        ("0ms", Duration::ZERO),
        ("500ms", Duration::from_millis(500)),
        ("30s", Duration::from_secs(30)),
        ("5m", Duration::from_secs(300)),
        ("1h", Duration::from_secs(3600)),
        ("250us", Duration::from_micros(250)),
        ("250µs", Duration::from_micros(250)),
        ("7ns", Duration::from_nanos(7)),
        (" 10 s ", Duration::from_secs(10)),
        ("18446744073709551615s", Duration::from_secs(u64::MAX)),
        ("18446744073709551615999999999ns", Duration::MAX),
    ];
    for &(s, want) in ok {
        assert_eq!(parse_duration(s), Ok(want), "{s:?}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "expected a duration like 30s, 500ms or 5m"),
        ("fast", "got \"fast\""),
        ("30", "a unit is required"),
        ("s", "expected a duration"),
        ("1.5s", "1500ms"),
        ("-1s", "expected a duration"),
        ("5M", "expected a duration"),
        ("5S", "expected a duration"),
        ("1d", "expected a duration"),
        ("1min", "expected a duration"),
        ("1h30m", "expected a duration"),
        ("18446744073709551616s", "too large"),
        ("6000000000000000h", "too large"),
        ("18446744073709551616000000000ns", "too large"),
        ("999999999999999999999999999999999999999999h", "too large"),
    ];
    for &(s, fragment) in bad {
        let e = parse_duration(s).expect_err(s);
        assert!(e.contains(fragment), "{s:?} => {e}");
    }
}

#[test]
fn formats_use_the_largest_exact_unit_and_parse_back() {
    for (bytes, shown) in [(0, "0"), (512, "512"), (4096, "4K"), (64 << 20, "64M"), (3 << 30, "3G"), (1 << 40, "1T")] {
        assert_eq!(format_size(bytes), shown);
    }
    for bytes in [0, 1, 4097, 1 << 10, (1 << 40) * 3 + (1 << 20), u64::MAX, u64::MAX - 1023, 1 << 63] {
        assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
    }
    for (d, shown) in [
        (Duration::ZERO, "0s"),
        (Duration::from_millis(100), "100ms"),
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(300), "5m"),
        (Duration::from_secs(7200), "2h"),
        (Duration::new(1, 1), "1000000001ns"),
    ] {
        assert_eq!(format_duration(d), shown);
    }
    for d in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(3),
        Duration::new(59, 999_000_000),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ] {
        assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
    }
}

#[test]
fn log_levels_parse_for_the_file_and_rblk_log() {
    for level in LogLevel::ALL {
        assert_eq!(level.as_str().parse::<LogLevel>(), Ok(level));
        assert_eq!(level.to_string(), level.as_str());
    }
    assert_eq!("WARN".parse::<LogLevel>(), Ok(LogLevel::Warning));
    assert_eq!(" Debug ".parse::<LogLevel>(), Ok(LogLevel::Debug));
    assert!("verbose".parse::<LogLevel>().is_err());
    assert!(LogLevel::Trace < LogLevel::Critical, "ordered by severity");
    assert_eq!(Config::from_toml_str("[log]\nlevel = \"warn\"").unwrap().log.level, LogLevel::Warning);
}

#[test]
fn listen_addresses() {
    assert_eq!(Config::default().server.listen, None);
    for (text, host, port) in [
        ("127.0.0.1:10900", "127.0.0.1", 10900),
        ("0.0.0.0", "0.0.0.0", 10809),
        ("localhost:1", "localhost", 1),
        ("[::1]:10810", "::1", 10810),
        ("[::]", "::", 10809),
    ] {
        assert_eq!(parse_listen(text), Ok((host.to_string(), port)), "{text}");
        let c = Config::from_toml_str(&format!("[server]\nlisten = {text:?}\n")).unwrap();
        assert_eq!(c.server.listen.as_deref(), Some(text));
    }
    for bad in ["", ":10809", "host:", "host:0", "host:65536", "::1", "[::1", "[nothost]:1", "[::1]10809", "a b:1"] {
        assert!(parse_listen(bad).is_err(), "{bad:?} was accepted");
    }
    rejects("[server]\nlisten = \"host:0\"\n", "server.listen", "port must be 1 to 65535");
    rejects("[server]\nlisten = \"::1\"\n", "server.listen", "expected HOST:PORT");
}

#[test]
fn tls_settings() {
    let c = Config::default();
    assert_eq!((c.tls.mode, c.tls.certificates.clone(), c.tls.verify_peer), (config::TlsMode::Off, None, false));
    let c = Config::from_toml_str("[tls]\nmode = \"require\"\ncertificates = \"/etc/pki/rblk\"\nverify_peer = true\n")
        .unwrap();
    assert_eq!(c.tls.mode, config::TlsMode::Require);
    assert_eq!(c.tls.certificates, Some(PathBuf::from("/etc/pki/rblk")));
    rejects("[tls]\nmode = \"on\"\n", "tls.certificates", "must name a directory");
    rejects("[tls]\nverify_peer = true\n", "tls.verify_peer", "needs tls.mode");
    let e = Config::from_toml_str("[tls]\nmode = \"maybe\"\n").unwrap_err().to_string();
    assert!(e.contains("tls.mode") && e.contains("off") && e.contains("require"), "{e}");
}
