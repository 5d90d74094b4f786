//! The vhost-user-blk session against a front-end that is broken or malicious (a VM whose
//! kernel writes nonsense into its rings, or a VMM that sends bad messages), and against a
//! correct one for the basics. The test is the front-end: it maps its own "guest memory" (a
//! memfd), speaks vhost-user with the rust-vmm client, writes descriptors and rings itself
//! and reads the used ring back. The real `driver::run` serves it in this process, with an NBD
//! socket beside it on the same volume.
//!
//! What must hold: every bad request is answered with VIRTIO_BLK_S_IOERR or S_UNSUPP, or
//! completed with nothing written when it has no status byte to trust, or its ring (or
//! connection) is dropped; the driver keeps serving the other session and the next
//! front-end; nothing outside the guest memory is read or written (the memory around the
//! buffers is checked unchanged); and good requests keep working after bad ones.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_state::device::{Device, SimDisk, BLOCK};
use raft_state::volume::{FormatOptions, Volume};
use slog::{o, Discard, Logger};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const VOLUME_BLOCKS: u64 = 4096;
const VOLUME_BYTES: u64 = VOLUME_BLOCKS * BLOCK;

/// The test's guest memory: 4 MiB at guest physical 0; the front-end "maps" it at USER.
const MEM: u64 = 4 << 20;
const USER: u64 = 0x7f00_0000_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where request headers, data and status bytes go.
const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x18000;
const QSIZE: u16 = 16;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// What the status byte holds before the device answers.
const UNANSWERED: u8 = 0xee;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rblk-vhost-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// The driver, serving an NBD socket and a vhost-user socket on one simulated disk.
struct Driver {
    nbd: PathBuf,
    vhost: PathBuf,
    thread: std::thread::JoinHandle<Result<(), driver::DriverError>>,
}

fn start(dir: &Path) -> Driver {
    let disk = Arc::new(SimDisk::new((VOLUME_BLOCKS + 1024) * BLOCK, 7));
    let opts = FormatOptions { volume_bytes: VOLUME_BYTES, log_blocks: 256, volume_id: *b"vhost-test-vol-1" };
    Volume::format(disk.as_ref(), None, opts).expect("format");
    disk.flush().expect("flush");
    let (nbd, vhost) = (dir.join("nbd.sock"), dir.join("vhost.sock"));
    let listeners = driver::Listeners {
        unix: Some(UnixListener::bind(&nbd).expect("bind nbd")),
        tcp: None,
        vhost: Some(UnixListener::bind(&vhost).expect("bind vhost")),
    };
    let mut cfg = driver::driver_config(&config::Config::default());
    cfg.node.tick = Duration::from_millis(2);
    let dev = disk as Arc<dyn Device>;
    let stop = Arc::new(AtomicBool::new(false));
    let log = Logger::root(Discard, o!());
    let thread = std::thread::spawn(move || driver::run(dev, None, listeners, cfg, stop, None, log));
    Driver { nbd, vhost, thread }
}

impl Driver {
    fn alive(&self) {
        assert!(!self.thread.is_finished(), "the driver stopped");
    }
}

/// One request's descriptors, as the test lays them out.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The test as a vhost-user front-end with one ring of QSIZE descriptors.
struct Guest {
    mem: GuestMemoryMmap<()>,
    memfd: File,
    frontend: Frontend,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    next_used: u16,
}

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("size the memfd");
    file
}

impl Guest {
    /// Connects and negotiates like QEMU does, up to memory table and inflight region; the
    /// ring is set up by `ring`.
    fn connect(path: &Path) -> Guest {
        let memfd = memfd(c"test-guest", MEM);
        let region = (GuestAddress(0), MEM as usize, Some(FileOffset::new(memfd.try_clone().expect("dup"), 0)));
        let mem = GuestMemoryMmap::from_ranges_with_files([region]).expect("map guest memory");
        // Up to 64 queues as the client's limit, so that the test can ask for rings the
        // device does not have.
        let mut frontend = Frontend::connect(path, 64).expect("connect");
        frontend.set_owner().expect("set owner");
        let offered = frontend.get_features().expect("features");
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert!(offered & protocol != 0, "no PROTOCOL_FEATURES");
        // VERSION_1, INDIRECT_DESC and the device's features; no EVENT_IDX (the test wants a
        // signal per completion).
        let wanted = offered & !(1u64 << 29);
        frontend.set_features(wanted).expect("set features");
        let pf = frontend.get_protocol_features().expect("protocol features");
        let needed = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        assert!(pf.contains(needed), "protocol features offered: {pf:?}");
        frontend.set_protocol_features(needed).expect("set protocol features");
        // Every message asks for an acknowledgement, as QEMU's do: a refusal is seen.
        frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        let guest = Guest {
            mem,
            memfd,
            frontend,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            next_avail: 0,
            next_used: 0,
        };
        guest.set_memory(MEM).expect("memory table");
        guest
    }

    fn set_memory(&self, size: u64) -> vhost::Result<Option<Vec<u64>>> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: USER,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        self.frontend.set_mem_table(&[region])
    }

    /// Inflight region, ring 0 of QSIZE, started.
    fn ring(&mut self) {
        let ask = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QSIZE };
        let (region, fd) = self.frontend.get_inflight_fd(&ask).expect("get inflight");
        self.frontend.set_inflight_fd(&region, fd.as_raw_fd()).expect("set inflight");
        self.start_ring(USER + DESC, 0).expect("start the ring");
    }

    /// Sets ring 0 up (its descriptor table at front-end address `desc`, the avail ring
    /// resuming at `base`) and enables it, as QEMU does.
    fn start_ring(&mut self, desc: u64, base: u16) -> vhost::Result<()> {
        self.frontend.set_vring_num(0, QSIZE)?;
        let addrs = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: USER + USED,
            avail_ring_addr: USER + AVAIL,
            log_addr: None,
        };
        self.frontend.set_vring_addr(0, &addrs)?;
        self.frontend.set_vring_base(0, base)?;
        self.frontend.set_vring_call(0, &self.call)?;
        self.frontend.set_vring_kick(0, &self.kick)?;
        self.frontend.set_vring_enable(0, true)
    }

    /// Writes descriptor `d` at entry `index` of the table at `table` (the ring's, or an
    /// indirect one).
    fn put_at(&self, table: u64, index: u64, d: Desc) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(table + 16 * index)).expect("descriptor");
    }

    fn put(&self, index: u16, d: Desc) {
        self.put_at(DESC, u64::from(index), d);
    }

    /// Lays out `chain` as descriptors 0.. (linked in order) and offers descriptor 0.
    fn offer_chain(&mut self, chain: &[(u64, u32, bool)]) {
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.put(i as u16, Desc { addr, len, flags, next: i as u16 + 1 });
        }
        self.offer(0);
    }

    /// Puts `head` in the avail ring and kicks.
    fn offer(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
        self.mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail slot");
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .store(self.next_avail.to_le(), GuestAddress(AVAIL + 2), std::sync::atomic::Ordering::Release)
            .expect("avail idx");
        self.kick.write(1).expect("kick");
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.load(GuestAddress(USED + 2), std::sync::atomic::Ordering::Acquire).expect("used idx"))
    }

    /// Waits for the next used element: (head, length). None when none comes within 5 s.
    fn completion(&mut self) -> Option<(u32, u32)> {
        self.completion_within(Duration::from_secs(5))
    }

    fn completion_within(&mut self, wait: Duration) -> Option<(u32, u32)> {
        let until = Instant::now() + wait;
        while self.used_idx() == self.next_used {
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let slot = USED + 4 + 8 * u64::from(self.next_used % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used len");
        self.next_used = self.next_used.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER)).expect("header");
        self.mem.write_obj(UNANSWERED, GuestAddress(STATUS)).expect("status");
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    /// A request of the usual shape: header, one data buffer (`data_write`: device-writable),
    /// status. Returns the status and the used length.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        self.header(kind, sector);
        let mut chain = vec![(HEADER, 16, false)];
        if let Some((len, write)) = data {
            chain.push((DATA, len, write));
        }
        chain.push((STATUS, 1, true));
        self.offer_chain(&chain);
        let (head, len) = self.completion().expect("no completion");
        assert_eq!(head, 0);
        (self.status(), len)
    }

    fn write(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        self.mem.write_slice(bytes, GuestAddress(DATA)).expect("data");
        self.request(T_OUT, sector, Some((bytes.len() as u32, false))).0
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.mem.write_slice(&vec![0x5a; len as usize], GuestAddress(DATA)).expect("poison");
        let (status, used) = self.request(T_IN, sector, Some((len, true)));
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).expect("data");
        if status == S_OK {
            assert_eq!(used, len + 1, "used length of a read");
        }
        (status, out)
    }

    /// A good write and read back: the ring still works.
    fn still_works(&mut self, sector: u64, seed: u8) {
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        assert_eq!(self.write(sector, &bytes), S_OK, "a good write after bad input");
        let (status, back) = self.read(sector, 8192);
        assert_eq!(status, S_OK);
        assert!(back == bytes, "read back what was written");
    }
}

/// NBD read of `len` bytes at `offset` through the driver's other session (old-style
/// handshake with NBD_OPT_EXPORT_NAME).
fn nbd_read(path: &Path, offset: u64, len: u32) -> Vec<u8> {
    let mut s = common::nbd_connect(path);
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    s.write_all(&req).expect("request");
    let mut head = [0u8; 16];
    s.read_exact(&mut head).expect("reply");
    assert_eq!(&head[4..8], &[0, 0, 0, 0], "NBD read error");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).expect("data");
    data
}

/// The device's answers to well-formed requests of every kind, and what NBD sees of them.
#[test]
fn a_front_end_reads_and_writes_the_volume_nbd_serves() {
    let dir = scratch("basics");
    let driver = start(&dir);
    let mut g = Guest::connect(&driver.vhost);
    let config = g.frontend.get_config(0, 60, vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE, &[0; 60]);
    let (_, config) = config.expect("config space");
    assert_eq!(u64::from_le_bytes(config[..8].try_into().expect("8")), VOLUME_BYTES / 512, "capacity");
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().expect("4")), 4096, "blk_size");
    g.ring();
    let bytes: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(g.write(128, &bytes), S_OK);
    let (status, back) = g.read(128, 65536);
    assert_eq!(status, S_OK);
    assert!(back == bytes);
    assert!(nbd_read(&driver.nbd, 128 * 512, 65536) == bytes, "NBD reads what the guest wrote");
    // A 512-byte write in the middle of a 4 KiB block.
    assert_eq!(g.write(129, &[0xab; 512]), S_OK);
    assert_eq!(nbd_read(&driver.nbd, 129 * 512, 512), vec![0xab; 512]);
    assert_eq!(g.request(T_FLUSH, 0, None).0, S_OK);
    let (status, used) = g.request(T_GET_ID, 0, Some((20, true)));
    assert_eq!((status, used), (S_OK, 21));
    let mut id = [0u8; 4];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id, b"rblk");
    // Write zeroes, then discard, over part of what was written: 8 sectors at 136.
    for kind in [T_WRITE_ZEROES, T_DISCARD] {
        let mut range = [0u8; 16];
        range[..8].copy_from_slice(&136u64.to_le_bytes());
        range[8..12].copy_from_slice(&8u32.to_le_bytes());
        g.mem.write_slice(&range, GuestAddress(DATA)).expect("range");
        assert_eq!(g.request(kind, 0, Some((16, false))).0, S_OK);
        assert_eq!(nbd_read(&driver.nbd, 136 * 512, 4096), vec![0; 4096]);
    }
    // Descriptors through an indirect table: header, data, status.
    let table = 0x30000;
    g.header(T_IN, 128);
    let entries = [
        Desc { addr: HEADER, len: 16, flags: F_NEXT, next: 1 },
        Desc { addr: DATA, len: 4096, flags: F_NEXT | F_WRITE, next: 2 },
        Desc { addr: STATUS, len: 1, flags: F_WRITE, next: 0 },
    ];
    for (i, &d) in entries.iter().enumerate() {
        g.put_at(table, i as u64, d);
    }
    g.put(0, Desc { addr: table, len: 48, flags: F_INDIRECT, next: 0 });
    g.offer(0);
    assert_eq!(g.completion(), Some((0, 4097)));
    assert_eq!(g.status(), S_OK);
    let mut got = vec![0u8; 4096];
    g.mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
    let mut want = bytes[..4096].to_vec();
    want[512..1024].fill(0xab);
    assert!(got == want, "read through an indirect table");
    driver.alive();
}

/// Bad requests on the ring: each is refused (status when it has a trustworthy status byte,
/// a used length of 0 when not), nothing outside its buffers changes, and the ring goes on.
#[test]
fn malformed_requests_are_refused_and_the_ring_goes_on() {
    let dir = scratch("requests");
    let driver = start(&dir);
    let mut g = Guest::connect(&driver.vhost);
    g.ring();
    g.still_works(0, 1);
    // Guard bytes around the data buffer: nothing may write there.
    let guard = vec![0x77u8; 4096];
    g.mem.write_slice(&guard, GuestAddress(DATA - 4096)).expect("guard");
    g.mem.write_slice(&guard, GuestAddress(DATA + 8192)).expect("guard");
    /// What the case is, request type, sector, data buffer (length, device-writable), status.
    type Case = (&'static str, u32, u64, Option<(u32, bool)>, u8);
    let cases: Vec<Case> = vec![
        ("unknown request type", 99, 0, None, S_UNSUPP),
        ("read beyond the end", T_IN, VOLUME_BYTES / 512, Some((4096, true)), S_IOERR),
        ("write straddling the end", T_OUT, VOLUME_BYTES / 512 - 1, Some((4096, false)), S_IOERR),
        ("sector number that overflows", T_IN, u64::MAX / 256, Some((4096, true)), S_IOERR),
        ("read of 100 bytes", T_IN, 0, Some((100, true)), S_IOERR),
        ("write of 700 bytes", T_OUT, 0, Some((700, false)), S_IOERR),
        ("read whose buffer the device may not write", T_IN, 0, Some((4096, false)), S_IOERR),
        ("write whose data buffer is device-writable", T_OUT, 0, Some((4096, true)), S_IOERR),
        ("discard with 3 bytes of range", T_DISCARD, 0, Some((3, false)), S_IOERR),
    ];
    for (what, kind, sector, data, want) in cases {
        let (status, _) = g.request(kind, sector, data);
        assert_eq!(status, want, "{what}");
        g.still_works(8, 2);
    }
    // A discard with flags the spec reserves; a range beyond the end.
    for (sector, flags, want) in [(0u64, 1u32, S_UNSUPP), (VOLUME_BYTES / 512, 0, S_IOERR)] {
        let mut range = [0u8; 16];
        range[..8].copy_from_slice(&sector.to_le_bytes());
        range[8..12].copy_from_slice(&8u32.to_le_bytes());
        range[12..].copy_from_slice(&flags.to_le_bytes());
        g.mem.write_slice(&range, GuestAddress(DATA)).expect("range");
        assert_eq!(g.request(T_DISCARD, 0, Some((16, false))).0, want);
    }
    // A header of 8 bytes.
    g.header(T_IN, 0);
    g.offer_chain(&[(HEADER, 8, false), (DATA, 4096, true), (STATUS, 1, true)]);
    assert_eq!(g.completion().map(|c| c.0), Some(0));
    assert_eq!(g.status(), S_IOERR, "short header");
    // A header split over two descriptors is fine.
    g.header(T_IN, 0);
    g.offer_chain(&[(HEADER, 10, false), (HEADER + 10, 6, false), (DATA, 4096, true), (STATUS, 1, true)]);
    assert_eq!(g.completion(), Some((0, 4097)));
    assert_eq!(g.status(), S_OK, "split header");
    // Chains with nothing to trust: completed with length 0, status byte untouched.
    let broken: Vec<(&str, Vec<(u16, Desc)>)> = vec![
        (
            "data outside guest memory",
            vec![
                (0, Desc { addr: HEADER, len: 16, flags: F_NEXT, next: 1 }),
                (1, Desc { addr: MEM - 2048, len: 4096, flags: F_NEXT | F_WRITE, next: 2 }),
                (2, Desc { addr: STATUS, len: 1, flags: F_WRITE, next: 0 }),
            ],
        ),
        (
            "address that wraps around",
            vec![
                (0, Desc { addr: HEADER, len: 16, flags: F_NEXT, next: 1 }),
                (1, Desc { addr: u64::MAX - 100, len: 4096, flags: F_NEXT | F_WRITE, next: 2 }),
                (2, Desc { addr: STATUS, len: 1, flags: F_WRITE, next: 0 }),
            ],
        ),
        (
            "a loop",
            vec![
                (0, Desc { addr: HEADER, len: 16, flags: F_NEXT, next: 1 }),
                (1, Desc { addr: DATA, len: 512, flags: F_NEXT | F_WRITE, next: 0 }),
            ],
        ),
        ("next beyond the table", vec![(0, Desc { addr: HEADER, len: 16, flags: F_NEXT, next: QSIZE + 3 })]),
        (
            "readable after writable",
            vec![
                (0, Desc { addr: HEADER, len: 16, flags: F_NEXT, next: 1 }),
                (1, Desc { addr: STATUS, len: 1, flags: F_NEXT | F_WRITE, next: 2 }),
                (2, Desc { addr: DATA, len: 512, flags: 0, next: 0 }),
            ],
        ),
        (
            "indirect table outside guest memory",
            vec![(0, Desc { addr: MEM + (1 << 30), len: 64, flags: F_INDIRECT, next: 0 })],
        ),
        ("indirect table of 20 bytes", vec![(0, Desc { addr: 0x30000, len: 20, flags: F_INDIRECT, next: 0 })]),
        ("empty indirect table", vec![(0, Desc { addr: 0x30000, len: 0, flags: F_INDIRECT, next: 0 })]),
    ];
    for (what, descs) in broken {
        g.header(T_IN, 0);
        for (i, d) in descs {
            g.put(i, d);
        }
        g.offer(0);
        assert_eq!(g.completion(), Some((0, 0)), "{what}: completed with nothing written");
        assert_eq!(g.status(), UNANSWERED, "{what}: the status byte was written");
        g.still_works(16, 3);
    }
    // A nested indirect table, and a chain longer than any request may be.
    g.put(0, Desc { addr: 0x30000, len: 16, flags: F_INDIRECT, next: 0 });
    g.put_at(0x30000, 0, Desc { addr: 0x31000, len: 16, flags: F_INDIRECT, next: 0 });
    g.offer(0);
    assert_eq!(g.completion(), Some((0, 0)), "nested indirect table");
    let long = 0x40000;
    for i in 0..400u64 {
        g.put_at(long, i, Desc { addr: DATA + 512 * (i % 8), len: 512, flags: F_NEXT | F_WRITE, next: (i + 1) as u16 });
    }
    g.put(0, Desc { addr: long, len: 400 * 16, flags: F_INDIRECT, next: 0 });
    g.offer(0);
    assert_eq!(g.completion(), Some((0, 0)), "a chain of 400 descriptors");
    g.still_works(24, 4);
    let mut around = vec![0u8; 4096];
    g.mem.read_slice(&mut around, GuestAddress(DATA - 4096)).expect("guard");
    assert!(around == guard, "the device wrote before the data buffer");
    g.mem.read_slice(&mut around, GuestAddress(DATA + 8192)).expect("guard");
    assert!(around == guard, "the device wrote after the data buffer");
    driver.alive();
}

/// A ring the guest breaks (an avail index far ahead, a head beyond the table) stops; the
/// driver keeps serving NBD and the next front-end.
#[test]
fn a_broken_ring_stops_and_the_driver_serves_on() {
    let dir = scratch("ring");
    let driver = start(&dir);
    for round in 0..2 {
        let mut g = Guest::connect(&driver.vhost);
        g.ring();
        g.still_works(0, 5);
        if round == 0 {
            // The avail index jumps by more than the ring holds.
            g.next_avail = g.next_avail.wrapping_add(QSIZE * 3);
            g.offer(0);
        } else {
            g.offer(QSIZE + 1);
        }
        assert_eq!(g.completion_within(Duration::from_secs(1)), None, "a broken ring answered");
        driver.alive();
        assert_eq!(nbd_read(&driver.nbd, 0, 512).len(), 512);
    }
    let mut g = Guest::connect(&driver.vhost);
    g.ring();
    g.still_works(0, 6);
}

/// Bad messages close the connection (the device refuses them; the client sees an error),
/// and the next front-end is served.
#[test]
fn bad_messages_close_the_connection_and_the_next_front_end_is_served() {
    let dir = scratch("messages");
    let driver = start(&dir);
    type Bad = fn(&mut Guest) -> bool;
    let cases: Vec<(&str, Bad)> = vec![
        ("a ring index beyond the device's queues", |g| g.frontend.set_vring_num(40, QSIZE).is_err()),
        ("a ring size that is not a power of two", |g| g.frontend.set_vring_num(0, 100).is_err()),
        ("a ring size beyond the limit", |g| g.frontend.set_vring_num(0, 32768).is_err()),
        ("a memory table larger than its file", |g| g.set_memory(MEM * 4).is_err()),
        ("a ring outside guest memory", |g| g.start_ring(USER + MEM + 4096, 0).is_err()),
        ("an inflight region of the wrong size", |g| {
            let ask = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QSIZE };
            let Ok((mut region, fd)) = g.frontend.get_inflight_fd(&ask) else { return true };
            region.mmap_size *= 2;
            g.frontend.set_inflight_fd(&region, fd.as_raw_fd()).is_err()
        }),
        ("an inflight region for more queues than the device has", |g| {
            let ask = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 64, queue_size: QSIZE };
            g.frontend.get_inflight_fd(&ask).is_err()
        }),
    ];
    for (what, bad) in cases {
        let mut g = Guest::connect(&driver.vhost);
        assert!(bad(&mut g), "{what}: accepted");
        // The connection is closed: the next message fails.
        let closed = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            g.frontend.get_features().is_err()
        });
        assert!(closed, "{what}: the connection stayed open");
        driver.alive();
        let mut next = Guest::connect(&driver.vhost);
        next.ring();
        next.still_works(40, 7);
    }
}

/// The memory table replaced while requests run (QEMU does so when guest memory is added):
/// the ring goes on with the new table; a table that drops the ring's memory makes its
/// requests fail, not the driver.
#[test]
fn the_memory_table_changes_under_load() {
    let dir = scratch("memory");
    let driver = start(&dir);
    let mut g = Guest::connect(&driver.vhost);
    g.ring();
    for round in 0..20u8 {
        g.still_works(u64::from(round) * 16, round);
        g.set_memory(MEM).expect("the same table again");
    }
    // Half the memory: the data buffers (at 128 KiB) stay inside, the rings too.
    g.set_memory(MEM / 2).expect("a smaller table");
    g.still_works(0, 9);
    // A buffer in the memory that is gone: refused, not read.
    g.header(T_IN, 0);
    g.offer_chain(&[(HEADER, 16, false), (MEM / 2 + 4096, 4096, true), (STATUS, 1, true)]);
    assert_eq!(g.completion(), Some((0, 0)));
    g.still_works(0, 10);
    driver.alive();
}

/// What a driver killed with requests in flight leaves, laid out by hand, and a new driver
/// taking over: the requests the inflight region marks (and only those) are completed, in
/// the order taken; one whose completion reached the used ring before the old driver died
/// (the region's used_idx behind the ring's) is not redone; the avail ring resumes after
/// everything the old driver took.
#[test]
fn a_new_driver_resubmits_what_the_inflight_region_marks() {
    let dir = scratch("resubmit");
    let driver = start(&dir);
    let mut g = Guest::connect(&driver.vhost);
    let ask = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QSIZE };
    let (region, fd) = g.frontend.get_inflight_fd(&ask).expect("get inflight");
    let file = File::from(std::os::fd::OwnedFd::from(fd));
    let area = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        region.mmap_size as usize,
        Some(FileOffset::new(file.try_clone().expect("dup"), region.mmap_offset)),
    )])
    .expect("map the inflight region");
    // Five writes taken by the "old driver": heads 0, 3, 6, 9, 12, each header + 4 KiB +
    // status, to sectors 800 + 8 * n with data n + 1.
    let heads = [0u16, 3, 6, 9, 12];
    for (n, &head) in heads.iter().enumerate() {
        let base = 0x100000 + 0x4000 * n as u64;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&(800 + 8 * n as u64).to_le_bytes());
        g.mem.write_slice(&h, GuestAddress(base)).expect("header");
        g.mem.write_slice(&[n as u8 + 1; 4096], GuestAddress(base + 0x1000)).expect("data");
        g.mem.write_obj(UNANSWERED, GuestAddress(base + 0x3000)).expect("status");
        g.put(head, Desc { addr: base, len: 16, flags: F_NEXT, next: head + 1 });
        g.put(head + 1, Desc { addr: base + 0x1000, len: 4096, flags: F_NEXT, next: head + 2 });
        g.put(head + 2, Desc { addr: base + 0x3000, len: 1, flags: F_WRITE, next: 0 });
        let slot = AVAIL + 4 + 2 * n as u64;
        g.mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail slot");
    }
    g.mem.write_obj(5u16.to_le(), GuestAddress(AVAIL + 2)).expect("avail idx");
    g.next_avail = 5;
    // The old driver completed heads 3 and 9 (out of order) into the used ring; the region
    // still marks 0, 6, 12 and also 9: it died between 9's used-ring write and its unmark.
    for (i, head) in [3u32, 9].into_iter().enumerate() {
        let slot = USED + 4 + 8 * i as u64;
        g.mem.write_obj(head.to_le(), GuestAddress(slot)).expect("used id");
        g.mem.write_obj(4097u32.to_le(), GuestAddress(slot + 4)).expect("used len");
    }
    g.mem.write_obj(2u16.to_le(), GuestAddress(USED + 2)).expect("used idx");
    g.next_used = 2;
    area.write_obj(1u16.to_le(), GuestAddress(8)).expect("version");
    area.write_obj(QSIZE.to_le(), GuestAddress(10)).expect("desc_num");
    area.write_obj(9u16.to_le(), GuestAddress(12)).expect("last_batch_head");
    area.write_obj(1u16.to_le(), GuestAddress(14)).expect("used_idx");
    for (head, counter) in [(0u64, 0u64), (6, 2), (9, 3), (12, 4)] {
        area.write_obj(1u8, GuestAddress(16 + 16 * head)).expect("inflight");
        area.write_obj(counter.to_le(), GuestAddress(16 + 16 * head + 8)).expect("counter");
    }
    g.frontend.set_inflight_fd(&region, file.as_raw_fd()).expect("set inflight");
    // As QEMU does after a backend died: the base is the used ring's idx.
    g.start_ring(USER + DESC, 2).expect("start the ring");
    let mut done: Vec<u32> = (0..3).map(|_| g.completion().expect("a resubmitted request").0).collect();
    done.sort_unstable();
    assert_eq!(done, vec![0, 6, 12], "exactly the marked requests, not 9");
    for (n, &head) in heads.iter().enumerate() {
        let status: u8 = g.mem.read_obj(GuestAddress(0x100000 + 0x4000 * n as u64 + 0x3000)).expect("status");
        let redone = [0u16, 6, 12].contains(&head);
        assert_eq!(status, if redone { S_OK } else { UNANSWERED }, "status of head {head}");
        assert_eq!(
            nbd_read(&driver.nbd, (800 + 8 * n as u64) * 512, 4096),
            if redone { vec![n as u8 + 1; 4096] } else { vec![0; 4096] }
        );
    }
    // Nothing else comes (3 and 9 are not taken again from the avail ring), and the ring
    // goes on with the next request the guest offers.
    assert_eq!(g.completion_within(Duration::from_millis(300)), None, "a request was redone");
    let marks: Vec<u8> = (0..QSIZE as u64).map(|h| area.read_obj(GuestAddress(16 + 16 * h)).expect("mark")).collect();
    assert!(marks.iter().all(|&m| m == 0), "marks left after completion: {marks:?}");
    g.still_works(0, 11);
    driver.alive();
}
