//! [`FileDevice`]: a [`Device`] on a regular file or a block device.
//!
//! I/O is positional (pread/pwrite), so the device is shared between threads without seek
//! state. A second, buffered descriptor may be attached for the page cache
//! ([`FileDevice::with_page_cache`]): `read_cached_at` and `write_many` use it, everything
//! else stays direct. The device uses O_DIRECT when the file system accepts it, so that reads show what the media
//! holds and not a page cache the driver's previous incarnation left behind; where O_DIRECT is
//! refused (EINVAL: some file systems, e.g. older tmpfs) it falls back to buffered I/O, which
//! is still correct because `flush` is fdatasync either way. Buffers that are not 4 KiB-aligned
//! in memory are bounced through an [`AlignedBuf`] when O_DIRECT is on.
//!
//! The size is fixed at open: a regular file's length rounded down to whole blocks, or a block
//! device's size from BLKGETSIZE64. The device never grows or shrinks the file.
//!
//! A write or flush error poisons the device (see the failure model in [`super`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;

use super::{check_io, AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};

// BLKGETSIZE64 is `_IOR(0x12, 114, size_t)` in <linux/fs.h>, yet the kernel stores a u64
// through the pointer. `ioctl_read!` would derive the request code from the data type (u64),
// which is wrong where size_t is 4 bytes; so the code is built from size_t and the data is u64.
nix::ioctl_read_bad!(blk_get_size64, nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()), u64);

/// A raw sector device on a regular file or a block device; see the module docs.
pub struct FileDevice {
    file: File,
    /// The path (or the name given to [`FileDevice::from_fd`]), for errors and logs.
    name: String,
    direct: bool,
    size: u64,
    poisoned: AtomicBool,
    /// The same file opened read-write without O_DIRECT, for `read_cached_at` and
    /// `write_many` (see `with_page_cache`).
    cached: Option<File>,
    /// For `write_many`: one system call submits a whole batch, and the device works on all
    /// of it at once. `None` where io_uring is unavailable (then one write after another).
    ring: Option<Mutex<IoUring>>,
    /// Page-cache writes not yet started on their way to the device (`write_many`).
    unstarted: Mutex<Unstarted>,
    /// Runs of placed writes whose write-back may be in flight at once (`write_placed`).
    writeback_slots: Slots,
}

/// Runs of placed writes on their way to the device at most, all placed writes together.
const PLACED_WRITEBACK_SLOTS: usize = 32;

/// A counting semaphore.
struct Slots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots { free: Mutex::new(n), freed: std::sync::Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // A count only: a panic elsewhere cannot leave it half changed.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_take(&self) -> bool {
        let mut free = self.lock();
        let took = *free > 0;
        if took {
            *free -= 1;
        }
        took
    }

    fn take(&self) {
        let mut free = self.lock();
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
    }

    fn give(&self, n: usize) {
        *self.lock() += n;
        self.freed.notify_all();
    }
}

/// The page-cache writes since write-back was last started: the range they lie in and their
/// bytes.
#[derive(Default)]
struct Unstarted {
    from: u64,
    to: u64,
    bytes: u64,
}

/// Requests in flight at most per `write_many` system call.
const RING_ENTRIES: u32 = 64;

/// Page-cache writes of fewer bytes than this are left to the next flush instead of written
/// back at once (see `write_many`).
const EARLY_WRITEBACK_MIN: u64 = 256 << 10;

impl FileDevice {
    /// Opens an existing regular file or block device read-write, with O_DIRECT if the file
    /// system accepts it.
    pub fn open(path: &Path) -> Result<FileDevice, DeviceError> {
        Self::open_with(path, true)
    }

    /// Creates a sparse regular file of exactly `size_bytes` (a non-zero multiple of 4 KiB) and
    /// opens it. Refuses to touch an existing file.
    pub fn create(path: &Path, size_bytes: u64) -> Result<FileDevice, DeviceError> {
        let name = path.display().to_string();
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK) {
            let msg = format!("size {size_bytes} is not a non-zero multiple of {BLOCK_SIZE} bytes");
            return Err(io_error("create", &name, 0, 0, io::Error::new(io::ErrorKind::InvalidInput, msg)));
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_error("create", &name, 0, 0, e))?;
        // The file's length and its directory entry are made durable here, so a format that
        // flushes only through the device (fdatasync) cannot lose the file itself.
        let made = file.set_len(size_bytes).and_then(|()| file.sync_all()).and_then(|()| sync_parent_dir(path));
        drop(file);
        if let Err(e) = made {
            // Best effort: do not leave a half-made image behind; the error reported is the first.
            let _ = std::fs::remove_file(path);
            return Err(io_error("create", &name, 0, 0, e));
        }
        Self::open(path)
    }

    /// Wraps a descriptor inherited from the supervisor (which may not be able to open the
    /// path itself). Turns on O_DIRECT if the file system accepts it, else stays buffered.
    pub fn from_fd(fd: OwnedFd, name: String) -> Result<FileDevice, DeviceError> {
        let file = File::from(fd);
        let size = device_size(&file, &name)?;
        let mut dev = FileDevice {
            file,
            name,
            direct: false,
            size,
            poisoned: AtomicBool::new(false),
            cached: None,
            ring: ring(),
            unstarted: Mutex::default(),
            writeback_slots: Slots::new(PLACED_WRITEBACK_SLOTS),
        };
        dev.direct = dev.try_set_direct()?;
        Ok(dev)
    }

    /// Serves `read_cached_at` and `write_many` through `file`, a second, buffered read-write
    /// descriptor of the same file or block device (checked: same device and inode), so that
    /// data and tree blocks are written into the kernel's page cache and client reads of hot
    /// data come from it. `flush` (fdatasync) writes them back: it covers the whole file
    /// whatever the descriptor, and reports write-back errors. The log and the roots keep
    /// going through the direct descriptor; a direct write or read first writes back the
    /// dirty pages it covers, so the two never disagree.
    pub fn with_page_cache(mut self, file: File) -> Result<FileDevice, DeviceError> {
        use std::os::unix::fs::MetadataExt;
        let meta = |f: &File| f.metadata().map_err(|e| io_error("stat", &self.name, 0, 0, e));
        let (ours, theirs) = (meta(&self.file)?, meta(&file)?);
        let same = if ours.file_type().is_block_device() {
            theirs.file_type().is_block_device() && ours.rdev() == theirs.rdev()
        } else {
            (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino())
        };
        if !same {
            let msg = "the page-cache descriptor is not the same file as the device".to_string();
            return Err(io_error("open", &self.name, 0, 0, io::Error::new(io::ErrorKind::InvalidInput, msg)));
        }
        let mode =
            fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| io_error("fcntl", &self.name, 0, 0, e.into()))?;
        if OFlag::from_bits_truncate(mode) & OFlag::O_ACCMODE != OFlag::O_RDWR {
            let msg = "the page-cache descriptor is not open for reading and writing".to_string();
            return Err(io_error("open", &self.name, 0, 0, io::Error::new(io::ErrorKind::InvalidInput, msg)));
        }
        self.cached = Some(file);
        Ok(self)
    }

    /// Whether I/O bypasses the page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The path, or the name given to [`FileDevice::from_fd`].
    pub fn name(&self) -> &str {
        &self.name
    }

    fn open_with(path: &Path, try_direct: bool) -> Result<FileDevice, DeviceError> {
        let name = path.display().to_string();
        if try_direct {
            match open_rw(path, libc::O_DIRECT) {
                Ok(file) => {
                    let size = device_size(&file, &name)?;
                    let dev = FileDevice {
                        file,
                        name: name.clone(),
                        direct: true,
                        size,
                        poisoned: AtomicBool::new(false),
                        cached: None,
                        ring: ring(),
                        unstarted: Mutex::default(),
                        writeback_slots: Slots::new(PLACED_WRITEBACK_SLOTS),
                    };
                    if dev.probe_direct()? {
                        return Ok(dev);
                    }
                    // Accepted at open but refused at I/O time: reopen buffered below.
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(io_error("open", &name, 0, 0, e)),
            }
        }
        let file = open_rw(path, 0).map_err(|e| io_error("open", &name, 0, 0, e))?;
        let size = device_size(&file, &name)?;
        Ok(FileDevice {
            file,
            name,
            direct: false,
            size,
            poisoned: AtomicBool::new(false),
            cached: None,
            ring: ring(),
            unstarted: Mutex::default(),
            writeback_slots: Slots::new(PLACED_WRITEBACK_SLOTS),
        })
    }

    /// Turns on O_DIRECT on the descriptor; returns whether it is on. EINVAL (from fcntl or
    /// from a first direct read) means the file system refuses it: the flag is cleared again.
    fn try_set_direct(&self) -> Result<bool, DeviceError> {
        let fd = self.file.as_raw_fd();
        let getfl = |e: nix::Error| io_error("fcntl", &self.name, 0, 0, io::Error::from(e));
        let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(getfl)?);
        match fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)) {
            Ok(_) => {}
            Err(nix::Error::EINVAL) => return Ok(false),
            Err(e) => return Err(getfl(e)),
        }
        if self.probe_direct()? {
            return Ok(true);
        }
        fcntl(fd, FcntlArg::F_SETFL(flags.difference(OFlag::O_DIRECT))).map_err(getfl)?;
        Ok(false)
    }

    /// Reads block 0 with O_DIRECT on: false if the kernel refuses direct I/O here (EINVAL).
    fn probe_direct(&self) -> Result<bool, DeviceError> {
        let mut buf = AlignedBuf::blocks(1);
        match self.file.read_exact_at(&mut buf, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(io_error("read", &self.name, 0, BLOCK_SIZE, e)),
        }
    }

    fn poisoned_error(&self) -> DeviceError {
        DeviceError::Poisoned { device: self.name.clone() }
    }

    /// Records a write or flush failure: from now on the device refuses writes and flushes.
    fn poison(&self, op: &'static str, offset: u64, len: usize, source: io::Error) -> DeviceError {
        self.poisoned.store(true, Ordering::SeqCst);
        io_error(op, &self.name, offset, len, source)
    }

    /// Whether O_DIRECT needs a bounce buffer for `buf`.
    fn needs_bounce(&self, buf: &[u8]) -> bool {
        self.direct && !(buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_io("read", offset, buf.len(), self.size)?;
        // read_exact_at retries EINTR and short reads; EOF before the end (the file shrank
        // under us) is UnexpectedEof, never zeros.
        let result = if self.needs_bounce(buf) {
            let mut bounce = AlignedBuf::for_bytes(buf.len());
            self.file.read_exact_at(&mut bounce, offset).map(|()| buf.copy_from_slice(&bounce))
        } else {
            self.file.read_exact_at(buf, offset)
        };
        result.map_err(|e| io_error("read", &self.name, offset, buf.len(), e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        check_io("write", offset, buf.len(), self.size)?;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(self.poisoned_error());
        }
        // write_all_at retries EINTR and short writes.
        let result = if self.needs_bounce(buf) {
            let mut bounce = AlignedBuf::for_bytes(buf.len());
            bounce.copy_from_slice(buf);
            self.file.write_all_at(&bounce, offset)
        } else {
            self.file.write_all_at(buf, offset)
        };
        result.map_err(|e| self.poison("write", offset, buf.len(), e))
    }

    fn flush(&self) -> Result<(), DeviceError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(self.poisoned_error());
        }
        self.file.sync_data().map_err(|e| self.poison("flush", 0, 0, e))
    }

    fn read_ahead(&self) -> bool {
        true
    }

    /// With O_DIRECT: one write with RWF_DSYNC, which makes this range durable (the kernel
    /// syncs only the written range, then the device cache, or uses a FUA write) without
    /// writing back the page cache's other dirty blocks as fdatasync would. Buffered: the
    /// write and fdatasync.
    fn write_durable(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        if !self.direct || self.needs_bounce(buf) {
            self.write_at(offset, buf)?;
            return self.flush();
        }
        check_io("write", offset, buf.len(), self.size)?;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(self.poisoned_error());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec { iov_base: rest.as_ptr().cast_mut().cast(), iov_len: rest.len() };
            let at = offset + done as u64;
            let Ok(pos) = libc::off_t::try_from(at) else {
                return Err(self.poison("write", at, rest.len(), io::Error::from_raw_os_error(libc::EOVERFLOW)));
            };
            // SAFETY: `iov` describes `rest`, valid for reads of its length for the whole call
            // (the kernel only reads it); the descriptor is open for as long as `self`.
            let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, pos, libc::RWF_DSYNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(self.poison("write", at, rest.len(), e));
            }
            if n == 0 {
                return Err(self.poison("write", at, rest.len(), io::Error::from(io::ErrorKind::WriteZero)));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        if let Some(cached) = &self.cached {
            self.write_cached(cached, writes)?;
            // Start writing them back now, without waiting, so that the next flush (the
            // checkpoint's) finds little left to do — once EARLY_WRITEBACK_MIN bytes gathered,
            // and only when they lie close together: the kernel writes back every dirty page
            // of the range, on this thread, so for blocks scattered over the device (a
            // checkpoint's tree nodes on a full volume) that costs the caller more than the
            // flush saves (sealing a checkpoint of 1,500 scattered nodes took 33 ms with it,
            // 20 ms without). Starting each small batch at once (a QD1 client's single
            // block) put a data write in the device's queue before every log append: 4 KiB
            // writes at QD1 with fsync, same hour, 2731–3170 IOPS that way, 3745–3872 without.
            let from = writes.iter().map(|&(o, _)| o).min().unwrap_or(0);
            let to = writes.iter().map(|&(o, b)| o + b.len() as u64).max().unwrap_or(0);
            let written: u64 = writes.iter().map(|&(_, b)| b.len() as u64).sum();
            let mut u = self.unstarted.lock().unwrap_or_else(|e| e.into_inner());
            let merged = Unstarted { from: u.from.min(from), to: u.to.max(to), bytes: u.bytes + written };
            // Writes far from the ones gathered start a new gathering (the kernel writes
            // the old ones back by itself, or the next flush does).
            *u = if u.bytes > 0 && merged.to - merged.from <= 2 * merged.bytes {
                merged
            } else {
                Unstarted { from, to, bytes: written }
            };
            let compact = u.to - u.from <= 2 * u.bytes;
            if let (true, true, Ok(at), Ok(len)) = (
                compact,
                u.bytes >= EARLY_WRITEBACK_MIN,
                libc::off64_t::try_from(u.from),
                libc::off64_t::try_from(u.to - u.from),
            ) {
                // SAFETY: a plain system call on a descriptor open for as long as `self`; no
                // memory is passed. Its result is only a hint's: errors show up at the flush.
                let _ = unsafe { libc::sync_file_range(cached.as_raw_fd(), at, len, libc::SYNC_FILE_RANGE_WRITE) };
                *u = Unstarted::default();
            }
            return Ok(());
        }
        let Some(ring) = self.ring.as_ref().filter(|_| writes.len() > 1) else {
            return writes.iter().try_for_each(|&(offset, buf)| self.write_at(offset, buf));
        };
        self.write_direct_many(ring, writes)
    }

    /// Through the page cache, a placed write also waits until its pages are written back:
    /// the flush before its record then has only the device's cache left to flush, and the
    /// placed bytes in the device's queue are bounded by the writes being placed (the
    /// connections' workers) instead of growing with the page cache — a light client's log
    /// write queued behind hundreds of MiB of a flood's write-back waited 150–300 ms.
    ///
    /// A write to blocks scattered over a full volume is hundreds of runs: waiting for each
    /// before starting the next kept one 4 KiB write in the device's queue per placed write
    /// (1 MiB writes QD4 after random overwrites: 321–325 MiB/s), starting all of them at once
    /// put hundreds in it (445–467 MiB/s, but a light client's p99 beside a flood of them grew
    /// by a quarter). So runs take slots, `PLACED_WRITEBACK_SLOTS` for all placed writes
    /// together: a write starts runs while slots are free, else waits for its own oldest run
    /// and starts the next in its slot (a write that holds none waits for a free one, so
    /// every holder makes progress).
    fn write_placed(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        let Some(cached) = &self.cached else { return self.write_many(writes) };
        self.write_cached(cached, writes)?;
        let mut in_flight = std::collections::VecDeque::new();
        let result = (|| {
            for &(offset, buf) in writes {
                if in_flight.is_empty() {
                    self.writeback_slots.take();
                } else if !self.writeback_slots.try_take() {
                    if let Some(&(at, len)) = in_flight.front() {
                        // Its slot passes to the run started next.
                        self.sync_range(cached, at, len, WAIT)?;
                        in_flight.pop_front();
                    }
                }
                in_flight.push_back((offset, buf.len()));
                self.sync_range(cached, offset, buf.len(), libc::SYNC_FILE_RANGE_WRITE)?;
            }
            while let Some((at, len)) = in_flight.front().copied() {
                self.sync_range(cached, at, len, WAIT)?;
                in_flight.pop_front();
                self.writeback_slots.give(1);
            }
            Ok(())
        })();
        self.writeback_slots.give(in_flight.len());
        result
    }

    fn read_cached_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let Some(cached) = &self.cached else { return self.read_at(offset, buf) };
        check_io("read", offset, buf.len(), self.size)?;
        cached.read_exact_at(buf, offset).map_err(|e| io_error("read", &self.name, offset, buf.len(), e))
    }

    fn try_read_cached_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DeviceError> {
        check_io("read", offset, buf.len(), self.size)?;
        let Some(cached) = &self.cached else { return Ok(false) };
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let Ok(at) = libc::off_t::try_from(offset) else { return Ok(false) };
        // SAFETY: `iov` describes `buf`, which is valid for writes of its length and borrowed
        // mutably for the whole call; the descriptor is open for as long as `self`.
        let n = unsafe { libc::preadv2(cached.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not all cached (or RWF_NOWAIT unsupported here): the caller reads normally.
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINTR) => Ok(false),
                _ => Err(io_error("read", &self.name, offset, buf.len(), e)),
            };
        }
        // A short read means part of it was not cached.
        Ok(n as usize == buf.len())
    }
}

/// sync_file_range's flags that wait until a range is written back.
const WAIT: u32 = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;

impl FileDevice {
    /// sync_file_range of `len` bytes at `offset` of the page-cache descriptor.
    fn sync_range(&self, cached: &File, offset: u64, len: usize, flags: u32) -> Result<(), DeviceError> {
        let (Ok(at), Ok(n)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: a plain system call on a descriptor open for as long as `self`; no memory is
        // passed.
        if unsafe { libc::sync_file_range(cached.as_raw_fd(), at, n, flags) } != 0 {
            // A write-back error may be reported here rather than at the next flush: the
            // device is poisoned either way, never retried.
            return Err(self.poison("write back", offset, len, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Writes into the page cache (the buffered descriptor `cached`): the next flush
    /// (fdatasync, which covers the file whatever the descriptor) writes them back and reports
    /// any write-back error.
    fn write_cached(&self, cached: &File, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(self.poisoned_error());
        }
        for &(offset, buf) in writes {
            check_io("write", offset, buf.len(), self.size)?;
            cached.write_all_at(buf, offset).map_err(|e| self.poison("write", offset, buf.len(), e))?;
        }
        Ok(())
    }

    /// `writes` through the ring on the (direct, if O_DIRECT is on) descriptor, all at once.
    fn write_direct_many(&self, ring: &Mutex<IoUring>, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        for &(offset, buf) in writes {
            check_io("write", offset, buf.len(), self.size)?;
        }
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(self.poisoned_error());
        }
        // Unaligned buffers (never in practice) and lone writes take the plain path.
        let (batch, single): (Vec<_>, Vec<_>) =
            writes.iter().partition(|(_, buf)| !self.needs_bounce(buf) && buf.len() <= u32::MAX as usize);
        for &(offset, buf) in single {
            self.write_at(offset, buf)?;
        }
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in batch.chunks(RING_ENTRIES as usize) {
            let results = self.submit_writes(&mut ring, chunk);
            for (&&(offset, buf), result) in chunk.iter().zip(results) {
                match result {
                    Ok(n) if n == buf.len() => {}
                    // A short write: the rest goes the plain way.
                    Ok(n) => self.write_at(offset + n as u64, &buf[n..])?,
                    Err(e) => return Err(self.poison("write", offset, buf.len(), e)),
                }
            }
        }
        Ok(())
    }

    /// Submits `writes` (at most `RING_ENTRIES`) with one system call and waits for all of
    /// them; the bytes each wrote, or its error.
    fn submit_writes(&self, ring: &mut IoUring, writes: &[&(u64, &[u8])]) -> Vec<io::Result<usize>> {
        let fd = types::Fd(self.file.as_raw_fd());
        for (i, &&(offset, buf)) in writes.iter().enumerate() {
            // Lengths were checked to fit in u32 by the caller.
            let entry =
                opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(offset).build().user_data(i as u64);
            // SAFETY: every buffer outlives its request: this function waits below until the
            // kernel has completed all the requests it pushed, whatever happens, and the
            // caller's borrows last until it returns. The queue has room (writes.len() <=
            // RING_ENTRIES, the ring's size, and it is empty between calls).
            if unsafe { ring.submission().push(&entry) }.is_err() {
                fatal_ring("the submission queue is full");
            }
        }
        let mut results: Vec<io::Result<usize>> =
            writes.iter().map(|_| Err(io::Error::other("no completion"))).collect();
        let mut done = 0;
        while done < writes.len() {
            match ring.submit_and_wait(writes.len() - done) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The requests may be in flight with nothing to wait for them: the buffers
                // could not be released safely. Fail-stop (nothing durable names the blocks).
                Err(e) => fatal_ring(&format!("io_uring_enter: {e}")),
            }
            for cqe in ring.completion() {
                let at = cqe.user_data() as usize;
                results[at] = if cqe.result() < 0 {
                    Err(io::Error::from_raw_os_error(-cqe.result()))
                } else {
                    Ok(cqe.result() as usize)
                };
                done += 1;
            }
        }
        results
    }
}

/// A ring for `write_many`, if the kernel allows io_uring here. It is restricted to plain
/// writes before it is enabled: operations a ring runs pass no system-call filter, so a ring
/// that could open files or sockets would undo the driver's sandbox.
fn ring() -> Option<Mutex<IoUring>> {
    let ring: IoUring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES).ok()?;
    let mut only_writes = [io_uring::register::Restriction::sqe_op(opcode::Write::CODE)];
    ring.submitter().register_restrictions(&mut only_writes).ok()?;
    ring.submitter().register_enable_rings().ok()?;
    Some(Mutex::new(ring))
}

fn fatal_ring(why: &str) -> ! {
    eprintln!("rblk: io_uring failed with requests in flight ({why}); stopping (restart recovers)");
    std::process::abort()
}

impl fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDevice")
            .field("path", &self.name)
            .field("direct", &self.direct)
            .field("size", &self.size)
            .field("poisoned", &self.poisoned.load(Ordering::Relaxed))
            .field("page_cache", &self.cached.is_some())
            .finish()
    }
}

fn io_error(op: &'static str, device: &str, offset: u64, len: usize, source: io::Error) -> DeviceError {
    DeviceError::Io { op, device: device.to_owned(), offset, len, source }
}

fn open_rw(path: &Path, flags: i32) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(flags).open(path)
}

/// fsync of the directory holding `path`, so a newly created entry survives power loss.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The usable size: whole blocks of a regular file, or a block device's size. Zero blocks,
/// and anything that is neither a regular file nor a block device, are refused.
fn device_size(file: &File, name: &str) -> Result<u64, DeviceError> {
    let meta = file.metadata().map_err(|e| io_error("stat", name, 0, 0, e))?;
    let file_type = meta.file_type();
    let bytes = if file_type.is_file() {
        meta.len()
    } else if file_type.is_block_device() {
        let mut bytes: u64 = 0;
        // SAFETY: the descriptor is open for the lifetime of `file`, and BLKGETSIZE64 writes
        // exactly one u64 through the pointer, which points to a live, aligned local.
        unsafe { blk_get_size64(file.as_raw_fd(), &mut bytes) }
            .map_err(|e| io_error("BLKGETSIZE64", name, 0, 0, io::Error::from(e)))?;
        bytes
    } else {
        let msg = format!("{file_type:?} is neither a regular file nor a block device");
        return Err(io_error("open", name, 0, 0, io::Error::new(io::ErrorKind::InvalidInput, msg)));
    };
    let size = bytes - bytes % BLOCK;
    if size == 0 {
        let msg = format!("{bytes} bytes is smaller than one {BLOCK_SIZE}-byte block");
        return Err(io_error("open", name, 0, 0, io::Error::new(io::ErrorKind::InvalidInput, msg)));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::AtomicU64;

    /// A unique path under the temp dir, removed on drop (also when a test fails).
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("rblk-filedev-{}-{tag}-{n}", std::process::id());
            let path = std::env::temp_dir().join(name);
            let _ = std::fs::remove_file(&path);
            Self(path)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / 4096) as u8).collect()
    }

    /// Writes and reads back through `dev` with aligned and misaligned (in memory) buffers.
    fn round_trip(dev: &FileDevice) {
        // Aligned: an AlignedBuf of two blocks.
        let mut aligned = AlignedBuf::blocks(2);
        aligned.copy_from_slice(&pattern(1, 2 * BLOCK_SIZE));
        dev.write_at(BLOCK, &aligned).unwrap();
        // Misaligned: a slice starting one byte into a larger allocation.
        let mut backing = AlignedBuf::blocks(4);
        backing[1..=3 * BLOCK_SIZE].copy_from_slice(&pattern(2, 3 * BLOCK_SIZE));
        let unaligned = &backing[1..=3 * BLOCK_SIZE];
        dev.write_at(4 * BLOCK, unaligned).unwrap();
        dev.flush().unwrap();

        let mut back = AlignedBuf::blocks(2);
        dev.read_at(BLOCK, &mut back).unwrap();
        assert_eq!(&back[..], &aligned[..]);
        let mut backing_in = AlignedBuf::blocks(4);
        let unaligned_in = &mut backing_in[1..=3 * BLOCK_SIZE];
        dev.read_at(4 * BLOCK, unaligned_in).unwrap();
        assert_eq!(unaligned_in, unaligned);
        // Untouched blocks read as the sparse file's zeros.
        let mut zero = vec![0xAAu8; BLOCK_SIZE];
        dev.read_at(0, &mut zero).unwrap();
        assert!(zero.iter().all(|&b| b == 0));
    }

    /// Scattered writes submitted together land where they belong, next to untouched
    /// blocks; and the ring refuses anything but a write.
    #[test]
    fn write_many_lands_every_write_and_the_ring_only_writes() {
        let path = TempPath::new("many");
        let dev = FileDevice::create(&path.0, 512 * BLOCK).unwrap();
        assert!(dev.ring.is_some(), "io_uring is available on the test machines");
        let mut bufs = Vec::new();
        for i in 0..150u64 {
            let mut b = AlignedBuf::blocks(1 + (i % 3) as usize);
            let len = b.len();
            b.copy_from_slice(&pattern(i as u8, len));
            bufs.push((i * 3 * BLOCK, b));
        }
        let writes: Vec<(u64, &[u8])> = bufs.iter().map(|(o, b)| (*o, &b[..])).collect();
        dev.write_many(&writes).unwrap();
        dev.flush().unwrap();
        let reopened = FileDevice::open(&path.0).unwrap();
        for (offset, b) in &bufs {
            let mut back = AlignedBuf::blocks(3);
            reopened.read_at(*offset, &mut back).unwrap();
            assert_eq!(&back[..b.len()], &b[..], "at {offset}");
            assert!(back[b.len()..].iter().all(|&x| x == 0), "past the write at {offset}");
        }
        // A durable write (RWF_DSYNC) lands like any other, and is checked like any other.
        let mut durable = AlignedBuf::blocks(2);
        durable.copy_from_slice(&pattern(77, 2 * BLOCK_SIZE));
        dev.write_durable(500 * BLOCK, &durable).unwrap();
        let mut back = AlignedBuf::blocks(2);
        FileDevice::open(&path.0).unwrap().read_at(500 * BLOCK, &mut back).unwrap();
        assert_eq!(&back[..], &durable[..]);
        assert!(dev.write_durable(511 * BLOCK, &durable).is_err(), "past the end");
        // Out of range: refused before anything is submitted.
        let bad = AlignedBuf::blocks(1);
        assert!(dev.write_many(&[(0, &bad[..]), (512 * BLOCK, &bad[..])]).is_err());
        // The ring runs writes only.
        let mut ring = dev.ring.as_ref().unwrap().lock().unwrap();
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a no-op refers to no memory.
        unsafe { ring.submission().push(&nop) }.unwrap();
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().expect("a completion");
        assert_eq!(cqe.result(), -libc::EACCES, "a restricted ring refuses other operations");
    }

    fn rw(path: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(path).unwrap()
    }

    /// Placed writes of many scattered runs from several threads at once (more runs than
    /// write-back slots, in each write and together) all complete (none waits forever for a
    /// slot), land where they belong, and give every slot back.
    #[test]
    fn placed_writes_share_the_write_back_slots() {
        let path = TempPath::new("placed");
        let dev = FileDevice::create(&path.0, 4096 * BLOCK).unwrap().with_page_cache(rw(&path.0)).unwrap();
        let runs_per_write = 3 * PLACED_WRITEBACK_SLOTS;
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let dev = &dev;
                s.spawn(move || {
                    for round in 0..3u64 {
                        // Every other block of this thread's stripe: runs of one block.
                        let bufs: Vec<(u64, Vec<u8>)> = (0..runs_per_write as u64)
                            .map(|i| {
                                let block = t * 600 + 2 * i;
                                (block * BLOCK, pattern((t * 7 + round + i) as u8, BLOCK_SIZE))
                            })
                            .collect();
                        let writes: Vec<(u64, &[u8])> = bufs.iter().map(|(o, b)| (*o, &b[..])).collect();
                        dev.write_placed(&writes).unwrap();
                        for (offset, b) in &bufs {
                            let mut back = AlignedBuf::blocks(1);
                            dev.read_at(*offset, &mut back).unwrap();
                            assert_eq!(&back[..], &b[..], "thread {t} round {round} at {offset}");
                        }
                    }
                });
            }
        });
        assert_eq!(*dev.writeback_slots.lock(), PLACED_WRITEBACK_SLOTS, "every slot given back");
    }

    /// A cached read after a direct write sees the new content (the write invalidated the
    /// page cache); a direct read after a cached write sees it too, also after a reopen; a
    /// descriptor of another file, or a read-only one, is refused.
    #[test]
    fn page_cache_and_direct_io_agree_and_the_descriptor_must_fit() {
        let path = TempPath::new("cache");
        let dev = FileDevice::create(&path.0, 16 * BLOCK).unwrap();
        let dev = dev.with_page_cache(rw(&path.0)).unwrap();
        assert!(format!("{dev:?}").contains("page_cache: true"));
        for seed in 0..3u8 {
            let mut block = AlignedBuf::blocks(2);
            block.copy_from_slice(&pattern(seed, 2 * BLOCK_SIZE));
            dev.write_at(3 * BLOCK, &block).unwrap();
            let mut back = vec![0u8; 2 * BLOCK_SIZE];
            dev.read_cached_at(3 * BLOCK, &mut back).unwrap();
            assert_eq!(&back[..], &block[..], "round {seed}: the cached read is not stale");
            // Now in the page cache: a no-wait read succeeds (where the file system supports
            // RWF_NOWAIT; all the common ones do) and matches.
            let mut again = vec![0u8; 2 * BLOCK_SIZE];
            assert!(dev.try_read_cached_at(3 * BLOCK, &mut again).unwrap(), "round {seed}: cached");
            assert_eq!(&again[..], &block[..]);
        }
        let mut past = vec![0u8; BLOCK_SIZE];
        assert!(dev.read_cached_at(16 * BLOCK, &mut past).is_err(), "the range is checked");
        let mut cached_write = AlignedBuf::blocks(1);
        cached_write.copy_from_slice(&pattern(9, BLOCK_SIZE));
        dev.write_many(&[(8 * BLOCK, &cached_write[..])]).unwrap();
        let mut direct = AlignedBuf::blocks(1);
        dev.read_at(8 * BLOCK, &mut direct).unwrap();
        assert_eq!(&direct[..], &cached_write[..], "a direct read sees a write into the page cache");
        dev.flush().unwrap();
        drop(dev);
        let mut again = AlignedBuf::blocks(1);
        FileDevice::open(&path.0).unwrap().read_at(8 * BLOCK, &mut again).unwrap();
        assert_eq!(&again[..], &cached_write[..], "and so does a reopened device");
        let other = TempPath::new("cache-other");
        FileDevice::create(&other.0, 16 * BLOCK).unwrap();
        let dev = FileDevice::open(&path.0).unwrap();
        let mut none = vec![0u8; BLOCK_SIZE];
        assert!(!dev.try_read_cached_at(3 * BLOCK, &mut none).unwrap(), "no cache: never a no-wait read");
        assert!(FileDevice::open(&path.0).unwrap().with_page_cache(File::open(&path.0).unwrap()).is_err(), "read-only");
        assert!(dev.with_page_cache(rw(&other.0)).is_err());
    }

    #[test]
    fn round_trip_direct_and_reopen() {
        let tmp = TempPath::new("rt");
        let dev = FileDevice::create(&tmp.0, 8 * BLOCK).unwrap();
        assert_eq!(dev.size(), 8 * BLOCK);
        assert_eq!(dev.name(), tmp.0.display().to_string());
        round_trip(&dev);
        drop(dev);
        // A fresh device sees the same bytes.
        let dev = FileDevice::open(&tmp.0).unwrap();
        let mut back = vec![0u8; 3 * BLOCK_SIZE];
        dev.read_at(4 * BLOCK, &mut back).unwrap();
        assert_eq!(back, pattern(2, 3 * BLOCK_SIZE));
    }

    #[test]
    fn round_trip_buffered() {
        let tmp = TempPath::new("buffered");
        drop(FileDevice::create(&tmp.0, 8 * BLOCK).unwrap());
        let dev = FileDevice::open_with(&tmp.0, false).unwrap();
        assert!(!dev.direct());
        round_trip(&dev);
    }

    #[test]
    fn debug_shows_path_and_direct() {
        let tmp = TempPath::new("debug");
        let dev = FileDevice::create(&tmp.0, BLOCK).unwrap();
        let text = format!("{dev:?}");
        assert!(text.contains(&tmp.0.display().to_string()), "{text}");
        assert!(text.contains(&format!("direct: {}", dev.direct())), "{text}");
    }

    #[test]
    fn size_is_rounded_down_and_zero_blocks_refused() {
        let tmp = TempPath::new("size");
        std::fs::write(&tmp.0, vec![7u8; 3 * BLOCK_SIZE + 100]).unwrap();
        assert_eq!(FileDevice::open(&tmp.0).unwrap().size(), 3 * BLOCK);
        std::fs::write(&tmp.0, vec![7u8; BLOCK_SIZE - 1]).unwrap();
        let err = FileDevice::open(&tmp.0).unwrap_err();
        assert!(matches!(&err, DeviceError::Io { op: "open", .. }), "{err:?}");
        assert!(err.to_string().contains(&tmp.0.display().to_string()), "{err}");
    }

    #[test]
    fn open_refuses_what_is_not_a_file_or_block_device() {
        // A character device.
        let err = FileDevice::open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, DeviceError::Io { .. }), "{err:?}");
        // A missing path.
        let tmp = TempPath::new("missing");
        assert!(matches!(FileDevice::open(&tmp.0), Err(DeviceError::Io { op: "open", .. })));
    }

    #[test]
    fn create_refuses_bad_sizes_and_existing_files() {
        let tmp = TempPath::new("create");
        for bad in [0, 1, BLOCK - 1, BLOCK + 512] {
            let err = FileDevice::create(&tmp.0, bad).unwrap_err();
            assert!(matches!(&err, DeviceError::Io { op: "create", .. }), "{err:?}");
            assert!(!tmp.0.exists(), "a refused create must not leave a file");
        }
        let dev = FileDevice::create(&tmp.0, 16 * BLOCK).unwrap();
        assert_eq!(dev.size(), 16 * BLOCK);
        assert_eq!(std::fs::metadata(&tmp.0).unwrap().len(), 16 * BLOCK);
        let err = FileDevice::create(&tmp.0, 16 * BLOCK).unwrap_err();
        match err {
            DeviceError::Io { source, .. } => assert_eq!(source.kind(), io::ErrorKind::AlreadyExists),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
    }

    #[test]
    fn misaligned_and_out_of_range_requests() {
        let tmp = TempPath::new("range");
        let dev = FileDevice::create(&tmp.0, 4 * BLOCK).unwrap();
        let mut buf = AlignedBuf::blocks(1);
        assert!(matches!(dev.read_at(512, &mut buf), Err(DeviceError::Misaligned { op: "read", .. })));
        assert!(matches!(dev.write_at(512, &buf), Err(DeviceError::Misaligned { op: "write", .. })));
        assert!(matches!(dev.write_at(0, &buf[..100]), Err(DeviceError::Misaligned { .. })));
        assert!(matches!(dev.read_at(4 * BLOCK, &mut buf), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(dev.write_at(4 * BLOCK, &buf), Err(DeviceError::OutOfRange { .. })));
        let mut two = AlignedBuf::blocks(2);
        assert!(matches!(dev.read_at(3 * BLOCK, &mut two), Err(DeviceError::OutOfRange { .. })));
        // Refused requests do not poison: nothing was issued.
        dev.write_at(3 * BLOCK, &buf).unwrap();
        dev.flush().unwrap();
        // The file did not grow.
        assert_eq!(std::fs::metadata(&tmp.0).unwrap().len(), 4 * BLOCK);
    }

    #[test]
    fn read_past_eof_of_shrunk_file_is_an_error() {
        let tmp = TempPath::new("shrunk");
        let dev = FileDevice::create(&tmp.0, 4 * BLOCK).unwrap();
        std::fs::OpenOptions::new().write(true).open(&tmp.0).unwrap().set_len(2 * BLOCK).unwrap();
        let mut buf = AlignedBuf::blocks(1);
        dev.read_at(BLOCK, &mut buf).unwrap();
        for (offset, blocks) in [(2 * BLOCK, 1), (BLOCK, 2)] {
            let mut buf = AlignedBuf::blocks(blocks);
            match dev.read_at(offset, &mut buf) {
                Err(DeviceError::Io { op: "read", source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof)
                }
                other => panic!("read past EOF at {offset}: {other:?}"),
            }
        }
    }

    #[test]
    fn write_error_poisons() {
        let tmp = TempPath::new("poison");
        drop(FileDevice::create(&tmp.0, 4 * BLOCK).unwrap());
        let read_only = File::open(&tmp.0).unwrap();
        let dev = FileDevice::from_fd(OwnedFd::from(read_only), "read-only test fd".into()).unwrap();
        assert_eq!(dev.size(), 4 * BLOCK);
        let buf = AlignedBuf::blocks(1);
        match dev.write_at(BLOCK, &buf) {
            Err(DeviceError::Io { op: "write", device, offset, len, source }) => {
                assert_eq!((device.as_str(), offset, len), ("read-only test fd", BLOCK, BLOCK_SIZE));
                assert_eq!(source.raw_os_error(), Some(libc::EBADF));
            }
            other => panic!("expected a write error, got {other:?}"),
        }
        assert!(
            matches!(dev.write_at(0, &buf), Err(DeviceError::Poisoned { device }) if device == "read-only test fd")
        );
        assert!(matches!(dev.flush(), Err(DeviceError::Poisoned { .. })));
        // Reads still work.
        let mut back = AlignedBuf::blocks(1);
        dev.read_at(0, &mut back).unwrap();
    }

    #[test]
    fn from_fd_round_trip() {
        let tmp = TempPath::new("fromfd");
        drop(FileDevice::create(&tmp.0, 8 * BLOCK).unwrap());
        let fd = OpenOptions::new().read(true).write(true).open(&tmp.0).unwrap();
        let dev = FileDevice::from_fd(OwnedFd::from(fd), "inherited".into()).unwrap();
        round_trip(&dev);
        // The temp dir here is on a file system with O_DIRECT; where it is not, direct() is
        // false and the round trip above covered the buffered path.
        println!("from_fd direct: {}", dev.direct());
    }

    /// Detaches the loop device when dropped, whatever happened in between.
    struct LoopGuard(String);

    impl Drop for LoopGuard {
        fn drop(&mut self) {
            match Command::new("losetup").arg("-d").arg(&self.0).status() {
                Ok(s) if s.success() => {}
                other => eprintln!("warning: losetup -d {} failed: {other:?}", self.0),
            }
        }
    }

    /// Why the loop-device test cannot run here, if it cannot.
    fn loop_unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root".into());
        }
        match Command::new("losetup").arg("--version").output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!("losetup --version failed: {}", out.status)),
            Err(e) => Some(format!("losetup not found: {e}")),
        }
    }

    fn skip_or_fail(reason: &str) {
        if std::env::var("RBLK_REQUIRE_LOOP").as_deref() == Ok("1") {
            panic!("RBLK_REQUIRE_LOOP=1 but the loop-device test cannot run: {reason}");
        }
        println!("skipped: {reason}");
    }

    #[test]
    fn file_device_on_loop_device() {
        if let Some(reason) = loop_unavailable() {
            return skip_or_fail(&reason);
        }
        const SIZE: u64 = 64 << 20;
        let tmp = TempPath::new("loop");
        drop(FileDevice::create(&tmp.0, SIZE).unwrap());
        let out = Command::new("losetup").arg("-f").arg("--show").arg(&tmp.0).output().unwrap();
        if !out.status.success() {
            let reason = format!("losetup -f --show failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            return skip_or_fail(&reason);
        }
        let guard = LoopGuard(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        let loop_path = Path::new(&guard.0);

        let dev = FileDevice::open(loop_path).unwrap();
        assert!(dev.direct(), "a loop device accepts O_DIRECT: {dev:?}");
        assert_eq!(dev.size(), SIZE);
        println!("loop device test running on {dev:?}");
        let writes: Vec<(u64, Vec<u8>)> = [(0, 1), (7 * BLOCK, 3), (SIZE / 2 + BLOCK, 2), (SIZE - BLOCK, 1)]
            .into_iter()
            .enumerate()
            .map(|(i, (offset, blocks))| (offset, pattern(i as u8 + 10, blocks * BLOCK_SIZE)))
            .collect();
        for (offset, data) in &writes {
            dev.write_at(*offset, data).unwrap();
        }
        dev.flush().unwrap();
        drop(dev);

        let check = |dev: &FileDevice| {
            for (offset, data) in &writes {
                let mut back = AlignedBuf::for_bytes(data.len());
                dev.read_at(*offset, &mut back).unwrap();
                assert_eq!(&back[..], &data[..], "at byte {offset} of {dev:?}");
            }
        };
        check(&FileDevice::open(loop_path).unwrap());
        drop(guard);
        // The bytes reached the backing file, too.
        check(&FileDevice::open(&tmp.0).unwrap());
    }
}
