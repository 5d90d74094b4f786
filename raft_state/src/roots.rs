//! The three fixed root blocks, and the seed's rule that tells which is which.
//!
//! Every root has a 32-byte `version`. Root generation g+1 gets version H(v_{g-1}, v_g) and is
//! written over the third slot, so among the 6 orderings (a, b, c) of the slots exactly one
//! satisfies H(a.version, b.version) = c.version: c is the current root, b the backup, a the
//! slot the next root overwrites. Beyond the seed, every root carries its parents' versions,
//! its generation, slot number and volume id under a checksum, so a torn, damaged or
//! misdirected slot is detected and opening falls back to the newest intact root whose chain
//! agrees — or refuses, naming the slots, when no single answer exists. Never a guess.
//!
//! The roots live in blocks 0, 1, 2 of a *root device*, which may be the main device or a
//! separate one. The byte layout is in `docs/format.md`.

use prost::Message;
use raft::eraftpb::ConfState;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash::{self, Hash};
use crate::layout::{Geometry, ROOT_SLOTS};

/// Magic at the start of every root block.
pub const ROOT_MAGIC: [u8; 8] = *b"RBLKROOT";
/// The root format this code writes and reads.
pub const ROOT_FORMAT_VERSION: u32 = 2;
/// Bytes reserved for the prost-encoded `ConfState`.
pub const CONF_STATE_BYTES: usize = 512;
/// The checksum occupies the last 32 bytes of the block in every format version, so it can be
/// verified before the version is interpreted.
const CHECKSUM_AT: usize = BLOCK_SIZE - 32;

/// One root slot on disk. Byte offsets (integers little-endian):
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | magic `RBLKROOT` |
/// | 8 | 4 | format_version (2) |
/// | 12 | 4 | slot (0, 1, 2) |
/// | 16 | 16 | volume_id |
/// | 32 | 8 | generation |
/// | 40 | 32 | version |
/// | 72 | 32 | parent_b (version of the backup when this root was made) |
/// | 104 | 32 | parent_c (version of the current root when this root was made) |
/// | 136 | 4 | roots_on_main (0 or 1) |
/// | 140 | 4 | reserved (zero) |
/// | 144 | 8 | main_blocks |
/// | 152 | 8 | log_start |
/// | 160 | 8 | log_blocks |
/// | 168 | 8 | data_start |
/// | 176 | 8 | data_blocks |
/// | 184 | 8 | volume_blocks |
/// | 192 | 8 | applied_index |
/// | 200 | 8 | applied_term |
/// | 208 | 8 | log_tail (vblock where this root's log replay starts) |
/// | 216 | 8 | log_head (log head when this root was written) |
/// | 224 | 8 | tree_root (block, 0 = empty) |
/// | 232 | 4 | tree_height |
/// | 236 | 4 | conf_state_len |
/// | 240 | 32 | tree_hash |
/// | 272 | 8 | alloc_root |
/// | 280 | 32 | alloc_hash |
/// | 312 | 512 | conf_state (prost `eraftpb.ConfState`, `conf_state_len` bytes, rest zero) |
/// | 824 | 8 | used_blocks (data-region blocks marked in use by this root's allocator) |
/// | 832 | 8 | placed_blocks (blocks of placed writes applied since the root before) |
/// | 840 | 3224 | reserved (zero) |
/// | 4064 | 32 | checksum = H_root_checksum(bytes 0..4064) |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRoot {
    magic: [u8; 8],
    format_version: U32,
    slot: U32,
    volume_id: [u8; 16],
    generation: U64,
    version: [u8; 32],
    parent_b: [u8; 32],
    parent_c: [u8; 32],
    roots_on_main: U32,
    reserved0: U32,
    main_blocks: U64,
    log_start: U64,
    log_blocks: U64,
    data_start: U64,
    data_blocks: U64,
    volume_blocks: U64,
    applied_index: U64,
    applied_term: U64,
    log_tail: U64,
    log_head: U64,
    tree_root: U64,
    tree_height: U32,
    conf_state_len: U32,
    tree_hash: [u8; 32],
    alloc_root: U64,
    alloc_hash: [u8; 32],
    conf_state: [u8; CONF_STATE_BYTES],
    used_blocks: U64,
    placed_blocks: U64,
    reserved: [u8; 3224],
    checksum: [u8; 32],
}

const _: () = assert!(size_of::<RawRoot>() == BLOCK_SIZE);

/// What a root records about the volume's applied state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RootPayload {
    pub applied_index: u64,
    pub applied_term: u64,
    pub conf_state: ConfState,
    /// Log position (vblock) where this root's replay starts.
    pub log_tail: u64,
    /// Log head when this root was written: every record before it was durable.
    pub log_head: u64,
    pub tree_root: u64,
    pub tree_height: u32,
    pub tree_hash: Hash,
    pub alloc_root: u64,
    pub alloc_hash: Hash,
    /// Data-region blocks this root's allocator marks in use.
    pub used_blocks: u64,
    /// Blocks of placed writes applied since the root before this one (their records lie
    /// between the two roots' applied indexes; recovery pins them only when there are any).
    pub placed_blocks: u64,
}

/// A decoded, verified root.
#[derive(Debug, Clone, PartialEq)]
pub struct Root {
    pub slot: u8,
    pub generation: u64,
    pub version: Hash,
    pub parent_b: Hash,
    pub parent_c: Hash,
    pub volume_id: [u8; 16],
    pub geometry: Geometry,
    pub payload: RootPayload,
}

/// Why a slot does not hold a usable root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotProblem {
    Unreadable(String),
    Blank,
    Checksum,
    Magic,
    /// A valid root of another slot: a misdirected write.
    Misplaced {
        claims: u32,
    },
    /// The version is not H(parents) (or the genesis value).
    VersionMismatch,
    Invalid(String),
}

impl std::fmt::Display for SlotProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "unreadable ({e})"),
            Self::Blank => write!(f, "blank"),
            Self::Checksum => write!(f, "checksum mismatch"),
            Self::Magic => write!(f, "no root magic"),
            Self::Misplaced { claims } => write!(f, "holds the root of slot {claims}"),
            Self::VersionMismatch => write!(f, "version is not the hash of its parents"),
            Self::Invalid(why) => write!(f, "invalid: {why}"),
        }
    }
}

/// The role a slot plays after opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Current,
    Backup,
    Overwrite,
}

/// What `open` found in one slot (for errors and `rblk inspect`).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotReport {
    pub slot: u8,
    /// The root, if the slot is intact.
    pub root: Result<Root, SlotProblem>,
    pub role: Option<Role>,
}

impl std::fmt::Display for SlotReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.root {
            Ok(r) => write!(
                f,
                "slot {}: generation {} version {} applied {}",
                self.slot,
                r.generation,
                short(&r.version),
                r.payload.applied_index
            )?,
            Err(p) => write!(f, "slot {}: {p}", self.slot)?,
        }
        match self.role {
            Some(role) => write!(f, " ({role:?})"),
            None => Ok(()),
        }
    }
}

fn short(h: &Hash) -> String {
    h[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn describe(reports: &[SlotReport]) -> String {
    reports.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; ")
}

/// Errors of the root set.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("root slot {slot} I/O failed")]
    Device {
        slot: u8,
        #[source]
        source: DeviceError,
    },
    #[error("root slot {slot} has format version {version}; this rblk reads version {ROOT_FORMAT_VERSION}{}",
        if *version < ROOT_FORMAT_VERSION {
            " (an older rblk formatted this image: copy its data out with that rblk, e.g. through NBD, into a volume this one formats)"
        } else {
            " (a newer rblk wrote it)"
        })]
    UnsupportedVersion { slot: u8, version: u32 },
    #[error("root device of {bytes} bytes cannot hold three 4 KiB root slots")]
    DeviceTooSmall { bytes: u64 },
    #[error("payload cannot be stored: {0}")]
    Payload(String),
    #[error("only {intact} root slot(s) intact, need two that agree: {detail}")]
    TooFewIntact { intact: usize, detail: String },
    #[error("root slots {slots:?} both claim generation {generation}: a fork, refusing to choose ({detail})")]
    Fork { slots: Vec<u8>, generation: u64, detail: String },
    #[error("no consistent current root among the slots: {detail}")]
    NoConsistentCurrent { detail: String },
    #[error("root slots disagree on the volume ({what}): {detail}")]
    MixedVolumes { what: &'static str, detail: String },
    #[error("current root (slot {current}) applied index {current_applied} is below its backup's {backup_applied}")]
    Regression { current: u8, current_applied: u64, backup: u8, backup_applied: u64 },
    #[error("the root set is poisoned by an earlier write or flush error; restart to recover")]
    Poisoned,
}

impl Root {
    /// The version of the root before this one (the backup while this one is current):
    /// its `parent_c`, or for the genesis root of generation 1, which has no parents, the
    /// genesis version of generation 0. (Generation 0 has no predecessor and is never current.)
    pub fn predecessor_version(&self) -> Hash {
        match self.generation {
            1 => hash::genesis_version(&self.volume_id, 0),
            _ => self.parent_c,
        }
    }

    /// Encodes this root into one block.
    pub fn encode(&self) -> Result<AlignedBuf, RootError> {
        let conf = self.payload.conf_state.encode_to_vec();
        if conf.len() > CONF_STATE_BYTES {
            return Err(RootError::Payload(format!("conf state of {} bytes exceeds {CONF_STATE_BYTES}", conf.len())));
        }
        let mut conf_state = [0u8; CONF_STATE_BYTES];
        conf_state[..conf.len()].copy_from_slice(&conf);
        let (g, p) = (&self.geometry, &self.payload);
        let raw = RawRoot {
            magic: ROOT_MAGIC,
            format_version: U32::new(ROOT_FORMAT_VERSION),
            slot: U32::new(u32::from(self.slot)),
            volume_id: self.volume_id,
            generation: U64::new(self.generation),
            version: self.version,
            parent_b: self.parent_b,
            parent_c: self.parent_c,
            roots_on_main: U32::new(u32::from(g.roots_on_main)),
            reserved0: U32::new(0),
            main_blocks: U64::new(g.main_blocks),
            log_start: U64::new(g.log_start),
            log_blocks: U64::new(g.log_blocks),
            data_start: U64::new(g.data_start),
            data_blocks: U64::new(g.data_blocks),
            volume_blocks: U64::new(g.volume_blocks),
            applied_index: U64::new(p.applied_index),
            applied_term: U64::new(p.applied_term),
            log_tail: U64::new(p.log_tail),
            log_head: U64::new(p.log_head),
            tree_root: U64::new(p.tree_root),
            tree_height: U32::new(p.tree_height),
            conf_state_len: U32::new(conf.len() as u32),
            tree_hash: p.tree_hash,
            alloc_root: U64::new(p.alloc_root),
            alloc_hash: p.alloc_hash,
            conf_state,
            used_blocks: U64::new(p.used_blocks),
            placed_blocks: U64::new(p.placed_blocks),
            reserved: [0; 3224],
            checksum: [0; 32],
        };
        let mut buf = AlignedBuf::blocks(1);
        buf.copy_from_slice(raw.as_bytes());
        let checksum = hash::root_checksum(&buf[..CHECKSUM_AT]);
        buf[CHECKSUM_AT..].copy_from_slice(&checksum);
        Ok(buf)
    }

    /// Decodes the block read from `slot`. `Err(Ok(problem))` is a damaged slot;
    /// `Err(Err(error))` is a root this rblk must not interpret (a newer format).
    fn decode(slot: u8, bytes: &[u8]) -> Result<Root, Result<SlotProblem, RootError>> {
        let bad = |p| Err(Ok(p));
        if bytes.iter().all(|&b| b == 0) {
            return bad(SlotProblem::Blank);
        }
        let Ok(raw) = RawRoot::ref_from_bytes(bytes) else {
            return bad(SlotProblem::Invalid("not one block".into()));
        };
        if raw.checksum != hash::root_checksum(&bytes[..CHECKSUM_AT]) {
            return bad(SlotProblem::Checksum);
        }
        if raw.magic != ROOT_MAGIC {
            return bad(SlotProblem::Magic);
        }
        let version = raw.format_version.get();
        if version != ROOT_FORMAT_VERSION {
            return Err(Err(RootError::UnsupportedVersion { slot, version }));
        }
        if raw.slot.get() != u32::from(slot) {
            return bad(SlotProblem::Misplaced { claims: raw.slot.get() });
        }
        let generation = raw.generation.get();
        let expected = match generation {
            0 | 1 if raw.parent_b == [0; 32] && raw.parent_c == [0; 32] => {
                hash::genesis_version(&raw.volume_id, generation)
            }
            0 | 1 => return bad(SlotProblem::VersionMismatch),
            _ => hash::root_version(&raw.parent_b, &raw.parent_c),
        };
        if raw.version != expected {
            return bad(SlotProblem::VersionMismatch);
        }
        let roots_on_main = match raw.roots_on_main.get() {
            0 => false,
            1 => true,
            other => return bad(SlotProblem::Invalid(format!("roots_on_main = {other}"))),
        };
        let geometry = Geometry {
            roots_on_main,
            main_blocks: raw.main_blocks.get(),
            log_start: raw.log_start.get(),
            log_blocks: raw.log_blocks.get(),
            data_start: raw.data_start.get(),
            data_blocks: raw.data_blocks.get(),
            volume_blocks: raw.volume_blocks.get(),
        };
        if let Err(e) = geometry.validate() {
            return bad(SlotProblem::Invalid(e.to_string()));
        }
        let conf_len = raw.conf_state_len.get() as usize;
        if conf_len > CONF_STATE_BYTES {
            return bad(SlotProblem::Invalid(format!("conf state length {conf_len}")));
        }
        let conf_state = match ConfState::decode(&raw.conf_state[..conf_len]) {
            Ok(c) => c,
            Err(e) => return bad(SlotProblem::Invalid(format!("conf state: {e}"))),
        };
        Ok(Root {
            slot,
            generation,
            version: raw.version,
            parent_b: raw.parent_b,
            parent_c: raw.parent_c,
            volume_id: raw.volume_id,
            geometry,
            payload: RootPayload {
                applied_index: raw.applied_index.get(),
                applied_term: raw.applied_term.get(),
                conf_state,
                log_tail: raw.log_tail.get(),
                log_head: raw.log_head.get(),
                tree_root: raw.tree_root.get(),
                tree_height: raw.tree_height.get(),
                tree_hash: raw.tree_hash,
                alloc_root: raw.alloc_root.get(),
                alloc_hash: raw.alloc_hash,
                used_blocks: raw.used_blocks.get(),
                placed_blocks: raw.placed_blocks.get(),
            },
        })
    }
}

/// The three roots after opening: which is current, which backup, which to overwrite next.
#[derive(Debug)]
pub struct Roots {
    current: Root,
    backup: Option<Root>,
    overwrite: u8,
    reports: Vec<SlotReport>,
    poisoned: bool,
}

fn check_size(dev: &dyn Device) -> Result<(), RootError> {
    if dev.size() < ROOT_SLOTS * BLOCK {
        return Err(RootError::DeviceTooSmall { bytes: dev.size() });
    }
    Ok(())
}

fn write_slot(dev: &dyn Device, root: &Root) -> Result<(), RootError> {
    let buf = root.encode()?;
    dev.write_at(u64::from(root.slot) * BLOCK, &buf).map_err(|source| RootError::Device { slot: root.slot, source })
}

/// Writes the genesis triple for a new volume: generations 0, 1, 2 in slots 0, 1, 2, for which
/// the rule holds with slot 2 current; then one flush.
pub fn format(
    root_dev: &dyn Device,
    volume_id: [u8; 16],
    geometry: Geometry,
    payload: RootPayload,
) -> Result<Roots, RootError> {
    check_size(root_dev)?;
    let v0 = hash::genesis_version(&volume_id, 0);
    let v1 = hash::genesis_version(&volume_id, 1);
    let make = |slot: u8, generation, version, parent_b, parent_c| Root {
        slot,
        generation,
        version,
        parent_b,
        parent_c,
        volume_id,
        geometry,
        payload: payload.clone(),
    };
    let triple = [
        make(0, 0, v0, [0; 32], [0; 32]),
        make(1, 1, v1, [0; 32], [0; 32]),
        make(2, 2, hash::root_version(&v0, &v1), v0, v1),
    ];
    for root in &triple {
        write_slot(root_dev, root)?;
    }
    root_dev.flush().map_err(|source| RootError::Device { slot: 2, source })?;
    let [a, b, c] = triple;
    let reports = vec![
        SlotReport { slot: 0, root: Ok(a), role: Some(Role::Overwrite) },
        SlotReport { slot: 1, root: Ok(b.clone()), role: Some(Role::Backup) },
        SlotReport { slot: 2, root: Ok(c.clone()), role: Some(Role::Current) },
    ];
    Ok(Roots { current: c, backup: Some(b), overwrite: 0, reports, poisoned: false })
}

/// Reads the three slots and decides, by the rule and the parent chain, which root is current.
pub fn open(root_dev: &dyn Device) -> Result<Roots, RootError> {
    check_size(root_dev)?;
    let mut reports = Vec::with_capacity(3);
    let mut buf = AlignedBuf::blocks(1);
    for slot in 0..ROOT_SLOTS as u8 {
        let root = match root_dev.read_at(u64::from(slot) * BLOCK, &mut buf) {
            Err(e) => Err(SlotProblem::Unreadable(e.to_string())),
            Ok(()) => match Root::decode(slot, &buf) {
                Ok(root) => Ok(root),
                Err(Ok(problem)) => Err(problem),
                Err(Err(fatal)) => return Err(fatal),
            },
        };
        reports.push(SlotReport { slot, root, role: None });
    }
    let (current, backup, overwrite) = choose(&reports)?;
    for r in &mut reports {
        r.role = Some(if r.slot == current.slot {
            Role::Current
        } else if r.slot == overwrite {
            Role::Overwrite
        } else {
            Role::Backup
        });
    }
    if let Some(b) = &backup {
        if current.payload.applied_index < b.payload.applied_index {
            return Err(RootError::Regression {
                current: current.slot,
                current_applied: current.payload.applied_index,
                backup: b.slot,
                backup_applied: b.payload.applied_index,
            });
        }
    }
    Ok(Roots { current, backup, overwrite, reports, poisoned: false })
}

/// The choice of `open`: (current, backup if intact, slot to overwrite next).
fn choose(reports: &[SlotReport]) -> Result<(Root, Option<Root>, u8), RootError> {
    let intact: Vec<&Root> = reports.iter().filter_map(|r| r.root.as_ref().ok()).collect();
    let detail = || describe(reports);
    if let Some(first) = intact.first() {
        if intact.iter().any(|r| r.volume_id != first.volume_id) {
            return Err(RootError::MixedVolumes { what: "volume id", detail: detail() });
        }
        if intact.iter().any(|r| r.geometry != first.geometry) {
            return Err(RootError::MixedVolumes { what: "geometry", detail: detail() });
        }
    }
    let same_generation = |roots: &[&Root]| -> Option<(Vec<u8>, u64)> {
        for (i, x) in roots.iter().enumerate() {
            for y in &roots[i + 1..] {
                if x.generation == y.generation {
                    return Some((vec![x.slot, y.slot], x.generation));
                }
            }
        }
        None
    };
    // No root follows another: two claiming the same generation are a fork, else nothing fits.
    let unchained = || match same_generation(&intact) {
        Some((slots, generation)) => RootError::Fork { slots, generation, detail: detail() },
        None => RootError::NoConsistentCurrent { detail: detail() },
    };
    match intact.as_slice() {
        [_, _, _] => {
            let mut found = Vec::new();
            for (a, b, c) in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)] {
                let (a, b, c) = (intact[a], intact[b], intact[c]);
                if hash::root_version(&a.version, &b.version) == c.version
                    && a.generation + 1 == b.generation
                    && b.generation + 1 == c.generation
                {
                    found.push((a, b, c));
                }
            }
            match found.as_slice() {
                [(a, b, c)] => Ok(((*c).clone(), Some((*b).clone()), a.slot)),
                [] => Err(unchained()),
                _ => Err(RootError::Fork {
                    slots: found.iter().map(|(_, _, c)| c.slot).collect(),
                    generation: found[0].2.generation,
                    detail: detail(),
                }),
            }
        }
        [x, y] => {
            let damaged = 3 - x.slot - y.slot;
            // (current, backup, overwrite) if `c` follows `p`.
            let follows = |p: &Root, c: &Root| -> Option<(Root, Option<Root>, u8)> {
                if c.generation == p.generation + 1 && c.predecessor_version() == p.version {
                    Some((c.clone(), Some(p.clone()), damaged))
                } else if c.generation == p.generation + 2 && c.parent_b == p.version {
                    // The damaged slot held c's backup; p is the oldest and is overwritten next.
                    Some((c.clone(), None, p.slot))
                } else {
                    None
                }
            };
            match (follows(x, y), follows(y, x)) {
                (Some(choice), None) | (None, Some(choice)) => Ok(choice),
                (Some(_), Some(_)) => {
                    Err(RootError::Fork { slots: vec![x.slot, y.slot], generation: y.generation, detail: detail() })
                }
                (None, None) => Err(unchained()),
            }
        }
        _ => Err(RootError::TooFewIntact { intact: intact.len(), detail: detail() }),
    }
}

impl Roots {
    pub fn current(&self) -> &Root {
        &self.current
    }

    /// The backup root, unless its slot is damaged.
    pub fn backup(&self) -> Option<&Root> {
        self.backup.as_ref()
    }

    /// The slot the next root is written over.
    pub fn overwrite_slot(&self) -> u8 {
        self.overwrite
    }

    /// What each slot held when the set was opened or formatted.
    pub fn slot_reports(&self) -> &[SlotReport] {
        &self.reports
    }

    /// Writes the next root (generation +1, version H(b, c)) over the overwrite slot and
    /// flushes; only then does it become current. A write or flush error poisons the set.
    pub fn commit(&mut self, root_dev: &dyn Device, payload: RootPayload) -> Result<&Root, RootError> {
        let next = self.prepare(payload)?;
        if let Err(e) = next.write(root_dev) {
            self.poisoned = true;
            return Err(e);
        }
        Ok(self.install(next))
    }

    /// The next root, encoded, for `NextRoot::write` (which needs no access to the set, so it
    /// can run while the set is read elsewhere) and then `install`. Encoding errors are
    /// refused here, before any I/O, and do not poison.
    pub fn prepare(&self, payload: RootPayload) -> Result<NextRoot, RootError> {
        if self.poisoned {
            return Err(RootError::Poisoned);
        }
        let c = &self.current;
        let b = c.predecessor_version();
        let root = Root {
            slot: self.overwrite,
            generation: c.generation + 1,
            version: hash::root_version(&b, &c.version),
            parent_b: b,
            parent_c: c.version,
            volume_id: c.volume_id,
            geometry: c.geometry,
            payload,
        };
        let buf = root.encode()?;
        Ok(NextRoot { root, buf })
    }

    /// Makes a root that `NextRoot::write` made durable the current one. Only the root
    /// prepared from the current set may be installed (one at a time).
    pub fn install(&mut self, next: NextRoot) -> &Root {
        let old_current_slot = self.current.slot;
        self.overwrite = 3 - next.root.slot - old_current_slot;
        self.backup = Some(std::mem::replace(&mut self.current, next.root));
        &self.current
    }
}

/// A root prepared by `Roots::prepare`: written and flushed by `write`, then installed.
#[derive(Debug)]
pub struct NextRoot {
    root: Root,
    buf: AlignedBuf,
}

impl NextRoot {
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Changes the prepared root's payload (before it is written): a checkpoint learns its
    /// block map's root only after writing the frozen tree.
    pub fn update_payload(&mut self, change: impl FnOnce(&mut RootPayload)) -> Result<(), RootError> {
        change(&mut self.root.payload);
        self.buf = self.root.encode()?;
        Ok(())
    }

    /// Writes the root over its slot and flushes. After an error the root set must not be
    /// used again (the caller poisons it or stops).
    pub fn write(&self, root_dev: &dyn Device) -> Result<(), RootError> {
        let slot = self.root.slot;
        root_dev
            .write_at(u64::from(slot) * BLOCK, &self.buf)
            .and_then(|()| {
                crate::failpoint("roots::after_write");
                root_dev.flush()
            })
            .map_err(|source| RootError::Device { slot, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{SimDisk, SimFault};
    use proptest::prelude::*;

    const VOL: [u8; 16] = *b"roots-test-vol-1";

    fn geometry(roots_on_main: bool) -> Geometry {
        Geometry::plan(256 * BLOCK, roots_on_main, 64, 1 << 20).expect("geometry")
    }

    fn payload(n: u64) -> RootPayload {
        RootPayload {
            applied_index: n * 10,
            applied_term: n,
            conf_state: ConfState { voters: vec![1], ..Default::default() },
            log_tail: n * 3,
            log_head: n * 3 + 1,
            tree_root: n + 100,
            tree_height: (n % 5) as u32,
            tree_hash: [n as u8; 32],
            alloc_root: n + 200,
            alloc_hash: [!(n as u8); 32],
            used_blocks: n * 7 + 3,
            placed_blocks: n * 5,
        }
    }

    /// Formats and commits `k` roots with payloads 1..=k.
    fn rotated(k: u64) -> (SimDisk, Roots) {
        let disk = SimDisk::new(8 * BLOCK, k);
        let mut roots = format(&disk, VOL, geometry(true), payload(0)).expect("format");
        for n in 1..=k {
            roots.commit(&disk, payload(n)).expect("commit");
        }
        (disk, roots)
    }

    fn rule_orderings(disk: &SimDisk) -> usize {
        let mut versions = Vec::new();
        let mut buf = AlignedBuf::blocks(1);
        for slot in 0..3u8 {
            disk.read_at(u64::from(slot) * BLOCK, &mut buf).expect("read");
            versions.push(Root::decode(slot, &buf).map(|r| r.version).ok());
        }
        let v: Vec<Hash> = versions.into_iter().flatten().collect();
        if v.len() < 3 {
            return 0;
        }
        [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
            .iter()
            .filter(|&&(a, b, c)| hash::root_version(&v[a], &v[b]) == v[c])
            .count()
    }

    fn write_raw(disk: &SimDisk, slot: u8, bytes: &[u8]) {
        disk.write_at(u64::from(slot) * BLOCK, bytes).expect("write");
    }

    #[test]
    fn genesis_triple_satisfies_the_rule() {
        let (disk, _) = rotated(0);
        assert_eq!(rule_orderings(&disk), 1);
        let roots = open(&disk).expect("open");
        assert_eq!((roots.current().slot, roots.current().generation), (2, 2));
        assert_eq!(roots.backup().map(|b| b.slot), Some(1));
        assert_eq!(roots.overwrite_slot(), 0);
        assert_eq!(roots.current().payload, payload(0));
        let roles: Vec<_> = roots.slot_reports().iter().map(|r| r.role).collect();
        assert_eq!(roles, vec![Some(Role::Overwrite), Some(Role::Backup), Some(Role::Current)]);
    }

    #[test]
    fn roots_on_a_separate_device() {
        let root_dev = SimDisk::new(3 * BLOCK, 0);
        let g = geometry(false);
        assert_eq!(g.log_start, 0);
        let mut roots = format(&root_dev, VOL, g, payload(0)).expect("format");
        roots.commit(&root_dev, payload(1)).expect("commit");
        let reopened = open(&root_dev).expect("open");
        assert_eq!(reopened.current().geometry, g);
        assert_eq!(reopened.current().payload, payload(1));
        assert!(matches!(open(&SimDisk::new(2 * BLOCK, 0)), Err(RootError::DeviceTooSmall { .. })));
    }

    #[test]
    fn commit_error_poisons_and_nothing_rotates() {
        let (disk, mut roots) = rotated(2);
        let before = roots.current().clone();
        disk.inject(SimFault::FlushError);
        assert!(matches!(roots.commit(&disk, payload(3)), Err(RootError::Device { .. })));
        assert_eq!(roots.current(), &before);
        assert!(matches!(roots.commit(&disk, payload(3)), Err(RootError::Poisoned)));
    }

    #[test]
    fn two_damaged_slots_are_refused() {
        let (disk, roots) = rotated(4);
        let current = roots.current().slot;
        for other in (0..3u8).filter(|&s| s != current) {
            let (disk, _) = rotated(4);
            write_raw(&disk, current, &[0xAB; BLOCK_SIZE]);
            write_raw(&disk, other, &[0; BLOCK_SIZE]);
            let err = open(&disk).expect_err("two bad slots");
            assert!(matches!(err, RootError::TooFewIntact { intact: 1, .. }), "{err}");
            assert!(err.to_string().contains("blank") && err.to_string().contains("checksum"), "{err}");
        }
        drop(disk);
    }

    #[test]
    fn a_second_successor_of_the_same_root_is_a_fork() {
        let (disk, roots) = rotated(3);
        // Another root of the current generation, written into the overwrite slot (it claims
        // the same parents, so the same version, with a different payload).
        let mut twin = roots.current().clone();
        twin.slot = roots.overwrite_slot();
        twin.payload = payload(99);
        write_raw(&disk, twin.slot, &twin.encode().expect("encode"));
        let err = open(&disk).expect_err("fork");
        assert!(
            matches!(&err, RootError::Fork { generation, .. } if *generation == roots.current().generation),
            "{err}"
        );
    }

    #[test]
    fn unrelated_roots_have_no_consistent_current() {
        let (disk, roots) = rotated(3);
        // A root that chains to nothing here, in the overwrite slot.
        let mut stray = roots.current().clone();
        stray.slot = roots.overwrite_slot();
        stray.generation += 7;
        stray.parent_b = [7; 32];
        stray.version = hash::root_version(&stray.parent_b, &stray.parent_c);
        write_raw(&disk, stray.slot, &stray.encode().expect("encode"));
        assert!(matches!(open(&disk), Err(RootError::NoConsistentCurrent { .. })));
    }

    #[test]
    fn newer_format_version_is_refused_not_treated_as_damage() {
        let (disk, roots) = rotated(1);
        let slot = roots.backup().expect("backup").slot;
        let mut buf = roots.backup().expect("backup").encode().expect("encode");
        buf[8] = 3;
        let checksum = hash::root_checksum(&buf[..CHECKSUM_AT]);
        buf[CHECKSUM_AT..].copy_from_slice(&checksum);
        write_raw(&disk, slot, &buf);
        let refused = open(&disk);
        assert!(matches!(refused, Err(RootError::UnsupportedVersion { version: 3, slot: s }) if s == slot));
        assert!(refused.expect_err("refused").to_string().contains("newer rblk"));
    }

    /// Format version 1 logged every byte inline; version 2 names placed blocks, which a
    /// version 1 reader would skip as invalid commands: images of either kind are refused by
    /// the other, with a message that says what to do.
    #[test]
    fn an_image_of_format_version_1_is_refused_with_advice() {
        let (disk, roots) = rotated(1);
        for root in [roots.current(), roots.backup().expect("backup")] {
            let mut buf = root.encode().expect("encode");
            buf[8] = 1;
            let checksum = hash::root_checksum(&buf[..CHECKSUM_AT]);
            buf[CHECKSUM_AT..].copy_from_slice(&checksum);
            write_raw(&disk, root.slot, &buf);
        }
        let refused = open(&disk).expect_err("refused");
        assert!(matches!(refused, RootError::UnsupportedVersion { version: 1, .. }));
        assert!(refused.to_string().contains("older rblk formatted this image"), "{refused}");
    }

    #[test]
    fn roots_of_another_volume_are_refused() {
        let (disk, roots) = rotated(1);
        let other = SimDisk::new(8 * BLOCK, 0);
        let foreign = format(&other, *b"another-volume!!", geometry(true), payload(0)).expect("format");
        let slot = roots.overwrite_slot();
        let mut buf = AlignedBuf::blocks(1);
        other.read_at(u64::from(slot) * BLOCK, &mut buf).expect("read");
        write_raw(&disk, slot, &buf);
        assert!(matches!(open(&disk), Err(RootError::MixedVolumes { what: "volume id", .. })));
        drop(foreign);
    }

    #[test]
    fn a_root_written_to_the_wrong_slot_is_damage() {
        let (disk, roots) = rotated(2);
        let current = roots.current().clone();
        let mut buf = AlignedBuf::blocks(1);
        disk.read_at(u64::from(current.slot) * BLOCK, &mut buf).expect("read");
        // Misdirected: the current root's bytes land on the backup's slot.
        let backup = roots.backup().expect("backup").slot;
        write_raw(&disk, backup, &buf);
        let reopened = open(&disk).expect("single damaged slot");
        assert_eq!(reopened.current(), &current);
        assert!(matches!(reopened.slot_reports()[backup as usize].root, Err(SlotProblem::Misplaced { .. })));
    }

    #[test]
    fn payload_too_large_is_refused_before_any_io() {
        let (disk, mut roots) = rotated(0);
        let ops = disk.ops();
        let mut p = payload(1);
        p.conf_state.voters = (1u64 << 40..(1u64 << 40) + 200).collect();
        assert!(matches!(roots.commit(&disk, p), Err(RootError::Payload(_))));
        assert_eq!(disk.ops(), ops);
        assert!(roots.commit(&disk, payload(1)).is_ok(), "not poisoned");
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip_and_every_bit_flip_is_caught(
            n in 0u64..1000, generation in 2u64..u64::MAX, slot in 0u8..3, bit in 0usize..BLOCK_SIZE * 8,
        ) {
            let parent_b = [n as u8; 32];
            let parent_c = [(n >> 8) as u8 ^ 0x5A; 32];
            let root = Root {
                slot, generation, version: hash::root_version(&parent_b, &parent_c), parent_b, parent_c,
                volume_id: VOL, geometry: geometry(n % 2 == 0), payload: payload(n),
            };
            let mut buf = root.encode().expect("encode");
            prop_assert_eq!(Root::decode(slot, &buf).expect("decode"), root);
            prop_assert!(Root::decode((slot + 1) % 3, &buf).is_err(), "bound to its slot");
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(matches!(Root::decode(slot, &buf), Err(Ok(_))), "bit {} flip not detected", bit);
        }

        /// After any number of rotations exactly one ordering satisfies the rule and open
        /// finds the last committed root.
        #[test]
        fn any_number_of_rotations(k in 0u64..40) {
            let (disk, roots) = rotated(k);
            prop_assert_eq!(rule_orderings(&disk), 1);
            let reopened = open(&disk).expect("open");
            prop_assert_eq!(reopened.current(), roots.current());
            prop_assert_eq!(reopened.current().generation, 2 + k);
            prop_assert_eq!(reopened.current().payload.clone(), payload(k));
            prop_assert_eq!(reopened.backup().map(|b| b.generation), Some(1 + k));
            prop_assert_eq!(reopened.overwrite_slot(), roots.overwrite_slot());
        }

        /// Any single torn or damaged slot: open falls back to the newest intact root whose
        /// chain agrees, and two more commits restore the full rule.
        #[test]
        fn every_single_damaged_slot(k in 0u64..30, victim in 0u8..3, how in 0u8..4, seed: u64) {
            let (disk, roots) = rotated(k);
            let current = roots.current().clone();
            let backup = roots.backup().cloned().expect("backup");
            let at = u64::from(victim) * BLOCK;
            match how {
                0 => { disk.flip_random_bit(at, at + BLOCK); }
                1 => write_raw(&disk, victim, &[0; BLOCK_SIZE]),
                2 => disk.inject(SimFault::ReadError { offset: at }),
                _ => {
                    // Torn: half of the sectors of some other root's bytes.
                    let mut buf = AlignedBuf::blocks(1);
                    disk.read_at(at, &mut buf).expect("read");
                    let mut other = current.clone();
                    other.slot = victim;
                    other.payload = payload(seed % 1000 + 1000);
                    let new = other.encode().expect("encode");
                    let half = if seed % 2 == 0 { 0..BLOCK_SIZE / 2 } else { BLOCK_SIZE / 2..BLOCK_SIZE };
                    buf[half.clone()].copy_from_slice(&new[half]);
                    write_raw(&disk, victim, &buf);
                }
            }
            let mut reopened = open(&disk).expect("one damaged slot must open");
            if victim == current.slot {
                prop_assert_eq!(reopened.current(), &backup, "fall back to the predecessor");
            } else {
                prop_assert_eq!(reopened.current(), &current);
            }
            let resumed = reopened.current().generation;
            disk.crash(crate::device::CrashPolicy::KeepAll); // clears the injected read error
            for n in 1..=2 {
                reopened.commit(&disk, payload(500 + n)).expect("commit");
                let again = open(&disk).expect("open after commit");
                prop_assert_eq!(again.current().generation, resumed + n);
                prop_assert_eq!(again.current().payload.clone(), payload(500 + n));
            }
            prop_assert_eq!(rule_orderings(&disk), 1, "healed after two commits");
        }
    }
}
