//! A simulated disk for crash and fault tests.
//!
//! It keeps the *durable image* apart from the writes not yet durable (TigerBeetle keeps
//! faults apart from pristine data in the same way). Reads see the volatile view: the
//! durable image with the pending writes applied in order, as a real disk's cache would show.
//! A crash resolves every pending write to one [`WriteFate`]: kept, dropped, or torn at
//! 512-byte granularity (each sector kept or not), then the durable image is all that remains.
//!
//! It makes durable exactly what [`super::FileDevice`] does, no more: `flush` (fdatasync)
//! makes every completed write durable, and `write_durable` (one O_DIRECT write with
//! RWF_DSYNC) makes only its own bytes durable; every other write stays pending, whichever
//! path it took. In particular data and tree blocks that the real device writes through the
//! page cache (`write_many`) are written back by fdatasync only: the `sync_file_range` it
//! issues to start write-back early promises nothing, so here they are plain pending writes.
//! A durable write supersedes the sectors it covers in older pending writes (an O_DIRECT write
//! first writes back and drops the cached pages it covers; a drive's cache holds the newest
//! content of a sector), so no crash can bring older bytes back over it.
//!
//! Faults are explicit ([`SimFault`]) or drawn from the disk's own seeded [`Rng`], so a run is
//! reproduced exactly from its seed. `crash_after_ops` makes the device go down after the N-th
//! write or flush, which lets a test stop a workload at every point of its I/O trace. The
//! write that meets the cut fails, yet may have reached the media in part, as a write the power
//! interrupts: it stays pending for the crash to resolve.
//!
//! For suites that must show they can fail, [`SimDisk::plant`] plants a bug in the disk
//! itself ([`Planted`]): test-only switches that make it lie about durability the way a
//! broken driver would, without touching product code.

use std::sync::{Mutex, MutexGuard};

use super::{check_io, Device, DeviceError, SECTOR_SIZE};
use crate::rng::Rng;

/// What a crash does to one unflushed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFate {
    /// Every sector reached the media.
    Keep,
    /// Nothing reached the media.
    Drop,
    /// Sector `i` of the write reached the media iff `kept[i]`.
    Torn { kept: Vec<bool> },
}

impl WriteFate {
    /// The fates an exhaustive crash test enumerates for a write of `sectors` sectors: kept,
    /// dropped, and torn so that only the first half or only the second half survived.
    pub fn choices(sectors: usize) -> Vec<WriteFate> {
        let mut fates = vec![WriteFate::Keep, WriteFate::Drop];
        if sectors > 1 {
            let half = sectors / 2;
            fates.push(WriteFate::Torn { kept: (0..sectors).map(|i| i < half).collect() });
            fates.push(WriteFate::Torn { kept: (0..sectors).map(|i| i >= half).collect() });
        }
        fates
    }
}

/// How a crash resolves the pending writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashPolicy {
    /// The cache was written back in full (a process kill: the kernel keeps the page cache).
    KeepAll,
    /// Nothing unflushed survived.
    DropAll,
    /// Each write independently kept, dropped or torn, drawn from the disk's seeded RNG.
    Random,
    /// Each write independently kept or dropped whole, never torn, drawn from the disk's
    /// seeded RNG. Tearing at 512 bytes rarely lets a 4 KiB block survive whole; only whole
    /// writes kept out of order expose a block written before the blocks it names are durable.
    RandomWhole,
    /// One fate per pending write, oldest first (missing entries mean `Keep`).
    Fates(Vec<WriteFate>),
}

/// What a crash did to one pending write (see [`SimDisk::crash`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedWrite {
    pub offset: u64,
    pub len: usize,
    pub fate: WriteFate,
}

/// A bug planted in the disk, for tests only: a suite run on a disk with a planted bug must
/// find violations, which shows it can fail at all. A real device has none of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planted {
    /// `write_durable` acts like `write_at`: the write stays pending. A driver on this disk
    /// acknowledges writes before their log records are durable.
    DsyncNotDurable,
    /// `flush` makes nothing durable (it still counts, is traced and may fail): as if the
    /// fdatasync before and after every root write were gone. `write_durable` still works.
    FlushIgnored,
    /// Writes made with `write_placed` never become durable (flushes skip them; a crash
    /// drops them): as if the log's owner logged placed writes before their bytes were
    /// flushed.
    DirectWritesLost,
}

/// A fault armed on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimFault {
    /// Every read overlapping the block at byte `offset` fails (a latent sector error), until
    /// the block is written again.
    ReadError { offset: u64 },
    /// Flips one bit of the durable and volatile image at byte `offset`.
    BitFlip { offset: u64, bit: u8 },
    /// The next write that starts at byte `offset` reports success but never reaches the disk.
    LoseWrite { offset: u64 },
    /// The next write that starts at byte `from` lands at byte `to` instead (same length).
    MisdirectWrite { from: u64, to: u64 },
    /// The next write that starts at byte `offset` fails with EIO and poisons the disk. A failed
    /// write may still have reached the media, in part: it stays pending (and visible to
    /// reads), and the crash decides its fate like any unflushed write's.
    WriteError { offset: u64 },
    /// The next flush fails with EIO and poisons the disk. The pending writes stay pending:
    /// after a failed fdatasync nobody knows which reached the media, so the crash decides.
    /// A durable write syncs too: if it comes first, it fails (EIO) instead and stays pending.
    FlushError,
}

/// One device operation, as recorded in the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceOp {
    Write {
        offset: u64,
        len: usize,
    },
    /// `write_durable`: the write and its own durability, one operation.
    WriteDurable {
        offset: u64,
        len: usize,
    },
    Flush,
}

#[derive(Debug)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
    /// Never made durable (`Planted::DirectWritesLost`).
    doomed: bool,
}

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    pending: Vec<Pending>,
    rng: Rng,
    faults: Vec<SimFault>,
    read_errors: Vec<u64>,
    /// Writes (plain or durable) and flushes completed so far.
    ops: u64,
    /// The device goes down once `ops` reaches this.
    crash_at: Option<u64>,
    down: bool,
    /// The device went down by `crash_at` and no operation has met the cut yet: the next one
    /// is the one the power went off in.
    cut_open: bool,
    poisoned: bool,
    trace: Vec<TraceOp>,
    planted: Vec<Planted>,
}

impl State {
    /// Puts `data` at `offset` in the durable image, and into the sectors older pending writes
    /// share with it: whatever their fate, those sectors now end up holding `data`.
    fn make_durable(&mut self, offset: u64, data: &[u8]) {
        let (start, end) = (offset as usize, offset as usize + data.len());
        self.durable[start..end].copy_from_slice(data);
        for p in &mut self.pending {
            let (p_start, p_end) = (p.offset as usize, p.offset as usize + p.data.len());
            let (from, to) = (start.max(p_start), end.min(p_end));
            if from < to {
                p.data[from - p_start..to - p_start].copy_from_slice(&data[from - start..to - start]);
            }
        }
    }
}

/// A simulated disk; see the module docs.
#[derive(Debug)]
pub struct SimDisk {
    size: u64,
    state: Mutex<State>,
}

impl SimDisk {
    /// A zero-filled disk of `size` bytes (a multiple of 4 KiB) whose random choices follow `seed`.
    pub fn new(size: u64, seed: u64) -> Self {
        Self::from_image(vec![0; size as usize], seed)
    }

    /// A disk whose durable content is `image`.
    pub fn from_image(image: Vec<u8>, seed: u64) -> Self {
        assert!(image.len().is_multiple_of(super::BLOCK_SIZE), "image must be whole blocks");
        let size = image.len() as u64;
        let state = State {
            volatile: image.clone(),
            durable: image,
            pending: Vec::new(),
            rng: Rng::new(seed),
            faults: Vec::new(),
            read_errors: Vec::new(),
            ops: 0,
            crash_at: None,
            down: false,
            cut_open: false,
            poisoned: false,
            trace: Vec::new(),
            planted: Vec::new(),
        };
        Self { size, state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked while holding the lock leaves consistent byte vectors.
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// A copy of what is durable now.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// How many writes are not yet flushed.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// The sector count of each pending write, oldest first.
    pub fn pending_sectors(&self) -> Vec<usize> {
        self.lock().pending.iter().map(|p| p.data.len() / SECTOR_SIZE).collect()
    }

    /// Writes (plain or durable) and flushes completed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Every write (plain or durable) and flush so far, in order.
    pub fn trace(&self) -> Vec<TraceOp> {
        self.lock().trace.clone()
    }

    /// After `n` more completed writes (plain or durable) or flushes, every operation fails with
    /// [`DeviceError::Crashed`] until [`SimDisk::crash`] is called. The write that meets the
    /// cut (the next one) stays pending, durable or not: the crash decides what of it reached
    /// the media. `None` disarms.
    pub fn crash_after_ops(&self, n: Option<u64>) {
        let mut s = self.lock();
        s.crash_at = n.map(|n| s.ops + n);
        if s.crash_at == Some(s.ops) && !s.down {
            s.down = true;
            s.cut_open = true;
        }
    }

    /// Plants a bug in the disk (tests that show a suite can fail; see [`Planted`]). It stays
    /// planted across crashes.
    pub fn plant(&self, bug: Planted) {
        let mut s = self.lock();
        if !s.planted.contains(&bug) {
            s.planted.push(bug);
        }
    }

    /// Whether the device went down (by `crash_after_ops`).
    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    /// Arms a fault. A bit flip takes effect at once.
    pub fn inject(&self, fault: SimFault) {
        let mut s = self.lock();
        match fault {
            SimFault::BitFlip { offset, bit } => {
                let i = offset as usize;
                assert!(i < s.durable.len(), "bit flip beyond the disk");
                s.durable[i] ^= 1 << (bit % 8);
                s.volatile[i] ^= 1 << (bit % 8);
            }
            SimFault::ReadError { offset } => {
                let block = offset - offset % super::BLOCK;
                s.read_errors.push(block);
            }
            other => s.faults.push(other),
        }
    }

    /// Flips one random bit in the byte range `[start, end)` of the durable image (and the
    /// volatile view), drawn from the seeded RNG; returns the byte offset flipped.
    pub fn flip_random_bit(&self, start: u64, end: u64) -> u64 {
        let (offset, bit) = {
            let mut s = self.lock();
            let offset = start + s.rng.below(end - start);
            (offset, s.rng.below(8) as u8)
        };
        self.inject(SimFault::BitFlip { offset, bit });
        offset
    }

    /// Power loss: resolves the pending writes by `policy` into the durable image, then the
    /// disk comes back up with exactly the durable content, faults and poison cleared.
    /// Returns what became of each pending write, oldest first (for a test's fault report).
    pub fn crash(&self, policy: CrashPolicy) -> Vec<ResolvedWrite> {
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        let mut resolved = Vec::with_capacity(pending.len());
        for (i, write) in pending.into_iter().enumerate() {
            let fate = match &policy {
                _ if write.doomed => WriteFate::Drop,
                CrashPolicy::KeepAll => WriteFate::Keep,
                CrashPolicy::DropAll => WriteFate::Drop,
                CrashPolicy::Fates(fates) => fates.get(i).cloned().unwrap_or(WriteFate::Keep),
                CrashPolicy::Random => {
                    let sectors = write.data.len() / SECTOR_SIZE;
                    match s.rng.below(3) {
                        0 => WriteFate::Keep,
                        1 => WriteFate::Drop,
                        _ => WriteFate::Torn { kept: (0..sectors).map(|_| s.rng.chance(1, 2)).collect() },
                    }
                }
                CrashPolicy::RandomWhole => {
                    if s.rng.chance(1, 2) {
                        WriteFate::Keep
                    } else {
                        WriteFate::Drop
                    }
                }
            };
            resolved.push(ResolvedWrite { offset: write.offset, len: write.data.len(), fate: fate.clone() });
            let at = write.offset as usize;
            match fate {
                WriteFate::Keep => s.durable[at..at + write.data.len()].copy_from_slice(&write.data),
                WriteFate::Drop => {}
                WriteFate::Torn { kept } => {
                    for (j, sector) in write.data.chunks(SECTOR_SIZE).enumerate() {
                        if kept.get(j).copied().unwrap_or(false) {
                            let o = at + j * SECTOR_SIZE;
                            s.durable[o..o + SECTOR_SIZE].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
        s.volatile = s.durable.clone();
        s.faults.clear();
        s.read_errors.clear();
        s.crash_at = None;
        s.down = false;
        s.cut_open = false;
        s.poisoned = false;
        resolved
    }

    /// A fresh disk with this one's durable image (pending writes dropped) and a new seed.
    pub fn clone_durable(&self, seed: u64) -> SimDisk {
        SimDisk::from_image(self.durable_image(), seed)
    }

    /// A write, made durable on its own (`write_durable`) or left pending (`write_at`).
    fn write(&self, offset: u64, buf: &[u8], durable: bool) -> Result<(), DeviceError> {
        check_io("write", offset, buf.len(), self.size)?;
        let mut s = self.lock();
        if s.poisoned {
            return Err(DeviceError::Poisoned { device: "simdisk".into() });
        }
        // The write the power goes off in may reach the media in part: it stays pending, and
        // the crash decides its fate (for a durable write too: it never completed).
        let at_cut = s.down && s.cut_open;
        if let Err(e) = Self::count_op(&mut s) {
            if at_cut {
                s.pending.push(Pending { offset, data: buf.to_vec(), doomed: false });
            }
            return Err(e);
        }
        let len = buf.len();
        s.trace.push(if durable { TraceOp::WriteDurable { offset, len } } else { TraceOp::Write { offset, len } });
        let durable = durable && !s.planted.contains(&Planted::DsyncNotDurable);
        let mut target = offset;
        // A durable write syncs like a flush, and fails like one: EIO, poisoned, and its bytes
        // may or may not have reached the media.
        // A failed write, too, may have reached the media in part.
        let fails = |f: &SimFault| {
            (durable && *f == SimFault::FlushError) || matches!(f, SimFault::WriteError { offset: o } if *o == offset)
        };
        if let Some(i) = s.faults.iter().position(fails) {
            s.faults.remove(i);
            s.poisoned = true;
            let at = offset as usize;
            s.volatile[at..at + buf.len()].copy_from_slice(buf);
            s.pending.push(Pending { offset, data: buf.to_vec(), doomed: false });
            return Err(eio("write", offset, buf.len()));
        }
        if let Some(i) = s.faults.iter().position(|f| matches!(f, SimFault::LoseWrite { offset: o } if *o == offset)) {
            s.faults.remove(i);
            return Ok(());
        }
        if let Some(i) =
            s.faults.iter().position(|f| matches!(f, SimFault::MisdirectWrite { from, .. } if *from == offset))
        {
            if let SimFault::MisdirectWrite { to, .. } = s.faults.remove(i) {
                check_io("misdirected write", to, buf.len(), self.size)?;
                target = to;
            }
        }
        // Rewriting a block cures its latent read error (the drive remaps the sector).
        let end = target + buf.len() as u64;
        s.read_errors.retain(|&b| b < target || b >= end);
        let at = target as usize;
        s.volatile[at..at + buf.len()].copy_from_slice(buf);
        if durable {
            s.make_durable(target, buf);
        } else {
            s.pending.push(Pending { offset: target, data: buf.to_vec(), doomed: false });
        }
        Ok(())
    }

    fn count_op(s: &mut State) -> Result<(), DeviceError> {
        if s.down {
            s.cut_open = false;
            return Err(DeviceError::Crashed);
        }
        s.ops += 1;
        if s.crash_at == Some(s.ops) {
            // The op completes; the next one finds the device down (it meets the cut).
            s.down = true;
            s.cut_open = true;
        }
        Ok(())
    }
}

impl Device for SimDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_io("read", offset, buf.len(), self.size)?;
        let s = self.lock();
        if s.down {
            return Err(DeviceError::Crashed);
        }
        let end = offset + buf.len() as u64;
        if let Some(&bad) = s.read_errors.iter().find(|&&b| b >= offset && b < end) {
            return Err(DeviceError::Io {
                op: "read",
                device: "simdisk".into(),
                offset: bad,
                len: buf.len(),
                source: std::io::Error::from_raw_os_error(nix::libc::EIO),
            });
        }
        let at = offset as usize;
        buf.copy_from_slice(&s.volatile[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.write(offset, buf, false)
    }

    fn write_placed(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        for &(offset, buf) in writes {
            self.write(offset, buf, false)?;
            let mut s = self.lock();
            if s.planted.contains(&Planted::DirectWritesLost) {
                if let Some(p) = s.pending.last_mut().filter(|p| p.offset == offset) {
                    p.doomed = true;
                }
            }
        }
        Ok(())
    }

    /// Makes exactly this write durable, as one O_DIRECT write with RWF_DSYNC does; other
    /// pending writes stay pending. One operation for `crash_after_ops` and the trace.
    fn write_durable(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.write(offset, buf, true)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut s = self.lock();
        if s.poisoned {
            return Err(DeviceError::Poisoned { device: "simdisk".into() });
        }
        Self::count_op(&mut s)?;
        s.trace.push(TraceOp::Flush);
        if let Some(i) = s.faults.iter().position(|f| *f == SimFault::FlushError) {
            s.faults.remove(i);
            s.poisoned = true;
            return Err(eio("flush", 0, 0));
        }
        if s.planted.contains(&Planted::FlushIgnored) {
            return Ok(());
        }
        let (doomed, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut s.pending).into_iter().partition(|p| p.doomed);
        for write in pending {
            let at = write.offset as usize;
            s.durable[at..at + write.data.len()].copy_from_slice(&write.data);
        }
        s.pending = doomed;
        Ok(())
    }
}

/// An injected I/O error, as the kernel reports a media error.
fn eio(op: &'static str, offset: u64, len: usize) -> DeviceError {
    DeviceError::Io {
        op,
        device: "simdisk".into(),
        offset,
        len,
        source: std::io::Error::from_raw_os_error(nix::libc::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BLOCK, BLOCK_SIZE};
    use proptest::prelude::*;

    const B: usize = BLOCK_SIZE;

    fn read(disk: &SimDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        disk.read_at(offset, &mut buf).unwrap();
        buf
    }

    fn block_of(image: &[u8], block: u64) -> &[u8] {
        &image[block as usize * B..(block as usize + 1) * B]
    }

    fn is_eio(err: &DeviceError, want_op: &str) -> bool {
        matches!(err, DeviceError::Io { op, source, .. } if *op == want_op && source.raw_os_error() == Some(nix::libc::EIO))
    }

    #[test]
    fn reads_see_unflushed_writes_and_flush_makes_them_durable() {
        let disk = SimDisk::new(4 * BLOCK, 1);
        disk.write_at(BLOCK, &[0x11; B]).unwrap();
        disk.write_at(2 * BLOCK, &[0x22; 2 * B]).unwrap();
        assert_eq!(read(&disk, BLOCK, B), [0x11; B]);
        assert_eq!(read(&disk, 3 * BLOCK, B), [0x22; B]);
        assert_eq!(disk.durable_image(), vec![0; 4 * B]);
        assert_eq!(disk.pending_writes(), 2);
        assert_eq!(disk.pending_sectors(), [8, 16]);
        // A copy of the durable image carries nothing pending.
        assert_eq!(read(&disk.clone_durable(2), BLOCK, B), [0; B]);

        disk.flush().unwrap();
        assert_eq!(disk.pending_writes(), 0);
        let image = disk.durable_image();
        assert_eq!(block_of(&image, 0), [0; B]);
        assert_eq!(block_of(&image, 1), [0x11; B]);
        assert_eq!(&image[2 * B..], [0x22; 2 * B]);
    }

    /// Block 0 flushed as 1, then unflushed: block 0 as 2, block 1 as 3, block 1 as 4.
    fn flushed_then_pending() -> SimDisk {
        let disk = SimDisk::new(2 * BLOCK, 3);
        disk.write_at(0, &[1; B]).unwrap();
        disk.flush().unwrap();
        disk.write_at(0, &[2; B]).unwrap();
        disk.write_at(BLOCK, &[3; B]).unwrap();
        disk.write_at(BLOCK, &[4; B]).unwrap();
        disk
    }

    #[test]
    fn crash_drop_all_loses_unflushed_writes_only() {
        let disk = flushed_then_pending();
        disk.crash(CrashPolicy::DropAll);
        assert_eq!(disk.pending_writes(), 0);
        assert_eq!(read(&disk, 0, B), [1; B]);
        assert_eq!(read(&disk, BLOCK, B), [0; B]);
        assert_eq!(read(&disk, 0, 2 * B), disk.durable_image());
    }

    #[test]
    fn crash_keep_all_keeps_unflushed_writes_in_order() {
        let disk = flushed_then_pending();
        disk.crash(CrashPolicy::KeepAll);
        assert_eq!(read(&disk, 0, B), [2; B]);
        assert_eq!(read(&disk, BLOCK, B), [4; B]);
        assert_eq!(read(&disk, 0, 2 * B), disk.durable_image());
    }

    #[test]
    fn crash_fates_torn_keeps_exactly_the_chosen_sectors() {
        let disk = SimDisk::new(4 * BLOCK, 5);
        disk.write_at(0, &[0xAA; 4 * B]).unwrap();
        disk.flush().unwrap();
        let new: Vec<u8> = (0..B).map(|i| 0x50 + (i / SECTOR_SIZE) as u8).collect();
        disk.write_at(BLOCK, &new).unwrap();
        disk.write_at(2 * BLOCK, &[0x77; B]).unwrap();
        disk.write_at(3 * BLOCK, &[0x88; B]).unwrap();
        let kept = vec![false, true, false, false, true, true, false, true];
        // The third write has no entry: it is kept.
        disk.crash(CrashPolicy::Fates(vec![WriteFate::Torn { kept: kept.clone() }, WriteFate::Drop]));
        let image = disk.durable_image();
        for (j, sector) in block_of(&image, 1).chunks(SECTOR_SIZE).enumerate() {
            let want = if kept[j] { 0x50 + j as u8 } else { 0xAA };
            assert!(sector.iter().all(|&b| b == want), "sector {j}: want {want:#x}, got {:#x}", sector[0]);
        }
        assert_eq!(block_of(&image, 0), [0xAA; B]);
        assert_eq!(block_of(&image, 2), [0xAA; B]);
        assert_eq!(block_of(&image, 3), [0x88; B]);
    }

    /// A fixed workload (the same whatever the seed), crashed with `Random`.
    fn random_crash_image(seed: u64) -> Vec<u8> {
        let disk = SimDisk::new(16 * BLOCK, seed);
        disk.write_at(0, &[1; 4 * B]).unwrap();
        disk.flush().unwrap();
        for i in 0..8u64 {
            disk.write_at(i * 2 * BLOCK, &vec![10 + i as u8; 2 * B]).unwrap();
        }
        disk.crash(CrashPolicy::Random);
        disk.durable_image()
    }

    #[test]
    fn random_crash_is_reproducible_from_the_seed() {
        let images: Vec<Vec<u8>> = (0..8).map(random_crash_image).collect();
        for (seed, image) in images.iter().enumerate() {
            assert_eq!(&random_crash_image(seed as u64), image, "seed {seed}");
        }
        assert!(images.iter().any(|image| *image != images[0]), "every seed gave the same crash");
    }

    #[test]
    fn crash_after_ops_lets_exactly_n_ops_complete() {
        for n in 0..6u64 {
            let disk = SimDisk::new(4 * BLOCK, 7);
            // Ops before arming do not count towards n.
            disk.write_at(0, &[9; B]).unwrap();
            disk.crash_after_ops(Some(n));
            let mut done = 0;
            for i in 0..8u64 {
                let result = if i % 3 == 2 { disk.flush() } else { disk.write_at((i % 4) * BLOCK, &[i as u8; B]) };
                match result {
                    Ok(()) => {
                        assert_eq!(done, i, "an op succeeded after the crash (n = {n})");
                        done += 1;
                    }
                    Err(DeviceError::Crashed) => {}
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            assert_eq!(done, n);
            assert_eq!(disk.ops(), n + 1);
            assert!(disk.is_down());
            let mut buf = vec![0; B];
            assert!(matches!(disk.read_at(0, &mut buf), Err(DeviceError::Crashed)));
            disk.crash(CrashPolicy::KeepAll);
            assert!(!disk.is_down());
            disk.read_at(0, &mut buf).unwrap();
            disk.write_at(0, &buf).unwrap();
            disk.flush().unwrap();
        }
        // None disarms.
        let disk = SimDisk::new(BLOCK, 7);
        disk.crash_after_ops(Some(1));
        disk.crash_after_ops(None);
        for _ in 0..3 {
            disk.flush().unwrap();
        }
    }

    #[test]
    fn read_error_fails_overlapping_reads_until_the_block_is_written() {
        let disk = SimDisk::new(4 * BLOCK, 11);
        disk.inject(SimFault::ReadError { offset: 2 * BLOCK + 100 });
        let mut one = vec![0; B];
        let mut two = vec![0; 2 * B];
        assert!(is_eio(&disk.read_at(2 * BLOCK, &mut one).unwrap_err(), "read"));
        assert!(is_eio(&disk.read_at(BLOCK, &mut two).unwrap_err(), "read"));
        disk.read_at(0, &mut two).unwrap();
        disk.read_at(3 * BLOCK, &mut one).unwrap();
        // A read error does not poison, and a write elsewhere does not repair it.
        disk.write_at(BLOCK, &[1; B]).unwrap();
        disk.flush().unwrap();
        assert!(disk.read_at(2 * BLOCK, &mut one).is_err());
        disk.write_at(2 * BLOCK, &[2; B]).unwrap();
        disk.read_at(2 * BLOCK, &mut one).unwrap();
        assert_eq!(one, [2; B]);
    }

    #[test]
    fn bit_flip_flips_exactly_one_bit() {
        let disk = SimDisk::new(2 * BLOCK, 13);
        let data: Vec<u8> = (0..2 * B).map(|i| i as u8).collect();
        disk.write_at(0, &data).unwrap();
        disk.flush().unwrap();
        let flipped_bits = |a: &[u8], b: &[u8]| -> u32 { a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum() };

        disk.inject(SimFault::BitFlip { offset: 100, bit: 3 });
        let image = disk.durable_image();
        assert_eq!(flipped_bits(&image, &data), 1);
        assert_eq!(image[100] ^ data[100], 1 << 3);
        assert_eq!(read(&disk, 0, 2 * B), image);

        let at = disk.flip_random_bit(BLOCK, 2 * BLOCK);
        assert!((BLOCK..2 * BLOCK).contains(&at));
        let image2 = disk.durable_image();
        assert_eq!(flipped_bits(&image2, &image), 1);
        assert_ne!(image2[at as usize], image[at as usize]);
    }

    #[test]
    fn lose_write_reports_success_but_never_lands() {
        let disk = SimDisk::new(4 * BLOCK, 17);
        disk.write_at(BLOCK, &[1; B]).unwrap();
        disk.flush().unwrap();
        disk.inject(SimFault::LoseWrite { offset: BLOCK });
        disk.write_at(2 * BLOCK, &[5; B]).unwrap();
        disk.write_at(BLOCK, &[2; B]).unwrap();
        assert_eq!(read(&disk, BLOCK, B), [1; B]);
        assert_eq!(read(&disk, 2 * BLOCK, B), [5; B]);
        disk.flush().unwrap();
        disk.crash(CrashPolicy::KeepAll);
        assert_eq!(block_of(&disk.durable_image(), 1), [1; B]);
        // One-shot: the next write at that offset lands.
        disk.write_at(BLOCK, &[3; B]).unwrap();
        assert_eq!(read(&disk, BLOCK, B), [3; B]);
    }

    #[test]
    fn misdirected_write_lands_at_the_other_offset() {
        let disk = SimDisk::new(4 * BLOCK, 19);
        disk.inject(SimFault::MisdirectWrite { from: BLOCK, to: 3 * BLOCK });
        disk.write_at(BLOCK, &[9; B]).unwrap();
        assert_eq!(read(&disk, BLOCK, B), [0; B]);
        assert_eq!(read(&disk, 3 * BLOCK, B), [9; B]);
        disk.flush().unwrap();
        let image = disk.durable_image();
        assert_eq!(block_of(&image, 1), [0; B]);
        assert_eq!(block_of(&image, 3), [9; B]);
        disk.write_at(BLOCK, &[8; B]).unwrap();
        assert_eq!(read(&disk, BLOCK, B), [8; B]);
    }

    #[test]
    fn write_error_poisons_until_crash() {
        for (policy, survived) in [(CrashPolicy::DropAll, 0u8), (CrashPolicy::KeepAll, 2)] {
            let disk = SimDisk::new(4 * BLOCK, 23);
            disk.inject(SimFault::WriteError { offset: BLOCK });
            disk.write_at(0, &[1; B]).unwrap();
            let err = disk.write_at(BLOCK, &[2; B]).unwrap_err();
            assert!(is_eio(&err, "write"), "{err:?}");
            assert!(matches!(disk.write_at(0, &[3; B]), Err(DeviceError::Poisoned { .. })));
            assert!(matches!(disk.flush(), Err(DeviceError::Poisoned { .. })));
            // Reads still work while poisoned.
            assert_eq!(read(&disk, 0, B), [1; B]);
            // The failed write may or may not have reached the media.
            disk.crash(policy);
            assert_eq!(block_of(&disk.durable_image(), 1), [survived; B]);
            disk.write_at(BLOCK, &[4; B]).unwrap();
            disk.flush().unwrap();
            assert_eq!(block_of(&disk.durable_image(), 1), [4; B]);
        }
    }

    #[test]
    fn flush_error_poisons_until_crash() {
        let disk = SimDisk::new(4 * BLOCK, 29);
        disk.write_at(BLOCK, &[1; B]).unwrap();
        disk.inject(SimFault::FlushError);
        let err = disk.flush().unwrap_err();
        assert!(is_eio(&err, "flush"), "{err:?}");
        assert_eq!(disk.pending_writes(), 1, "a failed flush made nothing durable");
        assert_eq!(disk.durable_image(), vec![0; 4 * B]);
        assert!(matches!(disk.write_at(0, &[3; B]), Err(DeviceError::Poisoned { .. })));
        assert!(matches!(disk.flush(), Err(DeviceError::Poisoned { .. })));
        disk.crash(CrashPolicy::DropAll);
        assert_eq!(disk.durable_image(), vec![0; 4 * B]);
        // One-shot: after the crash, flushes succeed again.
        disk.write_at(BLOCK, &[2; B]).unwrap();
        disk.flush().unwrap();
        assert_eq!(block_of(&disk.durable_image(), 1), [2; B]);
    }

    #[test]
    fn flush_error_fails_the_sync_of_the_next_durable_write() {
        let disk = SimDisk::new(4 * BLOCK, 61);
        disk.inject(SimFault::FlushError);
        let err = disk.write_durable(BLOCK, &[1; B]).unwrap_err();
        assert!(is_eio(&err, "write"), "{err:?}");
        assert_eq!(disk.pending_writes(), 1, "a failed durable write is not durable");
        assert!(matches!(disk.flush(), Err(DeviceError::Poisoned { .. })));
        disk.crash(CrashPolicy::DropAll);
        assert_eq!(disk.durable_image(), vec![0; 4 * B]);
    }

    #[test]
    fn trace_records_writes_and_flushes() {
        let disk = SimDisk::new(4 * BLOCK, 31);
        disk.write_at(0, &[1; B]).unwrap();
        disk.write_at(BLOCK, &[2; 2 * B]).unwrap();
        // Refused requests are not device operations.
        assert!(disk.write_at(1, &[0; B]).is_err());
        disk.flush().unwrap();
        disk.write_at(3 * BLOCK, &[3; B]).unwrap();
        let mut buf = vec![0; B];
        disk.read_at(0, &mut buf).unwrap();
        disk.flush().unwrap();
        let want = [
            TraceOp::Write { offset: 0, len: B },
            TraceOp::Write { offset: BLOCK, len: 2 * B },
            TraceOp::Flush,
            TraceOp::Write { offset: 3 * BLOCK, len: B },
            TraceOp::Flush,
        ];
        assert_eq!(disk.trace(), want);
        assert_eq!(disk.ops(), want.len() as u64);
    }

    #[test]
    fn write_durable_leaves_an_earlier_plain_write_pending() {
        let disk = SimDisk::new(4 * BLOCK, 37);
        disk.write_at(BLOCK, &[1; B]).unwrap();
        disk.write_durable(2 * BLOCK, &[2; B]).unwrap();
        let image = disk.durable_image();
        assert_eq!(block_of(&image, 1), [0; B], "the plain write became durable");
        assert_eq!(block_of(&image, 2), [2; B], "the durable write is not durable");
        assert_eq!(disk.pending_writes(), 1);
        assert_eq!(read(&disk, BLOCK, B), [1; B]);
        // A crash can drop the earlier write, never the durable one.
        let resolved = disk.crash(CrashPolicy::DropAll);
        assert_eq!(resolved, [ResolvedWrite { offset: BLOCK, len: B, fate: WriteFate::Drop }]);
        let image = disk.durable_image();
        assert_eq!(block_of(&image, 1), [0; B]);
        assert_eq!(block_of(&image, 2), [2; B]);
    }

    /// A durable write the power goes off in never completed: like any interrupted write it
    /// may be kept, dropped or torn.
    #[test]
    fn write_durable_is_one_traced_op_and_a_cut_in_it_leaves_it_to_the_crash() {
        for (policy, survived) in [(CrashPolicy::DropAll, 0u8), (CrashPolicy::KeepAll, 3)] {
            let disk = SimDisk::new(4 * BLOCK, 41);
            disk.crash_after_ops(Some(2));
            disk.write_at(0, &[1; B]).unwrap();
            disk.write_durable(BLOCK, &[2; B]).unwrap();
            assert!(matches!(disk.write_durable(2 * BLOCK, &[3; B]), Err(DeviceError::Crashed)));
            // After the cut nothing reaches the media.
            assert!(matches!(disk.write_durable(3 * BLOCK, &[4; B]), Err(DeviceError::Crashed)));
            let trace = [TraceOp::Write { offset: 0, len: B }, TraceOp::WriteDurable { offset: BLOCK, len: B }];
            assert_eq!(disk.trace(), trace);
            assert_eq!(disk.ops(), 2);
            assert_eq!(disk.pending_writes(), 2);
            disk.crash(policy);
            let image = disk.durable_image();
            assert_eq!(block_of(&image, 0), [survived.min(1); B]);
            assert_eq!(block_of(&image, 1), [2; B]);
            assert_eq!(block_of(&image, 2), [survived; B]);
            assert_eq!(block_of(&image, 3), [0; B]);
        }
    }

    /// An older pending write to the same sectors cannot come back over a durable write,
    /// whatever the crash does to it; its other sectors keep their own fate.
    #[test]
    fn write_durable_supersedes_older_pending_writes_to_its_sectors() {
        for policy in [CrashPolicy::KeepAll, CrashPolicy::DropAll, CrashPolicy::Random, CrashPolicy::RandomWhole] {
            let disk = SimDisk::new(4 * BLOCK, 43);
            disk.write_at(0, &[1; 2 * B]).unwrap();
            disk.write_durable(BLOCK, &[2; B]).unwrap();
            assert_eq!(read(&disk, 0, 2 * B), [[1; B], [2; B]].concat());
            disk.crash(policy.clone());
            let image = disk.durable_image();
            assert_eq!(block_of(&image, 1), [2; B], "{policy:?}");
            assert!(block_of(&image, 0).iter().all(|&b| b <= 1), "{policy:?}");
        }
    }

    /// The page-cache path of the real device (`write_many`, then write-back started with
    /// sync_file_range) promises nothing until fdatasync: here every such write stays pending.
    #[test]
    fn write_many_leaves_every_write_pending_until_flush() {
        let disk = SimDisk::new(4 * BLOCK, 47);
        disk.write_many(&[(0, &[1; B][..]), (2 * BLOCK, &[2; 2 * B][..])]).unwrap();
        assert_eq!(disk.pending_writes(), 2);
        assert_eq!(disk.durable_image(), vec![0; 4 * B]);
        disk.flush().unwrap();
        assert_eq!(disk.pending_writes(), 0);
        assert_eq!(block_of(&disk.durable_image(), 3), [2; B]);
    }

    #[test]
    fn random_whole_keeps_or_drops_whole_writes_and_reports_the_fates() {
        let mut kept = 0;
        for seed in 0..16 {
            let disk = SimDisk::new(8 * BLOCK, seed);
            for i in 0..8u64 {
                disk.write_at(i * BLOCK, &[1 + i as u8; B]).unwrap();
            }
            let resolved = disk.crash(CrashPolicy::RandomWhole);
            assert_eq!(resolved.len(), 8);
            let image = disk.durable_image();
            for (i, r) in resolved.iter().enumerate() {
                assert_eq!(r.offset, i as u64 * BLOCK);
                let want = match r.fate {
                    WriteFate::Keep => 1 + i as u8,
                    WriteFate::Drop => 0,
                    WriteFate::Torn { .. } => panic!("RandomWhole tore a write"),
                };
                kept += usize::from(r.fate == WriteFate::Keep);
                assert_eq!(block_of(&image, i as u64), [want; B]);
            }
        }
        assert!(kept > 16 && kept < 112, "kept {kept} of 128");
    }

    #[test]
    fn planted_dsync_not_durable_leaves_durable_writes_pending() {
        let disk = SimDisk::new(4 * BLOCK, 53);
        disk.plant(Planted::DsyncNotDurable);
        disk.write_durable(BLOCK, &[1; B]).unwrap();
        assert_eq!(disk.pending_writes(), 1);
        assert_eq!(read(&disk, BLOCK, B), [1; B]);
        disk.crash(CrashPolicy::DropAll);
        assert_eq!(disk.durable_image(), vec![0; 4 * B]);
        // Flush still works, and the bug outlives the crash.
        disk.write_durable(BLOCK, &[2; B]).unwrap();
        assert_eq!(disk.pending_writes(), 1);
        disk.flush().unwrap();
        assert_eq!(block_of(&disk.durable_image(), 1), [2; B]);
    }

    #[test]
    fn planted_flush_ignored_makes_nothing_durable_but_write_durable_works() {
        let disk = SimDisk::new(4 * BLOCK, 59);
        disk.plant(Planted::FlushIgnored);
        disk.write_at(0, &[1; B]).unwrap();
        disk.flush().unwrap();
        assert_eq!(disk.pending_writes(), 1);
        assert_eq!(disk.trace(), [TraceOp::Write { offset: 0, len: B }, TraceOp::Flush]);
        disk.write_durable(BLOCK, &[2; B]).unwrap();
        disk.crash(CrashPolicy::DropAll);
        let image = disk.durable_image();
        assert_eq!(block_of(&image, 0), [0; B]);
        assert_eq!(block_of(&image, 1), [2; B]);
    }

    #[test]
    fn planted_direct_writes_lost_never_become_durable() {
        let disk = SimDisk::new(4 * BLOCK, 61);
        disk.plant(Planted::DirectWritesLost);
        disk.write_placed(&[(0, &[1; B][..])]).unwrap();
        disk.write_at(BLOCK, &[2; B]).unwrap();
        assert_eq!(read(&disk, 0, B), [1; B], "visible before the crash");
        disk.flush().unwrap();
        assert_eq!(disk.pending_writes(), 1);
        disk.crash(CrashPolicy::KeepAll);
        let image = disk.durable_image();
        assert_eq!(block_of(&image, 0), [0; B]);
        assert_eq!(block_of(&image, 1), [2; B]);
    }

    #[test]
    fn write_fate_choices() {
        assert_eq!(WriteFate::choices(1), [WriteFate::Keep, WriteFate::Drop]);
        let fates = WriteFate::choices(8);
        assert_eq!(fates.len(), 4);
        assert_eq!(fates[..2], [WriteFate::Keep, WriteFate::Drop]);
        let first: Vec<bool> = (0..8).map(|i| i < 4).collect();
        let second: Vec<bool> = first.iter().map(|k| !k).collect();
        assert_eq!(fates[2], WriteFate::Torn { kept: first });
        assert_eq!(fates[3], WriteFate::Torn { kept: second });
        assert_eq!(WriteFate::choices(2).len(), 4);
    }

    const PROP_BLOCKS: u64 = 6;

    #[derive(Debug, Clone)]
    enum Op {
        Write { block: u64, blocks: u64 },
        Flush,
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..PROP_BLOCKS, 1..=3u64)
                .prop_map(|(block, blocks)| Op::Write { block: block.min(PROP_BLOCKS - blocks), blocks }),
            1 => Just(Op::Flush),
        ]
    }

    /// The content write `id` gives sector `sector` (of the whole disk): unique per pair.
    fn stamp(id: usize, sector: usize) -> Vec<u8> {
        let mut bytes = vec![(id * 7 + sector) as u8; SECTOR_SIZE];
        bytes[..4].copy_from_slice(&(id as u32 + 1).to_le_bytes());
        bytes[4..8].copy_from_slice(&(sector as u32).to_le_bytes());
        bytes
    }

    proptest! {
        /// Per-sector oracle: after a crash, every sector holds its last flushed value or the
        /// value of some write to it issued after that flush; DropAll and KeepAll give exactly
        /// the flushed and the volatile view.
        #[test]
        fn crash_keeps_each_sector_flushed_or_later(
            seed in any::<u64>(),
            policy in 0..3u8,
            ops in prop::collection::vec(op_strategy(), 0..40),
        ) {
            let size = PROP_BLOCKS as usize * B;
            let sectors = size / SECTOR_SIZE;
            let disk = SimDisk::new(size as u64, seed);
            let mut flushed = vec![vec![0u8; SECTOR_SIZE]; sectors];
            let mut later: Vec<Vec<Vec<u8>>> = vec![Vec::new(); sectors];
            let mut volatile = vec![0u8; size];
            for (id, op) in ops.iter().enumerate() {
                match *op {
                    Op::Write { block, blocks } => {
                        let first = block as usize * B / SECTOR_SIZE;
                        let count = blocks as usize * B / SECTOR_SIZE;
                        let data: Vec<u8> = (first..first + count).flat_map(|s| stamp(id, s)).collect();
                        disk.write_at(block * BLOCK, &data).unwrap();
                        for s in first..first + count {
                            let value = stamp(id, s);
                            volatile[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE].copy_from_slice(&value);
                            later[s].push(value);
                        }
                    }
                    Op::Flush => {
                        disk.flush().unwrap();
                        for s in 0..sectors {
                            if let Some(last) = later[s].pop() {
                                flushed[s] = last;
                            }
                            later[s].clear();
                        }
                    }
                }
            }
            prop_assert_eq!(read(&disk, 0, size), volatile.clone());
            let policy = match policy {
                0 => CrashPolicy::DropAll,
                1 => CrashPolicy::KeepAll,
                _ => CrashPolicy::Random,
            };
            disk.crash(policy.clone());
            let image = disk.durable_image();
            match policy {
                CrashPolicy::DropAll => prop_assert_eq!(&image, &flushed.concat()),
                CrashPolicy::KeepAll => prop_assert_eq!(&image, &volatile),
                _ => {
                    for (s, got) in image.chunks(SECTOR_SIZE).enumerate() {
                        prop_assert!(
                            got == flushed[s].as_slice() || later[s].iter().any(|v| v.as_slice() == got),
                            "sector {} holds neither its flushed value nor a later write's", s
                        );
                    }
                }
            }
            prop_assert_eq!(read(&disk, 0, size), image);
            prop_assert_eq!(disk.pending_writes(), 0);
        }
    }
}
