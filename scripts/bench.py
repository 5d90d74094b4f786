#!/usr/bin/env python3
"""rblk against nbdkit's file plugin, qemu-nbd and the device limit, with the same client.

Every target serves (or is) a fresh image of the same size; fio runs the same job sequence
against each; targets are interleaved and the whole round repeated, and the table shows
medians. Not a test: machines are noisy, so compare the ratios within one run.

    scripts/bench.sh [--rounds 3] [--runtime 10] [--size 1G] [--out bench-results]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

JOBS = [
    # name, fio options
    ("randwrite 4K QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("randread 4K QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("randwrite 4K QD1 fsync each", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]),
    ("randwrite 4K QD32 flush/32", ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"]),
    ("write 1M QD4", ["--rw=write", "--bs=1m", "--iodepth=4"]),
    ("read 1M QD4", ["--rw=read", "--bs=1m", "--iodepth=4"]),
]
TARGETS = ["rblk", "nbdkit", "qemu-nbd", "device"]


def wait_socket(path, proc, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"no socket at {path}")


class Server:
    def __init__(self, target, image, socket, rblk, size):
        self.proc = None
        self.target = target
        if target == "rblk":
            cmd = [rblk, "serve", image, "--socket", socket, "--size", size]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.proc.stdout.readline()  # the URI: socket bound
            time.sleep(0.3)  # recovery and election
        elif target == "nbdkit":
            cmd = ["nbdkit", "--foreground", "--unix", socket, "file", image]
            self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            wait_socket(socket, self.proc)
        elif target == "qemu-nbd":
            cmd = ["qemu-nbd", "-k", socket, "-f", "raw", "--cache=none", "--aio=native", "--shared=8", "--persistent", image]
            self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            wait_socket(socket, self.proc)

    def stop(self):
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fio(target, image, socket, job, runtime, size):
    name, opts = job
    base = ["fio", "--name=bench", "--output-format=json", f"--runtime={runtime}", "--time_based",
            "--group_reporting", "--randrepeat=0", f"--size={size}"]
    if target == "device":
        base += ["--ioengine=io_uring", "--direct=1", f"--filename={image}"]
    else:
        base += ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={socket}"]
    out = subprocess.run(base + opts, check=True, capture_output=True, text=True).stdout
    data = json.loads(out[out.index("{"):])
    j = data["jobs"][0]
    side = "read" if "read" in name and "write" not in name else "write"
    s = j[side]
    p99 = s.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000.0
    if "fsync" in name or "flush" in name:
        sync = j.get("sync", {})
        p99 = max(p99, sync.get("lat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000.0)
    return {"iops": s["iops"], "mbs": s["bw_bytes"] / 1e6, "p99_us": p99}


def fill(target, image, socket, size):
    """Writes the whole image once, so reads read data (and rblk maps every block)."""
    base = ["fio", "--name=fill", "--rw=write", "--bs=1m", "--iodepth=4", f"--size={size}", "--output-format=json"]
    if target == "device":
        base += ["--ioengine=io_uring", "--direct=1", f"--filename={image}"]
    else:
        base += ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={socket}"]
    subprocess.run(base, check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--rblk", required=True)
    ap.add_argument("--targets", default=",".join(TARGETS))
    args = ap.parse_args()
    targets = args.targets.split(",")
    work = tempfile.mkdtemp(prefix="rblk-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    results = {t: {j[0]: [] for j in JOBS} for t in targets}
    try:
        for rnd in range(args.rounds):
            for target in targets:
                image = os.path.join(work, f"{target}.img")
                socket = os.path.join(work, f"{target}.sock")
                for p in (image, socket):
                    if os.path.exists(p):
                        os.remove(p)
                if target != "rblk":
                    subprocess.run(["truncate", "-s", args.size, image], check=True)
                server = Server(target, image, socket, args.rblk, args.size)
                try:
                    fill(target, image, socket, args.size)
                    for job in JOBS:
                        r = fio(target, image, socket, job, args.runtime, args.size)
                        results[target][job[0]].append(r)
                        print(f"round {rnd + 1} {target:9} {job[0]:30} {r['iops']:10.0f} IOPS {r['mbs']:8.1f} MB/s "
                              f"p99 {r['p99_us']:8.0f} us", flush=True)
                finally:
                    server.stop()
                for p in (image, socket):
                    if os.path.exists(p):
                        os.remove(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    med = {t: {j: {k: statistics.median(r[k] for r in rs) for k in ("iops", "mbs", "p99_us")}
               for j, rs in jobs.items() if rs} for t, jobs in results.items()}
    lines = ["| job | " + " | ".join(f"{t} IOPS / MB/s / p99 µs" for t in targets) + " | rblk / nbdkit |",
             "|---|" + "---|" * len(targets) + "---|"]
    for job, _ in JOBS:
        cells = []
        for t in targets:
            m = med[t].get(job)
            cells.append(f"{m['iops']:.0f} / {m['mbs']:.1f} / {m['p99_us']:.0f}" if m else "—")
        ratio = "—"
        if "rblk" in med and "nbdkit" in med and med["nbdkit"].get(job) and med["rblk"].get(job):
            ratio = f"{med['rblk'][job]['iops'] / med['nbdkit'][job]['iops']:.2f}×"
        lines.append(f"| {job} | " + " | ".join(cells) + f" | {ratio} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Medians of {args.rounds} interleaved rounds, {args.runtime} s per job, {args.size} image.\n\n")
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    chart(med, targets, args.out)
    print()
    print(table)


def chart(med, targets, out):
    """A bar chart of IOPS per job and target (gnuplot, when installed)."""
    if shutil.which("gnuplot") is None:
        print("gnuplot not installed: no chart", file=sys.stderr)
        return
    dat = os.path.join(out, "results.dat")
    with open(dat, "w") as f:
        for job, _ in JOBS:
            vals = [str(med[t].get(job, {}).get("iops", 0)) for t in targets]
            f.write('"' + job + '" ' + " ".join(vals) + "\n")
    plot = ", ".join(f"'{dat}' using {i + 2}:xtic(1) title '{t}'" for i, t in enumerate(targets))
    script = (f"set terminal png size 1100,500; set output '{os.path.join(out, 'results.png')}';"
              "set style data histograms; set style fill solid 0.8; set ylabel 'IOPS';"
              "set xtics rotate by -20; set key top right; set grid ytics;"
              f"plot {plot}")
    subprocess.run(["gnuplot", "-e", script], check=True)


if __name__ == "__main__":
    main()
