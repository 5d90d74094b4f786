#!/usr/bin/env bash
# The vhost-user-blk benchmark (not a test): inside a small Linux guest under QEMU (TCG), fio
# with direct I/O on the guest's disk served by rblk's vhost-user-blk session, by
# qemu-storage-daemon's vhost-user-blk export of a raw file (cache.direct=on), and by rblk's NBD
# path through QEMU's NBD client; and the same jobs from the host through fio's nbd engine.
# Interleaved rounds; writes bench-results/vhost.md and .json. Run as root (the driver drops
# to nobody). The guest kit comes from scripts/guest.sh (downloaded once into target/guest).
# Options go to scripts/bench_vhost.py (--rounds, --runtime, --region, --targets).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
need protoc=protobuf-compiler fio=fio qemu-storage-daemon=qemu-utils
guest="$("$root/scripts/guest.sh")"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p run
exec python3 "$root/scripts/bench_vhost.py" --rblk "${CARGO_TARGET_DIR:-$root/target}/release/rblk" --guest "$guest" "$@"
