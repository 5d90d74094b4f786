//! lazyfs: a FUSE file system for power-cut tests, in the spirit of LazyFS.
//!
//! A mount shows the regular files of a backing directory. The backing files hold the durable
//! state; every write not yet made durable lives in an in-memory overlay that reads see. A
//! write becomes durable when it is written with O_DSYNC or O_SYNC (the open flag, or
//! RWF_DSYNC/RWF_SYNC on the write: the kernel passes both in FUSE_WRITE's `flags`), or when
//! its file is fsync'd or fdatasync'd (FUSE_FSYNC: the whole file's overlay goes to the backing
//! file). Everything else is resolved at a **cut** (see [`Mode`]), after which the mount
//! answers every request with EIO until it is unmounted. Mounting the backing directory again
//! then shows exactly the durable state.
//!
//! Files are opened with FOPEN_DIRECT_IO: the kernel keeps no page cache for them, so nothing
//! from before a cut can be read back from memory, and a RWF_DSYNC write reaches us as one
//! FUSE_WRITE flagged O_DSYNC and nothing else. (Without it the kernel follows a DSYNC write
//! with a FUSE_FSYNC of the whole file, which cannot be told apart from an fdatasync and would
//! make every other pending write of the file durable too; `tests/probes.rs` shows both.)
//!
//! Only file data is subject to the cut. Names, creation, size changes and removal are applied
//! to the backing directory at once (durable immediately): the tests this is for make their
//! files durable with fsync before they rely on them. An unmount without a cut is a clean
//! shutdown: the pending writes are written to the backing files.
//!
//! The layer models the page cache and the device's volatile cache as one: pending writes are
//! per file, and a FUSE_FSYNC makes durable only its own file's pending writes.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

/// The tear unit: a device writes 512-byte sectors whole.
pub const SECTOR: u64 = 512;
/// The unit of `reorder`: a device with atomic 4 KiB writes.
pub const PAGE: u64 = 4096;

const TTL: Duration = Duration::from_secs(1);

/// How a cut resolves each write that was not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each 512-byte sector of each write is kept or dropped on its own.
    Tear,
    /// Each 4 KiB-aligned piece of each write is kept or dropped whole, independently of the
    /// others and of their order: a device with atomic 4 KiB writes and a volatile cache.
    Reorder,
    /// Every write not made durable is lost.
    Drop,
    /// Every write is kept (a cut that happened to lose nothing).
    Keep,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "tear" => Ok(Mode::Tear),
            "reorder" => Ok(Mode::Reorder),
            "drop" => Ok(Mode::Drop),
            "keep" => Ok(Mode::Keep),
            _ => Err(format!("unknown mode {s:?}: expected tear, reorder, drop or keep")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tear => "tear",
            Mode::Reorder => "reorder",
            Mode::Drop => "drop",
            Mode::Keep => "keep",
        })
    }
}

/// How a mount behaves.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Seeds the choices of the cut.
    pub seed: u64,
    /// Opens files without FOPEN_DIRECT_IO (through the kernel's page cache). Only for probing
    /// what the kernel does: a DSYNC write then makes the whole file durable.
    pub cached: bool,
}

/// What the layer saw, and what a cut did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// FUSE_WRITE requests.
    pub writes: u64,
    /// FUSE_WRITE requests flagged O_DSYNC or O_SYNC (durable at once).
    pub dsync_writes: u64,
    /// FUSE_FSYNC requests.
    pub fsyncs: u64,
    /// Writes waiting for a sync now.
    pub pending: u64,
    /// Whether the mount has been cut.
    pub cut: bool,
    /// Pieces (sectors or 4 KiB pieces, or whole writes) the cut kept and dropped.
    pub kept: u64,
    pub dropped: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} writes={} dsync_writes={} fsyncs={} pending={} kept={} dropped={}",
            if self.cut { "cut" } else { "live" },
            self.writes,
            self.dsync_writes,
            self.fsyncs,
            self.pending,
            self.kept,
            self.dropped
        )
    }
}

/// SplitMix64: reproducible choices from the seed.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// A write in arrival order. Durable writes are recorded only when they cover a sector that
/// pending writes also cover, so that a cut replays them after the older pending ones.
#[derive(Debug)]
struct Write {
    offset: u64,
    data: Vec<u8>,
    durable: bool,
}

#[derive(Debug)]
struct Inode {
    name: OsString,
    file: File,
    /// The size the mount shows: the backing file's, or more if pending writes extend it.
    size: u64,
    /// The current contents of every sector a pending write touched.
    overlay: HashMap<u64, Box<[u8]>>,
    pending: Vec<Write>,
}

impl Inode {
    /// A sector as the backing file holds it (zeros past its end).
    fn backing_sector(&self, sector: u64) -> io::Result<Box<[u8]>> {
        let mut buf = vec![0u8; SECTOR as usize].into_boxed_slice();
        read_full(&self.file, &mut buf, sector * SECTOR)?;
        Ok(buf)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        read_full(&self.file, &mut buf, offset)?;
        if len > 0 && !self.overlay.is_empty() {
            let end = offset + len as u64;
            for sector in offset / SECTOR..=(end - 1) / SECTOR {
                if let Some(data) = self.overlay.get(&sector) {
                    copy_overlap(data, sector * SECTOR, &mut buf, offset);
                }
            }
        }
        Ok(buf)
    }

    fn write(&mut self, offset: u64, data: &[u8], durable: bool) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let mut touches_pending = false;
        if !data.is_empty() {
            for sector in offset / SECTOR..=(end - 1) / SECTOR {
                if !durable && !self.overlay.contains_key(&sector) {
                    let base = self.backing_sector(sector)?;
                    self.overlay.insert(sector, base);
                }
                if let Some(view) = self.overlay.get_mut(&sector) {
                    touches_pending = true;
                    let at = sector * SECTOR;
                    let (from, to) = (offset.max(at), end.min(at + SECTOR));
                    view[(from - at) as usize..(to - at) as usize]
                        .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                }
            }
        }
        if durable {
            self.file.write_all_at(data, offset)?;
        }
        if !durable || touches_pending {
            self.pending.push(Write { offset, data: data.to_vec(), durable });
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// fsync: the current contents of every pending sector go to the backing file.
    fn sync(&mut self) -> io::Result<()> {
        for (&sector, data) in &self.overlay {
            let at = sector * SECTOR;
            let len = self.size.saturating_sub(at).min(SECTOR) as usize;
            self.file.write_all_at(&data[..len], at)?;
        }
        self.overlay.clear();
        self.pending.clear();
        Ok(())
    }

    /// The cut: each pending write, in arrival order, kept or dropped piece by piece.
    fn cut(&mut self, mode: Mode, keep_percent: u64, rng: &mut Rng, stats: &mut Stats) -> io::Result<()> {
        let unit = match mode {
            Mode::Tear => SECTOR,
            Mode::Reorder => PAGE,
            Mode::Drop | Mode::Keep => u64::MAX,
        };
        for w in std::mem::take(&mut self.pending) {
            let end = w.offset + w.data.len() as u64;
            let mut at = w.offset;
            while at < end {
                let next = if unit == u64::MAX { end } else { end.min((at / unit + 1) * unit) };
                let keep = w.durable
                    || match mode {
                        Mode::Keep => true,
                        Mode::Drop => false,
                        Mode::Tear | Mode::Reorder => rng.below(100) < keep_percent,
                    };
                if !w.durable {
                    if keep {
                        stats.kept += 1;
                    } else {
                        stats.dropped += 1;
                    }
                }
                if keep {
                    self.file.write_all_at(&w.data[(at - w.offset) as usize..(next - w.offset) as usize], at)?;
                }
                at = next;
            }
        }
        self.overlay.clear();
        self.size = self.file.metadata()?.len();
        Ok(())
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break, // past the end: zeros
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies the overlap of `src` (at file offset `src_at`) into `dst` (at `dst_at`).
fn copy_overlap(src: &[u8], src_at: u64, dst: &mut [u8], dst_at: u64) {
    let from = src_at.max(dst_at);
    let to = (src_at + src.len() as u64).min(dst_at + dst.len() as u64);
    if from < to {
        dst[(from - dst_at) as usize..(to - dst_at) as usize]
            .copy_from_slice(&src[(from - src_at) as usize..(to - src_at) as usize]);
    }
}

#[derive(Debug)]
struct State {
    options: Options,
    rng: Rng,
    backing: PathBuf,
    names: HashMap<OsString, u64>,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Cut when this many more FUSE_FSYNC requests have arrived.
    armed: Option<u64>,
    stats: Stats,
}

impl State {
    fn cut(&mut self) -> io::Result<()> {
        if self.stats.cut {
            return Ok(());
        }
        self.stats.cut = true;
        self.armed = None;
        // How likely each piece survives varies from cut to cut, so that both "almost
        // everything" and "almost nothing" happen.
        let keep_percent = 10 + self.rng.below(81);
        let mode = self.options.mode;
        let mut inodes: Vec<&mut Inode> = self.inodes.values_mut().collect();
        inodes.sort_by(|a, b| a.name.cmp(&b.name)); // the same seed, the same choices
        let mut result = Ok(());
        for inode in inodes {
            if let Err(e) = inode.cut(mode, keep_percent, &mut self.rng, &mut self.stats) {
                result = result.and(Err(e));
            }
        }
        self.stats.pending = 0;
        result
    }

    fn inode(&mut self, ino: INodeNo) -> Result<&mut Inode, Errno> {
        if self.stats.cut {
            return Err(Errno::EIO);
        }
        self.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    /// The inode of a backing file, made on first sight.
    fn lookup(&mut self, name: &OsStr) -> Result<u64, Errno> {
        if let Some(&ino) = self.names.get(name) {
            return Ok(ino);
        }
        let path = self.backing.join(name);
        let meta = std::fs::symlink_metadata(&path).map_err(Errno::from)?;
        if !meta.is_file() {
            return Err(Errno::ENOENT);
        }
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(Errno::from)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let inode =
            Inode { name: name.to_owned(), file, size: meta.len(), overlay: HashMap::new(), pending: Vec::new() };
        self.inodes.insert(ino, inode);
        self.names.insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let (meta, size) = if ino == INodeNo::ROOT.0 {
            (std::fs::metadata(&self.backing).map_err(Errno::from)?, 0)
        } else {
            let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
            (inode.file.metadata().map_err(Errno::from)?, inode.size)
        };
        let time = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
        let dir = ino == INodeNo::ROOT.0;
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { size },
            blocks: size.div_ceil(512),
            atime: time(meta.atime()),
            mtime: time(meta.mtime()),
            ctime: time(meta.ctime()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: (meta.mode() & 0o7777) as u16,
            nlink: if dir { 2 } else { 1 },
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }
}

/// A handle on a mount's layer: cut it, arm a cut, read its counters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Layer(Arc<Mutex<State>>);

impl Layer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power now: every write not made durable is resolved by the mode, and every
    /// request from now on fails with EIO. Returns the counters after the cut.
    pub fn cut(&self) -> io::Result<Stats> {
        let mut state = self.lock();
        state.cut()?;
        Ok(state.stats.clone())
    }

    /// Cuts the power when the `n`-th FUSE_FSYNC from now arrives (`n` ≥ 1), before it is
    /// served: the window in which writes wait for the sync that would make them durable.
    pub fn arm_at_fsync(&self, n: u64) {
        self.lock().armed = Some(n.max(1));
    }

    pub fn stats(&self) -> Stats {
        let state = self.lock();
        let mut stats = state.stats.clone();
        if !stats.cut {
            stats.pending = state.inodes.values().map(|i| i.pending.iter().filter(|w| !w.durable).count() as u64).sum();
        }
        stats
    }

    /// Serves one control command (the binary's control socket speaks these lines):
    /// `cut`, `arm N` (cut at the N-th fsync from now), `status`.
    pub fn command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["cut"] => match self.cut() {
                Ok(stats) => stats.to_string(),
                Err(e) => format!("error: {e}"),
            },
            ["arm", n] => match n.parse::<u64>() {
                Ok(n) if n > 0 => {
                    self.arm_at_fsync(n);
                    format!("armed {n}")
                }
                _ => format!("error: arm wants a count ≥ 1, got {n:?}"),
            },
            ["status"] => self.stats().to_string(),
            _ => format!("error: unknown command {line:?}: expected cut, arm N or status"),
        }
    }
}

/// The file system the kernel talks to.
#[derive(Debug)]
struct LazyFs(Layer);

impl LazyFs {
    fn open_flags(&self) -> FopenFlags {
        if self.0.lock().options.cached {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_DIRECT_IO
        }
    }
}

impl Filesystem for LazyFs {
    fn destroy(&mut self) {
        // A clean unmount: the pending writes reach the backing files.
        let mut state = self.0.lock();
        if !state.stats.cut {
            for inode in state.inodes.values_mut() {
                let _ = inode.sync();
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.0.lock();
        if state.stats.cut {
            return reply.error(Errno::EIO);
        }
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match state.lookup(name).and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = self.0.lock();
        if state.stats.cut {
            return reply.error(Errno::EIO);
        }
        match state.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.0.lock();
        let result = (|| {
            if state.stats.cut {
                return Err(Errno::EIO);
            }
            if ino != INodeNo::ROOT {
                let inode = state.inode(ino)?;
                if let Some(size) = size {
                    // A size change is durable at once; pending writes past it go.
                    inode.file.set_len(size).map_err(Errno::from)?;
                    inode.overlay.retain(|&s, _| s * SECTOR < size);
                    if let Some(last) = inode.overlay.get_mut(&(size / SECTOR)) {
                        last[(size % SECTOR) as usize..].fill(0);
                    }
                    inode.pending.retain_mut(|w| {
                        w.data.truncate(size.saturating_sub(w.offset) as usize);
                        !w.data.is_empty()
                    });
                    inode.size = size;
                }
                if let Some(mode) = mode {
                    let name = state.inode(ino)?.name.clone();
                    let path = state.backing.join(name);
                    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
                        .map_err(Errno::from)?;
                }
            }
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.0.lock();
        if state.stats.cut {
            return reply.error(Errno::EIO);
        }
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match std::fs::remove_file(state.backing.join(name)) {
            Ok(()) => {
                if let Some(ino) = state.names.remove(name) {
                    state.inodes.remove(&ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fopen = self.open_flags();
        let mut state = self.0.lock();
        let result = state.inode(ino).and_then(|inode| {
            if flags.0 & libc::O_TRUNC != 0 {
                inode.file.set_len(0).map_err(Errno::from)?;
                inode.overlay.clear();
                inode.pending.clear();
                inode.size = 0;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.opened(FileHandle(0), fopen),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let fopen = self.open_flags();
        let mut state = self.0.lock();
        let result = (|| {
            if state.stats.cut {
                return Err(Errno::EIO);
            }
            if parent != INodeNo::ROOT {
                return Err(Errno::ENOENT);
            }
            let mut open = OpenOptions::new();
            open.read(true).write(true).mode(mode & !umask & 0o7777);
            if flags & libc::O_EXCL != 0 {
                open.create_new(true);
            } else {
                open.create(true);
            }
            drop(open.open(state.backing.join(name)).map_err(Errno::from)?);
            if let Some(ino) = state.names.remove(name) {
                state.inodes.remove(&ino); // replaced behind our back
            }
            let ino = state.lookup(name)?;
            if flags & libc::O_TRUNC != 0 {
                let inode = state.inode(INodeNo(ino))?;
                inode.file.set_len(0).map_err(Errno::from)?;
                inode.size = 0;
            }
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), fopen),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.0.lock();
        let result = state.inode(ino).and_then(|inode| {
            let len = inode.size.saturating_sub(offset).min(u64::from(size)) as usize;
            inode.read(offset, len).map_err(Errno::from)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel sets O_DSYNC here for O_DSYNC/O_SYNC files and RWF_DSYNC/RWF_SYNC writes
        // (O_SYNC includes the O_DSYNC bit).
        let durable = flags.0 & libc::O_DSYNC != 0;
        let mut state = self.0.lock();
        let result = state.inode(ino).and_then(|inode| inode.write(offset, data, durable).map_err(Errno::from));
        if result.is_ok() {
            state.stats.writes += 1;
            state.stats.dsync_writes += u64::from(durable);
        }
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(): not a sync.
        if self.0.lock().stats.cut {
            return reply.error(Errno::EIO);
        }
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut state = self.0.lock();
        if let Some(n) = state.armed {
            if n <= 1 {
                let _ = state.cut();
                return reply.error(Errno::EIO);
            }
            state.armed = Some(n - 1);
        }
        let result = state.inode(ino).and_then(|inode| inode.sync().map_err(Errno::from));
        if result.is_ok() {
            state.stats.fsyncs += 1;
        }
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Names are durable at once.
        if self.0.lock().stats.cut {
            return reply.error(Errno::EIO);
        }
        reply.ok()
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut state = self.0.lock();
        if state.stats.cut {
            return reply.error(Errno::EIO);
        }
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names: Vec<OsString> = match std::fs::read_dir(&state.backing) {
            Ok(dir) => dir
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name())
                .collect(),
            Err(e) => return reply.error(Errno::from(e)),
        };
        names.sort();
        let mut entries = vec![(INodeNo::ROOT.0, FileType::Directory, OsString::from(".")); 2];
        entries[1].2 = OsString::from("..");
        for name in names {
            if let Ok(ino) = state.lookup(&name) {
                entries.push((ino, FileType::RegularFile, name));
            }
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }
}

/// Unmounts a lazyfs (or any FUSE mount) with `fusermount3 -u`, retrying for up to two
/// seconds while it is busy: a process forked by another thread may hold a descriptor of the
/// mount for a moment, until its exec closes it.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        let out = std::process::Command::new("fusermount3").arg("-u").arg(mountpoint).output()?;
        if out.status.success() {
            return Ok(());
        }
        tries += 1;
        if tries >= 100 {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(io::Error::other(format!("fusermount3 -u {}: {why}", mountpoint.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mounted lazyfs. Dropping it unmounts (lazily if the mount is busy).
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    layer: Layer,
    mountpoint: PathBuf,
}

/// Mounts `backing` (a directory) at `mountpoint`. Other users may use the mount too
/// (`allow_other`): rblk's driver drops to `nobody` and still stats its image.
pub fn mount(backing: &Path, mountpoint: &Path, options: Options) -> io::Result<Mounted> {
    let state = State {
        rng: Rng(options.seed),
        options,
        backing: backing.canonicalize()?,
        names: HashMap::new(),
        inodes: HashMap::new(),
        next_ino: 2,
        armed: None,
        stats: Stats::default(),
    };
    let layer = Layer(Arc::new(Mutex::new(state)));
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("lazyfs".into()), MountOption::Subtype("lazyfs".into())];
    config.acl = SessionACL::All;
    let session = fuser::spawn_mount(LazyFs(layer.clone()), mountpoint, &config)?;
    Ok(Mounted { session: Some(session), layer, mountpoint: mountpoint.to_path_buf() })
}

impl Mounted {
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the file system to stop; fails if the mount stays busy.
    pub fn unmount(mut self) -> io::Result<()> {
        unmount(&self.mountpoint)?;
        match self.session.take() {
            Some(session) => session.join(),
            None => Ok(()),
        }
    }

    /// Serves until someone else unmounts it (`fusermount3 -u`).
    pub fn wait(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.session.is_some() {
            // Detach at once, busy or not: a failing test must not leave a mount behind.
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .stderr(std::process::Stdio::null())
                .status();
            // Not joined: a detached mount ends only when its last user lets go.
            drop(self.session.take());
        }
    }
}
