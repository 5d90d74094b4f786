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
}
