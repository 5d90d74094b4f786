//! A real guest on rblk: Linux under QEMU (TCG) with the volume as its virtio disk, either
//! through QEMU's NBD client (`reconnect-delay`) or as a vhost-user-blk device (the guest's
//! memory shared with the driver, QEMU's `-chardev socket,reconnect=1` reconnecting to the
//! socket the supervisor holds), writing a seeded pattern with direct I/O and reading it back
//! round after round while the host SIGKILLs the driver again and again. The guest must see
//! every byte and no I/O error in its kernel log; afterwards the host reads the same bytes
//! through NBD (over vhost-user too: both sessions serve the same volume).
//!
//! What it boots comes from `scripts/guest.sh` (Debian's QEMU, cloud kernel and busybox,
//! unpacked into a cache directory; `scripts/test.sh` prepares it and sets RBLK_GUEST_DIR).
//! Without it the test is skipped, unless RBLK_REQUIRE_CLIENTS=1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use raft_state::rng::Rng;

mod common;
use common::{free_port, have, make_pki, Scratch, Serve};

const MIB: u64 = 1 << 20;
/// The pattern's length, and where the guest writes it (MiB offsets on a 64 MiB volume).
const PATTERN_MIB: u64 = 8;
const AT_MIB: [u64; 3] = [0, 17, 40];
const KILLS: usize = 5;
/// The guest's memory in MiB; a vhost-user-blk front-end shares all of it with the backend
/// through a memfd of exactly this size.
const GUEST_MEM_MIB: u64 = 256;
/// The volume's size as the guest's /sys/block/vda/size says it (512-byte sectors of 64 MiB).
const VOLUME_SECTORS: u64 = 64 * MIB / 512;

fn guest_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("RBLK_GUEST_DIR").map(PathBuf::from);
    match dir {
        Some(d) if d.join("qemu-system-x86_64").exists() => Some(d),
        _ => {
            assert!(
                std::env::var_os("RBLK_REQUIRE_CLIENTS").is_none(),
                "RBLK_GUEST_DIR does not name a directory made by scripts/guest.sh"
            );
            eprintln!("skipped: no guest (run scripts/guest.sh and set RBLK_GUEST_DIR to what it prints)");
            None
        }
    }
}

/// The guest's /init (after the preamble `initramfs` adds): write the pattern at each offset
/// and read it back (direct I/O both ways, the offsets in parallel so that several requests
/// are in flight when the driver dies) round after round until the control disk says STOP;
/// then report and power off.
fn init_script() -> String {
    let offsets: Vec<String> = AT_MIB.iter().map(u64::to_string).collect();
    format!(
        r#"ok=1; round=0
while ! dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q STOP; do
  round=$((round+1))
  echo "RBLK-GUEST: round $round writes"
  for at in {offsets}; do
    dd if=/pattern of=/dev/vda bs=1M seek=$at oflag=direct conv=fsync 2>/dev/null || {{ echo "RBLK-GUEST: write failed at $at"; touch /tmp/bad; }} &
  done
  wait
  for at in {offsets}; do
    dd if=/dev/vda of=/tmp/back$at bs=1M skip=$at count={count} iflag=direct 2>/dev/null || {{ echo "RBLK-GUEST: read failed at $at"; touch /tmp/bad; }} &
  done
  wait
  for at in {offsets}; do
    cmp -s /tmp/back$at /pattern || {{ echo "RBLK-GUEST: mismatch at $at in round $round"; ok=0; }}
  done
  [ -e /tmp/bad ] && ok=0
  echo "RBLK-GUEST: round $round done"
  [ $round -ge 500 ] && {{ echo "RBLK-GUEST: no STOP after $round rounds"; ok=0; break; }}
done
dmesg | grep -i -e "I/O error" -e "blk_update_request" -e "Buffer I/O" && {{ echo "RBLK-GUEST: kernel saw I/O errors"; ok=0; }}
[ $ok = 1 ] && echo "RBLK-GUEST-OK after $round rounds" || echo "RBLK-GUEST-FAIL"
poweroff -f
"#,
        offsets = offsets.join(" "),
        count = PATTERN_MIB,
    )
}

/// Packs the initramfs: busybox, the modules, /init (a preamble that mounts /proc, /sys and
/// /dev, loads the modules and waits for both disks, then `init`), the pattern, and `host_bins`
/// (host programs, copied with the libraries ldd names, at the same paths).
fn initramfs(guest: &Path, dir: &Scratch, pattern: &[u8], init: &str, host_bins: &[&str]) -> PathBuf {
    initramfs_with(guest, dir, pattern, init, host_bins, &[])
}

/// `initramfs` with more files at the initramfs' top level (`(name, bytes)`).
fn initramfs_with(
    guest: &Path,
    dir: &Scratch,
    pattern: &[u8],
    init: &str,
    host_bins: &[&str],
    files: &[(&str, &[u8])],
) -> PathBuf {
    let root = dir.path("initrd");
    for sub in ["bin", "modules", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).expect("initrd dir");
    }
    std::fs::copy(guest.join("busybox"), root.join("bin/busybox")).expect("busybox");
    for m in module_order(guest).split_whitespace() {
        std::fs::copy(guest.join(format!("modules/{m}.ko")), root.join(format!("modules/{m}.ko"))).expect("module");
    }
    let modules = module_order(guest).split_whitespace().collect::<Vec<_>>().join(" ");
    let preamble = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /modules/$m.ko || echo "RBLK-INIT: insmod $m failed"; done
i=0; while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done
echo "RBLK-GUEST: disk $(cat /sys/block/vda/size) sectors"
"#
    );
    std::fs::write(root.join("init"), preamble + init).expect("init");
    for bin in host_bins {
        let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
        let libs = String::from_utf8_lossy(&ldd.stdout).into_owned();
        let paths = libs.split_whitespace().filter(|w| w.starts_with('/')).map(str::to_owned);
        for path in std::iter::once(bin.to_string()).chain(paths) {
            let inside = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(inside.parent().expect("parent")).expect("lib dir");
            // Copies follow symlinks: the guest gets the files themselves.
            std::fs::copy(&path, &inside).unwrap_or_else(|e| panic!("copying {path}: {e}"));
        }
    }
    let executable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(root.join("init"), executable).expect("chmod init");
    std::fs::write(root.join("pattern"), pattern).expect("pattern");
    for (name, bytes) in files {
        std::fs::write(root.join(name), bytes).expect("initramfs file");
    }
    let out = dir.path("initrd.gz");
    let pack = format!(
        "cd '{}' && find . | ./bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        root.display(),
        out.display()
    );
    assert!(Command::new("sh").arg("-c").arg(pack).status().expect("pack").success(), "packing the initramfs");
    out
}

fn module_order(guest: &Path) -> String {
    std::fs::read_to_string(guest.join("modules/order")).expect("module order")
}

/// A running guest: QEMU with its serial console in a file.
struct Vm {
    qemu: std::process::Child,
    console: PathBuf,
}

impl Vm {
    /// Boots `initrd` with the volume (`disk`: QEMU's arguments for the device, see
    /// `Via::qemu_args`) as /dev/vda and `control` (a plain file) as /dev/vdb (the `-device`
    /// given first takes the first PCI slot, and virtio_blk names disks in slot order).
    fn boot(guest: &Path, dir: &Scratch, initrd: &Path, disk: &[String], control: &Path, console: &str) -> Vm {
        let console = dir.path(console);
        let qemu = Command::new(guest.join("qemu-system-x86_64"))
            .args(["-accel", "tcg", "-m", &GUEST_MEM_MIB.to_string(), "-nographic", "-no-reboot", "-kernel"])
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .args(disk)
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", control.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).expect("console"))
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        Vm { qemu, console }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn wait_for(&self, what: &str, within: Duration) {
        self.wait_for_or(what, within, &String::new);
    }

    /// `wait_for`, with `context()` (the server's log) in the failure message.
    fn wait_for_or(&self, what: &str, within: Duration, context: &dyn Fn() -> String) {
        let until = Instant::now() + within;
        while !self.console().contains(what) {
            assert!(Instant::now() < until, "the guest did not say {what:?}:\n{}\n{}", self.console(), context());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self, within: Duration) {
        let until = Instant::now() + within;
        while self.qemu.try_wait().expect("qemu").is_none() {
            assert!(Instant::now() < until, "the guest did not stop:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// How the guest's QEMU reaches the volume: its NBD client, reconnecting for up to a minute,
/// or vhost-user-blk.
enum Via {
    Unix,
    /// TCP with TLS required; the client certificate directory (the test CA's).
    Tls {
        port: u16,
        pki: PathBuf,
    },
    /// A vhost-user-blk device on this socket (`rblk serve --vhost-user`), with two queues;
    /// the host still reads through the NBD socket.
    VhostUser {
        socket: PathBuf,
    },
}

impl Via {
    /// `qemu-img convert`'s source arguments for the volume.
    fn qemu_img_source(&self, serve: &Serve) -> Vec<String> {
        match self {
            Via::Unix | Via::VhostUser { .. } => {
                vec!["-f".into(), "raw".into(), format!("nbd+unix:///?socket={}", serve.socket.display())]
            }
            Via::Tls { port, pki } => vec![
                "--object".into(),
                format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display()),
                "--image-opts".into(),
                format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"),
            ],
        }
    }

    /// QEMU's arguments that give the guest the volume as a virtio disk.
    fn qemu_args(&self, serve: &Serve) -> Vec<String> {
        let nbd_disk = ["-device".to_string(), "virtio-blk-pci,drive=d0".to_string()];
        match self {
            Via::Unix => [
                "-blockdev".into(),
                format!(
                    "driver=nbd,node-name=d0,server.type=unix,server.path={},reconnect-delay=60",
                    serve.socket.display()
                ),
            ]
            .into_iter()
            .chain(nbd_disk)
            .collect(),
            Via::Tls { port, pki } => [
                "-object".into(),
                format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display()),
                "-blockdev".into(),
                format!(
                    "driver=nbd,node-name=d0,server.type=inet,server.host=127.0.0.1,server.port={port},\
                     tls-creds=tls0,reconnect-delay=60"
                ),
            ]
            .into_iter()
            .chain(nbd_disk)
            .collect(),
            Via::VhostUser { socket } => vhost_user_disk(socket),
        }
    }
}

/// QEMU's arguments for a vhost-user-blk disk on `socket`: the guest's RAM in a shared memfd
/// (the backend maps it; its size must equal `-m`), the chardev reconnecting every second
/// when the backend goes away, two queues.
fn vhost_user_disk(socket: &Path) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-chardev".into(),
        format!("socket,id=c0,path={},reconnect=1", socket.display()),
        "-device".into(),
        "vhost-user-blk-pci,chardev=c0,num-queues=2".into(),
    ]
}

/// The last round the guest reported done (0 before the first).
fn last_round(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.split("RBLK-GUEST: round ").nth(1)?.strip_suffix(" done")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// How the driver is taken from under the guest.
#[derive(Debug, Clone, Copy)]
enum Death {
    /// SIGKILL: the driver's connections drop at once.
    Kill,
    /// SIGSTOP: the driver hangs with its connections open until the supervisor misses its
    /// heartbeat and kills it.
    Hang,
}

/// Boots the guest on a fresh volume, kills the driver [`KILLS`] times while it works (after
/// its first round, then after each round the next incarnation served), tells it to stop,
/// and checks what it said: `RBLK-GUEST-OK`, no I/O error in its kernel log, every death in
/// the supervisor's log. Returns the volume's bytes as the host reads them through NBD.
fn through_kills(guest: &Path, dir: &Scratch, initrd: &Path, seed: u64, via: &Via) -> Vec<u8> {
    through_deaths(guest, dir, initrd, seed, via, Death::Kill, KILLS)
}

/// `through_kills` with `deaths` deaths of the given kind.
fn through_deaths(
    guest: &Path,
    dir: &Scratch,
    initrd: &Path,
    seed: u64,
    via: &Via,
    death: Death,
    deaths: usize,
) -> Vec<u8> {
    let control = dir.path("control.img");
    std::fs::write(&control, vec![0u8; 4096]).expect("control disk");
    let mut cfg =
        "[supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"2s\"\nrestart_backoff = \"20ms\"\n".to_owned();
    if let Via::Tls { port, pki } = via {
        cfg += &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[tls]\nmode = \"require\"\ncertificates = \"{}\"\n",
            pki.display()
        );
    }
    let serve = match via {
        Via::VhostUser { socket } => {
            let args = [std::ffi::OsStr::new("--vhost-user"), socket.as_os_str()];
            Serve::launch_with(dir, &dir.path("v.img"), Some("64M"), &cfg, "serve", &args, &[])
        }
        _ => Serve::start(dir, &cfg, &[]),
    };
    serve.wait_for("serving", 1, Duration::from_secs(30));

    let mut vm = Vm::boot(guest, dir, initrd, &via.qemu_args(&serve), &control, "console.log");
    let server_log = || serve.log_tail();
    vm.wait_for_or("RBLK-GUEST: round 1 done", Duration::from_secs(120), &server_log);
    // Each death lands a seeded 20-120 ms after a round says it starts writing, while its
    // writes are in flight (in TCG the guest spends most of a round comparing, and its dd
    // processes take a while to start; a death at a random instant mostly found the rings
    // idle). The next death waits until the new
    // incarnation served a whole round begun after this one: the guest may run rounds ahead
    // of the host, and a death before the front-end came back tests less.
    let mut rng = Rng::new(seed ^ 0xdea7);
    for k in 1..=deaths {
        let writes = format!("RBLK-GUEST: round {} writes", last_round(&vm.console()) + 1);
        let until = Instant::now() + Duration::from_secs(120);
        while !vm.console().contains(&writes) {
            assert!(Instant::now() < until, "the guest did not say {writes:?}:\n{}", vm.console());
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(20 + rng.below(100)));
        let round = last_round(&vm.console());
        let pid = Pid::from_raw(serve.driver_pid());
        match death {
            Death::Kill => kill(pid, Signal::SIGKILL).expect("SIGKILL"),
            Death::Hang => {
                kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
                serve.wait_for("no heartbeat", k, Duration::from_secs(30));
            }
        }
        serve.wait_for("driver ready", k + 1, Duration::from_secs(60));
        vm.wait_for_or(&format!("RBLK-GUEST: round {} done", round + 2), Duration::from_secs(120), &server_log);
    }
    std::fs::write(&control, b"STOP").expect("stop the guest");
    vm.wait_exit(Duration::from_secs(120));
    let text = vm.console();
    let said: Vec<&str> = text.lines().filter(|l| l.contains("RBLK-GUEST")).collect();
    let disk = format!("RBLK-GUEST: disk {VOLUME_SECTORS} sectors");
    assert!(text.contains(&disk), "the guest's /dev/vda is not the 64 MiB volume:\n{}", said.join("\n"));
    assert!(text.contains("RBLK-GUEST-OK"), "the guest saw a problem (seed {seed}):\n{}", said.join("\n"));
    assert!(!text.contains("I/O error"), "I/O errors in the guest's kernel log:\n{text}");
    assert!(serve.log().matches("driver died").count() >= deaths, "{}", serve.log_tail());
    if let Via::VhostUser { .. } = via {
        // Every incarnation took the front-end's reconnection (the driver's own log line).
        let log = serve.log();
        let connected = log.matches("front-end connected").count();
        assert!(connected > deaths, "{connected} vhost-user connections for {} incarnations:\n{log}", deaths + 1);
        let resubmits = log.matches("resubmitting what the previous driver left in flight").count();
        eprintln!("vhost-user: {connected} connections, {resubmits} rings resubmitted in-flight requests");
    }

    let copy = dir.path("copy.raw");
    let mut convert = Command::new("qemu-img");
    convert.arg("convert").args(via.qemu_img_source(&serve)).args(["-O", "raw"]).arg(&copy);
    let out = convert.output();
    let out = out.expect("qemu-img convert");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(serve.stop().success());
    std::fs::read(&copy).expect("copy")
}

/// The volume's bytes as the host read them (through NBD) hold the pattern at every offset
/// the guest wrote it.
fn assert_pattern(image: &[u8], pattern: &[u8], seed: u64) {
    for at in AT_MIB {
        let got = &image[(at * MIB) as usize..][..pattern.len()];
        assert!(got == pattern, "the host reads other bytes at {at} MiB through NBD (seed {seed})");
    }
}

fn seeded_pattern() -> (u64, Vec<u8>) {
    let seed = std::env::var("RBLK_GUEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6e57);
    eprintln!("guest test: seed {seed} (RBLK_GUEST_SEED)");
    let mut pattern = vec![0u8; (PATTERN_MIB * MIB) as usize];
    Rng::new(seed).fill(&mut pattern);
    (seed, pattern)
}

#[test]
fn a_guest_writes_and_verifies_through_driver_kills() {
    let Some(guest) = guest_dir() else { return };
    if !have("qemu-img") {
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let dir = Scratch::new("guest");
    let initrd = initramfs(&guest, &dir, &pattern, &init_script(), &[]);
    let image = through_kills(&guest, &dir, &initrd, seed, &Via::Unix);
    assert_pattern(&image, &pattern, seed);
}

/// The seeded pattern over vhost-user-blk: the guest's memory shared with the driver, two
/// queues, the driver SIGKILLed under the running guest again and again. QEMU's chardev
/// reconnects to the socket the supervisor holds; the next incarnation must take the
/// front-end's inflight region and the rings back and complete what was in flight, so the
/// guest sees no error. The host then reads the same bytes through the NBD socket of the same
/// `rblk serve`.
#[test]
fn a_guest_on_vhost_user_writes_and_verifies_through_driver_kills() {
    let Some(guest) = guest_dir() else { return };
    if !have("qemu-img") {
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let dir = Scratch::new("guest-vhost");
    let initrd = initramfs(&guest, &dir, &pattern, &init_script(), &[]);
    let image = through_kills(&guest, &dir, &initrd, seed, &Via::VhostUser { socket: dir.path("vhost.sock") });
    assert_pattern(&image, &pattern, seed);
}

/// Hung drivers under a vhost-user-blk guest: each stops (SIGSTOP) with the front-end's
/// connection open, the supervisor kills it for its silent heartbeat, and the next incarnation
/// must finish what the hung one had taken from the rings.
#[test]
fn a_guest_on_vhost_user_survives_hung_drivers() {
    let Some(guest) = guest_dir() else { return };
    if !have("qemu-img") {
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let dir = Scratch::new("guest-vhost-hung");
    let initrd = initramfs(&guest, &dir, &pattern, &init_script(), &[]);
    let via = Via::VhostUser { socket: dir.path("vhost.sock") };
    let image = through_deaths(&guest, &dir, &initrd, seed, &via, Death::Hang, 2);
    assert_pattern(&image, &pattern, seed);
}

/// Where the cross-session test's guest and host write (MiB).
const SHARED_AT_MIB: [u64; 2] = [0, 40];

/// The guest's /init for the cross-session test: write the pattern at the first offset and
/// say so; wait for the host's NEXT on the control disk; read both offsets (the host wrote
/// /host there through NBD) and compare; write the pattern at the second offset; report.
fn shared_init_script() -> String {
    let [first, second] = SHARED_AT_MIB;
    format!(
        r#"ok=1
dd if=/pattern of=/dev/vda bs=1M seek={first} oflag=direct conv=fsync 2>/dev/null && echo "RBLK-GUEST: wrote at {first}" || {{ echo "RBLK-GUEST: write failed at {first}"; ok=0; }}
i=0; while ! dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q NEXT; do i=$((i+1)); [ $i -gt 1200 ] && {{ echo "RBLK-GUEST: no NEXT"; ok=0; break; }}; sleep 0.1; done
for at in {first} {second}; do
  dd if=/dev/vda of=/tmp/back bs=1M skip=$at count={count} iflag=direct 2>/dev/null || {{ echo "RBLK-GUEST: read failed at $at"; ok=0; }}
  cmp -s /tmp/back /host && echo "RBLK-GUEST: the host's bytes at $at" || {{ echo "RBLK-GUEST: other bytes than the host's at $at"; ok=0; }}
done
dd if=/pattern of=/dev/vda bs=1M seek={second} oflag=direct conv=fsync 2>/dev/null && echo "RBLK-GUEST: wrote at {second}" || {{ echo "RBLK-GUEST: write failed at {second}"; ok=0; }}
dmesg | grep -i -e "I/O error" -e "blk_update_request" -e "Buffer I/O" && {{ echo "RBLK-GUEST: kernel saw I/O errors"; ok=0; }}
[ $ok = 1 ] && echo "RBLK-GUEST-OK" || echo "RBLK-GUEST-FAIL"
poweroff -f
"#,
        count = PATTERN_MIB,
    )
}

/// Both sessions of one `rblk serve` on one volume: what the guest wrote through vhost-user-blk
/// (acknowledged: its direct write returned) the host reads through NBD, and what the host
/// wrote through NBD with qemu-io (acknowledged: qemu-io returned), over the guest's own data
/// and beside it, the guest reads through vhost-user-blk.
#[test]
fn vhost_user_and_nbd_see_each_others_writes() {
    let Some(guest) = guest_dir() else { return };
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let mut host = vec![0u8; pattern.len()];
    Rng::new(seed ^ 0x4e42_4400).fill(&mut host);
    let dir = Scratch::new("guest-vhost-nbd");
    std::fs::write(dir.path("host.bin"), &host).expect("host pattern");
    let initrd = initramfs_with(&guest, &dir, &pattern, &shared_init_script(), &[], &[("host", &host)]);
    let control = dir.path("control.img");
    std::fs::write(&control, vec![0u8; 4096]).expect("control disk");
    let vhost = dir.path("vhost.sock");
    let args = [std::ffi::OsStr::new("--vhost-user"), vhost.as_os_str()];
    let serve = Serve::launch_with(&dir, &dir.path("v.img"), Some("64M"), "", "serve", &args, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let uri = format!("nbd+unix:///?socket={}", serve.socket.display());
    let read_volume = |name: &str| {
        let copy = dir.path(name);
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", &uri, "-O", "raw"])
            .arg(&copy)
            .output()
            .expect("qemu-img convert");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(&copy).expect("copy")
    };
    let at = |image: &[u8], mib: u64| image[(mib * MIB) as usize..][..pattern.len()].to_vec();
    let [first, second] = SHARED_AT_MIB;

    let mut vm = Vm::boot(&guest, &dir, &initrd, &vhost_user_disk(&vhost), &control, "console.log");
    vm.wait_for(&format!("RBLK-GUEST: wrote at {first}"), Duration::from_secs(120));
    let image = read_volume("after-guest.raw");
    assert!(at(&image, first) == pattern, "NBD does not read what the guest wrote at {first} MiB (seed {seed})");
    let source = dir.path("host.bin");
    let len = pattern.len();
    let writes: Vec<String> =
        SHARED_AT_MIB.iter().map(|mib| format!("write -s {} {} {len}", source.display(), mib * MIB)).collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    common::qemu_io(&uri, &writes);
    std::fs::write(&control, b"NEXT").expect("tell the guest");
    vm.wait_exit(Duration::from_secs(120));
    let text = vm.console();
    let said: Vec<&str> = text.lines().filter(|l| l.contains("RBLK-GUEST")).collect();
    assert!(text.contains(&format!("RBLK-GUEST: disk {VOLUME_SECTORS} sectors")), "{}", said.join("\n"));
    assert!(text.contains("RBLK-GUEST-OK"), "the guest saw a problem (seed {seed}):\n{}", said.join("\n"));
    let image = read_volume("after-both.raw");
    assert!(at(&image, first) == host, "the host's write at {first} MiB did not stay (seed {seed})");
    assert!(at(&image, second) == pattern, "NBD does not read the guest's write at {second} MiB (seed {seed})");
    assert!(serve.stop().success());
}

/// The guest's /init for the filesystem test: mkfs.ext4 on the disk, then round after round
/// a new file with the pattern (synced, compared), the oldest of four removed, until STOP;
/// then unmount, e2fsck, mount again and compare every file left.
fn fs_init_script() -> &'static str {
    r#"ok=1; round=0
want=$(md5sum < /pattern)
/sbin/mke2fs -t ext4 -F -q /dev/vda || { echo "RBLK-GUEST: mkfs failed"; ok=0; }
mkdir -p /mnt; mount -t ext4 /dev/vda /mnt || { echo "RBLK-GUEST: mount failed"; ok=0; }
while ! dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q STOP; do
  round=$((round+1))
  echo "RBLK-GUEST: round $round writes"
  cp /pattern /mnt/f$round && sync || { echo "RBLK-GUEST: writing f$round failed"; ok=0; }
  echo 3 > /proc/sys/vm/drop_caches
  [ "$(md5sum < /mnt/f$round)" = "$want" ] || { echo "RBLK-GUEST: f$round differs"; ok=0; }
  rm -f /mnt/f$((round-4)); sync
  echo "RBLK-GUEST: round $round done"
  [ $round -ge 500 ] && { echo "RBLK-GUEST: no STOP after $round rounds"; ok=0; break; }
done
umount /mnt || { echo "RBLK-GUEST: umount failed"; ok=0; }
/sbin/e2fsck -fn /dev/vda > /tmp/fsck 2>&1 || { echo "RBLK-GUEST: e2fsck found problems"; cat /tmp/fsck; ok=0; }
mount -t ext4 -o ro /dev/vda /mnt && for f in /mnt/f*; do
  [ "$(md5sum < $f)" = "$want" ] || { echo "RBLK-GUEST: $f differs after remount"; ok=0; }
done
umount /mnt
dmesg | grep -i -e "I/O error" -e "blk_update_request" -e "Buffer I/O" -e "EXT4-fs error" && { echo "RBLK-GUEST: kernel saw errors"; ok=0; }
[ $ok = 1 ] && echo "RBLK-GUEST-OK after $round rounds" || echo "RBLK-GUEST-FAIL"
poweroff -f
"#
}

/// ext4 in the guest through the kills: mkfs, files written and synced round after round,
/// e2fsck clean inside the guest and again on the host's copy of the volume.
#[test]
fn a_guest_filesystem_survives_driver_kills() {
    filesystem_through_kills("guest-fs", |_| Via::Unix);
}

/// The same over vhost-user-blk: ext4's flushes and journal writes go through the virtqueues,
/// the driver killed under them.
#[test]
fn a_guest_filesystem_on_vhost_user_survives_driver_kills() {
    filesystem_through_kills("guest-vhost-fs", |dir| Via::VhostUser { socket: dir.path("vhost.sock") });
}

fn filesystem_through_kills(name: &str, via: impl Fn(&Scratch) -> Via) {
    let Some(guest) = guest_dir() else { return };
    if !have("qemu-img") || !have("e2fsck") || !have("mke2fs") {
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let dir = Scratch::new(name);
    let bins = ["/sbin/mke2fs", "/sbin/e2fsck"];
    let initrd = initramfs(&guest, &dir, &pattern, fs_init_script(), &bins);
    let image = through_kills(&guest, &dir, &initrd, seed, &via(&dir));
    let copy = dir.path("fsck.raw");
    std::fs::write(&copy, &image).expect("copy");
    let fsck = Command::new("e2fsck").arg("-fn").arg(&copy).output().expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck on the host's copy:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// The same pattern over TCP with TLS required: each reconnection after a kill is a new TLS
/// handshake with a new driver incarnation (the credentials handed over again).
#[test]
fn a_guest_over_tls_reconnects_through_driver_kills() {
    let Some(guest) = guest_dir() else { return };
    if !have("qemu-img") || !have("certtool") {
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let dir = Scratch::new("guest-tls");
    let pki = dir.path("pki");
    make_pki(&pki);
    let initrd = initramfs(&guest, &dir, &pattern, &init_script(), &[]);
    let image = through_kills(&guest, &dir, &initrd, seed, &Via::Tls { port: free_port(), pki });
    assert_pattern(&image, &pattern, seed);
}

/// The verifying guest after a power cut: mount (ext4 replays its journal), compare every
/// file, unmount, e2fsck -fn; one `RBLK-CHECK:` line per finding.
fn check_init_script() -> &'static str {
    r#"want=$(md5sum < /pattern)
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
  for f in /mnt/f*; do
    [ "$(md5sum < $f)" = "$want" ] && echo "RBLK-CHECK: $(basename $f) ok" || echo "RBLK-CHECK: $(basename $f) differs"
  done
  umount /mnt
else
  echo "RBLK-CHECK: mount failed"
fi
/sbin/e2fsck -fn /dev/vda > /tmp/fsck 2>&1 && echo "RBLK-CHECK: fsck clean" || { echo "RBLK-CHECK: fsck found problems"; cat /tmp/fsck; }
dmesg | grep -i -e "I/O error" -e "EXT4-fs error" && echo "RBLK-CHECK: kernel errors"
echo "RBLK-CHECK: end"
poweroff -f
"#
}

/// ext4 in a guest through power cuts: the image on lazyfs, the guest writing synced files
/// round after round; at a seeded instant the power goes (unsynced writes torn or reordered,
/// QEMU and rblk killed). After the restart a second guest mounts the volume: every file the
/// first guest had synced (its round reported done) must read back whole, and e2fsck must be
/// clean; every other cut runs without the page cache, and the first guest's disk is NBD or
/// vhost-user-blk (both within the default two cuts). `RBLK_GUEST_CUTS=N` runs N cuts
/// (default 2), `RBLK_GUEST_SEED=S` picks the first.
#[test]
fn a_guest_filesystem_survives_power_cuts() {
    let Some(guest) = guest_dir() else { return };
    if !have("mke2fs") || !have("e2fsck") || !have("fusermount3") {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        assert!(std::env::var_os("RBLK_REQUIRE_CLIENTS").is_none(), "/dev/fuse is required but missing");
        return;
    }
    let (seed, pattern) = seeded_pattern();
    let cuts = std::env::var("RBLK_GUEST_CUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(2u64);
    let bins = ["/sbin/mke2fs", "/sbin/e2fsck"];
    for cut in 0..cuts {
        let seed = seed + cut;
        let mut rng = Rng::new(seed);
        let dir = Scratch::new(&format!("guest-cut-{cut}"));
        let writing = initramfs(&guest, &dir, &pattern, fs_init_script(), &bins);
        std::fs::rename(&writing, dir.path("writing.gz")).expect("rename");
        let checking = initramfs(&guest, &dir, &pattern, check_init_script(), &bins);
        let (backing, mnt) = (dir.path("backing"), dir.path("mnt"));
        std::fs::create_dir_all(&backing).expect("backing");
        std::fs::create_dir_all(&mnt).expect("mnt");
        let mode = if rng.chance(1, 2) { lazyfs::Mode::Tear } else { lazyfs::Mode::Reorder };
        let mounted =
            lazyfs::mount(&backing, &mnt, lazyfs::Options { mode, seed, cached: false }).expect("lazyfs mount");
        let image = mnt.join("v.img");
        let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
            .arg("format")
            .arg(&image)
            .args(["--size", "64M", "--log-size", "8M"])
            .output()
            .expect("rblk format");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let control = dir.path("control.img");
        std::fs::write(&control, vec![0u8; 4096]).expect("control disk");
        // Every other cut without the page cache (data and tree blocks O_DIRECT); the guest's
        // disk alternates between NBD and vhost-user-blk so that the default two cuts cover
        // both settings and both sessions (four cover every pair).
        let page_cache = cut % 2 == 0;
        let config = format!("[cache]\npage_cache = {page_cache}\n");
        let via = match (cut % 2) ^ (cut / 2 % 2) {
            0 => Via::Unix,
            _ => Via::VhostUser { socket: dir.path("vhost.sock") },
        };
        let args = match &via {
            Via::VhostUser { socket } => vec![std::ffi::OsStr::new("--vhost-user"), socket.as_os_str()],
            _ => Vec::new(),
        };
        let serve = Serve::launch_with(&dir, &image, None, &config, "before", &args, &[]);
        serve.wait_for("serving", 1, Duration::from_secs(30));
        let vm = Vm::boot(&guest, &dir, &dir.path("writing.gz"), &via.qemu_args(&serve), &control, "before.log");
        let rounds = 2 + rng.below(3);
        vm.wait_for(&format!("RBLK-GUEST: round {rounds} done"), Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        // The power goes: what was not made durable is torn or reordered, everything stops.
        let _ = mounted.layer().cut();
        drop(vm);
        serve.kill_all();
        let before = std::fs::read_to_string(dir.path("before.log")).unwrap_or_default();
        let done = last_round(&before);
        assert!(done > 0, "no round done before the cut:\n{before}");
        mounted.unmount().expect("unmount");

        let mounted = lazyfs::mount(&backing, &mnt, lazyfs::Options { mode: lazyfs::Mode::Keep, seed, cached: false })
            .expect("lazyfs remount");
        let serve = Serve::launch(&dir, &image, None, &config, "after", &[]);
        serve.wait_for("serving", 1, Duration::from_secs(60));
        let mut vm = Vm::boot(&guest, &dir, &checking, &Via::Unix.qemu_args(&serve), &control, "after.log");
        vm.wait_exit(Duration::from_secs(120));
        let after = vm.console();
        let said: Vec<&str> = after.lines().filter(|l| l.contains("RBLK-CHECK")).collect();
        let session = if matches!(via, Via::Unix) { "NBD" } else { "vhost-user" };
        let context = format!(
            "cut {cut} (seed {seed}, {mode:?}, page cache {page_cache}, written through {session}) after round {done}:\n{}",
            said.join("\n")
        );
        assert!(after.contains("RBLK-CHECK: end"), "the checking guest did not finish; {context}\n{after}");
        assert!(after.contains("RBLK-CHECK: fsck clean"), "{context}");
        assert!(!after.contains("differs") && !after.contains("kernel errors"), "{context}");
        // Files f(done-3)..=f(done) were synced and kept when round `done` was reported.
        for f in done.saturating_sub(3).max(1)..=done {
            assert!(after.contains(&format!("RBLK-CHECK: f{f} ok")), "f{f} was synced but is gone; {context}");
        }
        eprintln!(
            "guest power cut {cut}: seed {seed}, {mode:?}, page cache {page_cache}, {session}, after round {done}: every synced file intact"
        );
        assert!(serve.stop().success());
        mounted.unmount().expect("unmount");
    }
}
