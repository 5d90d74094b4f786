#!/usr/bin/env bash
# The benchmark (not a test): rblk (through its supervisor, as users run it) against nbdkit's
# file plugin, qemu-nbd (raw, cache=none, aio=native) and the device limit (fio io_uring,
# direct I/O), with fio's nbd engine as the one client. Writes bench-results/results.md, .json
# and .png (gnuplot). Options go to scripts/bench.py (--rounds, --runtime, --size, --targets).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
need protoc=protobuf-compiler fio=fio nbdkit=nbdkit qemu-nbd=qemu-utils gnuplot=gnuplot-nox
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p run
exec python3 "$root/scripts/bench.py" --rblk "$root/target/release/rblk" "$@"
