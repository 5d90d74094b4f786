//! Every fault-injection scenario in `run/scenarios/` through `rblk chaos`: random SIGKILLs,
//! kills at named failpoints, a hung driver, a crash loop, and the CI run (at least 30
//! deaths, every failpoint). Each runs for the (short) duration its file gives;
//! `RBLK_CHAOS_SECS=N` runs each for N seconds instead (a long run: `RBLK_CHAOS_SECS=600`
//! gives well over 1000 kills), `RBLK_CHAOS_SEED=S` fixes the seed (a failing run prints its
//! seed and keeps its directory). The driver needs failpoints: a default build has none, so
//! this runs only with `--features failpoints` (`scripts/test.sh` runs it so).

use std::process::Command;

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "the scenarios crash the driver at failpoints: run with --features failpoints (scripts/test.sh does)"
)]
fn every_scenario_passes() {
    let secs: Option<u64> = std::env::var("RBLK_CHAOS_SECS").ok().and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("RBLK_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut scenarios: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenarios")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    scenarios.sort();
    assert!(scenarios.len() >= 5, "scenarios: {scenarios:?}");
    for scenario in scenarios {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rblk"));
        cmd.arg("chaos").arg(&scenario).args(["--seed", &seed.to_string()]);
        if let Some(secs) = secs {
            cmd.args(["--duration", &format!("{secs}s")]);
        }
        let out = cmd.env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver")).output().expect("rblk chaos");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("passed"),
            "{} failed (seed {seed}):\n{stdout}\n{}",
            scenario.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", stdout.trim());
    }
}
