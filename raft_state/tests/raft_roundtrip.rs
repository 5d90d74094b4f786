//! A single-node raft-rs `RawNode` on the log store: it campaigns, proposes, persists through
//! the store, restarts from the disk alone and sees the same hard state and log.

use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, EntryType, HardState};
use raft::{Config, GetEntriesContext, RawNode, Storage};
use raft_state::device::{Device, FileDevice, SimDisk, BLOCK};
use raft_state::log::{Anchor, LogRegion, LogStore};
use slog::{o, Discard, Logger};

const VOL: [u8; 16] = *b"roundtrip-volume";

fn logger() -> Logger {
    Logger::root(Discard, o!())
}

fn region() -> LogRegion {
    LogRegion { start: 3, blocks: 256, volume_id: VOL }
}

fn open_node(dev: &Arc<dyn Device>, anchor: &Anchor, applied: u64) -> RawNode<LogStore> {
    let dev = dev.clone();
    let store = LogStore::open(dev, region(), anchor, logger()).expect("open log");
    let config = Config { id: 1, election_tick: 10, heartbeat_tick: 3, applied, ..Default::default() };
    RawNode::new(&config, store, &logger()).expect("raw node")
}

fn genesis() -> Anchor {
    Anchor::genesis(ConfState { voters: vec![1], ..Default::default() })
}

/// The ready loop of a single node: persist (one append per ready), advance, apply.
/// Returns the last hard state written to the disk.
fn drive(node: &mut RawNode<LogStore>, applied: &mut Vec<Entry>) -> Option<HardState> {
    let mut persisted = None;
    while node.has_ready() {
        let mut rd = node.ready();
        assert!(rd.messages().is_empty() && rd.persisted_messages().is_empty(), "single node sends nothing");
        assert!(rd.snapshot().is_empty());
        applied.extend(rd.take_committed_entries());
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        if !entries.is_empty() || hs.is_some() {
            node.mut_store().append(&entries, hs.as_ref()).expect("persist");
            persisted = Some(node.store().hard_state().clone());
        }
        let mut light = node.advance(rd);
        if let Some(commit) = light.commit_index() {
            node.mut_store().set_commit(commit);
        }
        applied.extend(light.take_committed_entries());
        node.advance_apply();
    }
    persisted
}

fn elect(node: &mut RawNode<LogStore>, applied: &mut Vec<Entry>) {
    node.campaign().expect("campaign");
    drive(node, applied);
    assert_eq!(node.raft.state, raft::StateRole::Leader);
}

fn data_of(entries: &[Entry]) -> Vec<Vec<u8>> {
    entries
        .iter()
        .filter(|e| e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty())
        .map(|e| e.data.clone())
        .collect()
}

#[test]
fn raw_node_round_trip_on_the_simulated_disk() {
    round_trip(Arc::new(SimDisk::new(512 * BLOCK, 1)));
}

#[test]
fn raw_node_round_trip_on_a_file_with_o_direct() {
    let path = std::env::temp_dir().join(format!("rblk-raft-roundtrip-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let dev = FileDevice::create(&path, 512 * BLOCK).expect("create image");
    round_trip(Arc::new(dev));
    std::fs::remove_file(&path).expect("remove image");
}

fn round_trip(disk: Arc<dyn Device>) {
    let mut applied = Vec::new();
    let mut node = open_node(&disk, &genesis(), 0);
    elect(&mut node, &mut applied);
    let mut persisted = None;
    let proposals: Vec<Vec<u8>> =
        (0..50u32).map(|i| format!("write {i}").repeat(1 + i as usize % 40).into_bytes()).collect();
    for (i, p) in proposals.iter().enumerate() {
        node.propose(vec![], p.clone()).expect("propose");
        if i % 7 == 0 {
            persisted = drive(&mut node, &mut applied).or(persisted); // otherwise proposals share a batch
        }
    }
    persisted = drive(&mut node, &mut applied).or(persisted);
    let persisted = persisted.expect("something was persisted");
    assert_eq!(data_of(&applied), proposals, "every proposal committed and applied in order");

    let store = node.store();
    let (hs, first, last) = (store.hard_state().clone(), store.first_index(), store.last_index());
    let log = store.entries(first, last + 1, None, GetEntriesContext::empty(false)).expect("entries");
    assert!(hs.commit == last && hs.term >= 1);
    // raft-rs learns the commit index after persisting (LightReady), so the disk's lags.
    assert!(persisted.commit < hs.commit && persisted.term == hs.term);
    drop(node);

    // Restart from the disk alone: exactly the persisted hard state and the same log.
    let node = open_node(&disk, &genesis(), persisted.commit);
    let store = node.store();
    assert_eq!(store.initial_state().expect("state").hard_state, persisted);
    assert_eq!((store.first_index(), store.last_index()), (first, last));
    assert_eq!(store.entries(first, last + 1, None, GetEntriesContext::empty(false)).expect("entries"), log);
    drop(node);

    // With a root that applied everything (the applied state proves the commit), the restart
    // starts from it: the log is compacted to it and the commit index is the root's.
    let term_last = log.last().map(|e| e.term).expect("entries");
    let anchor = Anchor { applied_index: last, applied_term: term_last, ..genesis() };
    let node = open_node(&disk, &anchor, last);
    let store = node.store();
    assert_eq!(store.hard_state().commit, last);
    assert_eq!((store.first_index(), store.last_index()), (last + 1, last));
    drop(node);
    let mut node = open_node(&disk, &genesis(), persisted.commit);
    let store = node.store();
    assert_eq!((store.first_index(), store.last_index()), (first, last));
    assert_eq!(store.entries(first, last + 1, None, GetEntriesContext::empty(false)).expect("entries"), log);

    // The restarted node is elected in a later term and keeps committing.
    let mut more = Vec::new();
    elect(&mut node, &mut more);
    assert!(node.raft.term > hs.term);
    node.propose(vec![], b"after restart".to_vec()).expect("propose");
    drive(&mut node, &mut more);
    // Entries committed after the persisted commit index are applied again (at-least-once).
    let mut want: Vec<Vec<u8>> = data_of(&log[(persisted.commit + 1 - first) as usize..]);
    want.push(b"after restart".to_vec());
    assert_eq!(data_of(&more), want);
    assert_eq!(node.store().last_index(), last + 2, "a leader entry and the proposal");
}
