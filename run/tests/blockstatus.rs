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
    // The 100 MiB range takes more than one block status reply (each walks at most 64 MiB
    // of mapped blocks).
    let ranges =
        [(0, MIB, 0x11u8), (3 << 30, 256 * K, 0x22), (5 << 30, 100 * MIB, 0x44), ((8 << 30) - 2 * MIB, 2 * MIB, 0x33)];
    let written: u64 = ranges.iter().map(|r| r.1).sum();
    qemu_io(&u, &ranges.iter().map(|(at, len, p)| format!("write -P {p} {at} {len}")).collect::<Vec<_>>());
    let data: Vec<(u64, u64)> = ranges.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(qemu_img_map(&u, 8 << 30), expected(&data, 8 << 30), "qemu-img map");
    if have("nbdinfo") {
        assert_eq!(nbdinfo_map(&u, 8 << 30), expected(&data, 8 << 30), "nbdinfo --map");
    }
    let by_nbdcopy = dir.path("nbdcopy.raw");
    let by_qemu = dir.path("convert.raw");
    run(Command::new("nbdcopy").arg(&u).arg(&by_nbdcopy));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&u).arg(&by_qemu));
    for copy in [&by_nbdcopy, &by_qemu] {
        let meta = std::fs::metadata(copy).expect("copy");
        assert_eq!(meta.len(), 8 << 30, "{copy:?}");
        let allocated = meta.blocks() * 512;
        assert!(allocated < written + 16 * MIB, "{copy:?} is not sparse: {allocated} bytes allocated");
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

/// A client written byte by byte (proto.md), to see the replies themselves: structured
/// replies on, `base:allocation` selected, the default export.
struct Raw {
    s: std::os::unix::net::UnixStream,
    context: u32,
}

/// A reply: simple `(error, None)`, or a structured chunk `(flags, Some((type, payload)))`.
type Reply = (u64, u32, Option<(u16, Vec<u8>)>);

impl Raw {
    fn connect(serve: &Serve) -> Raw {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&serve.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        s.write_all(&3u32.to_be_bytes()).expect("client flags");
        let mut raw = Raw { s, context: 0 };
        assert_eq!(raw.option(8, &[]), vec![(1, vec![])], "NBD_OPT_STRUCTURED_REPLY");
        let mut meta = 0u32.to_be_bytes().to_vec();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        let replies = raw.option(10, &meta);
        assert_eq!(replies.len(), 2, "one context and the ACK: {replies:?}");
        assert_eq!((replies[0].0, &replies[0].1[4..]), (4, &b"base:allocation"[..]));
        raw.context = u32::from_be_bytes(replies[0].1[..4].try_into().expect("id"));
        let replies = raw.option(7, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(replies.last().map(|r| r.0), Some(1), "NBD_OPT_GO: {replies:?}");
        raw
    }

    /// Sends an option and reads its replies up to the final one: (type, data) each.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        use std::io::{Read, Write};
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("option");
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).expect("option reply");
            let reply_type = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize];
            self.s.read_exact(&mut data).expect("option reply data");
            out.push((reply_type, data));
            // NBD_REP_META_CONTEXT (4) and NBD_REP_INFO (3) are followed by more.
            if reply_type != 3 && reply_type != 4 {
                return out;
            }
        }
    }

    fn send(&mut self, flags: u16, command: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
        use std::io::Write;
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&command.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).expect("request");
    }

    /// Reads one reply (without data for a simple one: only reads carry data, and they are
    /// structured here).
    fn reply(&mut self) -> Reply {
        use std::io::Read;
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        match u32::from_be_bytes(magic) {
            0x6744_6698 => {
                let mut rest = [0u8; 12];
                self.s.read_exact(&mut rest).expect("simple reply");
                let handle = u64::from_be_bytes(rest[4..].try_into().expect("8"));
                (handle, u32::from_be_bytes(rest[..4].try_into().expect("4")), None)
            }
            0x668e_33ef => {
                let mut rest = [0u8; 16];
                self.s.read_exact(&mut rest).expect("chunk header");
                let flags = u16::from_be_bytes([rest[0], rest[1]]);
                let kind = u16::from_be_bytes([rest[2], rest[3]]);
                let handle = u64::from_be_bytes(rest[4..12].try_into().expect("8"));
                let mut payload = vec![0u8; u32::from_be_bytes(rest[12..].try_into().expect("4")) as usize];
                self.s.read_exact(&mut payload).expect("chunk payload");
                (handle, u32::from(flags), Some((kind, payload)))
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// A structured read: its chunks put together (checked to cover the request exactly once,
    /// the last one alone marked done), and the number of (data, hole) chunks.
    fn read(&mut self, handle: u64, flags: u16, offset: u64, length: u32) -> (Vec<u8>, usize, usize) {
        self.send(flags, 0, handle, offset, length, &[]);
        let mut data = vec![0xeeu8; length as usize];
        let mut covered = vec![false; length as usize];
        let (mut datas, mut holes) = (0, 0);
        loop {
            let (h, chunk_flags, chunk) = self.reply();
            let (kind, payload) = chunk.expect("a read is answered with chunks");
            assert_eq!(h, handle);
            let at = (u64::from_be_bytes(payload[..8].try_into().expect("8")) - offset) as usize;
            let len = match kind {
                1 => {
                    datas += 1;
                    let len = payload.len() - 8;
                    data[at..at + len].copy_from_slice(&payload[8..]);
                    len
                }
                2 => {
                    holes += 1;
                    let len = u32::from_be_bytes(payload[8..12].try_into().expect("4")) as usize;
                    data[at..at + len].fill(0);
                    len
                }
                other => panic!("chunk type {other:#x} in a read"),
            };
            assert!(len > 0 && covered[at..at + len].iter().all(|c| !c), "chunks overlap at {at}");
            covered[at..at + len].fill(true);
            if chunk_flags & 1 != 0 {
                assert!(covered.iter().all(|c| *c), "the final chunk came before the read was covered");
                return (data, datas, holes);
            }
        }
    }

    /// Block status of a range: the context id and the (length, flags) descriptors.
    fn status(&mut self, handle: u64, flags: u16, offset: u64, length: u32) -> Vec<(u32, u32)> {
        self.send(flags, 7, handle, offset, length, &[]);
        let (h, chunk_flags, chunk) = self.reply();
        let (kind, payload) = chunk.expect("a structured reply");
        assert_eq!((h, chunk_flags, kind), (handle, 1, 5), "one final BLOCK_STATUS chunk");
        assert_eq!(u32::from_be_bytes(payload[..4].try_into().expect("4")), self.context);
        payload[4..]
            .chunks_exact(8)
            .map(|d| {
                (u32::from_be_bytes(d[..4].try_into().expect("4")), u32::from_be_bytes(d[4..].try_into().expect("4")))
            })
            .collect()
    }
}

/// The replies themselves: block status bounded (2048 descriptors for a range with more, one
/// with REQ_ONE, never beyond the request), following a write as soon as it is acknowledged;
/// a read with DF is one OFFSET_DATA chunk; a refused read an ERROR chunk; CACHE succeeds.
#[test]
fn replies_are_structured_bounded_and_follow_every_write() {
    let dir = Scratch::new("blockstatus-raw");
    let serve = Serve::start_sized(&dir, "64M", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(60));
    let mut raw = Raw::connect(&serve);
    // Every other block of the first 6000 written: 6000 extents.
    let block = vec![0x6bu8; K as usize];
    for round in 0..12u64 {
        for i in 0..250u64 {
            let n = round * 250 + i;
            raw.send(0, 1, n, 2 * n * K, K as u32, &block);
        }
        for _ in 0..250 {
            let (_, error, chunk) = raw.reply();
            assert_eq!((error, chunk), (0, None), "write");
        }
    }
    let size = 64 * MIB as u32;
    let all = raw.status(1, 0, 0, size);
    assert_eq!(all.len(), 2048, "bounded");
    for (i, d) in all.iter().enumerate() {
        assert_eq!(*d, (K as u32, if i % 2 == 0 { 0 } else { 3 }), "descriptor {i}");
    }
    assert_eq!(raw.status(2, 8, 0, size), vec![(K as u32, 0)], "REQ_ONE");
    assert_eq!(raw.status(3, 8, K, size - K as u32), vec![(K as u32, 3)], "REQ_ONE on a hole");
    // Cut to the request, at 512-byte offsets too.
    assert_eq!(raw.status(4, 0, 512, 1024), vec![(1024, 0)]);
    assert_eq!(raw.status(5, 0, 12_000 * K, size - 12_000 * K as u32), vec![(size - 12_000 * K as u32, 3)]);

    // A write is in the map as soon as it is acknowledged.
    raw.send(0, 1, 6, K, K as u32, &block);
    assert_eq!(raw.reply(), (6, 0, None));
    assert_eq!(raw.status(7, 8, K, K as u32), vec![(K as u32, 0)]);

    // A read with DF: one final OFFSET_DATA chunk with the offset and all the data.
    raw.send(4, 0, 8, 2 * K, 2 * K as u32, &[]);
    let (handle, flags, chunk) = raw.reply();
    let (kind, payload) = chunk.expect("structured");
    assert_eq!((handle, flags, kind), (8, 1, 1));
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().expect("8")), 2 * K);
    assert!(payload[8..8 + K as usize].iter().all(|b| *b == 0x6b) && payload[8 + K as usize..].iter().all(|b| *b == 0));
    assert_eq!(payload.len(), 8 + 2 * K as usize);
    // Without DF, a read's holes come as OFFSET_HOLE chunks; with DF it is one data chunk.
    raw.send(0, 1, 12, 32 * MIB + 64 * K, 16 * K as u32, &vec![0x7au8; 16 * K as usize]);
    assert_eq!(raw.reply(), (12, 0, None));
    let mut want = vec![0u8; 256 * K as usize];
    want[64 * K as usize..80 * K as usize].fill(0x7a);
    let (got, datas, holes) = raw.read(13, 0, 32 * MIB, 256 * K as u32);
    assert!(got == want, "a read with holes differs");
    assert_eq!((datas, holes), (1, 2), "hole, data, hole");
    let (got, datas, holes) = raw.read(14, 4, 32 * MIB, 256 * K as u32);
    assert!(got == want, "a read with DF differs");
    assert_eq!((datas, holes), (1, 0), "DF: one chunk");
    // Blocks 0, 1, 2 and every even one after are written (510 runs in 512 blocks): the
    // first 64 runs looked up are chunks, the rest goes as one data chunk.
    let mut want = vec![0u8; 512 * K as usize];
    for b in (0..512).filter(|b| b % 2 == 0 || *b < 3) {
        want[b * K as usize..(b + 1) * K as usize].fill(0x6b);
    }
    let (got, datas, holes) = raw.read(15, 0, 0, 512 * K as u32);
    let first = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(first.is_none(), "a read cut into chunks differs from byte {first:?}");
    assert_eq!((datas, holes), (33, 32), "64 runs looked up, then the rest");
    // A read past the end: an ERROR chunk with EINVAL.
    raw.send(0, 0, 9, u64::from(size), 4096, &[]);
    let (handle, flags, chunk) = raw.reply();
    let (kind, payload) = chunk.expect("structured");
    assert_eq!((handle, flags, kind), (9, 1, 0x8001));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().expect("4")), 22);
    // CACHE: checked like a read, answered at once.
    raw.send(0, 5, 10, 0, 8 << 20, &[]);
    assert_eq!(raw.reply(), (10, 0, None));
    raw.send(0, 5, 11, u64::from(size), 4096, &[]);
    assert_eq!(raw.reply(), (11, 22, None));
    assert!(serve.stop().success());
}
