//! Every fault-injection scenario in `run/scenarios/` through `rblk chaos`: random SIGKILLs,
//! kills at named failpoints, a hung driver, a crash loop. Short seeded runs by default;
//! `RBLK_CHAOS_SECS=N` runs each for N seconds, `RBLK_CHAOS_SEED=S` fixes the seed (a failing
//! run prints its seed and keeps its directory).

use std::process::Command;

#[test]
fn every_scenario_passes() {
    let secs: u64 = std::env::var("RBLK_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let seed: u64 = std::env::var("RBLK_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut scenarios: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenarios")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    scenarios.sort();
    assert!(scenarios.len() >= 4, "scenarios: {scenarios:?}");
    for scenario in scenarios {
        let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
            .arg("chaos")
            .arg(&scenario)
            .args(["--seed", &seed.to_string(), "--duration", &format!("{secs}s")])
            .env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"))
            .output()
            .expect("rblk chaos");
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
