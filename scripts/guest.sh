#!/usr/bin/env bash
# Prepares what the real-guest tests boot, once, into a cache directory (default
# target/guest): Debian's QEMU system emulator and the packages it needs that the machine
# lacks, unpacked with dpkg -x (installing bookworm's qemu-system-x86 would replace the
# newer qemu-utils the machines carry), Debian's cloud kernel with its virtio modules, and a
# static busybox. Nothing is installed. Prints the directory; run/tests/guest.rs reads it
# from RBLK_GUEST_DIR.
#
#   DIR/qemu-system-x86_64   a wrapper that runs the unpacked emulator (TCG)
#   DIR/vmlinuz              the kernel
#   DIR/modules/*.ko         virtio_ring … virtio_blk, in load order (DIR/modules/order)
#   DIR/busybox              static busybox for the initramfs
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-${CARGO_TARGET_DIR:-$root_dir/target}/guest}"
if [[ -x "$dir/qemu-system-x86_64" && -f "$dir/vmlinuz" && -f "$dir/modules/order" && -x "$dir/busybox" ]]; then
  echo "$dir"
  exit 0
fi
command -v apt-get >/dev/null || { echo "guest.sh: needs apt-get (Debian) to fetch QEMU and a kernel" >&2; exit 1; }
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp/debs" "$dir.tmp/root" "$dir.tmp/modules"
cd "$dir.tmp/debs"

# Package lists may be missing on a fresh machine (nothing else needed apt yet).
if ! apt-cache show qemu-system-x86 >/dev/null 2>&1; then
  apt-get update -qq >&2
fi
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# The emulator and whatever of its dependencies (two levels) the machine does not have.
want=(qemu-system-x86 busybox-static)
kernel=$(apt-cache depends linux-image-cloud-amd64 | awk '/ Depends: linux-image-[0-9]/{print $2; exit}')
[[ -n "$kernel" ]] || { echo "guest.sh: no linux-image-cloud-amd64 dependency found" >&2; exit 1; }
want+=("$kernel")
level=(qemu-system-x86)
for _ in 1 2; do
  next=()
  for p in "${level[@]}"; do
    while read -r dep; do
      [[ -z "$dep" || "$dep" == \<* ]] && continue
      if ! installed "$dep" && [[ ! " ${want[*]} " == *" $dep "* ]]; then
        want+=("$dep")
        next+=("$dep")
      fi
    done < <(apt-cache depends "$p" | awk '/ Depends:/{print $2}')
  done
  level=("${next[@]}")
  [[ ${#level[@]} -gt 0 ]] || break
done
apt-get download "${want[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true
for deb in ./*.deb; do dpkg -x "$deb" "$dir.tmp/root"; done

r="$dir.tmp/root"
cp "$r"/boot/vmlinuz-* "$dir.tmp/vmlinuz"
cp "$r/bin/busybox" "$dir.tmp/busybox"
mods=$(echo "$r"/lib/modules/*/kernel/drivers)
: >"$dir.tmp/modules/order"
for m in virtio/virtio_ring virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev virtio/virtio \
  virtio/virtio_pci block/virtio_blk; do
  cp "$mods/$m.ko" "$dir.tmp/modules/"
  basename "$m" >>"$dir.tmp/modules/order"
done
cat >"$dir.tmp/qemu-system-x86_64" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
r="$here/root"
export LD_LIBRARY_PATH="$r/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QEMU_MODULE_DIR="$r/usr/lib/x86_64-linux-gnu/qemu"
exec "$r/usr/bin/qemu-system-x86_64" -L "$r/usr/share/qemu" -L "$r/usr/share/seabios" "$@"
EOF
chmod +x "$dir.tmp/qemu-system-x86_64"
cd /
# The kernel and busybox were copied out; their unpacked trees are not needed.
rm -rf "$dir.tmp/debs" "$r/boot" "$r/lib/modules" "$r/usr/share/doc"
# It must run here, or the tests would fail for a reason that is not rblk's.
if ! "$dir.tmp/qemu-system-x86_64" --version >/dev/null; then
  echo "guest.sh: the unpacked QEMU does not run:" >&2
  "$dir.tmp/qemu-system-x86_64" --version >&2 || true
  exit 1
fi
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir"
