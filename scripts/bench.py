#!/usr/bin/env python3
"""rblk against nbdkit's file plugin, qemu-nbd and the device limit, with the same client.

Every target serves (or is) a fresh, thin image of the same size; fio runs the same jobs
against each; targets are interleaved and the whole round repeated, and the table shows
medians. Not a test: machines are noisy, so compare the ratios within one run.

Each job says which image it needs. "fresh" jobs run right after the server starts, on an
image never written (a thin volume's first writes, what a new user meets first); then the
whole image is written once (fill) and the "filled" jobs run, so reads read data.

"light 4K QD1 beside flood" measures fairness: one fio run, two jobs on their own
connections. `flood` is three writers of 1 MiB sequential writes QD32, each over its own
stripe of the first 90% of the image; `light` is 4 KiB random writes QD1, fsync after each,
over the last 5%. Its row reports the light job (IOPS, p99); the flood's total MB/s is in the
json and under the table. The light client may finish only a few writes per second, so in
short runs its p99 is close to its slowest write.

Table: per target IOPS / MB/s / p99 µs (p99 of completion latency; for jobs that fsync, the
larger of the write's and the flush's). "rblk / nbdkit" and "rblk / best peer" divide rblk's
throughput by nbdkit's and by the better of nbdkit and qemu-nbd: above 1 is better. For the
fairness job they divide p99 latencies instead and say so ("p99 0.50×": below 1 is better),
since the light client's waiting is what that job is about.

Chart (gnuplot, when installed): one panel per job with its own y axis, MB/s for the 1 MiB
jobs and IOPS for the rest, and under it a panel with each target's p99 in ms.

    scripts/bench.sh [--rounds 3] [--runtime 10] [--size 1G] [--out bench-results]
"""

import argparse
import collections
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["rblk", "nbdkit", "qemu-nbd", "device"]
PEERS = ["nbdkit", "qemu-nbd"]
UNITS = {"K": 10, "M": 20, "G": 30, "T": 40}

# name: the row in the table; image: "fresh" or "filled"; unit: "IOPS" or "MB/s", what the
# chart shows; opts: fio's options after the global ones (each --name starts a job; a job
# named "flood" is load beside the measured job, not measured itself).
Job = collections.namedtuple("Job", "name image unit opts")


def jobs(size):
    """The job list for an image of `size` bytes (offsets and sizes in MiB, as fio reads them)."""
    mib = size >> 20
    tail = mib // 20  # the light client's 5% at the end
    stripe = mib * 3 // 10  # each of the three flood writers: 30%, together the first 90%
    return [
        Job("randwrite 4K QD32 fresh", "fresh", "IOPS",
            ["--name=bench", "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={mib // 2}m"]),
        Job("randwrite 4K QD32", "filled", "IOPS", ["--name=bench", "--rw=randwrite", "--bs=4k", "--iodepth=32"]),
        Job("randread 4K QD32", "filled", "IOPS", ["--name=bench", "--rw=randread", "--bs=4k", "--iodepth=32"]),
        Job("randwrite 4K QD1 fsync each", "filled", "IOPS",
            ["--name=bench", "--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]),
        Job("randwrite 4K QD32 flush/32", "filled", "IOPS",
            ["--name=bench", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"]),
        Job("write 1M QD4", "filled", "MB/s", ["--name=bench", "--rw=write", "--bs=1m", "--iodepth=4"]),
        Job("read 1M QD4", "filled", "MB/s", ["--name=bench", "--rw=read", "--bs=1m", "--iodepth=4"]),
        Job("light 4K QD1 beside flood", "filled", "IOPS",
            ["--name=flood", "--rw=write", "--bs=1m", "--iodepth=32", "--numjobs=3",
             f"--size={stripe}m", f"--offset_increment={stripe}m",
             "--name=light", "--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1",
             f"--offset={mib - tail}m", f"--size={tail}m"]),
    ]


def parse_size(s):
    """`1G` -> 2^30, binary units as rblk and truncate read them."""
    s = s.strip().upper().removesuffix("IB")
    return int(s[:-1]) << UNITS[s[-1]] if s[-1] in UNITS else int(s)


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


def engine(target, image, socket):
    """fio's options to reach the target: its NBD socket, or the image file itself."""
    if target == "device":
        return ["--ioengine=io_uring", "--direct=1", f"--filename={image}"]
    return ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={socket}"]


def p99_us(lat):
    """The 99th percentile of one of fio's latency records, in µs (0 when there is none)."""
    return lat.get("percentile", {}).get("99.000000", 0) / 1000.0


def fio(target, image, socket, job, runtime, size):
    # Options before the first --name are global, so every job of the run gets them.
    cmd = ["fio", "--output-format=json", f"--runtime={runtime}", "--time_based", "--randrepeat=0",
           f"--size={size}"] + engine(target, image, socket) + job.opts
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    data = json.loads(out[out.index("{"):])  # the nbd engine prints "connected" lines first
    # Without --group_reporting there is one entry per job (and per clone of numjobs).
    (j,) = [j for j in data["jobs"] if j["jobname"] != "flood"]
    s = j["read"] if j["read"]["io_bytes"] else j["write"]
    # A job that fsyncs waits for the flush too: its p99 is the larger of the two.
    r = {"iops": s["iops"], "mbs": s["bw_bytes"] / 1e6, "p99_us": max(p99_us(s["clat_ns"]), p99_us(j["sync"]["lat_ns"]))}
    flood = [f for f in data["jobs"] if f["jobname"] == "flood"]
    if flood:
        r["flood_mbs"] = sum(f["write"]["bw_bytes"] for f in flood) / 1e6
    return r


def fill(target, image, socket, size):
    """Writes the whole image once, so reads read data (and rblk maps every block)."""
    cmd = ["fio", "--name=fill", "--rw=write", "--bs=1m", "--iodepth=4", f"--size={size}", "--output-format=json"]
    subprocess.run(cmd + engine(target, image, socket), check=True, capture_output=True)


def warm(image):
    """Reads the image file once, so a read job starts with it in the page cache for every target
    alike (the machines this runs on reclaim idle page cache within seconds, and a job that
    found some of it gone measured the disk instead of the server). qemu-nbd (cache=none) and
    the device job (direct I/O) do not use the page cache."""
    with open(image, "rb") as f:
        while f.read(8 << 20):
            pass


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
    size = parse_size(args.size)
    job_list = jobs(size)
    work = tempfile.mkdtemp(prefix="rblk-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    results = {t: {j.name: [] for j in job_list} for t in targets}
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
                    for image_state in ("fresh", "filled"):
                        if image_state == "filled":
                            fill(target, image, socket, size)
                        for job in (j for j in job_list if j.image == image_state):
                            if "--rw=read" in job.opts or "--rw=randread" in job.opts:
                                warm(image)
                            r = fio(target, image, socket, job, args.runtime, size)
                            results[target][job.name].append(r)
                            flood = f" (flood {r['flood_mbs']:.0f} MB/s)" if "flood_mbs" in r else ""
                            print(f"round {rnd + 1} {target:9} {job.name:30} {r['iops']:10.0f} IOPS {r['mbs']:8.1f} MB/s "
                                  f"p99 {r['p99_us']:8.0f} us{flood}", flush=True)
                finally:
                    server.stop()
                for p in (image, socket):
                    if os.path.exists(p):
                        os.remove(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    med = {t: {j: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for j, rs in runs.items() if rs} for t, runs in results.items()}
    table = report(med, targets, job_list)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Medians of {args.rounds} interleaved rounds, {args.runtime} s per job, {args.size} image.\n\n")
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    chart(med, targets, job_list, args.out)
    print()
    print(table)


def ratio(med, job, peers):
    """rblk against the best of `peers`: throughput (higher is better), or p99 for the fairness job."""
    mine = med.get("rblk", {}).get(job.name)
    theirs = [med[p][job.name] for p in peers if med.get(p, {}).get(job.name)]
    if not mine or not theirs:
        return "—"
    if "flood_mbs" in mine:
        best = min(m["p99_us"] for m in theirs)
        return f"p99 {mine['p99_us'] / best:.2f}×" if best else "—"
    best = max(m["iops"] for m in theirs)
    return f"{mine['iops'] / best:.2f}×" if best else "—"


def report(med, targets, job_list):
    lines = ["| job | " + " | ".join(f"{t} IOPS / MB/s / p99 µs" for t in targets) + " | rblk / nbdkit | rblk / best peer |",
             "|---|" + "---|" * len(targets) + "---|---|"]
    for job in job_list:
        cells = []
        for t in targets:
            m = med[t].get(job.name)
            cells.append(f"{m['iops']:.0f} / {m['mbs']:.1f} / {m['p99_us']:.0f}" if m else "—")
        lines.append(f"| {job.name} | " + " | ".join(cells) + f" | {ratio(med, job, ['nbdkit'])} | {ratio(med, job, PEERS)} |")
    lines.append("")
    lines.append("Ratios divide throughput (above 1× rblk is faster), except for the fairness job, where they "
                 "divide the light client's p99 (below 1× rblk makes it wait less).")
    for job in job_list:
        floods = [f"{t} {med[t][job.name]['flood_mbs']:.0f}" for t in targets if "flood_mbs" in med[t].get(job.name, {})]
        if floods:
            lines.append(f"The flood beside \"{job.name}\", MB/s: " + ", ".join(floods) + ".")
    return "\n".join(lines)


def chart(med, targets, job_list, out):
    """One panel per job, throughput above and p99 in ms below (gnuplot, when installed)."""
    if shutil.which("gnuplot") is None:
        print("gnuplot not installed: no chart", file=sys.stderr)
        return
    # One data block per job (gnuplot's `index`): target, throughput, p99 ms.
    with open(os.path.join(out, "results.dat"), "w") as f:
        for job in job_list:
            f.write(f"# {job.name}\n")
            for t in targets:
                m = med[t].get(job.name, {})
                f.write(f'"{t}" {m.get("mbs" if job.unit == "MB/s" else "iops", 0)} {m.get("p99_us", 0) / 1000}\n')
            f.write("\n\n")
    cols = 4
    blocks = math.ceil(len(job_list) / cols)
    # Bars coloured by target (the same colour in every panel), values written above them.
    bars = "'results.dat' index {i} using 0:{c}:($0+1):xtic(1) with boxes lc variable notitle, " \
           "'' index {i} using 0:{c}:(sprintf('%.{d}f', ${c})) with labels offset 0,0.6 font ',8' notitle"
    lines = ["set terminal pngcairo size 1600,1000 font ',9'", "set output 'results.png'",
             f"set multiplot layout {2 * blocks},{cols} title 'rblk benchmark (medians)'",
             "set style fill solid 0.8", "set boxwidth 0.7", "set grid ytics",
             f"set xrange [-0.5:{len(targets) - 0.5}]", "set yrange [0:*]", "set offsets 0,0,graph 0.15,0"]
    for b in range(blocks):
        row = list(enumerate(job_list))[b * cols:(b + 1) * cols]
        for i, job in row:
            lines += [f"set title '{job.name}'", f"set ylabel '{job.unit}'",
                      "plot " + bars.format(i=i, c=2, d=0 if job.unit == "IOPS" else 1)]
        lines += ["set multiplot next"] * (cols - len(row))
        for i, job in row:
            lines += [f"set title '{job.name}: p99'", "set ylabel 'ms'", "plot " + bars.format(i=i, c=3, d=2)]
        lines += ["set multiplot next"] * (cols - len(row))
    lines.append("unset multiplot")
    with open(os.path.join(out, "results.gp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    subprocess.run(["gnuplot", "results.gp"], cwd=out, check=True)


if __name__ == "__main__":
    main()
