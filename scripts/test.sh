#!/usr/bin/env bash
# The README's test command: installs what a fresh Debian machine lacks, then runs the format
# check, clippy and the whole test suite. Long runs are opt-in:
#   RBLK_SIM_SEEDS=N    seeded random runs per simulation suite; RBLK_SIM_SEED=S replays one
#   RBLK_POWERCUT_CUTS=N  power cuts per power-cut test; RBLK_POWERCUT_SEED=S replays one
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

# Debian packages the build and tests need: command=package.
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
need protoc=protobuf-compiler `# raft-proto is generated with prost at build time` \
  strace=strace                `# the sandboxed driver's system calls (no poll or fstat)` \
  losetup=mount                `# the FileDevice test on a real loop device` \
  qemu-io=qemu-utils           `# real NBD clients: qemu-io, qemu-img, qemu-storage-daemon` \
  nbdinfo=libnbd-bin           `# nbdinfo, nbdcopy` \
  nbdfuse=nbdfuse              `# the export as a file, for mkfs.ext4 and e2fsck` \
  fio=fio                      `# fio's nbd engine with verify` \
  nbdkit=nbdkit                `# a peer to compare with in benchmarks` \
  mkfs.ext4=e2fsprogs \
  certtool=gnutls-bin          `# X.509 certificates for the TLS tests` \
  script=bsdutils              `# a terminal for the progress-bar test` \
  systemd-socket-activate=systemd `# socket activation; systemd-analyze verify of the units` \
  fusermount3=fuse3            `# lazyfs (FUSE, no libfuse needed) under the power-cut test` \
  curl=curl                    `# scrapes /metrics and /status` \
  promtool=prometheus          `# promtool check metrics: the exposition is valid`

# Every real-client test must run, not skip, once its tools are here.
export RBLK_REQUIRE_CLIENTS=1

# As root with loop devices available, the real-block-device test must run, not skip.
if [[ $(id -u) -eq 0 ]] && command -v losetup >/dev/null 2>&1 && losetup -f >/dev/null 2>&1; then
  export RBLK_REQUIRE_LOOP=1
fi

# What the checkout holds before the tests, ignored files included (a stray rblk.img is
# ignored by .gitignore but still a leak); the build directory is the one thing allowed to grow.
tree_state() {
  git status --porcelain --ignored --untracked-files=all -- . ':!target' 2>/dev/null || true
}
in_git=false
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  in_git=true
  before=$(tree_state)
fi

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p run --features failpoints --all-targets -- -D warnings
# The driver builds for aarch64 too (its seccomp list names only calls aarch64 has): checked
# when that Rust target is installed (`rustup target add aarch64-unknown-linux-gnu`); blake3
# and ring compile C for it.
if rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  need aarch64-linux-gnu-gcc=gcc-aarch64-linux-gnu
  say "cargo check --target aarch64-unknown-linux-gnu"
  cargo check -p driver -p run --target aarch64-unknown-linux-gnu
else
  say "skipped: the aarch64 check (rustup target add aarch64-unknown-linux-gnu enables it)"
fi
# A real guest (Debian's QEMU, kernel and busybox, unpacked into target/guest once; nothing
# installed) for run/tests/guest.rs.
say "preparing the test guest (scripts/guest.sh)"
RBLK_GUEST_DIR=$(scripts/guest.sh) || { echo "scripts/guest.sh could not prepare the test guest" >&2; exit 1; }
export RBLK_GUEST_DIR
say "cargo test"
cargo test --workspace
# The default build has no failpoints (it ignores FAILPOINTS); the chaos scenarios crash the
# driver at them, so they run against a build made with the feature (the same target dir,
# its own fingerprints), and so do the build checks that expect failpoints.
say "cargo test --features failpoints (chaos scenarios)"
cargo test -p run --features failpoints --test chaos --test portability
if $in_git; then
  # Tests write only into temp dirs: anything new or changed in the checkout is a test that
  # wrote into the source tree (a fio verify state file was once committed that way).
  say "the tests left the checkout as they found it"
  after=$(tree_state)
  if [[ "$after" != "$before" ]]; then
    echo "the test run changed the checkout:" >&2
    diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") >&2 || true
    exit 1
  fi
fi
say "all tests passed"
