#!/usr/bin/env python3
"""rblk restart cost and memory: how long a killed driver takes to serve again, how fast it
replays its log, and how much memory it holds idle and under load.

Recovery (per workload, unapplied log size S and round; a fresh image each time):
  serve a fresh 1 GiB volume whose checkpoints never fire during the case, write S MiB
  through NBD with fio, SIGKILL the driver (never the supervisor), then from a tiny NBD
  client in this script connect, negotiate and read 4 KiB in a loop until the new
  incarnation answers. Reported: kill -> first read served and kill -> first write served
  (client clock), the driver's own recovery time and replayed entries (its log lines), the
  log bytes it had to recover (`rblk inspect` just before the kill) and the replay
  throughput computed from them.
Memory (per volume size, 1 GiB and 1 TiB thin, default configuration):
  the driver's VmRSS when idle after start, then VmRSS sampled every 0.5 s during a 4 KiB
  random-write QD32 fio job over the whole volume, and VmHWM at the end.

Tables go to stdout and to OUT/recovery.md, raw numbers to OUT/recovery.json. Not a test:
the machine is noisy, so each number is the median of --rounds runs.

    scripts/bench_recovery.sh [--rounds 3] [--sizes 0,16,64,256] [--quick] [--out bench-results]
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Client workloads that fill the log before the kill: name -> fio options. 4 KiB random
# writes at QD32 are the worst case for replay (one small entry, one map update per 4 KiB);
# 1 MiB sequential writes show the per-byte cost with little per-entry overhead.
WORKLOADS = {
    "rand4k": ("4 KiB randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    "seq1m": ("1 MiB write QD4", ["--rw=write", "--bs=1m", "--iodepth=4"]),
}

# How long a restarted driver may take to serve again before the case fails (the supervisor
# itself allows a recovering driver 300 s before it counts its silence).
RESTART_DEADLINE_S = 330.0
# How long the supervisor gets to stop (its driver checkpoints what it applied first).
STOP_GRACE_S = 180.0


class BenchError(Exception):
    """A failed step, with what the server said last."""


class OutsideStop(BenchError):
    """The server or its driver got a SIGTERM/SIGKILL this script did not send (another user
    of the machine stopping rblk processes): the case is run again. A driver that crashes on
    its own (an exit status, SIGABRT, SIGSEGV) is a real failure, not this."""


# ---------------------------------------------------------------------------------------------
# A minimal NBD client (newstyle fixed handshake, NBD_OPT_GO, simple replies), after the NBD
# protocol (NetworkBlockDevice/nbd doc/proto.md); the constants are those of session/src/wire.rs.

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
NBD_OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_INFO_EXPORT = 0
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2


class NbdProtocolError(Exception):
    """The server answered, but not as the protocol says: never retried."""


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
    return bytes(buf)


class NbdClient:
    """One connection in transmission phase. Connection errors (refused, reset, EOF) raise
    OSError subclasses, which the restart loop retries; protocol violations do not."""

    def __init__(self, path, timeout):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.handle = 0
        self.size = None
        try:
            self.sock.connect(path)
            self._negotiate()
        except BaseException:
            self.sock.close()
            raise

    def _negotiate(self):
        magic, opts, hflags = struct.unpack(">QQH", recv_exact(self.sock, 18))
        if magic != NBD_MAGIC or opts != NBD_OPTS_MAGIC:
            raise NbdProtocolError(f"not a newstyle NBD server (magic {magic:#x} {opts:#x})")
        cflags = NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if hflags & NBD_FLAG_NO_ZEROES else 0)
        data = struct.pack(">I", 0) + struct.pack(">H", 0)  # default export "", no info requests
        self.sock.sendall(struct.pack(">I", cflags) + struct.pack(">QII", NBD_OPTS_MAGIC, NBD_OPT_GO, len(data)) + data)
        while True:
            magic, opt, rtype, rlen = struct.unpack(">QIII", recv_exact(self.sock, 20))
            payload = recv_exact(self.sock, rlen)
            if magic != NBD_REP_MAGIC or opt != NBD_OPT_GO:
                raise NbdProtocolError(f"bad option reply (magic {magic:#x}, option {opt})")
            if rtype & NBD_REP_FLAG_ERROR:
                raise NbdProtocolError(f"NBD_OPT_GO refused: reply type {rtype:#x} {payload[4:]!r}")
            if rtype == NBD_REP_INFO and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == NBD_INFO_EXPORT:
                self.size = struct.unpack(">Q", payload[2:10])[0]
            if rtype == NBD_REP_ACK:
                return

    def _request(self, cmd, offset, length, data=b""):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, self.handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", recv_exact(self.sock, 16))
        if magic != NBD_SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdProtocolError(f"bad reply (magic {magic:#x}, handle {handle} for {self.handle})")
        if error:
            raise NbdProtocolError(f"command {cmd} at {offset} failed with NBD error {error}")

    def read(self, offset, length):
        self._request(NBD_CMD_READ, offset, length)
        return recv_exact(self.sock, length)

    def write(self, offset, data):
        self._request(NBD_CMD_WRITE, offset, len(data), data)

    def close(self):
        try:
            self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Processes and logs.

def children(pid):
    """Pids of the live (not zombie) direct children of `pid` named rblk-driver."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if comm == "rblk-driver" and fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def proc_status_kib(pid, *keys):
    """VmRSS, VmHWM, ... of `pid` in KiB, from /proc/PID/status."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                found[key] = int(rest.split()[0])
    return found


# slog_term lines: "Nov 25 13:34:58.461 INFO message, key: value, key: value".
LINE_RE = re.compile(r"^\d{4}-\d\d-\d\dT(\d\d):(\d\d):(\d\d)\.(\d{3})Z +([A-Z]+) (.*)$")


def line_ms(line):
    """The line's timestamp in ms since midnight (UTC, as the log writes it), or None."""
    m = LINE_RE.match(line)
    if not m:
        return None
    h, mi, s, ms = (int(x) for x in m.groups()[:4])
    return ((h * 60 + mi) * 60 + s) * 1000 + ms


def field(line, key):
    """The value of `key: value` in a log line (values here hold no commas)."""
    m = re.search(r"(?:, |^)" + re.escape(key) + r": ([^,]*)", line)
    return m.group(1).strip() if m else None


def incarnations(log_text):
    """The serve log split at the supervisor's `driver started` lines: {incarnation: lines}.
    A driver's own lines follow its `driver started` line (it is the only driver running)."""
    parts = {}
    current = None
    for line in log_text.splitlines():
        if "INFO driver started," in line:
            current = int(field(line, "incarnation") or 0)
            parts[current] = []
        if current is not None:
            parts[current].append(line)
    return parts


def first(lines, needle):
    return next((line for line in lines if needle in line), None)


def wall_ms(t):
    """time.time() as ms since midnight UTC, the clock of the log timestamps."""
    lt = time.gmtime(t)
    return ((lt.tm_hour * 60 + lt.tm_min) * 60 + lt.tm_sec) * 1000 + int(t % 1 * 1000)


def ms_between(a, b):
    """Milliseconds from line a to line b (through midnight too), or None."""
    ta, tb = line_ms(a or ""), line_ms(b or "")
    if ta is None or tb is None:
        return None
    return (tb - ta) % 86_400_000


class Server:
    """`rblk serve` in its own session, stderr (supervisor and drivers) to a log file."""

    def __init__(self, rblk, image, sock, log_path, extra):
        self.log_path = log_path
        self.sock = sock
        self.stopping = False
        self.kills = 0  # drivers this script SIGKILLed
        env = dict(os.environ, RBLK_LOG="info")
        self.log_file = open(log_path, "ab")
        cmd = [rblk, "serve", image, "--socket", sock] + extra
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log_file, env=env,
                                     start_new_session=True)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def tail(self, n=30):
        lines = self.log().splitlines()
        return "\n".join("    " + line for line in lines[-n:]) or "    (empty)"

    def fail(self, step, why):
        text = f"{step}: {why}\n  serve log ({self.log_path}), last lines:\n{self.tail()}"
        return OutsideStop(text) if self.stopped_from_outside() else BenchError(text)

    def stopped_from_outside(self):
        """A SIGTERM or SIGKILL this script did not send shows in the log."""
        log = self.log()
        if not self.stopping and "INFO stopping, signal:" in log:
            return True
        killed = len(re.findall(r"WARN driver died,.*killed by signal (?:9|15) ", log))
        return killed > self.kills

    def status(self, pid, step):
        """VmRSS and VmHWM of the driver pid."""
        try:
            return proc_status_kib(pid, "VmRSS", "VmHWM")
        except OSError as e:
            raise self.fail(step, f"cannot read /proc/{pid}/status: {e}") from e

    def check_deaths(self, step):
        """Fails unless exactly the drivers this script killed died."""
        died = self.log().count("WARN driver died,")
        if died != self.kills:
            raise self.fail(step, f"{died} driver deaths in the log, {self.kills} caused by this script")

    def wait_for(self, step, pred, seconds):
        """Waits until pred(log text) is truthy; returns it. Fails if serve exits."""
        deadline = time.monotonic() + seconds
        while True:
            got = pred(self.log())
            if got:
                return got
            if self.proc.poll() is not None:
                raise self.fail(step, f"rblk serve exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise self.fail(step, f"not done after {seconds:.0f} s")
            time.sleep(0.02)

    def wait_serving(self, incarnation, step, seconds=RESTART_DEADLINE_S):
        """Waits for incarnation's node to log `serving` (recovered and leader)."""
        return self.wait_for(step, lambda t: first(incarnations(t).get(incarnation, []), "INFO serving,"), seconds)

    def driver(self, step, not_pid=None, seconds=30):
        """The pid of the running driver (other than not_pid)."""
        deadline = time.monotonic() + seconds
        while True:
            pids = [p for p in children(self.proc.pid) if p != not_pid]
            if len(pids) == 1:
                return pids[0]
            if self.proc.poll() is not None:
                raise self.fail(step, f"rblk serve exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise self.fail(step, f"no single rblk-driver child of pid {self.proc.pid} (found {pids})")
            time.sleep(0.01)

    def stop(self):
        """SIGTERM (the driver checkpoints and exits, then the supervisor), SIGKILL to the whole
        session if that hangs. Safe to call twice."""
        self.stopping = True
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                print(f"rblk serve (pid {self.proc.pid}) did not stop in {STOP_GRACE_S:.0f} s: killing it",
                      file=sys.stderr)
            finally:
                if self.proc.poll() is None:
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.proc.wait()
        # The driver dies with its supervisor (PDEATHSIG); anything left in the session goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log_file.close()


def run_fio(server, step, opts, timeout=1800):
    """Runs fio against the server's socket; returns its JSON job summary."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={server.sock}",
           "--output-format=json", "--randrepeat=0", "--group_reporting"] + opts
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise server.fail(step, f"fio failed ({proc.returncode}): {' '.join(cmd)}\n{err.strip()[-2000:]}")
    return json.loads(out[out.index("{"):])["jobs"][0]


def inspect(rblk, image, step, server):
    """`rblk inspect --json` (read-only; safe while the image is served)."""
    r = subprocess.run([rblk, "inspect", image, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise server.fail(step, f"rblk inspect failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def rblk_binaries(rblk, work):
    """Copies rblk and the rblk-driver it starts (beside it, or $RBLK_DRIVER) into the work
    directory, so a concurrent rebuild of the target directory cannot swap them mid-run.
    rblk's copy is named rblk-bench: a broad `pkill -f "rblk serve"` someone else runs on a
    shared machine then leaves these servers alone (rblk finds rblk-driver beside itself)."""
    rblk = shutil.which(rblk) or rblk
    driver = os.environ.get("RBLK_DRIVER") or os.path.join(os.path.dirname(os.path.abspath(rblk)), "rblk-driver")
    for path in (rblk, driver):
        if not os.access(path, os.X_OK):
            raise BenchError(f"setup: {path} is not an executable (build with cargo build --release -p run)")
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir)
    shutil.copy2(rblk, os.path.join(bin_dir, "rblk-bench"))
    shutil.copy2(driver, os.path.join(bin_dir, "rblk-driver"))
    os.environ.pop("RBLK_DRIVER", None)
    return os.path.join(bin_dir, "rblk-bench")


# ---------------------------------------------------------------------------------------------
# Recovery.

def recovery_config(max_size_mib):
    """The serve configuration of the recovery cases (TOML) and the volume size.

    S MiB of client writes is at most S * ~1.08 MiB of log (4 KiB entries, each record
    sector keeps 8 of its 512 bytes for tags, one 256-byte header per record). A checkpoint
    is due when the log since the current root reaches checkpoint.log_bytes, which the
    storage clamps to a quarter of the ring, so the ring is sized at 4 * 1.25 * S (1280M for
    256 MiB): the whole S stays unapplied. log_bytes is that quarter (the effective clamp)
    and the interval an hour, so nothing checkpoints during a case. The volume is at least
    twice S so that fio's writes (every block once, no overwrites) never press on space,
    which would also force a checkpoint."""
    log_mib = max(64, -(-int(max_size_mib * 1.25 * 4) // 4) * 4)
    volume_gib = max(1, -(-2 * max_size_mib // 1024))
    toml = (f'[volume]\nlog_size = "{log_mib}M"\n\n'
            f'[checkpoint]\nlog_bytes = "{log_mib // 4}M"\ninterval = "1h"\n')
    return toml, f"{volume_gib}G", log_mib


def first_served(sock, t_kill, offset):
    """From the kill: connect, negotiate and read 4 KiB until the new incarnation answers,
    then write 4 KiB (a write needs the recovered node to be leader and commit). Returns ms
    from t_kill (perf_counter) to the negotiation, the read reply and the write reply, and
    the attempts. A connection made while no driver runs waits in the listening socket's
    backlog (the supervisor holds it), so attempts > 1 only when a connection reached the
    dying driver."""
    attempts = 0
    deadline = t_kill + RESTART_DEADLINE_S
    while True:
        attempts += 1
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError(f"no read served within {RESTART_DEADLINE_S:.0f} s of the kill ({attempts} attempts)")
        try:
            client = NbdClient(sock, remaining)
        except (ConnectionError, FileNotFoundError, BrokenPipeError):
            time.sleep(0.001)
            continue
        try:
            t_go = time.perf_counter()
            client.read(offset, 4096)
            t_read = time.perf_counter()
            client.write(offset, b"\xa5" * 4096)
            t_write = time.perf_counter()
        except (ConnectionError, BrokenPipeError):
            client.sock.close()
            time.sleep(0.001)
            continue
        client.close()
        ms = lambda t: (t - t_kill) * 1000.0  # noqa: E731
        return {"go_ms": ms(t_go), "read_ms": ms(t_read), "write_ms": ms(t_write), "attempts": attempts}


# Cases run again because something outside stopped their server: kept in the JSON.
INTERRUPTIONS = []


def retried(what, run, attempts=4):
    """run(), again when something outside stopped the server (see OutsideStop)."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except OutsideStop as e:
            INTERRUPTIONS.append({"case": what, "attempt": attempt, "error": str(e)})
            if attempt == attempts:
                raise
            first_line = str(e).splitlines()[0]
            print(f"{what}: rblk serve was stopped by a signal this script did not send ({first_line}); "
                  f"running it again", file=sys.stderr, flush=True)
    return None


def recovery_case(rblk, work, workload, size_mib, config_toml, volume_size):
    """One recovery measurement on a fresh image; returns its numbers."""
    case = os.path.join(work, f"rec-{workload}-{size_mib}")
    os.makedirs(case)
    image, sock = os.path.join(case, "v.img"), os.path.join(case, "v.sock")
    cfg = os.path.join(case, "rblk.toml")
    with open(cfg, "w") as f:
        f.write(config_toml)
    server = Server(rblk, image, sock, os.path.join(case, "serve.log"), ["--config", cfg, "--size", volume_size])
    try:
        server.wait_serving(1, "start (fresh image)", 60)
        old = server.driver("finding the driver")
        # Fill: S MiB of acknowledged (durable, applied) writes, none checkpointed.
        if size_mib:
            _, opts = WORKLOADS[workload]
            run_fio(server, f"writing {size_mib} MiB ({workload})",
                    opts + [f"--size={volume_size}", f"--io_size={size_mib}M"])
        # What recovery will have to read: the log from the current root's tail to the head.
        before = inspect(rblk, image, "inspect before the kill", server)
        if before["current"]["applied_index"] != 0:
            raise server.fail("inspect before the kill",
                              f"a checkpoint ran during the fill (root applied index "
                              f"{before['current']['applied_index']}): the log to replay is not {size_mib} MiB")
        log_bytes = (before["log"]["head"] - before["current"]["log_tail"]) * 4096
        rss_before = server.status(old, "memory before the kill")
        # The kill, and the client's view of the restart.
        server.check_deaths("before the kill")
        server.kills += 1
        t_kill_wall, t_kill = time.time(), time.perf_counter()
        try:
            os.kill(old, signal.SIGKILL)
        except ProcessLookupError as e:
            raise server.fail("the kill", f"driver {old} is gone already") from e
        try:
            served = first_served(sock, t_kill, 0)
        except (TimeoutError, NbdProtocolError, OSError) as e:
            raise server.fail("first request after the kill", str(e)) from e
        # The driver's side: its recovery time and replayed entries, and the phases from the
        # log timestamps (ms resolution): spawn -> log scanned -> volume recovered -> leader.
        server.wait_serving(2, "restarted driver serving", 30)
        new = server.driver("finding the restarted driver", not_pid=old)
        rss_after = server.status(new, "memory after recovery")
        server.check_deaths("after the restart")
        lines = incarnations(server.log())[2]
        started, scanned = first(lines, "INFO driver started,"), first(lines, "INFO log recovered,")
        recovered, ready = first(lines, "INFO volume recovered,"), first(lines, "INFO driver ready,")
        serving, first_req = first(lines, "INFO serving,"), first(lines, "INFO first request served")
        m = re.search(r"recovery: ms=(\d+) replayed=(\d+)", ready or "")
        if not (recovered and m):
            raise server.fail("parsing the restart log", "no `volume recovered` / `driver ready` line for incarnation 2")
        recovery_ms = int(field(recovered, "ms"))
        # The supervisor's reaction: kill -> `driver started` of the next incarnation (wall
        # clock against the log's ms timestamps, so +-1 ms).
        respawn = (line_ms(started) - wall_ms(t_kill_wall) + 43_200_000) % 86_400_000 - 43_200_000
        return {
            "workload": workload, "size_mib": size_mib,
            "log_bytes": log_bytes,
            "log_entries": before["log"]["last_index"] - before["current"]["applied_index"],
            "committed_at_kill": before["log"]["commit"],
            "kill_to_go_ms": served["go_ms"], "kill_to_read_ms": served["read_ms"],
            "kill_to_write_ms": served["write_ms"], "attempts": served["attempts"],
            "kill_to_respawn_ms": respawn, "recovery_ms": recovery_ms, "replayed": int(field(recovered, "replayed")),
            "ready_ms": int(m.group(1)), "ready_replayed": int(m.group(2)),
            "spawn_to_scanned_ms": ms_between(started, scanned),
            "scanned_to_recovered_ms": ms_between(scanned, recovered),
            "recovered_to_serving_ms": ms_between(recovered, serving),
            "spawn_to_first_served_ms": ms_between(started, first_req),
            "replay_mb_s": log_bytes / 1e6 / (recovery_ms / 1000.0) if size_mib and recovery_ms else None,
            "rss_before_kill_kib": rss_before.get("VmRSS"), "hwm_before_kill_kib": rss_before.get("VmHWM"),
            "rss_after_recovery_kib": rss_after.get("VmRSS"), "hwm_after_recovery_kib": rss_after.get("VmHWM"),
        }
    finally:
        server.stop()
        shutil.rmtree(case, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Memory.

def memory_case(rblk, work, volume_size, runtime):
    """Idle and loaded resident memory of the driver for one volume size (default settings)."""
    case = os.path.join(work, f"mem-{volume_size}")
    os.makedirs(case)
    image, sock = os.path.join(case, "v.img"), os.path.join(case, "v.sock")
    server = Server(rblk, image, sock, os.path.join(case, "serve.log"), ["--size", volume_size])
    try:
        server.wait_serving(1, f"start ({volume_size} volume)", 60)
        pid = server.driver("finding the driver")
        time.sleep(1.0)  # settled: recovered, leader, nothing to do
        idle = server.status(pid, "idle memory")
        # Load: 4 KiB random writes QD32 over the whole (thin) volume, VmRSS every 0.5 s.
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.wait(0.5):
                try:
                    samples.append(proc_status_kib(pid, "VmRSS")["VmRSS"])
                except (OSError, KeyError):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            job = run_fio(server, f"randwrite load on the {volume_size} volume",
                          ["--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={volume_size}", "--norandommap",
                           f"--runtime={runtime}", "--time_based"], timeout=runtime + 120)
        finally:
            stop.set()
            sampler.join()
        end = server.status(pid, "memory after the load")
        server.check_deaths("memory load")
        return {
            "volume": volume_size, "idle_rss_kib": idle["VmRSS"], "idle_hwm_kib": idle["VmHWM"],
            "peak_rss_kib": max(samples + [end["VmRSS"]]), "end_rss_kib": end["VmRSS"], "hwm_kib": end["VmHWM"],
            "samples_kib": samples, "iops": job["write"]["iops"], "runtime_s": runtime,
        }
    finally:
        server.stop()
        shutil.rmtree(case, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Report.

def median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".0f"):
    return "—" if v is None else format(v, spec)


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    mem = proc_meminfo_gib()
    commit = git("rev-parse", "--short=12", "HEAD") or "?"
    # Uncommitted changes to tracked files (the binaries may include them): named in the JSON.
    status = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout
    dirty = [line for line in status.splitlines() if line.strip()]
    if dirty:
        commit += "+dirty"
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu, "mem_gib": mem,
            "commit": commit, "commit_subject": git("log", "-1", "--format=%s") or "",
            "modified_files": [line[3:] for line in dirty]}


def proc_meminfo_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def git(*args):
    r = subprocess.run(["git", "-C", REPO] + list(args), capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def fs_type(path):
    """The file system type of the mount holding path (from /proc/mounts)."""
    best, kind = "", "?"
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def recovery_table(rows, workloads, sizes):
    lines = [
        "| workload | unapplied log | log MiB | entries replayed | kill → respawn ms | driver recovery ms "
        "(scan / apply) | kill → first read ms | kill → first write ms | replay MB/s of log | "
        "replay MB/s of data | RSS before kill / after recovery MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        for s in sizes:
            rs = [r for r in rows if r["workload"] == w and r["size_mib"] == s]
            if not rs:
                continue
            mb = median(rs, "replay_mb_s")
            ms = median(rs, "recovery_ms")
            data = s * MiB / 1e6 / (ms / 1e3) if s and ms else None
            # The goals (issue 12): 600 MB/s of log for 4 KiB writes; for 1 MiB writes, which
            # the log only names (written once), 1 GB/s of the data they wrote.
            log_ok = mb is None or w != "rand4k" or mb >= 600
            data_ok = data is None or w != "seq1m" or data >= 1000
            lines.append(
                f"| {WORKLOADS[w][0]} | {s} MiB | {fmt(median(rs, 'log_bytes') / MiB, '.1f')} "
                f"| {fmt(median(rs, 'replayed'))} | {fmt(median(rs, 'kill_to_respawn_ms'))} "
                f"| {fmt(median(rs, 'recovery_ms'))} ({fmt(median(rs, 'spawn_to_scanned_ms'))} / "
                f"{fmt(median(rs, 'scanned_to_recovered_ms'))}) "
                f"| {fmt(median(rs, 'kill_to_read_ms'), '.1f')} | {fmt(median(rs, 'kill_to_write_ms'), '.1f')} "
                f"| {fmt(mb)}{'' if log_ok else ' ✗'} | {fmt(data)}{'' if data_ok else ' ✗'} "
                f"| {fmt(median(rs, 'rss_before_kill_kib') / 1024)} / {fmt(median(rs, 'rss_after_recovery_kib') / 1024)} |")
    return "\n".join(lines)


def memory_table(rows, volumes):
    lines = ["| volume | idle VmRSS MiB | peak VmRSS under load MiB (max of 0.5 s samples) | VmHWM MiB | load IOPS |",
             "|---|---:|---:|---:|---:|"]
    for v in volumes:
        rs = [r for r in rows if r["volume"] == v]
        if rs:
            lines.append(f"| {v} | {fmt(median(rs, 'idle_rss_kib') / 1024, '.1f')} "
                         f"| {fmt(median(rs, 'peak_rss_kib') / 1024, '.1f')} | {fmt(median(rs, 'hwm_kib') / 1024, '.1f')} "
                         f"| {fmt(median(rs, 'iops'))} |")
    return "\n".join(lines)


NOTES = """\
How each number is taken (medians of the rounds):
- *unapplied log*: MiB the client wrote with fio (`--io_size`) into a fresh {volume} volume after
  start; the configuration (`log_size = "{log_mib}M"`, `checkpoint.log_bytes = "{ckpt_mib}M"`, the
  storage's clamp to a quarter of the ring, `interval = "1h"`) keeps all of it unapplied, and the
  script checks that the root is still the format's before the kill.
- *log MiB*: what recovery reads, `rblk inspect` just before the kill: (log head − root log tail) × 4 KiB.
- *kill → respawn*: from the kill to the supervisor's `driver started` line of the next
  incarnation (wall clock against the log's ms timestamps).
- *kill → first read / write*: client clock, from `kill(SIGKILL)` of the driver (not the
  supervisor) until a fresh NBD connection (handshake, NBD_OPT_GO) got its 4 KiB READ reply, then
  a 4 KiB WRITE reply on the same connection (a write needs the recovered node to lead and commit).
- *driver recovery ms* and *entries replayed*: the new driver's `volume recovered` line (roots,
  log scan and replay of the committed entries; the same as `driver ready ms=`). Entries persisted
  but not yet known committed at the kill are committed by the new leader and applied just after.
- *(scan / apply)*: from the log timestamps (1 ms resolution): supervisor spawn → `log recovered`
  (process start, sandbox, roots, reading and checking the log) and `log recovered` → `volume recovered`
  (applying the entries to the block map).
- *replay MB/s of log* = log bytes / driver recovery ms, in 10^6 bytes/s (✗: 4 KiB writes below
  the 600 MB/s goal); *of data* = the unapplied MiB the client wrote / driver recovery ms (✗: 1 MiB
  writes below the 1 GB/s goal; their log holds only the names of the blocks they were written to).
- *RSS*: VmRSS of the killed driver just before the kill and of the new one once it served.
- Memory: default configuration, `rblk serve --size V` (thin image file); idle = VmRSS 1 s after the
  driver logged `serving`; under load = fio 4 KiB randwrite QD32 over the whole volume for {runtime} s,
  VmRSS sampled every 0.5 s; VmHWM read at the end of the load.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rblk", default=os.path.join(REPO, "target", "release", "rblk"),
                    help="the rblk binary (rblk-driver is taken from beside it, or $RBLK_DRIVER)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="0,16,64,256", help="unapplied log sizes in MiB, comma-separated")
    ap.add_argument("--workloads", default="rand4k,seq1m", help=f"fill workloads: {', '.join(WORKLOADS)}")
    ap.add_argument("--volumes", default="1G,1T", help="volume sizes for the memory measurement")
    ap.add_argument("--runtime", type=int, default=None, help="seconds of load for the memory measurement (10)")
    ap.add_argument("--parts", default="recovery,memory", help="recovery, memory or both")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 0,16, one round, 3 s of load")
    ap.add_argument("--out", default="bench-results", help="directory for recovery.md and recovery.json")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.rounds = "0,16", 1
        args.runtime = args.runtime or 3
    runtime = args.runtime or 10
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    volumes = [v.strip() for v in args.volumes.split(",") if v.strip()]
    parts = {p.strip() for p in args.parts.split(",")}
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (have {', '.join(WORKLOADS)})")
    if shutil.which("fio") is None:
        ap.error("fio is not installed (apt-get install fio)")

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every server is stopped and the work dir removed.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    base = os.environ.get("TMPDIR") or "/var/tmp"
    work = tempfile.mkdtemp(prefix="rblk-recovery-", dir=base)
    if len(os.path.join(work, f"rec-{'x' * 6}-{max(sizes or [0])}", "v.sock")) > 107:
        shutil.rmtree(work)
        sys.exit(f"the work directory {work} is too long for a unix socket path; set TMPDIR shorter")
    info = machine()
    info["tmp_fs"] = fs_type(work)
    config_toml, rec_volume, log_mib = recovery_config(max(sizes or [0]))
    rec_rows, mem_rows = [], []
    started = time.time()
    try:
        rblk = rblk_binaries(args.rblk, work)
        print(f"rblk {info['commit']} · {info['nproc']} CPUs · kernel {info['kernel']} · work dir {work} "
              f"({info['tmp_fs']})", flush=True)
        for rnd in range(1, args.rounds + 1):
            if "recovery" in parts:
                for w in workloads:
                    for s in sizes:
                        r = retried(f"recovery {w} {s} MiB",
                                    lambda: recovery_case(rblk, work, w, s, config_toml, rec_volume))
                        r["round"] = rnd
                        rec_rows.append(r)
                        mb = "—" if r["replay_mb_s"] is None else f"{r['replay_mb_s']:.0f}"
                        print(f"round {rnd} {w:6} {s:4} MiB: log {r['log_bytes'] / MiB:6.1f} MiB, "
                              f"respawn {r['kill_to_respawn_ms']:3d} ms, kill→read {r['kill_to_read_ms']:7.1f} ms, kill→write {r['kill_to_write_ms']:7.1f} ms, "
                              f"recovery {r['recovery_ms']:5d} ms ({r['replayed']} entries), {mb} MB/s, "
                              f"RSS {r['rss_before_kill_kib'] // 1024} → {r['rss_after_recovery_kib'] // 1024} MiB",
                              flush=True)
            if "memory" in parts:
                for v in volumes:
                    r = retried(f"memory {v}", lambda: memory_case(rblk, work, v, runtime))
                    r["round"] = rnd
                    mem_rows.append(r)
                    print(f"round {rnd} memory {v:4}: idle {r['idle_rss_kib'] / 1024:.1f} MiB, peak "
                          f"{r['peak_rss_kib'] / 1024:.1f} MiB, VmHWM {r['hwm_kib'] / 1024:.1f} MiB, "
                          f"{r['iops']:.0f} IOPS", flush=True)
    except BenchError as e:
        print(f"bench_recovery: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_recovery: interrupted; servers stopped, work dir removed", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = (f"rblk {info['commit']} ({info['commit_subject']}) · {info['nproc']} CPUs ({info['cpu']}) · "
              f"{info['mem_gib']} GiB RAM · kernel {info['kernel']} · images on {info['tmp_fs']} · "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} · medians of {args.rounds} round(s)")
    out = [f"# rblk recovery and memory\n\n{header}\n"]
    if rec_rows:
        out.append("## Restart after SIGKILL against unapplied log\n\n" + recovery_table(rec_rows, workloads, sizes) + "\n")
    if mem_rows:
        out.append("## Driver resident memory\n\n" + memory_table(mem_rows, volumes) + "\n")
    if INTERRUPTIONS:
        out.append(f"{len(INTERRUPTIONS)} case(s) were run again because a signal this script did not send "
                   f"stopped their server (see `interruptions` in recovery.json).\n")
    out.append(NOTES.format(volume=rec_volume, log_mib=log_mib, ckpt_mib=log_mib // 4, runtime=runtime))
    text = "\n".join(out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recovery.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "recovery.json"), "w") as f:
        json.dump({"machine": info, "rounds": args.rounds, "recovery_config": config_toml,
                   "recovery_volume": rec_volume, "memory_runtime_s": runtime,
                   "recovery": rec_rows, "memory": mem_rows, "interruptions": INTERRUPTIONS}, f, indent=1)
    print()
    print(text)
    print(f"written: {os.path.join(args.out, 'recovery.md')}, {os.path.join(args.out, 'recovery.json')}")


if __name__ == "__main__":
    main()
