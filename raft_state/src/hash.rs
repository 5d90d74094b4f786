//! Every hash rblk puts on disk, each in its own BLAKE3 domain (`derive_key` contexts), so a
//! value computed for one purpose can never validate as another.

/// A 32-byte BLAKE3 output.
pub type Hash = [u8; 32];

const ROOT_VERSION: &str = "rblk 2026-11 root version H(a,b)";
const ROOT_GENESIS: &str = "rblk 2026-11 root genesis version";
const ROOT_CHECKSUM: &str = "rblk 2026-11 root block checksum";
const LOG_HEADER: &str = "rblk 2026-11 log record header checksum";
const LOG_PAYLOAD: &str = "rblk 2026-11 log record payload checksum";
const TREE_NODE: &str = "rblk 2026-11 tree node hash";
const DATA_BLOCK: &str = "rblk 2026-11 data block hash";

fn derive(context: &str, parts: &[&[u8]]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    for part in parts {
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// The seed's H: the version of the root that follows backup `b` and current `c`.
pub fn root_version(b: &Hash, c: &Hash) -> Hash {
    derive(ROOT_VERSION, &[b, c])
}

/// The versions of the two genesis roots that have no parents (generation 0 and 1).
pub fn genesis_version(volume_id: &[u8; 16], generation: u64) -> Hash {
    derive(ROOT_GENESIS, &[volume_id, &generation.to_le_bytes()])
}

/// The checksum over a root block's bytes before its checksum field.
pub fn root_checksum(bytes: &[u8]) -> Hash {
    derive(ROOT_CHECKSUM, &[bytes])
}

/// The checksum of a log record header (its bytes before the checksum field).
pub fn log_header_checksum(bytes: &[u8]) -> Hash {
    derive(LOG_HEADER, &[bytes])
}

/// The checksum of a log record payload, bound to the record's volume and position.
pub fn log_payload_checksum(volume_id: &[u8; 16], vblock: u64, payload: &[u8]) -> Hash {
    derive(LOG_PAYLOAD, &[volume_id, &vblock.to_le_bytes(), payload])
}

/// The hash of a tree node's whole block, kept in its parent (or the root block).
pub fn tree_node(bytes: &[u8]) -> Hash {
    derive(TREE_NODE, &[bytes])
}

/// The hash of a data block, kept in the leaf that points to it.
pub fn data_block(bytes: &[u8]) -> Hash {
    derive(DATA_BLOCK, &[bytes])
}

/// `data_block` of each 4 KiB block `blocks` yields, in order, into `out` (one hash per
/// block, as many as both have).
///
/// The same values as `data_block`, about twice as fast per byte on AVX-512: BLAKE3 hashes
/// the 1 KiB chunks of one input side by side in SIMD lanes, but a 4 KiB block has only four
/// chunks, so hashing blocks one at a time leaves most lanes idle (AVX-512 has 16). Here the
/// chunks of up to 16 blocks are hashed together, then their parents, level by level. It
/// drives BLAKE3's compression through `blake3::platform::hash_many`, which the crate marks
/// unstable: the version is pinned in the workspace's `Cargo.toml`, and the tests below hold
/// every result to `data_block`'s (the plain `Hasher`), so an upgrade that changed it fails
/// them rather than the disk.
pub fn data_blocks<'a>(blocks: impl IntoIterator<Item = &'a [u8; BLOCK_BYTES]>, out: &mut [Hash]) {
    static ZEROS: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
    let mut blocks = blocks.into_iter();
    for hashes in out.chunks_mut(LANES) {
        let mut group = [&ZEROS; LANES];
        let mut n = 0;
        for (slot, block) in group.iter_mut().take(hashes.len()).zip(&mut blocks) {
            *slot = block;
            n += 1;
        }
        hash_group(&group[..n], &mut hashes[..n]);
        if n < LANES {
            return;
        }
    }
}

/// `data_blocks` for one group of at most `LANES` blocks.
fn hash_group(group: &[&[u8; BLOCK_BYTES]], hashes: &mut [Hash]) {
    let n = group.len();
    if n < 4 {
        // Fewer blocks than the narrowest SIMD pass (four lanes) hash faster one by one.
        for (block, hash) in group.iter().zip(hashes) {
            *hash = data_block(&block[..]);
        }
        return;
    }
    // Lanes in whole SIMD passes (4, 8 or 16): hash_many does a remainder one input at a
    // time, slower than a pass with the last block repeated in the idle lanes.
    let lanes = n.next_power_of_two().min(LANES);
    let platform = blake3::platform::Platform::detect();
    let key = data_block_key();
    let at = |i: usize| group[i.min(n - 1)];
    let mut cvs = [[0u8; CHUNKS_PER_BLOCK * 32]; LANES];
    let mut parents = [[0u8; 2 * 32]; LANES];
    let mut tmp = [0u8; LANES * 32];
    let out = &mut tmp[..lanes * 32];
    for c in 0..CHUNKS_PER_BLOCK {
        let inputs: [&[u8; CHUNK]; LANES] = std::array::from_fn(|i| &at(i).as_chunks::<CHUNK>().0[c]);
        // Every block's chunk c has chunk counter c: the counter does not advance from one
        // input to the next (they are separate messages, not one).
        let flags = DERIVE_KEY_MATERIAL;
        platform.hash_many(&inputs[..lanes], &key, c as u64, NO, flags, CHUNK_START, CHUNK_END, out);
        for (cv, value) in cvs.iter_mut().zip(out.as_chunks::<32>().0) {
            cv[c * 32..][..32].copy_from_slice(value);
        }
    }
    for half in 0..2 {
        let inputs: [&[u8; 64]; LANES] = std::array::from_fn(|i| &cvs[i].as_chunks::<64>().0[half]);
        platform.hash_many(&inputs[..lanes], &key, 0, NO, DERIVE_KEY_MATERIAL | PARENT, 0, 0, out);
        for (parent, value) in parents.iter_mut().zip(out.as_chunks::<32>().0) {
            parent[half * 32..][..32].copy_from_slice(value);
        }
    }
    let inputs: [&[u8; 64]; LANES] = std::array::from_fn(|i| &parents[i]);
    platform.hash_many(&inputs[..lanes], &key, 0, NO, DERIVE_KEY_MATERIAL | PARENT | ROOT, 0, 0, out);
    for (hash, value) in hashes.iter_mut().zip(out.as_chunks::<32>().0) {
        *hash = *value;
    }
}

/// BLAKE3's sizes and domain flags (the BLAKE3 specification, section 2), for `data_blocks`.
const BLOCK_BYTES: usize = crate::device::BLOCK_SIZE;
const CHUNK: usize = 1024;
const CHUNKS_PER_BLOCK: usize = BLOCK_BYTES / CHUNK;
const LANES: usize = 16;
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const DERIVE_KEY_MATERIAL: u8 = 1 << 6;
const NO: blake3::IncrementCounter = blake3::IncrementCounter::No;

/// The key words of `DATA_BLOCK`'s domain (derive-key mode: the context's hash).
fn data_block_key() -> [u32; 8] {
    static KEY: std::sync::OnceLock<[u32; 8]> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let bytes = blake3::hazmat::hash_derive_key_context(DATA_BLOCK);
        let (words, _) = bytes.as_chunks::<4>();
        std::array::from_fn(|i| u32::from_le_bytes(words[i]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_separated() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let joined: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        assert_ne!(root_version(&a, &b), root_checksum(&joined));
        assert_ne!(root_version(&a, &b), root_version(&b, &a));
        assert_ne!(log_header_checksum(&joined), root_checksum(&joined));
        assert_ne!(genesis_version(&[0; 16], 0), genesis_version(&[0; 16], 1));
        assert_ne!(log_payload_checksum(&[0; 16], 1, b"x"), log_payload_checksum(&[0; 16], 2, b"x"));
    }

    #[test]
    fn batched_data_block_hashes_are_the_plain_ones() {
        let mut rng = crate::rng::Rng::new(0xb1a4e3);
        // Every count of one group and around the next ones (widths 4, 8, 16 with idle
        // lanes), and blocks that differ in one byte only.
        for count in (1usize..=20).chain([31, 32, 33, 47, 64, 256]) {
            let mut data = vec![0u8; count * 4096];
            rng.fill(&mut data);
            if count > 1 {
                let (a, b) = data.split_at_mut(4096);
                b[..4096].copy_from_slice(a);
                b[4095] ^= 1;
            }
            let mut batched = vec![[0u8; 32]; count];
            data_blocks(data.as_chunks().0, &mut batched);
            for (i, block) in data.chunks_exact(4096).enumerate() {
                assert_eq!(batched[i], data_block(block), "block {i} of {count}");
            }
        }
        // An all-zero block, and fewer blocks than `out` has room for: only the front is
        // written; more blocks than room: the first ones are hashed.
        let mut out = [[7u8; 32]; 3];
        data_blocks([&[0u8; 4096]], &mut out);
        assert_eq!(out[0], data_block(&[0u8; 4096]));
        assert_eq!(out[1..], [[7u8; 32]; 2]);
        let many = vec![[3u8; 4096]; 40];
        let mut out = vec![[0u8; 32]; 20];
        data_blocks(&many, &mut out);
        assert!(out.iter().all(|h| *h == data_block(&[3u8; 4096])));
    }
}
