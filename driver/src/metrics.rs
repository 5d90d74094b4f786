//! The metrics page: counters the sandboxed driver keeps in shared memory for its supervisor.
//!
//! The driver cannot bind a socket, so it cannot serve metrics itself. The supervisor creates
//! a memfd of `PAGE_BYTES`, writes the header (`MAGIC`, `VERSION`) and hands it over with
//! `--metrics-fd`; both map it `MAP_SHARED`. The driver maps it before entering its sandbox
//! and from then on only adds to counters (relaxed atomic adds, the only cost on the request
//! path) and sets gauges; the supervisor reads them when scraped.
//!
//! The page belongs to the supervisor and outlives every incarnation: counters are totals
//! over the supervisor's life (a restarted driver goes on adding to them), gauges (`*_blocks`,
//! `log_*_bytes`) are whatever the latest incarnation last set. A driver that dies between two
//! adds loses nothing that was counted. The supervisor only reads numbers from it: a broken
//! driver can make them wrong, never make the supervisor misbehave.
//!
//! The layout is `Page`, `repr(C)`, every field an `AtomicU64`; `VERSION` changes with it.
//! Without a page (a driver run by hand, or in-process by tests) the counters go to a page
//! of the process's own.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

/// "RBLKMETR", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RBLKMETR");
/// The layout's version: the supervisor writes it, a driver with another refuses the page.
pub const VERSION: u64 = 1;
/// The size of the shared mapping (one page holds `Page`).
pub const PAGE_BYTES: usize = 4096;

/// Request types, in the order of `Page::requests`, `bytes` and `latency`.
pub const KINDS: [&str; 8] = ["read", "write", "flush", "trim", "write_zeroes", "block_status", "cache", "other"];

/// A request type, an index into `KINDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Trim = 3,
    WriteZeroes = 4,
    BlockStatus = 5,
    Cache = 6,
    Other = 7,
}

impl Kind {
    /// The metrics kind of an NBD request.
    pub fn of(kind: session::RequestKind) -> Kind {
        match kind {
            session::RequestKind::Read => Kind::Read,
            session::RequestKind::Write => Kind::Write,
            session::RequestKind::Flush => Kind::Flush,
            session::RequestKind::Trim => Kind::Trim,
            session::RequestKind::WriteZeroes => Kind::WriteZeroes,
            session::RequestKind::Cache => Kind::Cache,
            session::RequestKind::BlockStatus => Kind::BlockStatus,
            session::RequestKind::Disc | session::RequestKind::Other(_) => Kind::Other,
        }
    }
}

/// The NBD error values replies carry, in the order of `Page::errors`.
pub const ERRNOS: [(u32, &str); 8] = [
    (1, "EPERM"),
    (5, "EIO"),
    (12, "ENOMEM"),
    (22, "EINVAL"),
    (28, "ENOSPC"),
    (75, "EOVERFLOW"),
    (95, "ENOTSUP"),
    (108, "ESHUTDOWN"),
];

/// Buckets of a histogram: bucket `k` counts values in (2^(k-1), 2^k] (bucket 0: ≤ 1); larger
/// values count only in `count` (the +Inf bucket).
pub const BUCKETS: usize = 24;

/// A histogram with fixed powers-of-two bounds: le = 1, 2, 4, ... 2^23 units.
#[repr(C)]
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative).
    pub buckets: [AtomicU64; BUCKETS],
    pub sum: AtomicU64,
    pub count: AtomicU64,
}

impl Histogram {
    #[allow(clippy::declare_interior_mutable_const)]
    const ZERO: Histogram =
        Histogram { buckets: [const { AtomicU64::new(0) }; BUCKETS], sum: AtomicU64::new(0), count: AtomicU64::new(0) };

    pub fn observe(&self, value: u64) {
        let k = bucket(value);
        if k < BUCKETS {
            self.buckets[k].fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(value, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

/// The bucket of `value`: the smallest k with value ≤ 2^k.
pub fn bucket(value: u64) -> usize {
    if value <= 1 {
        0
    } else {
        (64 - (value - 1).leading_zeros()) as usize
    }
}

/// The shared counters (layout `VERSION` 1). Times are in microseconds unless named `_ms`.
#[repr(C)]
#[derive(Debug)]
pub struct Page {
    pub magic: AtomicU64,
    pub version: AtomicU64,
    /// Requests received, by `KINDS`.
    pub requests: [AtomicU64; KINDS.len()],
    /// Bytes those requests named (a read's or write's length; the range of a trim,
    /// write-zeroes, cache or block status).
    pub bytes: [AtomicU64; KINDS.len()],
    /// Error replies, by `ERRNOS`.
    pub errors: [AtomicU64; ERRNOS.len()],
    /// From a request's header read to its reply, by `KINDS`, µs. For writes, trims and
    /// write-zeroes that is the acknowledged-write latency: the reply goes out only once the
    /// entry is durable in the log and applied.
    pub latency: [Histogram; KINDS.len()],
    /// Entries in each log append (one group commit).
    pub batch_entries: Histogram,
    /// Bytes of log entries in each append.
    pub batch_bytes: AtomicU64,
    /// How long each checkpoint took, sealing to installed root, ms.
    pub checkpoint_ms: Histogram,
    /// Gauges, set by the latest incarnation: the log ring's bytes in use and its size; the
    /// data region's blocks, those in use (data, tree, bitmaps, awaiting release) and those a
    /// data write may still take; the volume's applied Raft index.
    pub log_used_bytes: AtomicU64,
    pub log_size_bytes: AtomicU64,
    pub data_blocks: AtomicU64,
    pub used_blocks: AtomicU64,
    pub free_blocks: AtomicU64,
    pub applied_index: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Page>() <= PAGE_BYTES);

impl Page {
    #[allow(clippy::declare_interior_mutable_const)]
    const ZERO: Page = Page {
        magic: AtomicU64::new(0),
        version: AtomicU64::new(0),
        requests: [const { AtomicU64::new(0) }; KINDS.len()],
        bytes: [const { AtomicU64::new(0) }; KINDS.len()],
        errors: [const { AtomicU64::new(0) }; ERRNOS.len()],
        latency: [Histogram::ZERO; KINDS.len()],
        batch_entries: Histogram::ZERO,
        batch_bytes: AtomicU64::new(0),
        checkpoint_ms: Histogram::ZERO,
        log_used_bytes: AtomicU64::new(0),
        log_size_bytes: AtomicU64::new(0),
        data_blocks: AtomicU64::new(0),
        used_blocks: AtomicU64::new(0),
        free_blocks: AtomicU64::new(0),
        applied_index: AtomicU64::new(0),
    };

    /// A request arrived.
    pub fn request(&self, kind: Kind, bytes: u64) {
        self.requests[kind as usize].fetch_add(1, Relaxed);
        self.bytes[kind as usize].fetch_add(bytes, Relaxed);
    }

    /// A request of `kind` was answered `elapsed` after it arrived.
    pub fn answered(&self, kind: Kind, elapsed: Duration) {
        self.latency[kind as usize].observe(elapsed.as_micros() as u64);
    }

    /// An error reply with NBD error `errno` (values outside `ERRNOS`, which NBD does not
    /// define, and 0, no error, are not counted).
    pub fn error(&self, errno: u32) {
        if let Some(at) = ERRNOS.iter().position(|(e, _)| *e == errno) {
            self.errors[at].fetch_add(1, Relaxed);
        }
    }
}

/// A mapping of a metrics page.
#[derive(Debug)]
pub struct Mapped {
    page: NonNull<Page>,
}

// SAFETY: the mapping is only ever accessed through `&Page`, whose fields are all atomics
// (Sync); the pointer stays valid until `drop` unmaps it, which needs ownership.
unsafe impl Send for Mapped {}
// SAFETY: as above: shared access is atomic loads and adds only.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Creates a fresh page (the supervisor): a memfd of `PAGE_BYTES`, zeroed, with the header
    /// written. The descriptor is close-on-exec; hand it to a driver across exec explicitly.
    pub fn create() -> std::io::Result<(OwnedFd, Mapped)> {
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"rblk-metrics".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A fresh memfd reads as zeros once it has a size.
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE_BYTES as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mapped = Self::map_unchecked(fd.as_raw_fd())?;
        mapped.magic.store(MAGIC, Relaxed);
        mapped.version.store(VERSION, Relaxed);
        Ok((fd, mapped))
    }

    /// Maps the page handed over as `fd` (the driver), checking its size and header.
    pub fn open(fd: BorrowedFd<'_>) -> Result<Mapped, String> {
        let file_len = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| format!("metrics fd: {e}"))?.st_size;
        if file_len != PAGE_BYTES as i64 {
            return Err(format!("metrics fd: {file_len} bytes, expected {PAGE_BYTES}"));
        }
        let mapped = Self::map_unchecked(fd.as_raw_fd()).map_err(|e| format!("metrics fd: mapping: {e}"))?;
        let (magic, version) = (mapped.magic.load(Relaxed), mapped.version.load(Relaxed));
        if magic != MAGIC || version != VERSION {
            return Err(format!(
                "metrics fd: not a metrics page of version {VERSION} (magic {magic:#x}, version {version})"
            ));
        }
        Ok(mapped)
    }

    fn map_unchecked(fd: i32) -> std::io::Result<Mapped> {
        // SAFETY: a new shared mapping of PAGE_BYTES of a descriptor that holds at least that
        // many bytes (checked or set by the callers); the kernel picks the address.
        let at = unsafe {
            libc::mmap(std::ptr::null_mut(), PAGE_BYTES, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(at.cast::<Page>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Mapped { page })
    }
}

impl std::ops::Deref for Mapped {
    type Target = Page;

    fn deref(&self) -> &Page {
        // SAFETY: the mapping is page-aligned, PAGE_BYTES ≥ size_of::<Page>() long, stays
        // mapped while `self` lives, and any bit pattern is a valid `Page` (all AtomicU64).
        // Other processes change it only through atomic operations of their own.
        unsafe { self.page.as_ref() }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map_unchecked` made; no reference into it
        // outlives `self` (they borrow it).
        unsafe {
            libc::munmap(self.page.as_ptr().cast(), PAGE_BYTES);
        }
    }
}

static SHARED: OnceLock<Mapped> = OnceLock::new();
static OWN: Page = Page::ZERO;

/// Installs the page the supervisor handed over (once, before serving); later calls are
/// ignored.
pub fn install(mapped: Mapped) {
    let _ = SHARED.set(mapped);
}

/// The page counters go to: the supervisor's, else this process's own.
pub fn page() -> &'static Page {
    match SHARED.get() {
        Some(m) => m,
        None => &OWN,
    }
}

/// Sets the volume gauges from its statistics.
pub fn volume_gauges(stats: &raft_state::volume::VolumeStats) {
    let p = page();
    p.data_blocks.store(stats.data_blocks, Relaxed);
    p.used_blocks.store(stats.used_blocks, Relaxed);
    p.free_blocks.store(stats.writable_blocks, Relaxed);
    p.applied_index.store(stats.applied_index, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        let cases = [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1024, 10), (1025, 11), (1 << 23, 23)];
        for (value, k) in cases {
            assert_eq!(bucket(value), k, "value {value}");
        }
        assert_eq!(bucket((1 << 23) + 1), BUCKETS, "beyond the last bound: +Inf only");
        assert_eq!(bucket(u64::MAX), 64);
    }

    #[test]
    fn a_created_page_is_seen_by_a_second_mapping() {
        let (fd, page) = Mapped::create().expect("create");
        use std::os::fd::AsFd;
        let other = Mapped::open(fd.as_fd()).expect("open");
        page.request(Kind::Write, 4096);
        other.request(Kind::Write, 512);
        other.latency[Kind::Read as usize].observe(3);
        other.error(28);
        assert_eq!(page.requests[Kind::Write as usize].load(Relaxed), 2);
        assert_eq!(page.bytes[Kind::Write as usize].load(Relaxed), 4608);
        assert_eq!(page.latency[Kind::Read as usize].buckets[2].load(Relaxed), 1);
        assert_eq!(page.errors[4].load(Relaxed), 1, "ENOSPC");
    }

    #[test]
    fn a_page_with_another_header_is_refused() {
        let (fd, page) = Mapped::create().expect("create");
        page.version.store(VERSION + 1, Relaxed);
        use std::os::fd::AsFd;
        let e = Mapped::open(fd.as_fd()).expect_err("another version");
        assert!(e.contains("version"), "{e}");
    }
}
