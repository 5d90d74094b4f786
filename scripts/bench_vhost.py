#!/usr/bin/env python3
"""rblk's vhost-user-blk session against qemu-storage-daemon's, and against rblk's NBD path,
seen from inside a small Linux guest (QEMU, TCG: KVM does not work on the development VMs).

Targets, each a fresh 1 GiB volume, interleaved, the whole round repeated:

  rblk-vhost     `rblk serve --vhost-user`: -device vhost-user-blk-pci, two queues
  qsd            qemu-storage-daemon's vhost-user-blk export of a raw file (cache.direct=on,
                 aio=native, or threads where native fails), the same QEMU arguments
  qsd-wt         the same with the export's writethrough=on
  rblk-nbd-vm    `rblk serve` through QEMU's NBD client (-blockdev driver=nbd) under a
                 virtio-blk-pci disk: rblk's own NBD path as a guest sees it
  rblk-nbd-host  `rblk serve` with fio's nbd engine on the host, no guest at all

Every guest is the same: -accel tcg -smp 2 -m 512 with its memory in a shared memfd (which
vhost-user needs, given to every guest so that only the disk differs), the same kernel and an
initramfs holding busybox, the virtio modules and the host's fio with the libraries ldd names.
The guest's /init writes the first REGION of /dev/vda once (the fill, so that reads read
data), runs each job for RUNTIME seconds with libaio and direct I/O, prints each result
between marker lines on its console (ttyS0) and powers off. The host reads the console,
samples the CPU time of QEMU, of the backend's processes, of the kernel's threads and of the
rest of the machine between the markers (so a job's interval includes fio's start in the
guest), and writes bench-results/vhost.md and vhost.json.

Durability differs, and the jobs send no FLUSH. rblk completes a write once it is durable.
qemu-storage-daemon's vhost-user-blk export tells the guest its cache is write-through
(config wce=0), so the guest never sends FLUSH; by default (writethrough=off) it completes a
write once the host's device has it (O_DIRECT: in the device's volatile cache), so such a write
is not durable even after the guest's fsync. With writethrough=on it submits every write with
RWF_DSYNC (QEMU 10, aio=native: seen with strace), durable at completion like rblk's: qsd-wt.

    scripts/bench_vhost.sh [--rounds 2] [--runtime 10] [--region 256M] [--targets ...]
"""

import argparse
import collections
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["rblk-vhost", "qsd", "qsd-wt", "rblk-nbd-vm", "rblk-nbd-host"]
PEERS = ["qsd", "qsd-wt", "rblk-nbd-vm", "rblk-nbd-host"]  # what rblk-vhost is divided by
GUEST_MEM_MIB = 512
SIZE = "1G"

# name: the row in the table; opts: fio's job options (the same in the guest and on the host).
Job = collections.namedtuple("Job", "name opts")
JOBS = [
    Job("write 1M QD4", ["--rw=write", "--bs=1m", "--iodepth=4"]),
    Job("read 1M QD4", ["--rw=read", "--bs=1m", "--iodepth=4"]),
    Job("randwrite 4K QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    Job("randread 4K QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
]
FILL = Job("fill 1M QD4 (fresh volume)", ["--rw=write", "--bs=1m", "--iodepth=4"])

# What the guest prints around each result; the host parses the console with these.
MARK = "RBLK-BENCH"


def fio_args(job, region, runtime):
    """fio's options for one job over the first `region` of the disk; the fill runs once over it."""
    timed = [] if job is FILL else [f"--runtime={runtime}", "--time_based"]
    return ["--name=bench", f"--size={region}", "--randrepeat=0", "--output-format=json"] + timed + job.opts


# ---------------------------------------------------------------------------------------------
# The guest


def guest_init(region, runtime):
    """The guest's /init: load the virtio modules, wait for the disk, run the jobs, power off."""
    jobs = [FILL] + JOBS
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox --install -s /bin",
        "export PATH=/bin:/sbin:/usr/bin",
        "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev",
        f'for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "{MARK}-ERROR insmod $m"; done',
        "i=0; while [ ! -b /dev/vda ]; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done",
        f'echo "{MARK}-DISK $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues, '
        f'cache $(cat /sys/block/vda/queue/write_cache)"',
    ]
    for i, job in enumerate(jobs):
        args = " ".join(["/usr/bin/fio", "--filename=/dev/vda", "--ioengine=libaio", "--direct=1"]
                        + fio_args(job, region, runtime))
        lines += [
            f'echo "{MARK}-START {i}"',
            f'{args} > /tmp/out.json 2> /tmp/err || echo "{MARK}-ERROR fio {i}: $(cat /tmp/err)"',
            f'echo "{MARK}-END {i}"; cat /tmp/out.json; echo "{MARK}-JSON-END {i}"',
        ]
    lines += [
        # Errors the kernel saw (the console prints only critical messages).
        f'dmesg | grep -i -e "error" -e "blk_update_request" -e "hung task" -e "timeout" | sed "s/^/{MARK}-DMESG /"',
        f'echo "{MARK}-DONE"',
        "poweroff -f",
    ]
    return "\n".join(lines) + "\n"


def copy_with_libs(binary, root):
    """Copies `binary` and the libraries ldd names into `root`, at the same paths."""
    ldd = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    for path in [binary] + [w for w in ldd.split() if w.startswith("/")]:
        inside = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        shutil.copy(path, inside)  # follows symlinks: the guest gets the files themselves


def initramfs(guest, work, region, runtime):
    """Packs busybox, the virtio modules, fio with its libraries (about 80 MiB) and /init into
    an uncompressed cpio archive."""
    root = os.path.join(work, "initrd")
    for sub in ["bin", "modules", "proc", "sys", "dev", "tmp"]:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    shutil.copy(os.path.join(guest, "busybox"), os.path.join(root, "bin/busybox"))
    order = open(os.path.join(guest, "modules/order")).read().split()
    for m in order:
        shutil.copy(os.path.join(guest, f"modules/{m}.ko"), os.path.join(root, "modules"))
    with open(os.path.join(root, "modules/order"), "w") as f:
        f.write("\n".join(order) + "\n")
    copy_with_libs(shutil.which("fio"), root)
    init = os.path.join(root, "init")
    with open(init, "w") as f:
        f.write(guest_init(region, runtime))
    os.chmod(init, 0o755)
    out = os.path.join(work, "initrd.cpio")
    with open(out, "wb") as f:
        find = subprocess.Popen(["find", "."], cwd=root, stdout=subprocess.PIPE)
        subprocess.run(["./bin/busybox", "cpio", "-o", "-H", "newc"], cwd=root, stdin=find.stdout, stdout=f,
                       stderr=subprocess.DEVNULL, check=True)
        find.wait()
    return out


def qemu_disk_args(target, socket):
    """QEMU's arguments for the guest's one disk."""
    if target != "rblk-nbd-vm":
        return ["-chardev", f"socket,id=c0,path={socket},reconnect=1",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"]
    return ["-blockdev", f"driver=nbd,node-name=d0,server.type=unix,server.path={socket}",
            "-device", "virtio-blk-pci,drive=d0,num-queues=2"]


def boot(guest, initrd, target, socket, console):
    """Starts QEMU on the target's disk, its serial console written to the file `console`."""
    cmd = [os.path.join(guest, "qemu-system-x86_64"), "-accel", "tcg", "-smp", "2", "-m", str(GUEST_MEM_MIB),
           "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on", "-numa", "node,memdev=mem",
           "-nographic", "-no-reboot", "-kernel", os.path.join(guest, "vmlinuz"), "-initrd", initrd,
           "-append", "console=ttyS0 quiet loglevel=3 panic=-1"] + qemu_disk_args(target, socket)
    with open(console, "wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------------------------------------
# Backends and CPU time


def wait_socket(path, proc, seconds=60):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"no socket at {path}")
        time.sleep(0.05)


class Backend:
    """The process serving the target's volume: `rblk serve` or qemu-storage-daemon."""

    def __init__(self, target, work, args):
        self.image = os.path.join(work, f"{target}.img")
        self.socket = os.path.join(work, f"{target}.sock")
        self.log = os.path.join(work, f"{target}.log")
        self.qsd = args.qsd
        for p in (self.image, self.socket):
            if os.path.exists(p):
                os.remove(p)
        logf = self.logf = open(self.log, "wb")
        if target.startswith("qsd"):
            subprocess.run(["truncate", "-s", SIZE, self.image], check=True)
            for aio in ("native", "threads"):
                cmd = [args.qsd, "--blockdev", f"driver=file,node-name=f,filename={self.image},cache.direct=on,aio={aio}",
                       "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                       f"addr.path={self.socket},writable=on,num-queues=2"
                       + (",writethrough=on" if target == "qsd-wt" else "")]
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf)
                try:
                    wait_socket(self.socket, self.proc)
                    self.aio = aio
                    break
                except RuntimeError:
                    if aio == "threads":
                        raise
        else:
            cmd = [args.rblk, "serve", self.image, "--socket", self.socket, "--size", SIZE]
            if target == "rblk-vhost":
                self.vhost = os.path.join(work, f"{target}.vhost.sock")
                cmd += ["--vhost-user", self.vhost]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf)
            self.proc.stdout.readline()  # the URI: sockets bound
            time.sleep(0.3)  # recovery and election
        self.guest_socket = getattr(self, "vhost", self.socket)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()
        for p in (self.image, self.socket, getattr(self, "vhost", "")):
            if p and os.path.exists(p):
                os.remove(p)

    def complaints(self):
        """What the backend logged above INFO (rblk: WARN, ERRO, CRIT, such as a driver's death;
        qemu-storage-daemon logs only problems)."""
        lines = read(self.log).splitlines()
        if self.proc.args[0] == self.qsd:
            return [f"backend: {line}" for line in lines if line.strip()]
        return [f"backend: {line}" for line in lines if re.search(r" (WARN|ERRO|CRIT) ", line)]


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(roots):
    """{name: {pid: user + system CPU seconds}} of each root pid's process tree."""
    children = collections.defaultdict(list)
    own = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            own[int(entry)] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
            children[int(fields[1])].append(int(entry))
    trees = {}
    for name, root in roots.items():
        tree, todo = {}, [root]
        while todo:
            p = todo.pop()
            if p in own:
                tree[p] = own[p]
            todo += children.get(p, [])
        trees[name] = tree
    return trees


def machine_cpu_seconds():
    """CPU seconds the whole machine spent busy (all cores), and in interrupts, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK, (irq + softirq) / TICK


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Cpu:
    """CPU seconds between marks: of named process trees, of the kernel's threads and
    interrupts (page-cache write-back and I/O completions for every target, among others),
    and of everything else (other users of a shared machine, this script)."""

    KTHREADD = 2  # the parent of every kernel thread

    def __init__(self, pids):
        self.pids = pids | {"kernel": self.KTHREADD}
        self.last = self.now()

    def now(self):
        return tree_cpu_seconds(self.pids), machine_cpu_seconds(), time.time()

    def mark(self, outside=None):
        """({name: CPU seconds}, wall seconds) since the last mark; `outside`: CPU seconds of
        named processes measured otherwise (not counted as other)."""
        (then, (m0, i0), t0), (now, (m1, i1), t1) = self.last, self.now()
        self.last = (now, (m1, i1), t1)
        # Per process, so that one that exited (a kernel worker, a driver incarnation) does
        # not take its earlier CPU time out of the sum.
        used = {name: sum(t - then[name].get(pid, 0.0) for pid, t in now[name].items()) for name in now}
        used |= outside or {}
        used["kernel"] += i1 - i0
        used["other"] = max(m1 - m0 - sum(used.values()), 0.0)
        return used, t1 - t0


# ---------------------------------------------------------------------------------------------
# Runs


def summary(data):
    """IOPS, MB/s and p99 µs of fio's only job (reads or writes, whichever it did)."""
    (j,) = data["jobs"]
    s = j["read"] if j["read"]["io_bytes"] else j["write"]
    p99 = s["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
    return {"iops": s["iops"], "mbs": s["bw_bytes"] / 1e6, "p99_us": p99, "ios": s["total_ios"]}


def run_guest(target, backend, args, initrd, work):
    """Boots the guest on the target's disk and returns {job: result} and what it said."""
    console = os.path.join(work, f"{target}.console")
    qemu = boot(args.guest, initrd, target, backend.guest_socket, console)
    cpu = Cpu({"qemu": qemu.pid, "backend": backend.proc.pid})
    results, seen = {}, 0
    deadline = time.time() + 120 + (len(JOBS) * args.runtime) + 300
    try:
        while qemu.poll() is None:
            if time.time() > deadline:
                raise RuntimeError(f"{target}: the guest did not finish; console:\n{tail(console)}")
            if backend.proc.poll() is not None:
                raise RuntimeError(f"{target}: the backend exited ({backend.proc.returncode}); log:\n{tail(backend.log)}")
            text = read(console)
            # Each START or END marker closes a CPU interval: the one that ends at END is the job's.
            marks = re.findall(rf"{MARK}-(START|END) (\d+)", text)
            for kind, i in marks[seen:]:
                used, wall = cpu.mark()
                if kind == "END":
                    results.setdefault(int(i), {}).update(cpu_s=used, wall_s=wall)
            seen = len(marks)
            time.sleep(0.05)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
    text = read(console)
    # (The first line after the firmware starts with terminal escapes.)
    said = [m.group(0) for m in re.finditer(rf"{MARK}-(DISK|ERROR|DMESG).*", text)]
    for i, job in enumerate([FILL] + JOBS):
        m = re.search(rf"{MARK}-END {i}\s*\n(.*?){MARK}-JSON-END {i}", text, re.S)
        if not m or "{" not in m.group(1):
            said.append(f"{job.name}: no result")
            continue
        body = m.group(1)
        results.setdefault(i, {}).update(summary(json.loads(body[body.index("{"):body.rindex("}") + 1])))
    if f"{MARK}-DONE" not in text:
        said.append("the guest did not finish its jobs")
    return {([FILL] + JOBS)[i].name: r for i, r in results.items() if "iops" in r}, said


def run_host(backend, args):
    """fio's nbd engine against the target's NBD socket: the same jobs, no guest."""
    cpu = Cpu({"backend": backend.proc.pid})
    results = {}
    for job in [FILL] + JOBS:
        cmd = ["fio", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={backend.socket}"] \
            + fio_args(job, args.region, args.runtime)
        cpu.mark()
        # fio's CPU time: the children this process waited for (the backend is not waited for yet).
        before = children_cpu_seconds()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        used, wall = cpu.mark(outside={"fio": children_cpu_seconds() - before})
        results[job.name] = summary(json.loads(out[out.index("{"):])) | {"cpu_s": used, "wall_s": wall}
    return results, []


def read(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace").replace("\r", "")


def tail(path, lines=40):
    return "\n".join(read(path).splitlines()[-lines:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per job")
    ap.add_argument("--region", default="256M", help="how much of the disk the jobs use (fio's --size)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--rblk", required=True)
    ap.add_argument("--guest", required=True, help="the directory scripts/guest.sh prepared")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (consoles, backend logs)")
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon") or "qemu-storage-daemon")
    args = ap.parse_args()
    targets = args.targets.split(",")
    work = tempfile.mkdtemp(prefix="rblk-bench-vhost-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    runs = {t: [] for t in targets}
    notes = []
    try:
        initrd = initramfs(args.guest, work, args.region, args.runtime)
        for rnd in range(args.rounds):
            for target in targets:
                backend = Backend(target, work, args)
                try:
                    if target == "rblk-nbd-host":
                        results, said = run_host(backend, args)
                    else:
                        results, said = run_guest(target, backend, args, initrd, work)
                except (RuntimeError, subprocess.CalledProcessError) as e:
                    # A stalled guest or a dead backend is a finding: say it, keep the rest.
                    results, said = {}, [f"FAILED: {e}"]
                finally:
                    backend.stop()
                said += backend.complaints()
                if target.startswith("qsd"):
                    said.insert(0, f"aio={backend.aio}")
                runs[target].append(results)
                for line in said:
                    print(f"round {rnd + 1} {target:13} {line}", flush=True)
                    if "DISK" not in line or rnd == 0:
                        notes.append(f"{target}, round {rnd + 1}: {line}")
                for name, r in results.items():
                    print(f"round {rnd + 1} {target:13} {name:28} {r['iops']:9.0f} IOPS {r['mbs']:8.1f} MB/s "
                          f"p99 {r['p99_us']:8.0f} us  CPU {cpu_text(cpu_shares(r))}", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    med = {t: medians(rs) for t, rs in runs.items()}
    table = report(med, targets, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vhost.md"), "w") as f:
        f.write(table + "\n")
        if notes:
            f.write("\nWhat the guests said:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(os.path.join(args.out, "vhost.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    print()
    print(table)


CPU_ORDER = ["qemu", "fio", "backend", "kernel", "other"]


def cpu_shares(r):
    """Each process group's CPU during the job, as a share of one core."""
    return {k: r["cpu_s"][k] / r["wall_s"] for k in CPU_ORDER if k in r["cpu_s"]}


def cpu_text(shares):
    return " ".join(f"{k} {v * 100:.0f}%" for k, v in shares.items())


def medians(rounds):
    """Per job, the median of each number over the rounds that produced it."""
    out = {}
    for name in [FILL.name] + [j.name for j in JOBS]:
        rs = [r[name] for r in rounds if name in r and "cpu_s" in r[name]]
        if rs:
            m = {k: statistics.median(r[k] for r in rs) for k in ("iops", "mbs", "p99_us")}
            m["cpu"] = {k: statistics.median(cpu_shares(r)[k] for r in rs) for k in cpu_shares(rs[0])}
            m["backend_us"] = statistics.median(r["cpu_s"]["backend"] / r["ios"] * 1e6 for r in rs)
            out[name] = m
    return out


# Issue 14's goals: (job, the target rblk-vhost is divided by, at least).
GOALS = [("randwrite 4K QD32", "qsd", 1.0), ("write 1M QD4", "qsd", 1.0),
         ("randwrite 4K QD32", "qsd-wt", 1.0), ("write 1M QD4", "qsd-wt", 1.0),
         ("write 1M QD4", "rblk-nbd-vm", 1.5), ("read 1M QD4", "rblk-nbd-vm", 1.5),
         ("write 1M QD4", "rblk-nbd-host", 1.5), ("read 1M QD4", "rblk-nbd-host", 1.5)]


def quotient(med, job, a, b):
    x, y = med.get(a, {}).get(job), med.get(b, {}).get(job)
    return x["iops"] / y["iops"] if x and y and y["iops"] else None


def ratio(med, job, a, b):
    q = quotient(med, job, a, b)
    return "—" if q is None else f"{q:.2f}×"


def table(med, targets, cell, extra=()):
    """A markdown table: a row per job, a column per target with `cell(medians)`, then a column
    per (title, function of the job's name) in `extra`."""
    lines = ["| job | " + " | ".join(list(targets) + [title for title, _ in extra]) + " |",
             "|---|" + "---:|" * (len(targets) + len(extra))]
    for name in [FILL.name] + [j.name for j in JOBS]:
        cells = [cell(med[t][name]) if name in med[t] else "—" for t in targets]
        lines.append(f"| {name} | " + " | ".join(cells + [f(name) for _, f in extra]) + " |")
    return lines


def report(med, targets, args):
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    lines = [f"Medians of {rounds}, interleaved; {args.runtime} s per job over the first {args.region} of a fresh "
             f"{SIZE} volume; guest: QEMU TCG, -smp 2 -m {GUEST_MEM_MIB}, fio libaio direct I/O. "
             "Cells: IOPS / MB/s / p99 µs.", ""]
    ratios = [(f"rblk-vhost / {p}", lambda name, p=p: ratio(med, name, "rblk-vhost", p)) for p in PEERS]
    lines += table(med, targets, lambda m: f"{m['iops']:.0f} / {m['mbs']:.1f} / {m['p99_us']:.0f}", ratios)
    lines += ["", "CPU during each job, % of one core (2 cores: 200 % in all; medians), as client · backend · "
              "kernel · other. The client is QEMU (TCG runs the guest's CPUs in it) or, on the host, fio; the "
              "backend `rblk serve` with its driver, or qemu-storage-daemon; kernel: its threads and interrupts "
              "(page-cache write-back, I/O completions); other: the rest of the machine (other users, this "
              "script).", ""]
    lines += table(med, targets, lambda m: " · ".join(f"{v * 100:.0f}" for v in m["cpu"].values()))
    lines += ["", "The backend's CPU per request, µs (medians):", ""]
    lines += table(med, targets, lambda m: f"{m['backend_us']:.0f}")
    lines += ["", "Issue 14's goals. rblk and qsd-wt complete a write once it is durable; qsd once the host's "
              "device has it in its volatile cache, and tells the guest its cache is write-through, so the guest "
              "never flushes it (scripts/bench_vhost.py says more).", ""]
    for job, other, goal in GOALS:
        q = quotient(med, job, "rblk-vhost", other)
        if q is not None:
            lines.append(f"- {job}: rblk-vhost / {other} {q:.2f}× (goal ≥ {goal}×): {'met' if q >= goal else 'not met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
