//! The copy-on-write Merkle tree that maps an index (a virtual block, or an allocator bitmap
//! block) to a physical block and its BLAKE3 hash.
//!
//! ```text
//! node (4 KiB) := header(64 bytes) entry[64] zero-padding
//! entry        := child block (u64, 0 = empty) ‖ child hash (32 bytes)
//! level 0      : entries point at data blocks;  level n > 0: at level n-1 nodes
//! ```
//!
//! Invariants this module keeps:
//! - A node's hash is stored in its parent, the tree root's in the root block: every node and
//!   every data block read is verified against the hash its parent holds, and a mismatch is
//!   an error for that lookup, never wrong data (Merkle tree, as in ZFS and Genode's Tresor).
//! - Every node records its own block address, level, tree kind and volume, so a node that was
//!   written to the wrong place, or belongs to another tree or volume, never validates.
//! - Nothing on disk is modified in place. Changes build *dirty* nodes in memory; `flush`
//!   writes them to fresh blocks children-first (so each parent can hold its children's
//!   hashes) and returns the new root. The blocks of the nodes they replace are reported by
//!   `take_freed`; the caller reuses them only when no durable root can reach them.
//! - Dirty nodes are shared (`Arc`) and copied on write, so `freeze` takes a copy of the whole
//!   dirty tree in O(1): a checkpoint writes that frozen copy (`FrozenTree::write`, on any
//!   thread, without the tree) while the tree goes on changing — a change copies only the
//!   nodes on its path that the frozen copy shares. `thaw` then turns every live node that
//!   is still the frozen one into a clean reference to what was written, and reports the
//!   written blocks the live tree no longer reaches as freed.
//! - A subtree with no entries has no node: it is an empty entry in its parent. Unwritten and
//!   trimmed blocks therefore cost no space (thin provisioning).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::cache::ClockCache;
use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash::{self, Hash};

/// Magic at the start of every tree node.
pub const NODE_MAGIC: [u8; 8] = *b"RBLKNODE";
/// The node format this code writes and reads.
pub const NODE_FORMAT_VERSION: u32 = 1;
/// Entries per node.
pub const FANOUT: u64 = 64;
const FANOUT_BITS: u32 = 6;
/// The tallest tree: 64^10 blocks is far beyond any device.
pub const MAX_HEIGHT: u32 = 10;
/// Clean nodes a tree keeps in memory by default (about 3 KiB each, 48 MiB in all): 4096
/// leaves map 1 GiB, so the whole map of a volume up to 4 GiB stays in memory.
pub const DEFAULT_NODE_CACHE: usize = 16384;

/// Which tree a node belongs to; part of every node, so trees never mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    /// Virtual block → data block.
    BlockMap = 1,
    /// Bitmap index → allocator bitmap block.
    Allocator = 2,
}

/// A reference to a block and the hash of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ptr {
    pub block: u64,
    pub hash: Hash,
}

/// What a root block stores about a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeRef {
    /// Block of the top node, 0 for an empty tree.
    pub block: u64,
    pub hash: Hash,
    /// Levels of nodes: a tree of height h maps 64^h indexes.
    pub height: u32,
}

/// Errors of tree operations.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tree I/O failed at block {block}")]
    Device {
        block: u64,
        #[source]
        source: DeviceError,
    },
    #[error("{what} block {block} does not match the hash its parent holds (level {level}): damaged or misdirected")]
    HashMismatch { what: &'static str, block: u64, level: u32 },
    #[error("tree node at block {block} is invalid: {why}")]
    BadNode { block: u64, why: String },
    #[error("index {index} is beyond the tree's {capacity} entries")]
    OutOfRange { index: u64, capacity: u64 },
    #[error("tree height {height} is not in 1..={MAX_HEIGHT}")]
    BadHeight { height: u32 },
    #[error("no free block for a tree node")]
    NoSpace,
}

/// Node header. Byte offsets (integers little-endian):
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | magic `RBLKNODE` |
/// | 8 | 4 | format_version (1) |
/// | 12 | 4 | level (0 = leaf) |
/// | 16 | 16 | volume_id |
/// | 32 | 8 | block (this node's own address) |
/// | 40 | 4 | kind (1 = block map, 2 = allocator) |
/// | 44 | 4 | entries in use (non-empty) |
/// | 48 | 16 | reserved (zero) |
/// | 64 | 64 × 40 | entries: block (8) ‖ hash (32) |
/// | 2624 | 1472 | zero |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawNode {
    magic: [u8; 8],
    format_version: U32,
    level: U32,
    volume_id: [u8; 16],
    block: U64,
    kind: U32,
    used: U32,
    reserved: [u8; 16],
    entries: [RawEntry; FANOUT as usize],
    padding: [u8; 1472],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RawEntry {
    block: U64,
    hash: [u8; 32],
}

const _: () = assert!(size_of::<RawEntry>() == 40);
const _: () = assert!(size_of::<RawNode>() == BLOCK_SIZE);

/// A child of a node, as the tree holds it in memory.
#[derive(Debug, Clone)]
enum Slot {
    Empty,
    Clean(Ptr),
    /// Shared with a frozen copy until a change copies it (`Arc::make_mut`).
    Dirty(Arc<Node>),
}

#[derive(Debug, Clone)]
struct Node {
    slots: Vec<Slot>,
}

/// Verified clean nodes by block address, with the hash they were verified against.
type NodeCache = Mutex<Nodes>;
type Nodes = ClockCache<u64, (Hash, u32, Arc<Node>)>;

/// A copy-on-write Merkle tree; see the module docs.
pub struct BlockTree {
    kind: TreeKind,
    volume_id: [u8; 16],
    height: u32,
    root: Slot,
    /// Blocks of clean nodes replaced by dirty copies since the last `take_freed`.
    freed: Vec<u64>,
    /// Dirty nodes, counted as they are made (they stay dirty until `flush`).
    dirty: u64,
    /// Bounded: memory follows the working set, not the size of the tree.
    cache: NodeCache,
    /// Where `flush` encodes the nodes it writes (kept between flushes up to a bound).
    arena: AlignedBuf,
}

impl std::fmt::Debug for BlockTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockTree")
            .field("kind", &self.kind)
            .field("height", &self.height)
            .field("dirty", &self.is_dirty())
            .finish()
    }
}

impl BlockTree {
    /// The height a tree needs to map `entries` indexes (at least 1).
    pub fn height_for(entries: u64) -> u32 {
        let mut height = 1;
        while height < MAX_HEIGHT && FANOUT.pow(height) < entries {
            height += 1;
        }
        height
    }

    /// An empty tree of `height`.
    pub fn new(kind: TreeKind, volume_id: [u8; 16], height: u32) -> Result<Self, TreeError> {
        Self::open(kind, volume_id, TreeRef { block: 0, hash: [0; 32], height })
    }

    /// The tree a root block names. Nothing is read until a lookup needs it.
    pub fn open(kind: TreeKind, volume_id: [u8; 16], at: TreeRef) -> Result<Self, TreeError> {
        if at.height == 0 || at.height > MAX_HEIGHT {
            return Err(TreeError::BadHeight { height: at.height });
        }
        let root = if at.block == 0 { Slot::Empty } else { Slot::Clean(Ptr { block: at.block, hash: at.hash }) };
        let cache = Mutex::new(ClockCache::new(DEFAULT_NODE_CACHE));
        Ok(Self {
            kind,
            volume_id,
            height: at.height,
            root,
            freed: Vec::new(),
            dirty: 0,
            cache,
            arena: AlignedBuf::blocks(0),
        })
    }

    /// Keeps at most `nodes` clean nodes in memory (dirty nodes stay until `flush`).
    pub fn set_cache_capacity(&mut self, nodes: usize) {
        self.cache = Mutex::new(ClockCache::new(nodes));
    }

    /// Clean nodes held in the cache now.
    pub fn cached_nodes(&self) -> usize {
        lock(&self.cache).len()
    }

    /// How many indexes the tree maps.
    pub fn capacity(&self) -> u64 {
        FANOUT.pow(self.height)
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Whether there are changes not yet written by `flush`.
    pub fn is_dirty(&self) -> bool {
        matches!(self.root, Slot::Dirty(_))
    }

    fn check_index(&self, index: u64) -> Result<(), TreeError> {
        if index >= self.capacity() {
            return Err(TreeError::OutOfRange { index, capacity: self.capacity() });
        }
        Ok(())
    }

    /// The child position of `index` in a node of `level`.
    fn position(index: u64, level: u32) -> usize {
        ((index >> (FANOUT_BITS * level)) & (FANOUT - 1)) as usize
    }

    /// The block and hash `index` maps to, or `None` if unmapped. Every node read on the way
    /// is verified against its parent's hash.
    pub fn get(&self, dev: &dyn Device, index: u64) -> Result<Option<Ptr>, TreeError> {
        self.check_index(index)?;
        let mut level = self.height - 1;
        // Dirty nodes are walked in place; the first clean node hands over to `get_clean`.
        let mut slot = &self.root;
        loop {
            match slot {
                Slot::Empty => return Ok(None),
                Slot::Clean(ptr) => return self.get_clean(dev, *ptr, level, index),
                Slot::Dirty(node) => {
                    let child = &node.slots[Self::position(index, level)];
                    if level == 0 {
                        return Ok(match child {
                            Slot::Clean(ptr) => Some(*ptr),
                            _ => None,
                        });
                    }
                    slot = child;
                    level -= 1;
                }
            }
        }
    }

    /// `get` below a clean node: every node on the rest of the path is clean.
    fn get_clean(&self, dev: &dyn Device, mut ptr: Ptr, mut level: u32, index: u64) -> Result<Option<Ptr>, TreeError> {
        loop {
            let node = Self::cached(&self.cache, self.kind, self.volume_id, dev, ptr, level)?;
            match node.slots[Self::position(index, level)] {
                Slot::Clean(child) if level == 0 => return Ok(Some(child)),
                Slot::Clean(child) => {
                    ptr = child;
                    level -= 1;
                }
                _ => return Ok(None),
            }
        }
    }

    /// Maps `index` to `target` (or unmaps it with `None`); returns what it mapped before.
    /// Clean nodes on the path are read, verified and replaced by dirty copies.
    pub fn set(&mut self, dev: &dyn Device, index: u64, target: Option<Ptr>) -> Result<Option<Ptr>, TreeError> {
        self.check_index(index)?;
        let mut slot = &mut self.root;
        let mut level = self.height - 1;
        loop {
            // Make the node at `slot` dirty.
            match slot {
                Slot::Empty => {
                    if target.is_none() {
                        return Ok(None);
                    }
                    *slot = Slot::Dirty(Arc::new(Node { slots: vec![Slot::Empty; FANOUT as usize] }));
                    self.dirty += 1;
                }
                Slot::Clean(ptr) => {
                    let node = Self::cached(&self.cache, self.kind, self.volume_id, dev, *ptr, level)?;
                    self.freed.push(ptr.block);
                    // The current tree no longer reaches this copy: let it make room.
                    lock(&self.cache).remove(&ptr.block);
                    *slot = Slot::Dirty(Arc::new((*node).clone()));
                    self.dirty += 1;
                }
                Slot::Dirty(_) => {}
            }
            let Slot::Dirty(node) = slot else { unreachable!("made dirty above") };
            // A node a frozen copy shares is copied here, and so is every node on the path.
            let child = &mut Arc::make_mut(node).slots[Self::position(index, level)];
            if level == 0 {
                let old = match child {
                    Slot::Clean(ptr) => Some(*ptr),
                    _ => None,
                };
                *child = target.map_or(Slot::Empty, Slot::Clean);
                return Ok(old);
            }
            slot = child;
            level -= 1;
        }
    }

    /// Unmaps every index in `range` (clipped to the capacity) and appends the blocks the
    /// unmapped leaf entries pointed at to `unmapped` (the caller frees them, as for `set`).
    /// The work follows the tree, not the range: a subtree the range covers whole is dropped
    /// at once (its nodes are read only to learn what it held), empty subtrees cost nothing,
    /// and only the two edges of the range are copied into dirty nodes.
    ///
    /// On an error (a node that cannot be read or verified) the indexes before it may be
    /// unmapped already, and nothing that is still mapped is reported: unmapping is
    /// idempotent, so the caller may retry or report the damage.
    pub fn unmap_range(
        &mut self,
        dev: &dyn Device,
        range: std::ops::Range<u64>,
        unmapped: &mut Vec<u64>,
    ) -> Result<(), TreeError> {
        let end = range.end.min(self.capacity());
        if range.start >= end {
            return Ok(());
        }
        let mut unmap = Unmap {
            kind: self.kind,
            volume_id: self.volume_id,
            cache: &self.cache,
            dev,
            freed: &mut self.freed,
            dirty: &mut self.dirty,
            unmapped,
        };
        unmap.slot(&mut self.root, self.height - 1, 0, range.start, end)
    }

    /// Writes every dirty node to a fresh block from `alloc`, children first, and returns the
    /// new root. The writes are not flushed: the caller flushes once before writing the root
    /// block that names this tree. Subtrees that became empty vanish. (`freeze`, then
    /// `FrozenTree::write`, then `thaw`, at once.)
    pub fn flush(
        &mut self,
        dev: &dyn Device,
        alloc: &mut dyn FnMut() -> Result<u64, TreeError>,
    ) -> Result<TreeRef, TreeError> {
        let mut frozen = self.freeze(alloc)?;
        let at = frozen.write(dev)?;
        self.thaw(&mut frozen);
        Ok(at)
    }

    /// A copy of the tree as it is now, for `FrozenTree::write` to write while this tree goes
    /// on changing, with a block from `alloc` for every node it will write (taken here, in
    /// the order it writes them: children first). After the copy is written and its root is
    /// durable, hand it back to `thaw`. One at a time.
    pub fn freeze(&mut self, alloc: &mut dyn FnMut() -> Result<u64, TreeError>) -> Result<FrozenTree, TreeError> {
        let (nodes, _) = nodes_to_write(&self.root, self.height - 1);
        let blocks = (0..nodes).map(|_| alloc()).collect::<Result<Vec<u64>, TreeError>>()?;
        Ok(FrozenTree {
            kind: self.kind,
            volume_id: self.volume_id,
            height: self.height,
            root: self.root.clone(),
            blocks,
            arena: std::mem::replace(&mut self.arena, AlignedBuf::blocks(0)),
            written: HashMap::new(),
        })
    }

    /// Takes back a frozen copy that was written (`FrozenTree::write`): every live node that
    /// did not change since `freeze` becomes a clean reference to the block it was written
    /// to, and the blocks written for nodes that changed since (which the written root still
    /// reaches, the live tree no longer) join the freed ones. Afterwards the live tree
    /// shares no node with `frozen`; the written nodes it reaches move into the cache, and
    /// the others are freed when `frozen` is dropped: the caller drops it outside any lock it
    /// holds (on random writes, most of the nodes changed while the copy was written).
    pub fn thaw(&mut self, frozen: &mut FrozenTree) {
        let written = std::mem::take(&mut frozen.written);
        let arena = std::mem::replace(&mut frozen.arena, AlignedBuf::blocks(0));
        let mut freed = Vec::new();
        reconcile(&mut self.root, &frozen.root, self.height - 1, &written, &mut freed);
        // The nodes just written that the live tree reaches are the working set: keep them.
        let gone: std::collections::HashSet<u64> = freed.iter().copied().collect();
        let mut kept = Vec::new();
        harvest(&mut frozen.root, self.height - 1, &written, &gone, &mut kept);
        let mut cache = lock(&self.cache);
        for (block, hash, level, node) in kept {
            cache.insert(block, (hash, level, node));
        }
        drop(cache);
        self.freed.extend(freed);
        self.dirty = count_dirty(&self.root);
        if arena.len() <= MAX_KEPT_ARENA {
            self.arena = arena;
        }
    }

    /// Node blocks replaced since the last call: unreachable from the tree `flush` returns,
    /// but possibly still reachable from durable roots.
    pub fn take_freed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.freed)
    }

    /// Dirty nodes `flush` would write (before any of them became empty).
    pub fn dirty_nodes(&self) -> u64 {
        self.dirty
    }

    /// Every block (nodes and the blocks leaves point to) reachable from `old` but not from
    /// `new`, two versions of one tree. Copy-on-write blocks never move, so the walk compares
    /// positions and descends only where the pointers differ: the work is bounded by the
    /// changes between the versions.
    pub fn freed_between(
        kind: TreeKind,
        volume_id: [u8; 16],
        dev: &dyn Device,
        old: TreeRef,
        new: TreeRef,
    ) -> Result<Vec<u64>, TreeError> {
        if old.height != new.height {
            return Err(TreeError::BadHeight { height: new.height });
        }
        let as_ptr = |r: TreeRef| (r.block != 0).then_some(Ptr { block: r.block, hash: r.hash });
        let mut out = Vec::new();
        Self::diff(kind, volume_id, dev, as_ptr(old), as_ptr(new), old.height - 1, &mut out)?;
        Ok(out)
    }

    /// Counts the nodes of the tree at `at` and the entries of its leaves (mapped indexes),
    /// reading and verifying every node: for `rblk inspect`, not for the data path.
    pub fn census(kind: TreeKind, volume_id: [u8; 16], dev: &dyn Device, at: TreeRef) -> Result<(u64, u64), TreeError> {
        fn walk(
            kind: TreeKind,
            volume_id: [u8; 16],
            dev: &dyn Device,
            ptr: Ptr,
            level: u32,
            out: &mut (u64, u64),
        ) -> Result<(), TreeError> {
            let node = BlockTree::load_node(kind, volume_id, dev, ptr, level)?;
            out.0 += 1;
            for child in &node.slots {
                if let Slot::Clean(child) = child {
                    if level == 0 {
                        out.1 += 1;
                    } else {
                        walk(kind, volume_id, dev, *child, level - 1, out)?;
                    }
                }
            }
            Ok(())
        }
        let mut out = (0, 0);
        if at.block != 0 {
            walk(kind, volume_id, dev, Ptr { block: at.block, hash: at.hash }, at.height - 1, &mut out)?;
        }
        Ok(out)
    }

    /// The indexes of `range` as runs of mapped and unmapped ones, in order: `(length,
    /// mapped)`, neighbours of the same kind merged. Empty subtrees cost nothing, whatever
    /// their size. The walk stops early, covering only a prefix of `range` (at least one
    /// run), once `max_runs` runs are found or `max_nodes` clean nodes were visited, so its
    /// cost and its answer stay bounded whatever the range. Nodes read are verified as by
    /// `get`.
    pub fn runs(
        &self,
        dev: &dyn Device,
        range: std::ops::Range<u64>,
        max_runs: usize,
        max_nodes: usize,
    ) -> Result<Vec<(u64, bool)>, TreeError> {
        let end = range.end.min(self.capacity());
        let mut walk = Runs {
            tree: self,
            dev,
            start: range.start,
            end,
            max_runs: max_runs.max(1),
            nodes_left: max_nodes,
            out: Vec::new(),
            done: false,
        };
        if range.start < end {
            walk.slot(&self.root, self.height - 1, 0)?;
        }
        Ok(walk.out)
    }

    fn diff(
        kind: TreeKind,
        volume_id: [u8; 16],
        dev: &dyn Device,
        old: Option<Ptr>,
        new: Option<Ptr>,
        level: u32,
        out: &mut Vec<u64>,
    ) -> Result<(), TreeError> {
        let Some(old) = old else { return Ok(()) };
        if new == Some(old) {
            return Ok(());
        }
        out.push(old.block);
        let old_node = Self::load_node(kind, volume_id, dev, old, level)?;
        let new_node = match new {
            Some(p) => Some(Self::load_node(kind, volume_id, dev, p, level)?),
            None => None,
        };
        for (i, child) in old_node.slots.iter().enumerate() {
            let Slot::Clean(child) = child else { continue };
            let other = match new_node.as_ref().map(|n| &n.slots[i]) {
                Some(Slot::Clean(p)) => Some(*p),
                _ => None,
            };
            if level == 0 {
                if other != Some(*child) {
                    out.push(child.block);
                }
            } else {
                Self::diff(kind, volume_id, dev, Some(*child), other, level - 1, out)?;
            }
        }
        Ok(())
    }

    /// The clean node at `ptr`, from the cache or read and verified.
    fn cached(
        cache: &NodeCache,
        kind: TreeKind,
        volume_id: [u8; 16],
        dev: &dyn Device,
        ptr: Ptr,
        level: u32,
    ) -> Result<Arc<Node>, TreeError> {
        if let Some((hash, at_level, node)) = lock(cache).get(&ptr.block) {
            // A reused block address holds other content: only the same hash (and the level
            // it was verified at) is a hit.
            if hash == ptr.hash && at_level == level {
                return Ok(node);
            }
        }
        let node = Arc::new(Self::load_node(kind, volume_id, dev, ptr, level)?);
        lock(cache).insert(ptr.block, (ptr.hash, level, node.clone()));
        Ok(node)
    }

    fn load_node(
        kind: TreeKind,
        volume_id: [u8; 16],
        dev: &dyn Device,
        ptr: Ptr,
        level: u32,
    ) -> Result<Node, TreeError> {
        let mut buf = AlignedBuf::blocks(1);
        dev.read_at(ptr.block * BLOCK, &mut buf).map_err(|source| TreeError::Device { block: ptr.block, source })?;
        if hash::tree_node(&buf) != ptr.hash {
            return Err(TreeError::HashMismatch { what: "tree node", block: ptr.block, level });
        }
        let bad = |why: String| TreeError::BadNode { block: ptr.block, why };
        let raw = RawNode::ref_from_bytes(&buf).map_err(|_| bad("not one block".into()))?;
        if raw.magic != NODE_MAGIC {
            return Err(bad("no node magic".into()));
        }
        if raw.format_version.get() != NODE_FORMAT_VERSION {
            return Err(bad(format!("format version {}", raw.format_version.get())));
        }
        if raw.block.get() != ptr.block {
            return Err(bad(format!("written for block {}", raw.block.get())));
        }
        if raw.level.get() != level || raw.kind.get() != kind as u32 || raw.volume_id != volume_id {
            return Err(bad(format!("level {} kind {} of another tree or volume", raw.level.get(), raw.kind.get())));
        }
        let slots = raw
            .entries
            .iter()
            .map(|e| match e.block.get() {
                0 => Slot::Empty,
                block => Slot::Clean(Ptr { block, hash: e.hash }),
            })
            .collect();
        Ok(Node { slots })
    }
}

/// The state of `BlockTree::runs`.
struct Runs<'a> {
    tree: &'a BlockTree,
    dev: &'a dyn Device,
    start: u64,
    end: u64,
    max_runs: usize,
    nodes_left: usize,
    out: Vec<(u64, bool)>,
    /// Set when a limit stopped the walk: nothing more is added.
    done: bool,
}

impl Runs<'_> {
    /// Adds `[from, to)` (clipped to the range) as mapped or not.
    fn push(&mut self, from: u64, to: u64, mapped: bool) {
        let (from, to) = (from.max(self.start), to.min(self.end));
        if self.done || from >= to {
            return;
        }
        let runs = self.out.len();
        match self.out.last_mut() {
            Some(last) if last.1 == mapped => last.0 += to - from,
            _ if runs == self.max_runs => self.done = true,
            _ => self.out.push((to - from, mapped)),
        }
    }

    /// The subtree at `slot`, a node of `level` whose first index is `base`.
    fn slot(&mut self, slot: &Slot, level: u32, base: u64) -> Result<(), TreeError> {
        let span = FANOUT.pow(level + 1);
        if self.done || base >= self.end || base + span <= self.start {
            return Ok(());
        }
        match slot {
            Slot::Empty => {
                self.push(base, base + span, false);
                Ok(())
            }
            Slot::Clean(ptr) => {
                // The first node is always read: the answer holds at least one run.
                if self.nodes_left == 0 && !self.out.is_empty() {
                    self.done = true;
                    return Ok(());
                }
                self.nodes_left = self.nodes_left.saturating_sub(1);
                let node =
                    BlockTree::cached(&self.tree.cache, self.tree.kind, self.tree.volume_id, self.dev, *ptr, level)?;
                self.children(&node, level, base)
            }
            Slot::Dirty(node) => self.children(node, level, base),
        }
    }

    fn children(&mut self, node: &Node, level: u32, base: u64) -> Result<(), TreeError> {
        let child_span = FANOUT.pow(level);
        for (i, child) in node.slots.iter().enumerate() {
            let from = base + i as u64 * child_span;
            if self.done || from >= self.end {
                break;
            }
            if level == 0 {
                self.push(from, from + 1, matches!(child, Slot::Clean(_)));
            } else {
                self.slot(child, level - 1, from)?;
            }
        }
        Ok(())
    }
}

/// The arena `flush` keeps between calls, at most (larger ones are dropped after use): a
/// checkpoint after 8 MiB of random 4 KiB writes to a full 1 GiB volume writes about 1,600
/// nodes (6.4 MiB).
const MAX_KEPT_ARENA: usize = 8 << 20;

/// A copy of a tree's dirty nodes (`BlockTree::freeze`), to be written without the tree.
pub struct FrozenTree {
    kind: TreeKind,
    volume_id: [u8; 16],
    height: u32,
    root: Slot,
    /// The blocks the nodes go to, in the order `write` writes them.
    blocks: Vec<u64>,
    /// Where `write` encodes the nodes (the tree's, lent).
    arena: AlignedBuf,
    /// What `write` wrote: each node's pointer by the node's address (`node_id`; the nodes
    /// stay alive, and so their addresses unique, as long as `root` holds them).
    written: HashMap<usize, Ptr>,
}

/// A frozen node's identity while its frozen tree holds it: its address.
fn node_id(node: &Arc<Node>) -> usize {
    Arc::as_ptr(node) as usize
}

impl std::fmt::Debug for FrozenTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenTree").field("kind", &self.kind).field("nodes", &self.blocks.len()).finish()
    }
}

impl FrozenTree {
    /// Encodes and writes every node, children first, each to its block, and returns the
    /// tree's new root. The writes are not flushed: the caller flushes once before writing
    /// the root block that names this tree. Call once.
    pub fn write(&mut self, dev: &dyn Device) -> Result<TreeRef, TreeError> {
        let need = self.blocks.len();
        if self.arena.len() < need * BLOCK_SIZE {
            self.arena = AlignedBuf::blocks(need);
        }
        let mut writer = Writer {
            kind: self.kind,
            volume_id: self.volume_id,
            blocks: &self.blocks,
            arena: &mut self.arena,
            next: 0,
            written: HashMap::with_capacity(need),
        };
        let ptr = writer.node(&self.root, self.height - 1)?;
        let (next, written) = (writer.next, writer.written);
        if next != need {
            // `freeze` counted what this writes: a difference is a bug, never a guess.
            return Err(TreeError::BadNode { block: 0, why: format!("froze {need} nodes to write, wrote {next}") });
        }
        self.written = written;
        write_runs(dev, &self.arena, &self.blocks)?;
        Ok(match ptr {
            Some(p) => TreeRef { block: p.block, hash: p.hash, height: self.height },
            None => TreeRef { block: 0, hash: [0; 32], height: self.height },
        })
    }
}

/// How many nodes writing the subtree at `slot` (a node at `level`) writes, and whether it is
/// not empty: a dirty node is written when anything below it is mapped.
fn nodes_to_write(slot: &Slot, level: u32) -> (usize, bool) {
    let node = match slot {
        Slot::Empty => return (0, false),
        Slot::Clean(_) => return (0, true),
        Slot::Dirty(node) => node,
    };
    if level == 0 {
        let used = node.slots.iter().any(|c| matches!(c, Slot::Clean(_)));
        return (usize::from(used), used);
    }
    let (mut count, mut used) = (0, false);
    for child in &node.slots {
        let (c, u) = nodes_to_write(child, level - 1);
        count += c;
        used |= u;
    }
    (count + usize::from(used), used)
}

/// Dirty nodes in the subtree at `slot`.
fn count_dirty(slot: &Slot) -> u64 {
    match slot {
        Slot::Dirty(node) => 1 + node.slots.iter().map(count_dirty).sum::<u64>(),
        _ => 0,
    }
}

/// See `BlockTree::thaw`: `live` and `frozen` are the slots at the same place of the live
/// tree and of its frozen copy, a node at `level` (or a data block below level 0).
fn reconcile(live: &mut Slot, frozen: &Slot, level: u32, written: &HashMap<usize, Ptr>, freed: &mut Vec<u64>) {
    let Slot::Dirty(f) = frozen else { return };
    let wrote = written.get(&node_id(f)).copied();
    match live {
        // Unchanged since the freeze, and so is everything below it (a change copies every
        // node on its path).
        Slot::Dirty(l) if Arc::ptr_eq(l, f) => *live = wrote.map_or(Slot::Empty, Slot::Clean),
        Slot::Dirty(l) => {
            freed.extend(wrote.map(|p| p.block));
            if level > 0 {
                let l = Arc::make_mut(l);
                for (lc, fc) in l.slots.iter_mut().zip(&f.slots) {
                    reconcile(lc, fc, level - 1, written, freed);
                }
            }
        }
        // Dropped since the freeze: nothing live reaches what was written for it.
        Slot::Empty | Slot::Clean(_) => free_written(f, level, written, freed),
    }
}

/// After `reconcile`: moves the written nodes of the frozen subtree at `slot` (a node at
/// `level`) that the live tree reaches (their blocks are not `gone`) out of it into `kept`,
/// as the clean nodes they now are (children as written). The frozen tree holds its nodes
/// alone by now, so they change in place; the others stay, to be freed with it.
fn harvest(
    slot: &mut Slot,
    level: u32,
    written: &HashMap<usize, Ptr>,
    gone: &std::collections::HashSet<u64>,
    kept: &mut Vec<(u64, Hash, u32, Arc<Node>)>,
) {
    let Slot::Dirty(node) = slot else { return };
    let Some(ptr) = written.get(&node_id(node)).copied() else { return };
    let Some(inner) = Arc::get_mut(node) else { return };
    if level > 0 {
        for child in inner.slots.iter_mut() {
            harvest(child, level - 1, written, gone, kept);
        }
    }
    if gone.contains(&ptr.block) {
        return;
    }
    // Below a node the live tree reaches nothing changed: its children were all written (or
    // became empty) and are clean references now.
    for child in inner.slots.iter_mut() {
        if let Slot::Dirty(c) = child {
            *child = written.get(&node_id(c)).map_or(Slot::Empty, |p| Slot::Clean(*p));
        }
    }
    if let Slot::Dirty(node) = std::mem::replace(slot, Slot::Clean(ptr)) {
        kept.push((ptr.block, ptr.hash, level, node));
    }
}

/// The blocks written for the frozen subtree `node` (at `level`).
fn free_written(node: &Arc<Node>, level: u32, written: &HashMap<usize, Ptr>, freed: &mut Vec<u64>) {
    freed.extend(written.get(&node_id(node)).map(|p| p.block));
    if level > 0 {
        for child in &node.slots {
            if let Slot::Dirty(c) = child {
                free_written(c, level - 1, written, freed);
            }
        }
    }
}

/// Writes the arena's blocks to theirs: consecutive blocks (in both) with one write.
fn write_runs(dev: &dyn Device, arena: &[u8], blocks: &[u64]) -> Result<(), TreeError> {
    const MAX_RUN: usize = 256;
    let mut writes = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && j - i < MAX_RUN && blocks[j] == blocks[j - 1] + 1 {
            j += 1;
        }
        writes.push((blocks[i] * BLOCK, &arena[i * BLOCK_SIZE..j * BLOCK_SIZE]));
        i = j;
    }
    dev.write_many(&writes).map_err(|source| TreeError::Device { block: blocks.first().copied().unwrap_or(0), source })
}

/// What `FrozenTree::write` needs on its way down the tree. Each node is encoded in place, in
/// the next block of the arena, and written at the end: the allocator handed out consecutive
/// blocks, so runs of consecutive blocks are consecutive in the arena too and go out with one
/// write each, straight from it.
struct Writer<'a> {
    kind: TreeKind,
    volume_id: [u8; 16],
    blocks: &'a [u64],
    arena: &'a mut AlignedBuf,
    /// Nodes written so far (the next block and arena block to use).
    next: usize,
    written: HashMap<usize, Ptr>,
}

impl Writer<'_> {
    fn node(&mut self, slot: &Slot, level: u32) -> Result<Option<Ptr>, TreeError> {
        let node = match slot {
            Slot::Empty => return Ok(None),
            Slot::Clean(ptr) => return Ok(Some(*ptr)),
            Slot::Dirty(node) => node,
        };
        let mut entries = [RawEntry { block: U64::new(0), hash: [0; 32] }; FANOUT as usize];
        let mut used = 0u32;
        for (i, child) in node.slots.iter().enumerate() {
            let ptr = if level == 0 {
                match child {
                    Slot::Clean(ptr) => Some(*ptr),
                    _ => None,
                }
            } else {
                self.node(child, level - 1)?
            };
            if let Some(p) = ptr {
                entries[i] = RawEntry { block: U64::new(p.block), hash: p.hash };
                used += 1;
            }
        }
        if used == 0 {
            return Ok(None);
        }
        let Some(&block) = self.blocks.get(self.next) else {
            return Err(TreeError::BadNode { block: 0, why: "more nodes to write than were frozen".into() });
        };
        let bytes = &mut self.arena[self.next * BLOCK_SIZE..][..BLOCK_SIZE];
        let raw = RawNode::mut_from_bytes(bytes).map_err(|_| TreeError::NoSpace)?;
        *raw = RawNode {
            magic: NODE_MAGIC,
            format_version: U32::new(NODE_FORMAT_VERSION),
            level: U32::new(level),
            volume_id: self.volume_id,
            block: U64::new(block),
            kind: U32::new(self.kind as u32),
            used: U32::new(used),
            reserved: [0; 16],
            entries,
            padding: [0; 1472],
        };
        let ptr = Ptr { block, hash: hash::tree_node(bytes) };
        self.next += 1;
        self.written.insert(node_id(node), ptr);
        Ok(Some(ptr))
    }
}

/// The walk behind [`BlockTree::unmap_range`].
struct Unmap<'a> {
    kind: TreeKind,
    volume_id: [u8; 16],
    cache: &'a NodeCache,
    dev: &'a dyn Device,
    freed: &'a mut Vec<u64>,
    dirty: &'a mut u64,
    unmapped: &'a mut Vec<u64>,
}

/// What a subtree held: its data blocks, its clean node blocks, its dirty node count.
#[derive(Default)]
struct Held {
    data: Vec<u64>,
    nodes: Vec<u64>,
    dirty: u64,
}

impl Unmap<'_> {
    /// Unmaps `[start, end)` below `slot`, a node at `level` whose first index is `base`.
    fn slot(&mut self, slot: &mut Slot, level: u32, base: u64, start: u64, end: u64) -> Result<(), TreeError> {
        let span = FANOUT.pow(level + 1);
        if matches!(slot, Slot::Empty) || end <= base || start >= base + span {
            return Ok(());
        }
        if start <= base && base + span <= end {
            // Learn everything the subtree holds before dropping it: a node that cannot be
            // read leaves the subtree as it was, so no block still mapped is reported.
            let mut held = Held::default();
            self.collect(slot, level, &mut held)?;
            *slot = Slot::Empty;
            *self.dirty -= held.dirty;
            let mut cache = lock(self.cache);
            for block in &held.nodes {
                cache.remove(block);
            }
            drop(cache);
            self.freed.extend(held.nodes);
            self.unmapped.extend(held.data);
            return Ok(());
        }
        if let Slot::Clean(ptr) = slot {
            let node = BlockTree::cached(self.cache, self.kind, self.volume_id, self.dev, *ptr, level)?;
            self.freed.push(ptr.block);
            lock(self.cache).remove(&ptr.block);
            *slot = Slot::Dirty(Arc::new((*node).clone()));
            *self.dirty += 1;
        }
        let Slot::Dirty(node) = slot else { return Ok(()) };
        let node = Arc::make_mut(node);
        let child_span = FANOUT.pow(level);
        let first = (start.max(base) - base) / child_span;
        let last = (end.min(base + span) - 1 - base) / child_span;
        for i in first..=last {
            let child = &mut node.slots[i as usize];
            if level == 0 {
                if let Slot::Clean(p) = child {
                    self.unmapped.push(p.block);
                }
                *child = Slot::Empty;
            } else {
                self.slot(child, level - 1, base + i * child_span, start, end)?;
            }
        }
        Ok(())
    }

    /// Adds what the subtree at `slot` (a node at `level`) holds to `held`.
    fn collect(&self, slot: &Slot, level: u32, held: &mut Held) -> Result<(), TreeError> {
        let node = match slot {
            Slot::Empty => return Ok(()),
            Slot::Clean(ptr) => {
                held.nodes.push(ptr.block);
                BlockTree::cached(self.cache, self.kind, self.volume_id, self.dev, *ptr, level)?
            }
            Slot::Dirty(node) => {
                held.dirty += 1;
                // Walked in place: only clean children are read.
                return self.collect_children(&node.slots, level, held);
            }
        };
        self.collect_children(&node.slots, level, held)
    }

    fn collect_children(&self, slots: &[Slot], level: u32, held: &mut Held) -> Result<(), TreeError> {
        for child in slots {
            match child {
                Slot::Clean(p) if level == 0 => held.data.push(p.block),
                _ if level == 0 => {}
                other => self.collect(other, level - 1, held)?,
            }
        }
        Ok(())
    }
}

fn lock(cache: &NodeCache) -> std::sync::MutexGuard<'_, Nodes> {
    // The cache holds only verified copies of disk content: a panic elsewhere cannot leave it
    // inconsistent, so a poisoned lock is still good to use.
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the data block `ptr` names into `buf` (one block) and verifies it against the hash
/// its leaf holds: a mismatch is an error, never wrong data.
pub fn read_verified(dev: &dyn Device, ptr: Ptr, buf: &mut [u8]) -> Result<(), TreeError> {
    dev.read_at(ptr.block * BLOCK, buf).map_err(|source| TreeError::Device { block: ptr.block, source })?;
    if hash::data_block(buf) != ptr.hash {
        return Err(TreeError::HashMismatch { what: "data", block: ptr.block, level: 0 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{SimDisk, SimFault};
    use crate::rng::Rng;
    use std::collections::{BTreeMap, BTreeSet};

    const VOL: [u8; 16] = *b"tree-test-volume";

    /// A bump allocator over blocks 10.. of the disk that never reuses.
    fn bump(next: &mut u64) -> impl FnMut() -> Result<u64, TreeError> + '_ {
        move || {
            *next += 1;
            Ok(*next)
        }
    }

    fn ptr(n: u64) -> Ptr {
        Ptr { block: 1_000_000 + n, hash: hash::data_block(&n.to_le_bytes()) }
    }

    /// Every node block reachable from the tree at `at`.
    fn reachable(dev: &dyn Device, at: TreeRef) -> BTreeSet<u64> {
        fn walk(dev: &dyn Device, ptr: Ptr, level: u32, out: &mut BTreeSet<u64>) {
            out.insert(ptr.block);
            let node = BlockTree::load_node(TreeKind::BlockMap, VOL, dev, ptr, level).expect("load");
            if level > 0 {
                for s in node.slots {
                    if let Slot::Clean(p) = s {
                        walk(dev, p, level - 1, out);
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        if at.block != 0 {
            walk(dev, Ptr { block: at.block, hash: at.hash }, at.height - 1, &mut out);
        }
        out
    }

    #[test]
    fn height_covers_the_volume() {
        assert_eq!(BlockTree::height_for(1), 1);
        assert_eq!(BlockTree::height_for(64), 1);
        assert_eq!(BlockTree::height_for(65), 2);
        assert_eq!(BlockTree::height_for(1 << 28), 5, "1 TiB of 4 KiB blocks");
        let t = BlockTree::new(TreeKind::BlockMap, VOL, 5).expect("tree");
        assert!(t.capacity() >= 1 << 28);
        assert!(BlockTree::new(TreeKind::BlockMap, VOL, 0).is_err());
    }

    /// Random maps and unmaps against a model, with flushes and reopenings from the returned
    /// root; freed node blocks are exactly those no longer reachable.
    #[test]
    fn random_updates_match_a_model_across_flushes() {
        for seed in 0..40u64 {
            let disk = SimDisk::new(40_000 * BLOCK, seed);
            let mut rng = Rng::new(seed);
            let height = 1 + (seed % 3) as u32;
            let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, height).expect("tree");
            let span = tree.capacity().min(5000);
            let mut model: BTreeMap<u64, Ptr> = BTreeMap::new();
            let mut next = 10;
            let mut at = TreeRef { block: 0, hash: [0; 32], height };
            let mut old_at = at;
            let mut old_model: BTreeMap<u64, Ptr> = BTreeMap::new();
            for step in 0..400u64 {
                if rng.chance(1, 12) {
                    // A range unmap removes exactly the mapped indexes of the range.
                    let start = rng.below(span);
                    let len = if rng.chance(1, 2) { 70 } else { span };
                    let end = (start + 1 + rng.below(len)).min(span + 5);
                    let mut unmapped = Vec::new();
                    tree.unmap_range(&disk, start..end, &mut unmapped).expect("unmap");
                    let gone: Vec<u64> = model.range(start..end).map(|(i, _)| *i).collect();
                    let mut want: Vec<u64> = gone.iter().map(|i| model[i].block).collect();
                    for i in gone {
                        model.remove(&i);
                    }
                    unmapped.sort_unstable();
                    want.sort_unstable();
                    assert_eq!(unmapped, want, "seed {seed} step {step}: unmapped {start}..{end}");
                    assert_eq!(tree.dirty_nodes(), count_dirty(&tree.root), "seed {seed} step {step}");
                    continue;
                }
                let index = rng.below(span);
                let target = if rng.chance(1, 4) { None } else { Some(ptr(step)) };
                let old = tree.set(&disk, index, target).expect("set");
                let want_old = match target {
                    Some(p) => model.insert(index, p),
                    None => model.remove(&index),
                };
                assert_eq!(old, want_old, "seed {seed} step {step}");
                assert_eq!(tree.dirty_nodes(), count_dirty(&tree.root), "seed {seed} step {step}");
                if rng.chance(1, 20) {
                    assert_eq!(tree.dirty_nodes() > 0, tree.is_dirty());
                    let before = reachable(&disk, at);
                    at = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
                    let after = reachable(&disk, at);
                    let freed: BTreeSet<u64> = tree.take_freed().into_iter().collect();
                    assert_eq!(freed, before.difference(&after).copied().collect(), "seed {seed}: freed blocks");
                    // The diff of the two versions finds the same nodes, plus the data blocks
                    // that were unmapped or replaced.
                    let diff = BlockTree::freed_between(TreeKind::BlockMap, VOL, &disk, old_at, at).expect("diff");
                    let nodes: BTreeSet<u64> = diff.iter().copied().filter(|b| *b < 1_000_000).collect();
                    assert_eq!(nodes, freed, "seed {seed}: diff nodes");
                    let data: BTreeSet<u64> = diff.iter().copied().filter(|b| *b >= 1_000_000).collect();
                    let live: BTreeSet<u64> = model.values().map(|p| p.block).collect();
                    let want: BTreeSet<u64> =
                        old_model.values().map(|p| p.block).filter(|b| !live.contains(b)).collect();
                    assert_eq!(data, want, "seed {seed}: diff data blocks");
                    old_model = model.clone();
                    old_at = at;
                    assert!(!tree.is_dirty());
                    tree = BlockTree::open(TreeKind::BlockMap, VOL, at).expect("reopen");
                    if seed % 2 == 1 {
                        tree.set_cache_capacity(2);
                    }
                }
                if rng.chance(1, 10) {
                    for probe in 0..span.min(200) {
                        let i = rng.below(span).max(probe % span);
                        assert_eq!(tree.get(&disk, i).expect("get"), model.get(&i).copied(), "seed {seed} index {i}");
                    }
                }
            }
            at = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
            let reopened = BlockTree::open(TreeKind::BlockMap, VOL, at).expect("reopen");
            for i in 0..span {
                assert_eq!(reopened.get(&disk, i).expect("get"), model.get(&i).copied(), "seed {seed} index {i}");
            }
        }
    }

    /// The runs of a range from a model: `(length, mapped)`, neighbours merged.
    fn model_runs(model: &BTreeMap<u64, Ptr>, range: std::ops::Range<u64>) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        for i in range {
            let mapped = model.contains_key(&i);
            match out.last_mut() {
                Some(last) if last.1 == mapped => last.0 += 1,
                _ => out.push((1, mapped)),
            }
        }
        out
    }

    /// `runs` matches a model over random ranges, in dirty trees and in written ones read
    /// back through a tiny cache; with limits it answers a prefix of the full answer (at
    /// least one run, never more than asked), and an empty tree of any size is one run.
    #[test]
    fn runs_match_a_model_and_respect_their_limits() {
        let empty = BlockTree::new(TreeKind::BlockMap, VOL, 5).expect("tree");
        let disk = SimDisk::new(1000 * BLOCK, 0);
        assert_eq!(empty.runs(&disk, 0..1 << 28, 10, 0).expect("runs"), vec![(1 << 28, false)]);
        assert_eq!(empty.runs(&disk, 5..5, 10, 10).expect("runs"), vec![]);
        for seed in 0..20u64 {
            let disk = SimDisk::new(20_000 * BLOCK, seed);
            let mut rng = Rng::new(seed);
            let height = 1 + (seed % 3) as u32;
            let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, height).expect("tree");
            let span = tree.capacity().min(20_000);
            let mut model: BTreeMap<u64, Ptr> = BTreeMap::new();
            let mut next = 10;
            for round in 0..6u64 {
                for step in 0..150u64 {
                    // Clusters, so that runs longer than one index occur.
                    let at = rng.below(span);
                    for i in at..(at + rng.below(40)).min(span) {
                        let target = if rng.chance(1, 5) { None } else { Some(ptr(round * 10_000 + step)) };
                        tree.set(&disk, i, target).expect("set");
                        match target {
                            Some(p) => model.insert(i, p),
                            None => model.remove(&i),
                        };
                    }
                }
                for _ in 0..30 {
                    let start = rng.below(span);
                    let end = (start + 1 + rng.below(span)).min(span);
                    let want = model_runs(&model, start..end);
                    let got = tree.runs(&disk, start..end, usize::MAX, usize::MAX).expect("runs");
                    assert_eq!(got, want, "seed {seed} round {round} {start}..{end}");
                    let (max_runs, max_nodes) = (1 + rng.below(4) as usize, rng.below(3) as usize);
                    let part = tree.runs(&disk, start..end, max_runs, max_nodes).expect("runs");
                    assert!(!part.is_empty() && part.len() <= max_runs, "seed {seed}: {part:?}");
                    let (last, whole) = part.split_last().expect("one run");
                    assert_eq!(whole, &want[..whole.len()], "seed {seed}: a prefix");
                    let w = want[whole.len()];
                    assert!(last.1 == w.1 && last.0 <= w.0, "seed {seed}: {last:?} within {w:?}");
                }
                if rng.chance(1, 2) {
                    let at = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
                    tree = BlockTree::open(TreeKind::BlockMap, VOL, at).expect("reopen");
                    tree.set_cache_capacity(2);
                }
            }
        }
    }

    /// A frozen copy written while the tree goes on changing (as a checkpoint beside the
    /// applier does) holds exactly the tree as frozen; the live tree keeps every later change,
    /// and the blocks reported freed at each freeze are exactly those the previous written
    /// version reached and the next one does not.
    #[test]
    fn a_frozen_copy_is_written_while_the_tree_changes() {
        for seed in 0..60u64 {
            let disk = SimDisk::new(60_000 * BLOCK, seed);
            let mut rng = Rng::new(seed);
            let height = 1 + (seed % 3) as u32;
            let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, height).expect("tree");
            if seed % 3 == 2 {
                tree.set_cache_capacity(2);
            }
            let span = tree.capacity().min(3000);
            let mut model: BTreeMap<u64, Ptr> = BTreeMap::new();
            let mut next = 10;
            let mut step = 0u64;
            let mut change = |tree: &mut BlockTree, model: &mut BTreeMap<u64, Ptr>, rng: &mut Rng| {
                step += 1;
                if rng.chance(1, 15) {
                    let start = rng.below(span);
                    let len = if rng.chance(1, 2) { 70 } else { span };
                    let end = (start + 1 + rng.below(len)).min(span);
                    let mut unmapped = Vec::new();
                    tree.unmap_range(&disk, start..end, &mut unmapped).expect("unmap");
                    let gone: Vec<u64> = model.range(start..end).map(|(i, _)| *i).collect();
                    for i in gone {
                        model.remove(&i);
                    }
                } else {
                    let index = rng.below(span);
                    let target = if rng.chance(1, 5) { None } else { Some(ptr(step)) };
                    let old = tree.set(&disk, index, target).expect("set");
                    let want = match target {
                        Some(p) => model.insert(index, p),
                        None => model.remove(&index),
                    };
                    assert_eq!(old, want, "seed {seed} step {step}");
                }
            };
            let mut at = TreeRef { block: 0, hash: [0; 32], height };
            for round in 0..4 {
                for _ in 0..rng.below(200) {
                    change(&mut tree, &mut model, &mut rng);
                }
                let frozen_model = model.clone();
                let mut frozen = tree.freeze(&mut bump(&mut next)).expect("freeze");
                let freed: BTreeSet<u64> = tree.take_freed().into_iter().collect();
                for _ in 0..rng.below(200) {
                    change(&mut tree, &mut model, &mut rng);
                }
                let written = frozen.write(&disk).expect("write");
                let reopened = BlockTree::open(TreeKind::BlockMap, VOL, written).expect("reopen");
                for i in 0..span {
                    assert_eq!(
                        reopened.get(&disk, i).expect("get"),
                        frozen_model.get(&i).copied(),
                        "seed {seed} round {round} frozen index {i}"
                    );
                }
                assert_eq!(
                    freed,
                    reachable(&disk, at).difference(&reachable(&disk, written)).copied().collect(),
                    "seed {seed} round {round}: freed at the freeze"
                );
                at = written;
                tree.thaw(&mut frozen);
                drop(frozen);
                assert_eq!(tree.dirty_nodes(), count_dirty(&tree.root), "seed {seed} round {round}");
                for i in 0..span {
                    assert_eq!(
                        tree.get(&disk, i).expect("get"),
                        model.get(&i).copied(),
                        "seed {seed} round {round} live index {i}"
                    );
                }
            }
            // A last flush writes what changed after the last freeze, and frees what the last
            // written version reached and this one does not.
            let last = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
            let freed: BTreeSet<u64> = tree.take_freed().into_iter().collect();
            assert_eq!(
                freed,
                reachable(&disk, at).difference(&reachable(&disk, last)).copied().collect(),
                "seed {seed}"
            );
            assert!(!tree.is_dirty() && tree.dirty_nodes() == 0);
            let reopened = BlockTree::open(TreeKind::BlockMap, VOL, last).expect("reopen");
            for i in 0..span {
                assert_eq!(reopened.get(&disk, i).expect("get"), model.get(&i).copied(), "seed {seed} index {i}");
            }
        }
    }

    /// A block address reused for another node must not be served from the cache.
    #[test]
    fn cache_hits_need_the_same_hash() {
        let disk = SimDisk::new(64 * BLOCK, 0);
        let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, 1).expect("tree");
        tree.set(&disk, 3, Some(ptr(1))).expect("set");
        tree.flush(&disk, &mut || Ok(20)).expect("flush");
        assert_eq!(tree.get(&disk, 3).expect("get"), Some(ptr(1)));
        assert_eq!(tree.cached_nodes(), 1);
        tree.set(&disk, 3, Some(ptr(2))).expect("set");
        assert_eq!(tree.take_freed(), vec![20]);
        // The new version goes to the same block, as a reuse after two checkpoints would.
        tree.flush(&disk, &mut || Ok(20)).expect("flush");
        assert_eq!(tree.get(&disk, 3).expect("get"), Some(ptr(2)), "not the cached old node");
        assert_eq!(tree.cached_nodes(), 1, "replaced in place");
    }

    #[test]
    fn emptied_tree_has_no_nodes() {
        let disk = SimDisk::new(1000 * BLOCK, 0);
        let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, 3).expect("tree");
        let mut next = 10;
        for i in [0, 5000, 200_000] {
            tree.set(&disk, i, Some(ptr(i))).expect("set");
        }
        let at = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
        assert_eq!(reachable(&disk, at).len(), 1 + 3 + 3, "the top node, three interior nodes, three leaves");
        let mut tree = BlockTree::open(TreeKind::BlockMap, VOL, at).expect("reopen");
        for i in [0, 5000, 200_000] {
            tree.set(&disk, i, None).expect("clear");
        }
        let at = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
        assert_eq!(at.block, 0, "no entries, no nodes");
        assert_eq!(tree.take_freed().len(), 7);
    }

    #[test]
    fn damaged_or_misplaced_nodes_fail_the_lookup_never_return_wrong_data() {
        let disk = SimDisk::new(1000 * BLOCK, 0);
        let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, 2).expect("tree");
        let mut next = 10;
        tree.set(&disk, 3, Some(ptr(3))).expect("set");
        tree.set(&disk, 100, Some(ptr(100))).expect("set");
        let at = tree.flush(&disk, &mut bump(&mut next)).expect("flush");
        let tree = BlockTree::open(TreeKind::BlockMap, VOL, at).expect("open");
        // A bit flip anywhere in the top node.
        disk.flip_random_bit(at.block * BLOCK, (at.block + 1) * BLOCK);
        assert!(matches!(tree.get(&disk, 3), Err(TreeError::HashMismatch { .. })));
        // A leaf copied to another block: its hash still matches, its address does not.
        let disk = SimDisk::new(1000 * BLOCK, 0);
        let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, 1).expect("tree");
        tree.set(&disk, 3, Some(ptr(3))).expect("set");
        let at = tree.flush(&disk, &mut bump(&mut 10)).expect("flush");
        let mut buf = AlignedBuf::blocks(1);
        disk.read_at(at.block * BLOCK, &mut buf).expect("read");
        disk.write_at(500 * BLOCK, &buf).expect("write");
        let moved = BlockTree::open(TreeKind::BlockMap, VOL, TreeRef { block: 500, ..at }).expect("open");
        assert!(matches!(moved.get(&disk, 3), Err(TreeError::BadNode { .. })));
        // The same node read as another tree kind or volume.
        let other = BlockTree::open(TreeKind::Allocator, VOL, at).expect("open");
        assert!(matches!(other.get(&disk, 3), Err(TreeError::BadNode { .. })));
        let foreign = BlockTree::open(TreeKind::BlockMap, *b"some-other-vol!!", at).expect("open");
        assert!(matches!(foreign.get(&disk, 3), Err(TreeError::BadNode { .. })));
        // A read error is an error too.
        disk.inject(SimFault::ReadError { offset: at.block * BLOCK });
        let tree = BlockTree::open(TreeKind::BlockMap, VOL, at).expect("open");
        assert!(matches!(tree.get(&disk, 3), Err(TreeError::Device { .. })));
        assert!(matches!(tree.get(&disk, 64), Err(TreeError::OutOfRange { .. })));
    }

    #[test]
    fn data_blocks_are_verified_against_their_leaf() {
        let disk = SimDisk::new(100 * BLOCK, 0);
        let mut data = AlignedBuf::blocks(1);
        Rng::new(1).fill(&mut data);
        disk.write_at(40 * BLOCK, &data).expect("write");
        let p = Ptr { block: 40, hash: hash::data_block(&data) };
        let mut back = AlignedBuf::blocks(1);
        read_verified(&disk, p, &mut back).expect("read");
        assert_eq!(&back[..], &data[..]);
        disk.inject(SimFault::BitFlip { offset: 40 * BLOCK + 77, bit: 3 });
        assert!(matches!(read_verified(&disk, p, &mut back), Err(TreeError::HashMismatch { what: "data", .. })));
    }

    #[test]
    fn a_node_write_error_is_reported() {
        let disk = SimDisk::new(100 * BLOCK, 0);
        let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, 1).expect("tree");
        tree.set(&disk, 1, Some(ptr(1))).expect("set");
        disk.inject(SimFault::WriteError { offset: 11 * BLOCK });
        assert!(matches!(tree.flush(&disk, &mut bump(&mut 10)), Err(TreeError::Device { block: 11, .. })));
        let mut full = || Err(TreeError::NoSpace);
        let mut tree = BlockTree::new(TreeKind::BlockMap, VOL, 1).expect("tree");
        tree.set(&disk, 1, Some(ptr(1))).expect("set");
        assert!(matches!(tree.flush(&disk, &mut full), Err(TreeError::NoSpace)));
    }
}
