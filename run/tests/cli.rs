//! What `rblk` tells a user whose command fails: the message names the file and the step, and
//! the exit status is 2 for a refused command (1 for a chaos run that failed). Each runs the
//! binary on a scratch directory in well under a second; no driver is started.

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
    assert_eq!(code, Some(2));
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
        (Some(2), "rblk: v.img already holds an rblk volume; use --force to format over it\n")
    );
    let (code, err) = refused(&rblk(&[&args[..], &["--root-device", "nosuch.root"]].concat(), &dir.0));
    assert_eq!(code, Some(2));
    assert!(err.starts_with("rblk: nosuch.root: ") && err.contains("No such file or directory"), "{err}");
}

#[test]
fn inspect_names_the_image_whose_roots_are_unusable() {
    let dir = Scratch::new("cli-inspect");
    std::fs::write(dir.path("zero.img"), vec![0u8; 1 << 20]).expect("zero image");
    let (code, err) = refused(&rblk(&["inspect", "zero.img"], &dir.0));
    assert_eq!(code, Some(2));
    assert!(err.starts_with("rblk: zero.img: only 0 root slot(s) intact, need two that agree: slot 0: blank"), "{err}");
    let (code, err) = refused(&rblk(&["inspect", "nosuch.img"], &dir.0));
    assert_eq!(code, Some(2));
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
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(err.starts_with(&format!("rblk: {name}: {why}")), "{name}: {err}");
    }
    let (code, err) = refused(&rblk(&["chaos", "nosuch.toml"], &dir.0));
    assert_eq!(code, Some(2));
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
    assert_eq!(code, Some(2));
    assert!(err.starts_with("rblk: cannot read config file nosuch.toml: No such file or directory"), "{err}");
}
