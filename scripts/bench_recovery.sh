#!/usr/bin/env bash
# Restart and memory benchmark (not a test): SIGKILLs the driver behind `rblk serve` with 0..256
# MiB of unapplied log and times the first request served after it, the driver's replay and its
# throughput; and reads the driver's resident memory idle and under 4 KiB random writes for a
# 1 GiB and a 1 TiB volume. Writes bench-results/recovery.md and .json. Options go to
# scripts/bench_recovery.py (--rounds, --sizes, --workloads, --volumes, --parts, --quick).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
need protoc=protobuf-compiler fio=fio
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p run
exec python3 "$root/scripts/bench_recovery.py" --rblk "$root/target/release/rblk" "$@"
