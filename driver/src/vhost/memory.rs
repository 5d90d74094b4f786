//! The guest's memory as the front-end shares it (SET_MEM_TABLE): each region's file mapped
//! shared into the driver, found by guest physical address (what descriptors hold) or by the
//! front-end's own virtual address (what SET_VRING_ADDR gives).
//!
//! Every access goes through vm-memory, which checks it against the mapped regions: a
//! descriptor that points outside them fails that request, never reaches other memory.

use std::fs::File;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The guest memory type (no dirty-page bitmap: rblk offers no live-migration logging).
pub type Mem = GuestMemoryMmap<()>;

/// Regions one memory table may have (QEMU sends at most 8 without CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{regions} memory regions with {files} descriptors")]
    Files { regions: usize, files: usize },
    #[error("{0} memory regions (at most {MAX_REGIONS})")]
    TooMany(usize),
    #[error("memory region {index} is empty, too large or wraps around")]
    Bounds { index: usize },
    #[error("memory region {index}: its file holds {file} bytes, the region needs {needed}")]
    Short { index: usize, file: u64, needed: u64 },
    #[error("memory region {index}: {source}")]
    Io { index: usize, source: std::io::Error },
    #[error("memory region {index} cannot be mapped: {detail}")]
    Map { index: usize, detail: String },
    #[error("the memory regions overlap")]
    Overlap,
}

/// One memory table, mapped.
#[derive(Debug)]
pub struct Memory {
    pub guest: Mem,
    /// Per region: (front-end virtual address, size, guest physical address).
    user: Vec<(u64, u64, u64)>,
}

impl Memory {
    /// No memory yet (before the first memory table).
    pub fn empty() -> Memory {
        Memory { guest: Mem::default(), user: Vec::new() }
    }

    /// Maps the regions of a memory table from the descriptors that came with it.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Memory, MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::Files { regions: regions.len(), files: files.len() });
        }
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooMany(regions.len()));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut user = Vec::with_capacity(regions.len());
        for (index, (r, file)) in regions.iter().zip(files).enumerate() {
            let size = r.memory_size;
            let sane = size > 0
                && usize::try_from(size).is_ok()
                && r.guest_phys_addr.checked_add(size).is_some()
                && r.user_addr.checked_add(size).is_some();
            let Some(end) = r.mmap_offset.checked_add(size).filter(|_| sane) else {
                return Err(MemoryError::Bounds { index });
            };
            // A mapping beyond the end of its file faults (SIGBUS) when touched: refused here.
            // (A front-end that shrinks the file later still can; QEMU seals its memfds.)
            let len = file.metadata().map_err(|source| MemoryError::Io { index, source })?.len();
            if len < end {
                return Err(MemoryError::Short { index, file: len, needed: end });
            }
            let region = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), size as usize)
                .map_err(|e| MemoryError::Map { index, detail: e.to_string() })?;
            let region =
                GuestRegionMmap::new(region, GuestAddress(r.guest_phys_addr)).ok_or(MemoryError::Bounds { index })?;
            mapped.push(region);
            user.push((r.user_addr, size, r.guest_phys_addr));
        }
        let guest = GuestMemoryMmap::from_regions(mapped).map_err(|_| MemoryError::Overlap)?;
        Ok(Memory { guest, user })
    }

    /// The guest physical address of a front-end virtual address (vring addresses).
    pub fn user_to_guest(&self, addr: u64) -> Option<GuestAddress> {
        self.user
            .iter()
            .find(|&&(start, size, _)| addr >= start && addr - start < size)
            .map(|&(start, _, guest)| GuestAddress(guest + (addr - start)))
    }
}
