//! Raw sector devices.
//!
//! Everything rblk persists goes through [`Device`]: reads and writes of whole 4 KiB blocks at
//! 4 KiB-aligned byte offsets, and `flush` (fdatasync). There is no filesystem underneath the
//! formats built on it; a regular file or a block device only provides the sectors.
//!
//! Failure model (kept by every implementation and relied on by every caller): a write or
//! flush error is fatal. After one, the device is *poisoned*: every later write or flush
//! returns [`DeviceError::Poisoned`], because after a failed fdatasync Linux may have dropped
//! the dirty pages and a retried flush would report success for data that is gone. Callers
//! stop (fail-stop) and let the supervisor restart the driver, which recovers from what is
//! durable. Reads may fail for one request (a latent sector error) without poisoning.

mod file;
mod sim;

pub use file::FileDevice;
pub use sim::{CrashPolicy, Planted, ResolvedWrite, SimDisk, SimFault, TraceOp, WriteFate};

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The unit of every device I/O: offsets and lengths are multiples of it.
pub const BLOCK_SIZE: usize = 4096;
/// The same, as the 64-bit type used for on-disk offsets.
pub const BLOCK: u64 = BLOCK_SIZE as u64;
/// The granularity at which a write may be torn by power loss.
pub const SECTOR_SIZE: usize = 512;

/// What went wrong with a device operation, and where.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{op} at byte {offset} (+{len}) failed on {device}")]
    Io {
        op: &'static str,
        device: String,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} at byte {offset} (+{len}) is not {BLOCK_SIZE}-byte aligned")]
    Misaligned { op: &'static str, offset: u64, len: usize },
    #[error("{op} at byte {offset} (+{len}) is beyond the device end ({size} bytes)")]
    OutOfRange { op: &'static str, offset: u64, len: usize, size: u64 },
    #[error("{device} is poisoned by an earlier write or flush error; restart to recover")]
    Poisoned { device: String },
    #[error("simulated crash: the device is down until the test recovers it")]
    Crashed,
}

/// A raw sector device. Implementations are shared between threads (`&self` everywhere);
/// positional I/O needs no seek state.
pub trait Device: Send + Sync + fmt::Debug {
    /// Size in bytes, a multiple of [`BLOCK_SIZE`].
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`. Both multiples of [`BLOCK_SIZE`].
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `buf` at `offset`. Both multiples of [`BLOCK_SIZE`]. Not durable until `flush`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError>;
    /// Makes every completed write durable (fdatasync). An error poisons the device.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Reads data blocks for a client, like `read_at`, but possibly from a cache in front of
    /// the media (the kernel's page cache). Only for content that cannot change while it is
    /// read and that the caller verifies: a data block is immutable while a tree reaches it,
    /// and its hash is in the tree. A failed check is retried with `read_at`.
    fn read_cached_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.read_at(offset, buf)
    }
    /// Writes `buf` at `offset` and makes it durable before returning, like `write_at` and
    /// then `flush`, but it may leave other unflushed writes alone (a file's page cache): the
    /// log's appends need their own bytes durable, not the data blocks written meanwhile.
    /// An error poisons the device.
    fn write_durable(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.write_at(offset, buf)?;
        self.flush()
    }
    /// Whether long sequential reads (a log scan) should be read ahead on another thread.
    /// Simulated devices say no: their tests count and order every operation.
    fn read_ahead(&self) -> bool {
        false
    }
    /// Several `write_at`s, which the device may run at once (in any order): for blocks that
    /// nothing durable names yet, whose order does not matter until the next flush.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        writes.iter().try_for_each(|&(offset, buf)| self.write_at(offset, buf))
    }
    /// The bytes of placed writes (`crate::place`), like `write_many`: not durable until
    /// `flush`. A separate call so that a simulated disk can lose exactly these (a planted
    /// bug the power-loss suite must catch).
    fn write_placed(&self, writes: &[(u64, &[u8])]) -> Result<(), DeviceError> {
        self.write_many(writes)
    }
    /// `read_cached_at` only if it needs no wait for the media: `Ok(false)` when some of it
    /// is not cached (`buf` is then unspecified). Devices without a cache always say false.
    fn try_read_cached_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DeviceError> {
        check_io("read", offset, buf.len(), self.size())?;
        Ok(false)
    }
}

/// Checks the alignment and range rules every implementation shares.
pub(crate) fn check_io(op: &'static str, offset: u64, len: usize, size: u64) -> Result<(), DeviceError> {
    if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(DeviceError::Misaligned { op, offset, len });
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(DeviceError::OutOfRange { op, offset, len, size });
    }
    Ok(())
}

/// A type whose alignment is one block: its dangling pointer is a block-aligned empty buffer.
#[repr(C, align(4096))]
#[allow(dead_code)] // never built: only its alignment is used
struct BlockAligned([u8; BLOCK_SIZE]);

/// A zero-initialised byte buffer aligned to [`BLOCK_SIZE`], as O_DIRECT requires.
/// Its length is always a whole number of blocks.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8]; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `blocks` blocks.
    pub fn blocks(blocks: usize) -> Self {
        let len = blocks * BLOCK_SIZE;
        if len == 0 {
            return Self { ptr: NonNull::<BlockAligned>::dangling().cast(), len: 0 };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len }
    }

    /// A zeroed buffer large enough for `bytes`, rounded up to whole blocks.
    pub fn for_bytes(bytes: usize) -> Self {
        Self::blocks(bytes.div_ceil(BLOCK_SIZE))
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, BLOCK_SIZE) {
            Ok(layout) => layout,
            Err(_) => panic!("buffer of {len} bytes exceeds the address space"),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: ptr was allocated in `blocks` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed at allocation) or dangling
        // and aligned with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut copy = Self::blocks(self.len / BLOCK_SIZE);
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} blocks)", self.len / BLOCK_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for blocks in [0, 1, 3, 64] {
            let buf = AlignedBuf::blocks(blocks);
            assert_eq!(buf.len(), blocks * BLOCK_SIZE);
            assert_eq!(buf.as_ptr() as usize % BLOCK_SIZE, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
        assert_eq!(AlignedBuf::for_bytes(1).len(), BLOCK_SIZE);
        assert_eq!(AlignedBuf::for_bytes(BLOCK_SIZE + 1).len(), 2 * BLOCK_SIZE);
    }

    #[test]
    fn check_io_rejects_misaligned_and_out_of_range() {
        assert!(check_io("read", 0, BLOCK_SIZE, 2 * BLOCK).is_ok());
        assert!(matches!(check_io("read", 1, BLOCK_SIZE, 2 * BLOCK), Err(DeviceError::Misaligned { .. })));
        assert!(matches!(check_io("read", 0, 100, 2 * BLOCK), Err(DeviceError::Misaligned { .. })));
        assert!(matches!(check_io("read", BLOCK, 2 * BLOCK_SIZE, 2 * BLOCK), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(
            check_io("read", u64::MAX - 4095, BLOCK_SIZE, 2 * BLOCK),
            Err(DeviceError::Misaligned { .. }) | Err(DeviceError::OutOfRange { .. })
        ));
    }
}
