//! Where things live on the devices: the geometry fixed at format time and carried (inside
//! the checksum) by every root block.

use crate::device::BLOCK;

/// Root slots occupy the first three blocks of the root device.
pub const ROOT_SLOTS: u64 = 3;

/// The fixed layout of a volume, decided by `format` and never changed afterwards.
/// All positions are in 4 KiB blocks of the *main* device (log and data); the root slots are
/// blocks 0, 1, 2 of the root device, which is the main device when `roots_on_main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Whether the three root slots are blocks 0..3 of the main device.
    pub roots_on_main: bool,
    /// Size of the main device at format time, in blocks.
    pub main_blocks: u64,
    /// First block of the Raft log ring.
    pub log_start: u64,
    /// Length of the Raft log ring in blocks.
    pub log_blocks: u64,
    /// First block of the data region (tree nodes, data blocks, allocator).
    pub data_start: u64,
    /// Length of the data region in blocks.
    pub data_blocks: u64,
    /// Size of the virtual volume the clients see, in blocks (may exceed `data_blocks`).
    pub volume_blocks: u64,
}

/// Why a geometry cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("device of {main_bytes} bytes is too small: need {need_blocks} blocks of 4 KiB")]
    TooSmall { main_bytes: u64, need_blocks: u64 },
    #[error("log region of {log_blocks} blocks is below the minimum of {min} blocks")]
    LogTooSmall { log_blocks: u64, min: u64 },
    #[error("geometry field {field} is inconsistent: {why}")]
    Inconsistent { field: &'static str, why: String },
}

/// The smallest log ring a volume may have.
pub const MIN_LOG_BLOCKS: u64 = 16;

impl Geometry {
    /// Lays out a main device of `main_bytes`: root slots first (unless they live on a separate
    /// device), then a log ring of `log_blocks`, then the data region up to the device end.
    pub fn plan(
        main_bytes: u64,
        roots_on_main: bool,
        log_blocks: u64,
        volume_blocks: u64,
    ) -> Result<Self, GeometryError> {
        if log_blocks < MIN_LOG_BLOCKS {
            return Err(GeometryError::LogTooSmall { log_blocks, min: MIN_LOG_BLOCKS });
        }
        let main_blocks = main_bytes / BLOCK;
        let log_start = if roots_on_main { ROOT_SLOTS } else { 0 };
        let data_start = log_start + log_blocks;
        let need_blocks = data_start + 1;
        if main_blocks < need_blocks {
            return Err(GeometryError::TooSmall { main_bytes, need_blocks });
        }
        let geometry = Self {
            roots_on_main,
            main_blocks,
            log_start,
            log_blocks,
            data_start,
            data_blocks: main_blocks - data_start,
            volume_blocks,
        };
        geometry.validate()?;
        Ok(geometry)
    }

    /// Checks that the regions are in order, do not overlap and fit the device. Used on every
    /// geometry read back from disk: a root that passes its checksum still must make sense.
    pub fn validate(&self) -> Result<(), GeometryError> {
        let bad = |field, why: String| Err(GeometryError::Inconsistent { field, why });
        let first = if self.roots_on_main { ROOT_SLOTS } else { 0 };
        if self.log_start != first {
            return bad("log_start", format!("{} but the log must start at block {first}", self.log_start));
        }
        if self.log_blocks < MIN_LOG_BLOCKS {
            return bad("log_blocks", format!("{} is below {MIN_LOG_BLOCKS}", self.log_blocks));
        }
        if self.log_start.checked_add(self.log_blocks) != Some(self.data_start) {
            return bad(
                "data_start",
                format!("{} does not follow the log ({} + {})", self.data_start, self.log_start, self.log_blocks),
            );
        }
        if self.data_start.checked_add(self.data_blocks) != Some(self.main_blocks) {
            return bad(
                "data_blocks",
                format!("{} + {} != device blocks {}", self.data_start, self.data_blocks, self.main_blocks),
            );
        }
        if self.main_blocks.checked_mul(BLOCK).is_none() {
            return bad("main_blocks", format!("{} blocks overflow a byte offset", self.main_blocks));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lays_out_regions_in_order() {
        let g = Geometry::plan(1 << 20, true, 64, 1000).expect("plan");
        assert_eq!((g.log_start, g.log_blocks, g.data_start), (3, 64, 67));
        assert_eq!(g.data_start + g.data_blocks, 256);
        let g = Geometry::plan(1 << 20, false, 64, 1000).expect("plan");
        assert_eq!((g.log_start, g.data_start, g.data_blocks), (0, 64, 192));
    }

    #[test]
    fn plan_refuses_what_does_not_fit() {
        assert!(matches!(Geometry::plan(1 << 20, true, 8, 1), Err(GeometryError::LogTooSmall { .. })));
        assert!(matches!(Geometry::plan(64 * 4096, true, 64, 1), Err(GeometryError::TooSmall { .. })));
    }

    #[test]
    fn validate_catches_overlap() {
        let mut g = Geometry::plan(1 << 20, true, 64, 1000).expect("plan");
        g.data_start -= 1;
        assert!(g.validate().is_err());
    }
}
