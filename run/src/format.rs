//! `rblk format`: writes a new, empty volume on a regular file (created sparse when missing)
//! or a block device.

use std::io::Read;
use std::path::{Path, PathBuf};

use raft_state::device::{AlignedBuf, Device, DeviceError, FileDevice, BLOCK};
use raft_state::layout::ROOT_SLOTS;
use raft_state::volume::{FormatOptions, Volume, VolumeError};

/// Why `rblk format` did not format. A failed step names the image and the step
/// (`v.img: grow`); its cause is the source.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("--size {0} is not a positive multiple of 4096 bytes")]
    BadSize(u64),
    #[error("--log-size {0} is not a multiple of 4096 bytes")]
    BadLogSize(u64),
    /// Formatting would destroy a volume, and `--force` was not given.
    #[error("{} already holds an rblk volume; use --force to format over it", image.display())]
    HoldsVolume { image: PathBuf },
    /// The separate root device cannot be opened.
    #[error("{}", path.display())]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: DeviceError,
    },
    /// A step on the image's device failed (open, create, zero the log region, flush).
    #[error("{}: {what}", image.display())]
    Device {
        image: PathBuf,
        what: &'static str,
        #[source]
        source: DeviceError,
    },
    /// A step on the image as a file, or the volume id, failed.
    #[error("{}: {what}", image.display())]
    Io {
        image: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Writing the genesis roots and the empty log failed.
    #[error("{}: format", image.display())]
    Volume {
        image: PathBuf,
        #[source]
        source: VolumeError,
    },
}

/// What to format.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Size the clients see, in bytes.
    pub size: u64,
    /// Size of the Raft log ring, in bytes.
    pub log_size: u64,
    /// Format over an existing rblk volume.
    pub force: bool,
    /// On a regular file, write zeros over the data region too, so that no write of the
    /// driver ever allocates file-system blocks (the file is no longer thin).
    pub preallocate: bool,
}

/// Data-region blocks a new image file gets for a volume of `volume_blocks`: the volume, its
/// tree nodes (one per 64 blocks, rounded up generously to 1/32), and 128 MiB for the
/// copies a checkpoint interval keeps alive (the backup root's blocks are reused only two
/// checkpoints later). The file is sparse: unused space costs nothing.
fn data_blocks_for(volume_blocks: u64) -> u64 {
    volume_blocks + volume_blocks / 32 + (128 << 20) / BLOCK
}

/// Formats `image` (and `root`, the optional separate root device) and returns a summary.
pub fn format(image: &Path, root: Option<&Path>, spec: &Spec) -> Result<String, FormatError> {
    let device = |what| move |source| FormatError::Device { image: image.to_path_buf(), what, source };
    let io = |what| move |source| FormatError::Io { image: image.to_path_buf(), what, source };
    let open_root = |path: &Path| {
        FileDevice::open(path).map_err(|source| FormatError::OpenRoot { path: path.to_path_buf(), source })
    };
    if spec.size == 0 || !spec.size.is_multiple_of(BLOCK) {
        return Err(FormatError::BadSize(spec.size));
    }
    if !spec.log_size.is_multiple_of(BLOCK) {
        return Err(FormatError::BadLogSize(spec.log_size));
    }
    let volume_blocks = spec.size / BLOCK;
    let log_blocks = spec.log_size / BLOCK;
    let roots_here = if root.is_none() { ROOT_SLOTS } else { 0 };
    let want_bytes = (roots_here + log_blocks + data_blocks_for(volume_blocks)) * BLOCK;
    let dev = if image.exists() {
        let dev = FileDevice::open(image).map_err(device("open"))?;
        let separate = root.map(open_root).transpose()?;
        let roots_dev: &dyn Device = separate.as_ref().map_or(&dev as &dyn Device, |d| d as &dyn Device);
        if !spec.force && raft_state::roots::open(roots_dev).is_ok() {
            return Err(FormatError::HoldsVolume { image: image.to_path_buf() });
        }
        let is_file = std::fs::metadata(image).map(|m| m.is_file()).unwrap_or(false);
        if is_file && dev.size() < want_bytes {
            // A regular file grows (sparse) to what the volume needs.
            drop(dev);
            let file = std::fs::OpenOptions::new().write(true).open(image).map_err(io("open"))?;
            file.set_len(want_bytes).and_then(|()| file.sync_all()).map_err(io("grow"))?;
            FileDevice::open(image).map_err(device("open"))?
        } else {
            dev
        }
    } else {
        FileDevice::create(image, want_bytes).map_err(device("create"))?
    };
    let root_dev = root.map(open_root).transpose()?;
    let volume_id = random_id().map_err(io("random volume id"))?;
    let opts = FormatOptions { volume_bytes: spec.size, log_blocks, volume_id };
    Volume::format(&dev, root_dev.as_ref().map(|d| d as &dyn Device), opts)
        .map_err(|source| FormatError::Volume { image: image.to_path_buf(), source })?;
    if std::fs::metadata(image).map(|m| m.is_file()).unwrap_or(false) {
        // On a file system, the first write into a hole allocates blocks, and the flush after
        // it must then commit the file system's journal too: the log ring (flushed after
        // every append) is written once now so that appends never allocate. Zeros are no
        // record of any volume.
        let end = if spec.preallocate { dev.size() / BLOCK } else { roots_here + log_blocks };
        zero_fill(&dev, roots_here, end).map_err(device("zero the log region"))?;
    }
    dev.flush().map_err(device("flush"))?;
    if let Some(r) = &root_dev {
        r.flush().map_err(device("flush root device"))?;
    }
    let data_mib = ((dev.size() / BLOCK).saturating_sub(roots_here + log_blocks) * BLOCK) >> 20;
    Ok(format!(
        "formatted {}: volume {} MiB, log {} MiB, data region {} MiB, volume id {}",
        image.display(),
        spec.size >> 20,
        spec.log_size >> 20,
        data_mib,
        volume_id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Writes zeros over blocks `from..to`.
fn zero_fill(dev: &FileDevice, from: u64, to: u64) -> Result<(), DeviceError> {
    const CHUNK: u64 = 1024; // blocks: 4 MiB
    let zeros = AlignedBuf::blocks(CHUNK as usize);
    let bar = crate::progress::bytes((to - from) * BLOCK, "zeroing");
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK);
        dev.write_at(at * BLOCK, &zeros[..(n * BLOCK) as usize])?;
        at += n;
        bar.inc(n * BLOCK);
    }
    bar.finish_and_clear();
    Ok(())
}

fn random_id() -> std::io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(id)
}
