"""Running benchmark children and watching them from outside: wall time, peak RSS and CPU time of
every process they start (children and grandchildren: a launcher's trainer and producers), the
CPU the rest of the machine burns meanwhile, and when the lines of a log file appear.

Everything is read from /proc (Linux), polled every ``poll_s``: ``VmHWM`` is the kernel's own
high-water mark, so a poll can only miss growth in a process's last interval; CPU time is the last
sampled utime + stime, up to one interval short. ``cpu_capacity`` measures how many cores two
single-threaded processes really get on this machine.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far: user + system) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S)
    return table


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, since boot), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) * _TICK_S


def descendants(roots: list[int], table: dict[int, tuple[int, float]]) -> list[int]:
    """``roots`` (those still alive) and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def label_process(argv: list[str]) -> str:
    """A readable name for a draftstream process: trainer, producer-0, produce-1, run (launcher)."""

    def after(flag: str) -> str | None:
        i = argv.index(flag) if flag in argv else -1
        return argv[i + 1] if 0 <= i < len(argv) - 1 else None

    command = after("protocol.cli")
    if command == "produce":
        return after("--producer-id") or f"produce-{after('--rank') or 0}"
    if command is not None:
        return {"train": "trainer", "run": "run (launcher)"}.get(command, command)
    if "torch.distributed.run" in argv:
        return "torchrun"
    return Path(argv[0]).name if argv else "?"


@dataclasses.dataclass
class GroupRun:
    """Children started together: wall of the group, per command, and per process seen."""

    wall_s: float
    walls_s: dict[str, float]  # per command given
    peak_rss: dict[str, int]  # per process seen: label -> bytes
    cpu_s: dict[str, float]  # per process seen: label -> CPU seconds
    logs: dict[str, Path]
    line_times_s: list[float]  # when each line of the watched file appeared (one poll late at most)
    other_cpu_s: float  # CPU the rest of the machine used meanwhile: ~0 on a quiet machine


def run_processes(
    commands: dict[str, list[str]],
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    watch: Path | None = None,
    label: Callable[[list[str]], str | None] | None = None,
    poll_s: float = 0.1,
) -> GroupRun:
    """Start every command at once (stdout and stderr to ``log_dir/<name>.log``) and wait for all,
    sampling peak RSS and CPU time of each one and its descendants (named by ``label``, then
    ``label_process``), and the time each new line of ``watch`` appears. Raises ``RuntimeError``
    with the failed commands' last log lines if one exits non-zero."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = {name: log_dir / f"{name}.log" for name in commands}
    busy0, own0 = busy_cpu_s(), time.process_time()
    start = time.perf_counter()
    ends: dict[str, float] = {}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in commands.items():
            with open(logs[name], "wb") as log:
                procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    except BaseException:
        for p in procs.values():
            p.kill()
        raise

    def wait(name: str) -> None:
        procs[name].wait()
        ends[name] = time.perf_counter()

    waiters = [threading.Thread(target=wait, args=(n,), name=f"wait-{n}", daemon=True) for n in procs]
    for t in waiters:
        t.start()
    argvs: dict[int, list[str]] = {}  # re-read each poll: a child forked but not yet exec'd shows its parent's
    peaks: dict[int, int] = {}
    cpu: dict[int, float] = {}
    line_times: list[float] = []
    seen_bytes = 0

    def read_watched() -> None:
        nonlocal seen_bytes
        if watch is None or not watch.exists() or watch.stat().st_size <= seen_bytes:
            return
        data = watch.read_bytes()
        seen_bytes = len(data)
        line_times.extend([time.perf_counter() - start] * (data.count(b"\n") - len(line_times)))

    try:
        while any(t.is_alive() for t in waiters):
            read_watched()
            table = proc_table()
            for pid in descendants([p.pid for p in procs.values() if p.poll() is None], table):
                hwm = vm_hwm(pid)
                if hwm is None:
                    continue
                argv = cmdline(pid)
                if argv and argv != argvs.get(pid):
                    if pid in argvs:  # it exec'd since the last poll: a new image, with its own peak
                        peaks[pid] = 0
                    argvs[pid] = argv
                peaks[pid] = max(peaks.get(pid, 0), hwm)
                cpu[pid] = table[pid][1]
            time.sleep(poll_s)
    except BaseException:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        raise
    for t in waiters:
        t.join()
    read_watched()
    labels: dict[int, str] = {}
    for pid in sorted(peaks):
        argv = argvs.get(pid, [])
        base = (label(argv) if label else None) or label_process(argv)
        name, n = base, 1
        while name in labels.values():
            n += 1
            name = f"{base}#{n}"
        labels[pid] = name
    other_cpu = busy_cpu_s() - busy0 - (time.process_time() - own0) - sum(cpu.values())
    failed = [n for n, p in procs.items() if p.returncode != 0]
    if failed:
        tails = "\n".join(
            f"--- {n} (exit {procs[n].returncode}), last lines of {logs[n]}:\n{tail(logs[n])}" for n in failed
        )
        raise RuntimeError(f"{', '.join(failed)} failed\n{tails}")
    return GroupRun(
        wall_s=max(ends.values()) - start,
        walls_s={n: ends[n] - start for n in procs},
        peak_rss={labels[pid]: peaks[pid] for pid in peaks},
        cpu_s={labels[pid]: cpu[pid] for pid in cpu},
        logs=logs,
        line_times_s=line_times,
        other_cpu_s=max(0.0, other_cpu),
    )


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_SPIN = "import time\nt = time.perf_counter()\ns = 0\nfor i in range({n}): s += i\nprint(time.perf_counter() - t)"


def cpu_capacity(*, repeats: int = 3, iterations: int = 10_000_000) -> dict:
    """How many cores two single-threaded processes really get here: the same Python loop timed
    alone and as two concurrent copies; ``2 * alone / pair`` is 2.0 on two free cores and 1.0 when
    they share one core's throughput (a busy neighbour, SMT siblings). ``other_cpu_s``: what the
    rest of the machine burnt meanwhile (interpreter start-ups of the copies included)."""
    other = 0.0

    def timed(copies: int) -> float:
        nonlocal other
        busy = busy_cpu_s()
        procs = [
            subprocess.Popen([sys.executable, "-c", _SPIN.format(n=iterations)], stdout=subprocess.PIPE, text=True)
            for _ in range(copies)
        ]
        times = [float(p.communicate()[0]) for p in procs]
        other += max(0.0, busy_cpu_s() - busy - sum(times))
        return statistics.mean(times)

    start = time.perf_counter()
    alone = statistics.median(timed(1) for _ in range(repeats))
    pair = statistics.median(timed(2) for _ in range(repeats))
    return {
        "alone_s": alone,
        "pair_s": pair,
        "effective_cores": 2 * alone / pair,
        "other_cpu_s": other,
        "elapsed_s": time.perf_counter() - start,
    }
