//! The command line as a user meets it: help and version on stdout with status 0, usage
//! errors on stderr with status 2, runtime errors that name the file and the step with status
//! 1 (as does a chaos run that failed), `--flag=value`, `serve --print-config`, man pages and
//! completions. Each runs the binary on a scratch directory in well under a second; no
//! driver is started.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Scratch;

fn rblk(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rblk")).args(args).current_dir(dir).output().expect("run rblk")
}

/// Exit status and stderr, for a command that must fail.
fn refused(out: &Output) -> (Option<i32>, String) {
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn format_refuses_sizes_that_are_not_whole_blocks() {
    let dir = Scratch::new("cli-sizes");
    let (code, err) = refused(&rblk(&["format", "v.img", "--size", "1000"], &dir.0));
    assert_eq!((code, err.as_str()), (Some(2), "rblk: --size 1000 is not a positive multiple of 4096 bytes\n"));
    let (code, err) = refused(&rblk(&["format", "v.img", "--size", "4096", "--log-size", "1000"], &dir.0));
    assert_eq!((code, err.as_str()), (Some(2), "rblk: --log-size 1000 is not a multiple of 4096 bytes\n"));
}

#[test]
fn format_names_the_image_and_the_step_that_failed() {
    let dir = Scratch::new("cli-create");
    let (code, err) = refused(&rblk(&["format", "nodir/v.img", "--size", "1M", "--log-size", "1M"], &dir.0));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("rblk: nodir/v.img: create: ") && err.contains("No such file or directory"), "{err}");
}

#[test]
fn format_refuses_to_format_over_a_volume_without_force() {
    let dir = Scratch::new("cli-force");
    let args = ["format", "v.img", "--size", "1M", "--log-size", "1M"];
    assert!(rblk(&args, &dir.0).status.success());
    let (code, err) = refused(&rblk(&args, &dir.0));
    assert_eq!(
        (code, err.as_str()),
        (Some(1), "rblk: v.img already holds an rblk volume; use --force to format over it\n")
    );
    let (code, err) = refused(&rblk(&[&args[..], &["--root-device", "nosuch.root"]].concat(), &dir.0));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("rblk: nosuch.root: ") && err.contains("No such file or directory"), "{err}");
}

#[test]
fn inspect_names_the_image_whose_roots_are_unusable() {
    let dir = Scratch::new("cli-inspect");
    std::fs::write(dir.path("zero.img"), vec![0u8; 1 << 20]).expect("zero image");
    let (code, err) = refused(&rblk(&["inspect", "zero.img"], &dir.0));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("rblk: zero.img: only 0 root slot(s) intact, need two that agree: slot 0: blank"), "{err}");
    let (code, err) = refused(&rblk(&["inspect", "nosuch.img"], &dir.0));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("rblk: nosuch.img: ") && err.contains("No such file or directory"), "{err}");
}

#[test]
fn chaos_names_the_scenario_file_and_the_key_it_refuses() {
    let dir = Scratch::new("cli-chaos");
    let cases = [
        ("unknown.toml", "bogus = 1\n", "bogus: unknown key"),
        ("writers.toml", "writers = 0\n", "writers: expected 1..=64, got 0"),
        ("kill.toml", "kill_every = [\"1s\"]\n", "kill_every: expected [\"min\", \"max\"]"),
        ("expect.toml", "expect = \"maybe\"\n", "expect: expected \"survive\" or \"give-up\", got \"maybe\""),
        ("size.toml", "size = \"abc\"\n", "size: expected a size like"),
    ];
    for (name, text, why) in cases {
        std::fs::write(dir.path(name), text).expect("scenario");
        let (code, err) = refused(&rblk(&["chaos", name], &dir.0));
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.starts_with(&format!("rblk: {name}: {why}")), "{name}: {err}");
    }
    let (code, err) = refused(&rblk(&["chaos", "nosuch.toml"], &dir.0));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("rblk: nosuch.toml: ") && err.contains("No such file or directory"), "{err}");
}

#[test]
fn chaos_with_a_bad_server_config_is_a_failed_run() {
    let dir = Scratch::new("cli-chaos-config");
    std::fs::write(dir.path("bad.toml"), "duration = \"1s\"\nconfig = '''\n[[[bad\n'''\n").expect("scenario");
    let out = rblk(&["chaos", "bad.toml", "--seed", "5", "--dir", "run"], &dir.0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with(
            "chaos bad: FAILED (seed 5; the run directory run is kept): scenario config: TOML parse error"
        ),
        "{stdout}"
    );
}

#[test]
fn serve_says_why_its_config_file_cannot_be_read() {
    let dir = Scratch::new("cli-config");
    let (code, err) = refused(&rblk(&["serve", "v.img", "--config", "nosuch.toml"], &dir.0));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("rblk: cannot read config file nosuch.toml: No such file or directory"), "{err}");
}

/// Stdout of a command that must succeed, with nothing on stderr.
fn succeeds(args: &[&str], dir: &Path) -> String {
    let out = rblk(args, dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "rblk {args:?}: {stderr}");
    assert!(stderr.is_empty(), "rblk {args:?} wrote on stderr: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The options each subcommand has, as its help must show them.
const OPTIONS: &[(&str, &[&str])] = &[
    ("format", &["--size", "--log-size", "--root-device", "--force", "--preallocate"]),
    (
        "serve",
        &[
            "--socket",
            "--listen",
            "--vhost-user",
            "--tls",
            "--tls-certificates",
            "--tls-verify-peer",
            "--config",
            "--size",
            "--read-only",
            "--export-name",
            "--print-config",
        ],
    ),
    ("inspect", &["--root-device", "--json"]),
    ("chaos", &["--seed", "--duration", "--dir"]),
    ("status", &["--json"]),
];

#[test]
fn help_is_on_stdout_with_status_0() {
    let dir = Scratch::new("cli-help");
    for top in [&["--help"][..], &["help"], &["-h"]] {
        let text = succeeds(top, &dir.0);
        assert!(text.contains("Usage: rblk <COMMAND>"), "{text}");
        for (sub, _) in OPTIONS {
            assert!(text.contains(&format!("\n  {sub} ")), "{top:?} does not list {sub}: {text}");
        }
    }
    for (sub, options) in OPTIONS {
        let by_help = succeeds(&["help", sub], &dir.0);
        let by_flag = succeeds(&[sub, "--help"], &dir.0);
        assert_eq!(by_help, by_flag, "rblk help {sub} and rblk {sub} --help differ");
        assert!(by_help.contains(&format!("Usage: rblk {sub} ")), "{by_help}");
        // Each option on a line of its own (long help), its description on the next.
        let lines: Vec<&str> = by_help.lines().collect();
        for option in *options {
            let at = lines
                .iter()
                .position(|l| {
                    let l = l.trim_start();
                    l.starts_with(option) && !l[option.len()..].starts_with('-')
                })
                .unwrap_or_else(|| panic!("rblk help {sub} does not show {option}:\n{by_help}"));
            let described = lines.get(at + 1).is_some_and(|l| l.trim().len() > 10);
            assert!(described, "rblk help {sub}: {option} has no description:\n{by_help}");
        }
    }
}

#[test]
fn version_names_the_on_disk_format() {
    let dir = Scratch::new("cli-version");
    let text = succeeds(&["--version"], &dir.0);
    assert!(text.starts_with(&format!("rblk {} ", env!("CARGO_PKG_VERSION"))), "{text}");
    let log = format!("log {}", raft_state::log::LOG_FORMAT_VERSION);
    let roots = format!("roots {}", raft_state::roots::ROOT_FORMAT_VERSION);
    assert!(text.contains(&log) && text.contains(&roots), "{text}");
    assert_eq!(succeeds(&["-V"], &dir.0), text);
}

#[test]
fn usage_errors_exit_2_with_the_reason_on_stderr() {
    let dir = Scratch::new("cli-usage");
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--bogus"], "unexpected argument '--bogus'"),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (&["format", "v.img"], "--size <SIZE>"),
        (&["format", "v.img", "--size", "ten"], "expected a size like"),
        (&["chaos", "s.toml", "--seed", "x"], "invalid value 'x' for '--seed <N>'"),
        (&["chaos", "s.toml", "--duration", "5"], "expected a duration like"),
        (&["serve", "--socket"], "a value is required for '--socket <PATH>'"),
        (&["serve", "--tls", "maybe"], "invalid value 'maybe' for '--tls <MODE>'"),
        (&["serve", "--listen", "host:port"], "invalid value 'host:port' for '--listen <HOST:PORT>'"),
        (&[], "Usage: rblk <COMMAND>"),
    ];
    for (args, why) in cases {
        let out = rblk(args, &dir.0);
        let (code, err) = refused(&out);
        assert_eq!(code, Some(2), "rblk {args:?}: {err}");
        assert!(err.contains(why), "rblk {args:?}: {err}");
        assert!(out.stdout.is_empty(), "rblk {args:?} wrote on stdout");
    }
    // Nothing was made.
    assert_eq!(std::fs::read_dir(&dir.0).expect("scratch").count(), 0);
}

#[test]
fn flags_take_their_value_after_an_equals_sign() {
    let dir = Scratch::new("cli-equals");
    let joined = succeeds(&["format", "v.img", "--size=1M", "--log-size=64K"], &dir.0);
    let apart = succeeds(&["format", "w.img", "--size", "1M", "--log-size", "64K"], &dir.0);
    // The summaries differ only in the image's name (and the random volume id).
    let geometry = |s: &str, name: &str| s.replace(name, "IMAGE").split(", volume id").next().map(String::from);
    assert_eq!(geometry(&joined, "v.img"), geometry(&apart, "w.img"), "{joined}\n{apart}");
    assert!(joined.contains("volume 1 MiB"), "{joined}");
    for image in ["v.img", "w.img"] {
        let report = succeeds(&["inspect", image, "--json"], &dir.0);
        let report: serde_json::Value = serde_json::from_str(&report).expect("inspect json");
        assert!(report.to_string().contains(&(1u64 << 20).to_string()), "{image} is not 1M: {report}");
    }
    // Both geometries are the same: same file size.
    let len = |p: &str| std::fs::metadata(dir.path(p)).expect("image").len();
    assert_eq!(len("v.img"), len("w.img"));
}

#[test]
fn print_config_shows_file_and_flags_and_reads_back() {
    let dir = Scratch::new("cli-print-config");
    std::fs::write(dir.path("in.toml"), "[server]\nmax_connections = 7\nread_only = false\n[cache]\nnodes = 99\n")
        .expect("config");
    let printed = succeeds(
        &[
            "serve",
            "--config=in.toml",
            "--print-config",
            "my.img",
            "--socket=my.sock",
            "--size=2G",
            "--read-only",
            "--export-name",
            "disk0",
            "--listen=127.0.0.1:10900",
            "--vhost-user",
            "vm.sock",
            "--tls=on",
            "--tls-certificates",
            "certs",
        ],
        &dir.0,
    );
    let got = config::Config::from_toml_str(&printed).expect("the printed config parses");
    let mut want = config::Config::load(dir.path("in.toml")).expect("in.toml");
    want.volume.image = "my.img".into();
    want.server.socket = "my.sock".into();
    want.volume.size = 2 << 30;
    want.server.read_only = true;
    want.server.export_name = "disk0".into();
    want.server.listen = Some("127.0.0.1:10900".into());
    want.server.vhost_user_socket = Some("vm.sock".into());
    want.tls.mode = config::TlsMode::On;
    want.tls.certificates = Some("certs".into());
    assert_eq!(got, want, "{printed}");
    assert_ne!(want, config::Config::default());
    // Fed back as the config file, it prints itself.
    std::fs::write(dir.path("out.toml"), &printed).expect("out.toml");
    assert_eq!(succeeds(&["serve", "--config", "out.toml", "--print-config"], &dir.0), printed);
    // Without a file, the defaults.
    let defaults = succeeds(&["serve", "--print-config"], &dir.0);
    assert_eq!(config::Config::from_toml_str(&defaults).expect("defaults parse"), config::Config::default());
    assert!(printed.contains("vhost_user_socket = \"vm.sock\"\n"), "{printed}");
    // Nothing was served: no image, no socket.
    for name in ["my.img", "my.sock", "vm.sock", "rblk.img", "rblk.sock"] {
        assert!(!dir.path(name).exists(), "--print-config made {name}");
    }
    // A flag that breaks a rule is refused as the file would be.
    let long = "s".repeat(200);
    let (code, err) = refused(&rblk(&["serve", "--print-config", "--socket", &long], &dir.0));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("server.socket"), "{err}");
}

#[test]
fn man_pages_and_completions_are_generated() {
    let dir = Scratch::new("cli-generate");
    succeeds(&["generate", "man", "man"], &dir.0);
    for page in ["rblk.1", "rblk-format.1", "rblk-serve.1", "rblk-inspect.1", "rblk-chaos.1"] {
        let text = std::fs::read_to_string(dir.path("man").join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page: {text}");
    }
    let serve = std::fs::read_to_string(dir.path("man/rblk-serve.1")).expect("rblk-serve.1");
    assert!(serve.contains("print\\-config"), "{serve}");
    // Rendered by man where it is installed (optional: man pages are a packaging nicety).
    let man = Command::new("man").env("MANWIDTH", "100").arg("-l").arg(dir.path("man/rblk-serve.1")).output();
    match man {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).replace('‐', "-");
            assert!(text.contains("--print-config") && text.contains("--export-name"), "{text}");
        }
        _ => eprintln!("man -l did not run; the generated pages were not rendered"),
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = succeeds(&["generate", "completions", shell], &dir.0);
        for word in ["serve", "format", "inspect", "print-config", "export-name"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, _) = refused(&rblk(&["generate", "completions", "tcsh"], &dir.0));
    assert_eq!(code, Some(2));
}

/// `--vhost-user` overrides `[server] vhost_user_socket` both ways: a path sets it, "" turns a
/// file's vhost-user session off; a path the socket rules refuse is refused naming the key.
#[test]
fn print_config_shows_the_vhost_user_socket() {
    let dir = Scratch::new("cli-vhost-user");
    let set = succeeds(&["serve", "--print-config", "--vhost-user", "/run/rblk/vm0.sock"], &dir.0);
    assert!(set.contains("vhost_user_socket = \"/run/rblk/vm0.sock\"\n"), "{set}");
    let cfg = config::Config::from_toml_str(&set).expect("parses");
    assert_eq!(cfg.server.vhost_user_socket.as_deref(), Some(Path::new("/run/rblk/vm0.sock")));
    let defaults = succeeds(&["serve", "--print-config"], &dir.0);
    assert!(defaults.contains("vhost_user_socket = \"\"\n"), "{defaults}");
    std::fs::write(dir.path("vm.toml"), "[server]\nvhost_user_socket = \"vm.sock\"\n").expect("config");
    let off = succeeds(&["serve", "--config", "vm.toml", "--vhost-user", "", "--print-config"], &dir.0);
    assert_eq!(config::Config::from_toml_str(&off).expect("parses"), config::Config::default(), "{off}");
    let (code, err) = refused(&rblk(&["serve", "--print-config", "--vhost-user", "rblk.sock"], &dir.0));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("server.vhost_user_socket") && err.contains("must differ from server.socket"), "{err}");
}

/// A `--vhost-user` path that names a file which is not a socket is refused like `--socket`'s,
/// and the file kept.
#[test]
fn serve_never_replaces_a_file_with_the_vhost_user_socket() {
    let dir = Scratch::new("cli-vhost-not-a-socket");
    std::fs::write(dir.path("precious.img"), b"data that must survive").expect("file");
    let out = rblk(&["serve", "v.img", "--size", "64M", "--vhost-user", "precious.img"], &dir.0);
    let (code, stderr) = refused(&out);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("precious.img exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(dir.path("precious.img")).expect("kept"), b"data that must survive");
}

/// A `--socket` that names a file which is not a socket (a mistyped path, an image) is
/// refused and the file kept; a stale socket file is still replaced.
#[test]
fn serve_never_replaces_a_file_that_is_not_a_socket() {
    let dir = Scratch::new("cli-not-a-socket");
    let precious = dir.path("precious.img");
    std::fs::write(&precious, b"data that must survive").expect("file");
    let out = rblk(&["serve", "v.img", "--size", "64M", "--socket", precious.to_str().expect("utf-8")], &dir.0);
    let (code, stderr) = refused(&out);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&precious).expect("kept"), b"data that must survive");
    // A socket nobody listens on is stale: replaced, and served.
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .args(["serve", "v.img", "--size", "64M", "--socket"])
        .arg(&stale)
        .current_dir(&dir.0)
        .env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(serve.stdout.take().expect("stdout")), &mut line)
        .expect("uri");
    assert!(line.starts_with("nbd+unix://"), "{line}");
    let _ = serve.kill();
    let _ = serve.wait();
}
