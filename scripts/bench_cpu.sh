#!/usr/bin/env bash
# Driver CPU per byte (not a test): serves a fresh 1 GiB volume with `rblk serve`, runs fio's
# nbd engine (1 MiB sequential writes QD4, then 4 KiB random writes QD32, then 1 MiB sequential
# reads QD4 of what they wrote, RUNTIME seconds each), and reads the driver's user+system CPU
# time from /proc before and after each job. Prints a table: throughput, driver CPU seconds per
# GB written (or read), and microseconds per request.
# CPU time is steadier than throughput on a noisy machine; compare builds within one run:
#   RBLK=path/to/other/rblk scripts/bench_cpu.sh
# Options: ROUNDS (default 3), RUNTIME (default 8).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"
need protoc=protobuf-compiler fio=fio
if [ -z "${RBLK:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p run
  RBLK="${CARGO_TARGET_DIR:-$root/target}/release/rblk"
fi
rounds="${ROUNDS:-3}"
runtime="${RUNTIME:-8}"
work="$(mktemp -d "${TMPDIR:-/var/tmp}/rblk-cpu-XXXXXX")"
trap 'rm -rf "$work"' EXIT
tick="$(getconf CLK_TCK)"
echo "| round | job | MB/s | driver CPU s/GB | driver CPU µs/request |"
echo "|---|---|---:|---:|---:|"
for round in $(seq "$rounds"); do
  rm -f "$work/img" "$work/sock"
  "$RBLK" serve "$work/img" --socket "$work/sock" --size 1G >"$work/out" 2>"$work/log" &
  serve=$!
  for _ in $(seq 100); do [ -S "$work/sock" ] && break; sleep 0.1; done
  sleep 0.5
  driver="$(pgrep -P "$serve" | head -1)"
  for job in "--rw=write --bs=1m --iodepth=4" "--rw=randwrite --bs=4k --iodepth=32" "--rw=read --bs=1m --iodepth=4"; do
    before="$(awk '{print $14 + $15}' "/proc/$driver/stat")"
    # shellcheck disable=SC2086
    fio --output-format=json --ioengine=nbd --uri="nbd+unix:///?socket=$work/sock" --runtime="$runtime" \
      --time_based --randrepeat=0 --size=1g --name=cpu $job >"$work/fio.json" 2>/dev/null
    after="$(awk '{print $14 + $15}' "/proc/$driver/stat")"
    python3 - "$work/fio.json" "$job" "$((after - before))" "$tick" "$round" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
w = job["read"] if "--rw=read" in sys.argv[2] else job["write"]
cpu = int(sys.argv[3]) / int(sys.argv[4])
print(f"| {sys.argv[5]} | {sys.argv[2]} | {w['bw_bytes'] / 1e6:.1f} | {cpu / (w['io_bytes'] / 1e9):.2f} | "
      f"{cpu * 1e6 / w['total_ios']:.1f} |")
PY
  done
  kill "$serve"
  wait "$serve" || true
done
