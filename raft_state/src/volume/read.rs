use slog::warn;

use super::{Volume, VolumeError, MAX_RUN_BLOCKS};
use crate::device::{AlignedBuf, BLOCK, BLOCK_SIZE};
use crate::hash::{self, Hash};
use crate::tree::{Ptr, TreeError};

/// Block-map nodes `allocation` visits at most (each may be a read of 4 KiB while the
/// volume is locked for reading, which holds writes back): up to 64 MiB of fully mapped range
/// per answer, any size of unmapped one.
const STATUS_MAX_NODES: usize = 256;

/// When a read's blocks are checked against their hashes.
enum Verify<'a> {
    /// Before the read returns (`nowait`: only if all is cached).
    Now { nowait: bool },
    /// By the caller, through `checks`, as its read `read` (only if all is cached).
    Later { at: usize, read: usize, checks: &'a mut Checks },
}

/// The hash checks of reads made with `Volume::try_read_deferred`, each under the number its
/// caller gave it: run them all at once with `failed`.
#[derive(Debug, Default)]
pub struct Checks {
    /// Where a block lies in the caller's buffer, the hash it must have, and its read.
    blocks: Vec<(usize, Hash, usize)>,
}

impl Checks {
    /// Whether no block is waiting for its check.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Checks every deferred block in `buf` (the buffer the reads went into) and forgets them:
    /// the numbers of the reads with a block that failed, in the order they were deferred. Such a read must be read
    /// again (`Volume::read` checks its blocks, and reads the media itself when a cached copy
    /// is bad).
    pub fn failed(&mut self, buf: &[u8]) -> Vec<usize> {
        static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        let block = |at: usize| buf.get(at..).and_then(|b| b.first_chunk::<BLOCK_SIZE>());
        let mut hashes = vec![[0u8; 32]; self.blocks.len()];
        hash::data_blocks(self.blocks.iter().map(|&(at, ..)| block(at).unwrap_or(&ZEROS)), &mut hashes);
        // A block outside `buf` (a caller's mistake) fails too.
        let mut failed: Vec<usize> = (self.blocks.iter().zip(&hashes))
            .filter(|((at, want, _), got)| block(*at).is_none() || want != *got)
            .map(|((.., read), _)| *read)
            .collect();
        failed.dedup();
        self.blocks.clear();
        failed
    }
}

impl Volume {
    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). A block that fails its
    /// hash check fails the read: never wrong data. Blocks that sit next to each other on the
    /// device are read with one read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.checked_read(offset, buf, Verify::Now { nowait: false }).map(|_| ())
    }

    /// Like `read`, but only when the data can be had without waiting for the media (all of
    /// it in a cache, e.g. the kernel's page cache): `Ok(false)` means "use `read`" and leaves
    /// `buf` unspecified. Lets a connection answer hot reads on its own thread.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        self.checked_read(offset, buf, Verify::Now { nowait: true })
    }

    /// Like `try_read`, but the blocks' hash checks are left in `checks` rather than made
    /// now, so that the checks of many short reads run side by side (`Checks::failed`, which
    /// names a failed read by `read`); `at` is where `buf` starts in the buffer that
    /// `Checks::failed` is later given. Until then the data in `buf` is unverified: it must
    /// not leave the driver. Only reads of whole blocks are deferred; others, and reads not
    /// all cached, return `Ok(false)`.
    pub fn try_read_deferred(
        &self,
        offset: u64,
        buf: &mut [u8],
        at: usize,
        read: usize,
        checks: &mut Checks,
    ) -> Result<bool, VolumeError> {
        if !offset.is_multiple_of(BLOCK) || !buf.len().is_multiple_of(BLOCK_SIZE) {
            return Ok(false);
        }
        self.checked_read(offset, buf, Verify::Later { at, read, checks })
    }

    fn checked_read(&self, offset: u64, buf: &mut [u8], verify: Verify<'_>) -> Result<bool, VolumeError> {
        self.check()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let result = self.read_runs(offset, buf, verify);
        if let Err(e) = &result {
            warn!(self.log, "read failed"; "offset" => offset, "length" => buf.len(), "error" => %e);
        }
        result
    }

    /// Unless it waits (`Verify::Now { nowait: false }`), returns `Ok(false)` as soon as
    /// something is not in a cache.
    fn read_runs(&self, offset: u64, buf: &mut [u8], verify: Verify<'_>) -> Result<bool, VolumeError> {
        let nowait = !matches!(verify, Verify::Now { nowait: false });
        let first_vb = offset / BLOCK;
        let end = offset + buf.len() as u64;
        let blocks = (end.div_ceil(BLOCK) - first_vb) as usize;
        let ptrs: Vec<Option<Ptr>> =
            (0..blocks as u64).map(|i| self.map.get(&*self.dev, first_vb + i)).collect::<Result<_, _>>()?;
        // Whole blocks are read straight into the caller's buffer; a partial first or last
        // block goes through one block of staging.
        let aligned = offset.is_multiple_of(BLOCK) && end.is_multiple_of(BLOCK);
        if nowait && !aligned {
            return Ok(false);
        }
        let mut staging = if aligned { None } else { Some(AlignedBuf::blocks(1)) };
        let mut i = 0;
        while i < blocks {
            // A run: consecutive mapped blocks that are consecutive on the device.
            let mut j = i + 1;
            let Some(p) = ptrs[i] else {
                self.read_part(offset, buf, first_vb + i as u64, None, &mut staging)?;
                i = j;
                continue;
            };
            if aligned {
                while j < blocks
                    && j - i < MAX_RUN_BLOCKS as usize
                    && ptrs[j].is_some_and(|q| q.block == p.block + (j - i) as u64)
                {
                    j += 1;
                }
                let run = &mut buf[i * BLOCK_SIZE..j * BLOCK_SIZE];
                let device = |source| TreeError::Device { block: p.block, source };
                if nowait {
                    if !self.dev.try_read_cached_at(p.block * BLOCK, run).map_err(device)? {
                        return Ok(false);
                    }
                } else {
                    self.dev.read_cached_at(p.block * BLOCK, run).map_err(device)?;
                }
            } else {
                self.read_part(offset, buf, first_vb + i as u64, Some(p), &mut staging)?;
            }
            i = j;
        }
        match verify {
            Verify::Now { .. } if aligned => self.verify_blocks(buf, &ptrs)?,
            Verify::Now { .. } => {}
            Verify::Later { at, read, checks } => {
                let mapped =
                    ptrs.iter().enumerate().filter_map(|(i, p)| p.map(|p| (at + i * BLOCK_SIZE, p.hash, read)));
                checks.blocks.extend(mapped);
            }
        }
        Ok(true)
    }

    /// Checks the whole blocks of `buf`, read for `ptrs` (unmapped ones are zeros), against
    /// their hashes: all of them at once (`hash::data_blocks` hashes blocks side by side).
    fn verify_blocks(&self, buf: &mut [u8], ptrs: &[Option<Ptr>]) -> Result<(), VolumeError> {
        let (blocks, _) = buf.as_chunks::<BLOCK_SIZE>();
        let mut hashes = vec![[0u8; 32]; ptrs.iter().flatten().count()];
        let mapped = blocks.iter().zip(ptrs).filter(|(_, p)| p.is_some()).map(|(b, _)| b);
        hash::data_blocks(mapped, &mut hashes);
        let (blocks, _) = buf.as_chunks_mut::<BLOCK_SIZE>();
        let mapped = blocks.iter_mut().zip(ptrs).filter_map(|(b, p)| p.map(|p| (b, p)));
        for ((block, p), hash) in mapped.zip(hashes) {
            if hash != p.hash {
                self.read_media_again(p, block)?;
            }
        }
        Ok(())
    }

    /// The part of virtual block `vb` that `buf` (at `offset`) covers, through `staging`.
    fn read_part(
        &self,
        offset: u64,
        buf: &mut [u8],
        vb: u64,
        ptr: Option<Ptr>,
        staging: &mut Option<AlignedBuf>,
    ) -> Result<(), VolumeError> {
        let vb_start = vb * BLOCK;
        let from = offset.max(vb_start);
        let to = (offset + buf.len() as u64).min(vb_start + BLOCK);
        let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
        let Some(p) = ptr else {
            dst.fill(0);
            return Ok(());
        };
        let block = staging.get_or_insert_with(|| AlignedBuf::blocks(1));
        self.dev
            .read_cached_at(p.block * BLOCK, block)
            .map_err(|source| TreeError::Device { block: p.block, source })?;
        self.verify_data(p, block)?;
        dst.copy_from_slice(&block[(from - vb_start) as usize..(to - vb_start) as usize]);
        Ok(())
    }

    /// The allocation of `length` bytes at `offset`, as the block map has it now (every
    /// applied write, as reads see them): runs of `(bytes, mapped)` in order, neighbours of
    /// the same kind merged. An unmapped block reads as zeros. The first run starts at
    /// `offset` and none goes past `offset + length`; the answer may stop short of it (at
    /// least one run, at most `max_runs`, and a bounded number of block-map nodes visited,
    /// so its cost does not grow with the range).
    pub fn allocation(&self, offset: u64, length: u64, max_runs: usize) -> Result<Vec<(u64, bool)>, VolumeError> {
        self.check()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let end = offset + length;
        let blocks = offset / BLOCK..end.div_ceil(BLOCK);
        let runs = self.map.runs(&*self.dev, blocks.clone(), max_runs, STATUS_MAX_NODES)?;
        let mut at = blocks.start * BLOCK;
        let mut out = Vec::with_capacity(runs.len());
        for (count, mapped) in runs {
            let (from, to) = (at.max(offset), (at + count * BLOCK).min(end));
            at += count * BLOCK;
            out.push((to - from, mapped));
        }
        Ok(out)
    }

    /// Checks a data block read (maybe from a cache) against its hash; on a mismatch it reads
    /// the media itself once more before failing: never wrong data.
    fn verify_data(&self, p: Ptr, block: &mut [u8]) -> Result<(), VolumeError> {
        if hash::data_block(block) == p.hash {
            return Ok(());
        }
        self.read_media_again(p, block)
    }

    /// A data block that failed its check: read from the media itself once more, and
    /// checked again, into `block`.
    fn read_media_again(&self, p: Ptr, block: &mut [u8]) -> Result<(), VolumeError> {
        let mut again = AlignedBuf::blocks(1);
        self.dev.read_at(p.block * BLOCK, &mut again).map_err(|source| TreeError::Device { block: p.block, source })?;
        if hash::data_block(&again) != p.hash {
            return Err(TreeError::HashMismatch { what: "data", block: p.block, level: 0 }.into());
        }
        warn!(self.log, "a cached copy of a data block failed its check; the media's is good"; "block" => p.block);
        block.copy_from_slice(&again);
        Ok(())
    }
}
