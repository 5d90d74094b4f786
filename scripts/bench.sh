#!/usr/bin/env bash
# The benchmark (not a test): rblk (through its supervisor, as users run it) against nbdkit's
# file plugin, qemu-nbd (raw, cache=none, aio=native) and the device limit (fio io_uring,
# direct I/O), with fio's nbd engine as the one client. Jobs: 4K random writes on a fresh thin
# image, then, once the image is filled, 4K random and 1M sequential reads and writes, fsync and
# flush patterns, and a light QD1 fsync client beside a 1M write flood (its p99 is the fairness
# number). Writes bench-results/results.md, .json and .png (gnuplot: a panel per job, throughput
# above p99). Options go to scripts/bench.py (--rounds, --runtime, --size, --targets).
# VHOST=1 then runs scripts/bench_vhost.sh with its defaults (about ten minutes of QEMU guests:
# rblk's vhost-user-blk session against qemu-storage-daemon's and against its own NBD path).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
need protoc=protobuf-compiler fio=fio nbdkit=nbdkit qemu-nbd=qemu-utils gnuplot=gnuplot-nox
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p run
python3 "$root/scripts/bench.py" --rblk "${CARGO_TARGET_DIR:-$root/target}/release/rblk" "$@"
if [[ "${VHOST:-0}" == 1 ]]; then
  exec "$root/scripts/bench_vhost.sh"
fi
