//! Block status, structured replies and named exports with real clients: `qemu-img map`,
//! `nbdinfo --map` and `--list`, `nbdcopy`, `qemu-img convert` and `compare`, `qemu-io`.
//!
//! The tools come from Debian's qemu-utils and libnbd-bin; a missing one skips its test with a
//! message, or fails it under `RBLK_REQUIRE_CLIENTS=1` (as `scripts/test.sh` runs).

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{have, Scratch, Serve, MIB};

const K: u64 = 4096;

fn uri(serve: &Serve, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", serve.socket.display())
}

/// Runs `cmd`; its stdout and stderr, and whether it succeeded.
fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn run(cmd: &mut Command) -> String {
    let (ok, text) = output(cmd);
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}

fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let text = run(cmd.arg(uri));
    assert!(!text.contains("failed") && !text.contains("error"), "qemu-io reported a failure:\n{text}");
}

/// Merges neighbouring `(start, length, data)` extents of the same kind and checks that they
/// cover `0..size` in order.
fn merged(extents: Vec<(u64, u64, bool)>, size: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = 0;
    for (start, length, data) in extents {
        assert_eq!(start, at, "extents leave a gap or overlap at {at}");
        at += length;
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 += length,
            _ => out.push((start, length, data)),
        }
    }
    assert_eq!(at, size, "the extents cover the volume");
    out
}

/// What `qemu-img map --output=json` says: every extent with `data`, and each without data
/// must read as zeros.
fn qemu_img_map(uri: &str, size: u64) -> Vec<(u64, u64, bool)> {
    let text = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(uri));
    let map: serde_json::Value = serde_json::from_str(&text).expect("qemu-img map json");
    let extents = map
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            let data = e["data"].as_bool().expect("data");
            assert!(data || e["zero"] == true, "a hole that does not read as zeros: {e}");
            (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length"), data)
        })
        .collect();
    merged(extents, size)
}

/// What `nbdinfo --map --json` says (`base:allocation`: type 0 data, 3 hole and zero).
fn nbdinfo_map(uri: &str, size: u64) -> Vec<(u64, u64, bool)> {
    let text = run(Command::new("nbdinfo").args(["--map", "--json"]).arg(uri));
    let map: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo json");
    let extents = map
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            let kind = e["type"].as_u64().expect("type");
            assert!(kind == 0 || kind == 3, "unexpected extent type: {e}");
            (e["offset"].as_u64().expect("offset"), e["length"].as_u64().expect("length"), kind == 0)
        })
        .collect();
    merged(extents, size)
}

/// The expected map: `data` ranges (sorted, disjoint) and holes around them.
fn expected(data: &[(u64, u64)], size: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(start, length) in data {
        if start > at {
            out.push((at, start - at, false));
        }
        out.push((start, length, true));
        at = start + length;
    }
    if at < size {
        out.push((at, size - at, false));
    }
    out
}

/// Writes with qemu-io, trims one range and write-zeroes another; both maps then show exactly
/// the blocks that hold data, at 4 KiB granularity (a 512-byte write maps its whole block),
/// before and after a clean restart.
#[test]
fn maps_show_exactly_the_written_extents() {
    if !have("qemu-io") || !have("qemu-img") || !have("nbdinfo") {
        return;
    }
    let dir = Scratch::new("blockstatus-map");
    let serve = Serve::start_sized(&dir, "1G", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(60));
    let size = 1 << 30;
    let u = uri(&serve, "");
    qemu_io(
        &u,
        &[
            format!("write -P 1 {} 65536", MIB),
            format!("write -P 2 {} {}", 10 * MIB, MIB),
            format!("discard {} {}", 10 * MIB, 64 * K),
            format!("write -z {} {}", 10 * MIB + 128 * K, 32 * K),
            format!("write -P 3 {} 512", 20 * MIB + 512),
            format!("write -P 4 {} {}", 900 * MIB, 12 * K),
        ],
    );
    let data = [
        (MIB, 16 * K),
        (10 * MIB + 64 * K, 64 * K),
        (10 * MIB + 160 * K, MIB - 160 * K),
        (20 * MIB, K),
        (900 * MIB, 12 * K),
    ];
    let want = expected(&data, size);
    assert_eq!(qemu_img_map(&u, size), want, "qemu-img map");
    assert_eq!(nbdinfo_map(&u, size), want, "nbdinfo --map");
    // The holes read as zeros and the data is there.
    qemu_io(
        &u,
        &[
            format!("read -P 0 {} {}", 10 * MIB, 64 * K),
            format!("read -P 2 {} {}", 10 * MIB + 64 * K, 64 * K),
            format!("read -P 0 {} {}", 10 * MIB + 128 * K, 32 * K),
            format!("read -P 3 {} 512", 20 * MIB + 512),
            format!("read -P 0 {} 512", 20 * MIB),
        ],
    );
    // A trim of a whole extent makes it a hole again; a clean restart keeps the map.
    qemu_io(&u, &[format!("discard {} {}", 900 * MIB, 12 * K)]);
    let want = expected(&data[..4], size);
    assert_eq!(qemu_img_map(&u, size), want, "after a trim");
    assert!(serve.stop().success());
    let serve = Serve::start_sized(&dir, "1G", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(60));
    assert_eq!(nbdinfo_map(&uri(&serve, "rblk"), size), want, "after a restart");
    assert!(serve.stop().success());
}

/// `nbdcopy` and `qemu-img convert` of a mostly empty 8 GiB volume skip its holes: the copies
/// are identical to the volume (`qemu-img compare`, and the written ranges read back byte for
/// byte) and sparse.
#[test]
fn copies_of_a_mostly_empty_volume_are_sparse_and_exact() {
    if !have("qemu-io") || !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let dir = Scratch::new("blockstatus-copy");
    let serve = Serve::start_sized(&dir, "8G", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(60));
    let u = uri(&serve, "rblk");
    let ranges = [(0, MIB, 0x11u8), (3 << 30, 256 * K, 0x22), ((8 << 30) - 2 * MIB, 2 * MIB, 0x33)];
    qemu_io(&u, &ranges.iter().map(|(at, len, p)| format!("write -P {p} {at} {len}")).collect::<Vec<_>>());
    let by_nbdcopy = dir.path("nbdcopy.raw");
    let by_qemu = dir.path("convert.raw");
    run(Command::new("nbdcopy").arg(&u).arg(&by_nbdcopy));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&u).arg(&by_qemu));
    for copy in [&by_nbdcopy, &by_qemu] {
        let meta = std::fs::metadata(copy).expect("copy");
        assert_eq!(meta.len(), 8 << 30, "{copy:?}");
        let allocated = meta.blocks() * 512;
        assert!(allocated < 64 * MIB, "{copy:?} is not sparse: {allocated} bytes allocated");
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&u).arg(copy));
        let file = std::fs::File::open(copy).expect("open");
        for &(at, len, pattern) in &ranges {
            let mut buf = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at).expect("read");
            assert!(buf.iter().all(|b| *b == pattern), "{copy:?} at {at}");
        }
        let mut edge = vec![1u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut edge, MIB).expect("read");
        assert!(edge.iter().all(|b| *b == 0), "{copy:?}: a hole is not zeros");
    }
    assert!(serve.stop().success());
}

/// A volume exported as "vol": `nbdinfo --list` names it; "vol" and "" reach it with qemu-io,
/// qemu-img and nbdinfo; a wrong name fails cleanly with each (an error, no hang) and the
/// server goes on serving.
#[test]
fn export_names_are_checked() {
    if !have("qemu-io") || !have("qemu-img") || !have("nbdinfo") {
        return;
    }
    let dir = Scratch::new("blockstatus-names");
    let serve = Serve::start_sized(&dir, "64M", "[server]\nexport_name = \"vol\"\n", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(60));

    let text = run(Command::new("nbdinfo").args(["--list", "--json"]).arg(uri(&serve, "")));
    let list: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo json");
    let exports = list["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{text}");
    assert_eq!(exports[0]["export-name"], "vol", "{text}");
    assert_eq!(exports[0]["description"], "rblk volume", "{text}");

    for name in ["vol", ""] {
        let u = uri(&serve, name);
        qemu_io(&u, &[format!("write -P 5 {} 4096", name.len() as u64 * K), "flush".into()]);
        let info = run(Command::new("qemu-img").args(["info", "-f", "raw"]).arg(&u));
        assert!(info.contains("67108864"), "qemu-img info {name:?}: {info}");
        let text = run(Command::new("nbdinfo").arg("--json").arg(&u));
        let info: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo json");
        let export = &info["exports"][0];
        assert_eq!(export["export-size"], 64 * MIB, "{text}");
        let contexts = export["contexts"].as_array().expect("contexts");
        assert!(contexts.iter().any(|c| c == "base:allocation"), "{text}");
        for flag in ["can_cache", "can_df"] {
            assert_eq!(export[flag], true, "{flag}: {text}");
        }
    }
    let driver = serve.driver_pid();
    let wrong = uri(&serve, "wrong");
    let attempts: [(&str, Command); 3] = [
        ("qemu-io", {
            let mut c = Command::new("qemu-io");
            c.args(["-f", "raw", "-c", "read 0 4096"]).arg(&wrong);
            c
        }),
        ("qemu-img", {
            let mut c = Command::new("qemu-img");
            c.args(["info", "-f", "raw"]).arg(&wrong);
            c
        }),
        ("nbdinfo", {
            let mut c = Command::new("nbdinfo");
            c.arg(&wrong);
            c
        }),
    ];
    for (tool, mut cmd) in attempts {
        let (ok, text) = output(&mut cmd);
        assert!(!ok, "{tool} reached export \"wrong\":\n{text}");
        assert!(text.contains("wrong") || text.to_lowercase().contains("export"), "{tool} says why:\n{text}");
    }
    // Both writes are there, and the driver that refused the names still serves.
    qemu_io(&uri(&serve, "vol"), &["read -P 5 0 4096".into(), format!("read -P 5 {} 4096", 3 * K)]);
    assert_eq!(serve.driver_pid(), driver, "the driver was not restarted:\n{}", serve.log_tail());
    assert!(serve.stop().success());
}
