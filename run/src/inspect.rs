//! `rblk inspect`: what is on a volume, read-only — the three root slots and their roles, the
//! log region, and statistics of the block map and the allocator of the current root. It
//! writes nothing (no replay), so it is safe on a volume that is being served; what it shows
//! of the log is what is durable.

use std::sync::Arc;

use raft_state::device::{Device, BLOCK};
use raft_state::log::LogStore;
use raft_state::roots::{self, Role, RootError};
use raft_state::tree::{BlockTree, TreeKind};
use raft_state::volume::{alloc_ref, log_anchor, log_region, tree_ref};
use serde_json::{json, Value};

/// Why there is nothing to inspect. What fails beyond the roots (the log, a tree) is a finding
/// of the report, not an error.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// No current root can be chosen: the slots are blank, damaged or disagree. The roots'
    /// own message says which.
    #[error(transparent)]
    Roots(#[from] RootError),
}

/// The findings, as JSON (the text form is rendered from it).
#[derive(Debug)]
pub struct Report(Value);

pub fn inspect(dev: Arc<dyn Device>, root_dev: Option<Arc<dyn Device>>) -> Result<Report, InspectError> {
    let roots_dev = root_dev.clone().unwrap_or_else(|| dev.clone());
    let roots = roots::open(&*roots_dev)?;
    let current = roots.current().clone();
    let g = current.geometry;
    let p = &current.payload;
    let slots: Vec<Value> = roots
        .slot_reports()
        .iter()
        .map(|r| match &r.root {
            Ok(root) => json!({
                "slot": r.slot,
                "role": match r.role { Some(Role::Current) => "current", Some(Role::Backup) => "backup", Some(Role::Overwrite) => "overwrite", None => "none" },
                "generation": root.generation,
                "version": hex(&root.version[..8]),
                "applied_index": root.payload.applied_index,
                "applied_term": root.payload.applied_term,
            }),
            Err(problem) => json!({ "slot": r.slot, "role": "damaged", "problem": problem.to_string() }),
        })
        .collect();
    // Exactly the log the driver would open (read-only: opening writes nothing).
    let discard = slog::Logger::root(slog::Discard, slog::o!());
    let log = match LogStore::open(dev.clone(), log_region(&current), &log_anchor(&roots), discard) {
        Ok(store) => {
            let (used, total) = store.usage();
            let hs = store.hard_state();
            json!({
                "blocks": total, "in_use_blocks": used, "head": store.head(),
                "first_index": store.first_index(), "last_index": store.last_index(),
                "term": hs.term, "commit": hs.commit,
                "to_replay": hs.commit.saturating_sub(p.applied_index),
            })
        }
        Err(e) => json!({ "error": driver::error_chain(&e) }),
    };
    let census = |kind, at| match BlockTree::census(kind, current.volume_id, &*dev, at) {
        Ok((nodes, entries)) => json!({ "nodes": nodes, "entries": entries }),
        Err(e) => json!({ "error": driver::error_chain(&e) }),
    };
    Ok(Report(json!({
        "volume_id": hex(&current.volume_id),
        "volume_bytes": g.volume_blocks * BLOCK,
        "geometry": {
            "roots_on_main": g.roots_on_main, "main_blocks": g.main_blocks, "log_start": g.log_start,
            "log_blocks": g.log_blocks, "data_start": g.data_start, "data_blocks": g.data_blocks,
        },
        "roots": slots,
        "current": {
            "slot": current.slot, "generation": current.generation, "applied_index": p.applied_index,
            "applied_term": p.applied_term, "log_tail": p.log_tail, "log_head": p.log_head,
            "used_blocks": p.used_blocks, "free_blocks": g.data_blocks.saturating_sub(p.used_blocks),
        },
        "log": log,
        "block_map": census(TreeKind::BlockMap, tree_ref(&current)),
        "allocator": census(TreeKind::Allocator, alloc_ref(&current)),
    })))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.0).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let v = &self.0;
        let mut out = String::new();
        let mib = |x: &Value| x.as_u64().unwrap_or(0) >> 20;
        out.push_str(&format!("volume {}  {} MiB\n", v["volume_id"].as_str().unwrap_or("?"), mib(&v["volume_bytes"])));
        let g = &v["geometry"];
        out.push_str(&format!(
            "regions: roots {}, log blocks {}..+{}, data blocks {}..+{}\n",
            if g["roots_on_main"].as_bool().unwrap_or(true) { "on the image" } else { "on a separate device" },
            g["log_start"],
            g["log_blocks"],
            g["data_start"],
            g["data_blocks"]
        ));
        out.push_str("roots:\n");
        for s in v["roots"].as_array().into_iter().flatten() {
            match s.get("problem") {
                Some(problem) => {
                    out.push_str(&format!("  slot {}: damaged ({})\n", s["slot"], problem.as_str().unwrap_or("")))
                }
                None => out.push_str(&format!(
                    "  slot {}: {:9} generation {} version {} applied {} (term {})\n",
                    s["slot"],
                    s["role"].as_str().unwrap_or(""),
                    s["generation"],
                    s["version"].as_str().unwrap_or(""),
                    s["applied_index"],
                    s["applied_term"]
                )),
            }
        }
        let c = &v["current"];
        out.push_str(&format!(
            "space: {} blocks used, {} free of {}\n",
            c["used_blocks"], c["free_blocks"], g["data_blocks"]
        ));
        let l = &v["log"];
        match l.get("error") {
            Some(e) => out.push_str(&format!("log: {}\n", e.as_str().unwrap_or(""))),
            None => out.push_str(&format!(
                "log: {} of {} blocks in use, entries {}..={}, commit {}, term {}, {} to replay\n",
                l["in_use_blocks"],
                l["blocks"],
                l["first_index"],
                l["last_index"],
                l["commit"],
                l["term"],
                l["to_replay"]
            )),
        }
        for (name, key) in [("block map", "block_map"), ("allocator", "allocator")] {
            let t = &v[key];
            match t.get("error") {
                Some(e) => out.push_str(&format!("{name}: {}\n", e.as_str().unwrap_or(""))),
                None => out.push_str(&format!("{name}: {} nodes, {} entries\n", t["nodes"], t["entries"])),
            }
        }
        out
    }
}
