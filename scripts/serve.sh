#!/usr/bin/env bash
# Serves a volume: installs what a fresh Debian machine lacks to build rblk, builds it, and
# runs `rblk serve` with the arguments given. Without arguments it serves ./rblk.img
# (formatted with 1 GiB when missing) on ./rblk.sock and prints the NBD URI to attach.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
need protoc=protobuf-compiler
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin rblk --bin rblk-driver
exec "$root/target/release/rblk" serve "$@"
