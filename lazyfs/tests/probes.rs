//! Probes of the layer alone, through the real kernel: what survives a cut and what does not,
//! for each way a program makes a write durable (or believes it does). The power-cut test of
//! rblk relies on exactly these.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed probe

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const K4: usize = 4096;

/// Whether FUSE can be mounted here; without it the probes fail under
/// `RBLK_REQUIRE_CLIENTS=1` and skip otherwise.
fn fuse_available() -> bool {
    let tool = Command::new("sh").arg("-c").arg("command -v fusermount3").stdout(Stdio::null()).status();
    let ok = Path::new("/dev/fuse").exists() && tool.is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("RBLK_REQUIRE_CLIENTS").is_none(), "/dev/fuse and fusermount3 are required");
        eprintln!("skipped: /dev/fuse or fusermount3 is missing");
    }
    ok
}

/// A scratch directory with a backing directory and a mount point, and the lazyfs binary
/// serving it.
struct Fs {
    dir: PathBuf,
    child: Option<Child>,
}

impl Fs {
    fn new(name: &str) -> Fs {
        let dir = std::env::temp_dir().join(format!("lazyfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("backing")).unwrap();
        std::fs::create_dir_all(dir.join("mnt")).unwrap();
        Fs { dir, child: None }
    }

    fn mount(&mut self, args: &[&str]) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lazyfs"))
            .arg(self.dir.join("backing"))
            .arg(self.dir.join("mnt"))
            .arg("--control")
            .arg(self.dir.join("control.sock"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "mounted");
        self.child = Some(child);
    }

    fn unmount(&mut self) {
        lazyfs::unmount(&self.dir.join("mnt")).unwrap();
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "lazyfs exits cleanly after the unmount: {status}");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join("mnt").join(name)
    }

    fn command(&self, line: &str) -> String {
        let mut stream = UnixStream::connect(self.dir.join("control.sock")).unwrap();
        writeln!(stream, "{line}").unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }

    /// A counter from `status`.
    fn counter(&self, name: &str) -> u64 {
        let status = self.command("status");
        let field = status.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}=")));
        field.unwrap_or_else(|| panic!("no {name} in {status:?}")).parse().unwrap()
    }

    /// A file of `len` zero bytes, made durable.
    fn durable_file(&self, name: &str, len: u64) -> File {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(self.path(name)).unwrap();
        file.set_len(len).unwrap();
        file.sync_all().unwrap();
        file
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(self.dir.join("mnt")).status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 4 KiB of `byte`, aligned for O_DIRECT.
struct Aligned(Box<[u8]>, usize);

impl Aligned {
    fn new(byte: u8) -> Aligned {
        let raw = vec![byte; 2 * K4].into_boxed_slice();
        let skip = (K4 - raw.as_ptr() as usize % K4) % K4;
        Aligned(raw, skip)
    }

    fn bytes(&self) -> &[u8] {
        &self.0[self.1..self.1 + K4]
    }
}

fn pwritev2(file: &File, buf: &[u8], offset: u64, flags: i32) {
    let iov = libc::iovec { iov_base: buf.as_ptr().cast_mut().cast(), iov_len: buf.len() };
    // SAFETY: `iov` describes `buf`, valid for reads for the whole call; the descriptor is open.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, flags) };
    assert_eq!(n, buf.len() as isize, "pwritev2: {}", std::io::Error::last_os_error());
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).unwrap()
}

fn block(data: &[u8], i: usize) -> &[u8] {
    &data[i * K4..(i + 1) * K4]
}

/// Each way of writing, in one mount cut in `drop` mode: fsync, fdatasync, RWF_DSYNC, O_DSYNC
/// and O_DIRECT + RWF_DSYNC (opened so, or turned on with fcntl as rblk's driver does)
/// survive; plain and O_DIRECT writes without a sync do not, and a DSYNC write makes only
/// itself durable. The kernel sends no FUSE_FSYNC for DSYNC writes on this (direct_io)
/// mount, and after the cut nothing is served from memory.
#[test]
fn writes_survive_a_cut_exactly_when_they_were_made_durable() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::new("durability");
    fs.mount(&["--mode", "drop"]);
    let f = fs.durable_file("f", 16 * K4 as u64);
    let setup_fsyncs = fs.counter("fsyncs");
    let direct = open_direct(&fs.path("f"));
    let late_direct = File::options().read(true).write(true).open(fs.path("f")).unwrap();
    // SAFETY: plain fcntl calls on an open descriptor.
    unsafe {
        let flags = libc::fcntl(late_direct.as_raw_fd(), libc::F_GETFL);
        assert_eq!(libc::fcntl(late_direct.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT), 0, "fcntl O_DIRECT");
    }
    let odsync = File::options().write(true).custom_flags(libc::O_DSYNC).open(fs.path("f")).unwrap();

    f.write_all_at(&[1; K4], 0).unwrap();
    f.sync_data().unwrap(); // block 0: write + fdatasync
    f.write_all_at(&[2; K4], K4 as u64).unwrap();
    f.sync_all().unwrap(); // block 1: write + fsync
    f.write_all_at(&[3; K4], 2 * K4 as u64).unwrap(); // block 2: no sync
    pwritev2(&f, &[4; K4], 3 * K4 as u64, libc::RWF_DSYNC); // block 3: RWF_DSYNC
    odsync.write_all_at(&[5; K4], 4 * K4 as u64).unwrap(); // block 4: O_DSYNC file
    pwritev2(&direct, Aligned::new(6).bytes(), 5 * K4 as u64, 0); // block 5: O_DIRECT, no sync
    pwritev2(&direct, Aligned::new(7).bytes(), 6 * K4 as u64, libc::RWF_DSYNC); // block 6: O_DIRECT + RWF_DSYNC
    pwritev2(&late_direct, Aligned::new(8).bytes(), 7 * K4 as u64, 0); // block 7: fcntl O_DIRECT, no sync
    pwritev2(&late_direct, Aligned::new(9).bytes(), 8 * K4 as u64, libc::RWF_DSYNC); // block 8: and RWF_DSYNC
                                                                                     // Block 9 pending, then a DSYNC write beside it (block 10) and over part of it: the
                                                                                     // DSYNC write is durable, the rest of block 9 is not.
    f.write_all_at(&[10; K4], 9 * K4 as u64).unwrap();
    pwritev2(&direct, Aligned::new(11).bytes(), 10 * K4 as u64, libc::RWF_DSYNC);
    pwritev2(&f, &[12; 512], 9 * K4 as u64 + 1024, libc::RWF_DSYNC);

    assert_eq!(fs.counter("fsyncs") - setup_fsyncs, 2, "only fsync and fdatasync send FUSE_FSYNC here");
    assert_eq!(fs.counter("dsync_writes"), 6, "each DSYNC write arrives flagged O_DSYNC");
    assert_eq!(fs.counter("pending"), 4, "the writes without a sync wait");
    // Everything reads back before the cut: a page cache, if any, would hold it now.
    let before = fs.read("f");
    for (i, byte) in [1u8, 2, 3, 4, 5, 6, 7, 8, 9].iter().enumerate() {
        assert!(block(&before, i).iter().all(|b| b == byte), "block {i} before the cut");
    }

    let answer = fs.command("cut");
    assert!(answer.starts_with("cut "), "{answer}");
    let mut buf = [0u8; 16];
    for (name, file) in [("buffered", &f), ("direct", &direct)] {
        let err = file.read_at(&mut buf, 0).expect_err("a read after the cut fails");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
    }
    assert_eq!(f.write_at(&[0; 16], 0).expect_err("a write after the cut").raw_os_error(), Some(libc::EIO));
    assert_eq!(f.sync_data().expect_err("a sync after the cut").raw_os_error(), Some(libc::EIO));
    drop((f, direct, late_direct, odsync));
    fs.unmount();

    fs.mount(&[]);
    let after = fs.read("f");
    let expect: [(usize, u8, &str); 11] = [
        (0, 1, "write + fdatasync"),
        (1, 2, "write + fsync"),
        (2, 0, "write without a sync"),
        (3, 4, "RWF_DSYNC"),
        (4, 5, "O_DSYNC file"),
        (5, 0, "O_DIRECT without a sync"),
        (6, 7, "O_DIRECT + RWF_DSYNC"),
        (7, 0, "fcntl O_DIRECT without a sync"),
        (8, 9, "fcntl O_DIRECT + RWF_DSYNC"),
        (10, 11, "O_DIRECT + RWF_DSYNC beside a pending write"),
        (11, 0, "never written"),
    ];
    for (i, byte, what) in expect {
        assert!(block(&after, i).iter().all(|&b| b == byte), "block {i} ({what}) after the cut");
    }
    let nine = block(&after, 9);
    assert!(nine[..1024].iter().chain(&nine[1536..]).all(|&b| b == 0), "the pending write to block 9 is lost");
    assert!(nine[1024..1536].iter().all(|&b| b == 12), "the DSYNC write over it survives");
    fs.unmount();
}

/// Why the layer opens files with FOPEN_DIRECT_IO: through the page cache, the kernel follows
/// every DSYNC write with a FUSE_FSYNC of the whole file (it carries no range), which would make
/// every other pending write durable too; and after a cut the page cache may still answer
/// reads. Only an unmount drops it: the remount shows the durable state.
#[test]
fn through_the_page_cache_a_dsync_write_syncs_the_whole_file() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::new("cached");
    fs.mount(&["--mode", "drop", "--cached"]);
    let f = fs.durable_file("f", 4 * K4 as u64);
    let direct = open_direct(&fs.path("f"));
    let fsyncs = fs.counter("fsyncs");
    pwritev2(&direct, Aligned::new(1).bytes(), 0, libc::RWF_DSYNC);
    assert_eq!(fs.counter("fsyncs"), fsyncs + 1, "the kernel sends FUSE_FSYNC after an O_DIRECT RWF_DSYNC write");
    f.write_all_at(&[2; K4], K4 as u64).unwrap();
    assert_eq!(fs.counter("pending"), 1);
    pwritev2(&f, &[3; K4], 2 * K4 as u64, libc::RWF_DSYNC);
    assert_eq!(fs.counter("fsyncs"), fsyncs + 2, "and after a buffered RWF_DSYNC write");
    assert_eq!(fs.counter("pending"), 0, "which took the unrelated pending write along");
    f.write_all_at(&[4; K4], 3 * K4 as u64).unwrap();
    assert_eq!(block(&fs.read("f"), 3), [4; K4], "read back (into the page cache)");
    fs.command("cut");
    let mut buf = vec![0u8; K4];
    match f.read_at(&mut buf, 3 * K4 as u64) {
        Ok(_) => eprintln!("after the cut, a buffered read was answered from the page cache: {}", buf[0]),
        Err(e) => eprintln!("after the cut, a buffered read failed: {e}"),
    }
    drop((f, direct));
    fs.unmount();
    fs.mount(&[]);
    let after = fs.read("f");
    assert_eq!(block(&after, 3), [0; K4], "nothing of the old page cache shows after the remount");
    assert_eq!(block(&after, 1), [2; K4]);
    fs.unmount();
}

/// A cut resolves a pending 64 KiB write over durable data sector by sector (`tear`), 4 KiB
/// piece by piece (`reorder`), not at all (`drop`) or whole (`keep`); the same seed gives the
/// same result.
#[test]
fn each_mode_keeps_and_drops_in_its_own_unit() {
    if !fuse_available() {
        return;
    }
    let run = |mode: &str, seed: u64| -> Vec<u8> {
        let mut fs = Fs::new(&format!("mode-{mode}-{seed}"));
        fs.mount(&["--mode", mode, "--seed", &seed.to_string()]);
        let f = fs.durable_file("f", 16 * K4 as u64);
        f.write_all_at(&[0xAA; 16 * K4], 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[0xBB; 16 * K4], 0).unwrap();
        fs.command("cut");
        drop(f);
        fs.unmount();
        fs.mount(&[]);
        let data = fs.read("f");
        fs.unmount();
        data
    };
    let units = |data: &[u8], unit: usize| -> Vec<u8> {
        data.chunks(unit)
            .map(|c| {
                assert!(c.iter().all(|&b| b == c[0]), "a {unit}-byte unit is kept or dropped whole");
                assert!(c[0] == 0xAA || c[0] == 0xBB, "only the old or the new bytes");
                c[0]
            })
            .collect()
    };
    assert!(units(&run("drop", 1), K4).iter().all(|&b| b == 0xAA));
    assert!(units(&run("keep", 1), K4).iter().all(|&b| b == 0xBB));
    for (mode, unit) in [("tear", 512), ("reorder", K4)] {
        let a = units(&run(mode, 7), unit);
        assert!(a.contains(&0xAA) && a.contains(&0xBB), "{mode}: some units kept, some dropped: {a:?}");
        assert_eq!(units(&run(mode, 7), unit), a, "{mode}: the same seed, the same cut");
        if mode == "tear" {
            let pages = a.chunks(8).filter(|p| p.iter().any(|&b| b != p[0])).count();
            assert!(pages > 0, "tear splits 4 KiB pages: {a:?}");
        }
    }
}

/// `arm N` cuts when the N-th fsync arrives, before serving it: its writes are not durable.
#[test]
fn an_armed_cut_happens_at_the_fsync_it_names() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::new("armed");
    fs.mount(&["--mode", "drop"]);
    let f = fs.durable_file("f", 4 * K4 as u64);
    assert_eq!(fs.command("arm 2"), "armed 2");
    f.write_all_at(&[1; K4], 0).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(&[2; K4], K4 as u64).unwrap();
    assert_eq!(f.sync_data().expect_err("the cut").raw_os_error(), Some(libc::EIO));
    assert!(fs.command("status").starts_with("cut "));
    drop(f);
    fs.unmount();
    fs.mount(&[]);
    let after = fs.read("f");
    assert_eq!(block(&after, 0), [1; K4]);
    assert_eq!(block(&after, 1), [0; K4]);
    fs.unmount();
}
