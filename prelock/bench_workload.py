"""The two workload processes of `prelock bench thrash`.

    python -m prelock.bench_workload critical FILE [--interval-ms 50] [--cgroup DIR]
    python -m prelock.bench_workload hog FILE [--leak-bytes N] [--touch-pages N] [--cgroup DIR]

`critical` stands for a node agent: every interval it reads one byte of each page of
FILE and writes `heartbeat START_S DURATION_S` to stdout (CLOCK_MONOTONIC seconds), so
the heartbeat duration is the time it took to reach its whole working set.
`hog` stands for a leaking service: each pass it reads random pages of FILE, as running
code does, and leaks leak-bytes of anonymous memory, then writes `pass N LEAKED_BYTES`.

Both map FILE read-only and executable, so prelock treats it as code, and both write
`ready PID` once they have joined the cgroup, set their comm and mapped the file.
Nothing is buffered: the bench reads the lines as they come.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import signal
import sys
import time

PAGE_SIZE = mmap.PAGESIZE
PR_SET_PDEATHSIG = 1

COMM_NAMES = {"critical": "bench-critical", "hog": "bench-hog"}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        _prepare_process(args)
        view = _map_file(args.file)
        if args.role == "critical":
            run_critical(view, args.interval_ms / 1000.0)
        else:
            run_hog(view, args.leak_bytes, args.touch_pages, args.pause_ms / 1000.0, args.seed)
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group; the bench does the cleanup.
        return 130
    except BrokenPipeError:
        # The bench stopped reading: it has finished or died.
        return 0
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prelock.bench_workload")
    parser.add_argument("role", choices=sorted(COMM_NAMES))
    parser.add_argument("file", help="file to map; it must not be truncated while mapped")
    parser.add_argument("--cgroup", help="cgroup directory to join before mapping anything")
    parser.add_argument("--oom-score-adj", type=int, help="value for /proc/self/oom_score_adj")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="critical: heartbeat period")
    parser.add_argument("--leak-bytes", type=int, default=4 << 20, help="hog: anonymous bytes leaked per pass")
    parser.add_argument("--touch-pages", type=int, default=512, help="hog: random pages read per pass")
    parser.add_argument("--pause-ms", type=float, default=20.0, help="hog: sleep between passes")
    parser.add_argument("--seed", type=int, default=1, help="hog: seed of the random page order")
    return parser.parse_args(argv)


def _prepare_process(args: argparse.Namespace) -> None:
    # The kernel kills the workload when the bench exits, even by SIGKILL, because no
    # other process would stop it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if args.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(args.oom_score_adj))
    with open("/proc/self/comm", "w") as f:
        f.write(COMM_NAMES[args.role])


def _map_file(path: str) -> memoryview:
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_EXEC)
    _emit(f"ready {os.getpid()}")
    return memoryview(mapping)


def touch_all_pages(view: memoryview, sink: memoryview) -> None:
    """Read one byte of every page of view into sink, which has one byte per page."""
    # Copying a strided view reads each page once, in C, at memory speed when resident.
    # The copy goes into a preallocated buffer so that the pass allocates no memory, which
    # a full cgroup would first have to reclaim.
    sink[:] = view[::PAGE_SIZE]


def run_critical(view: memoryview, interval_s: float) -> None:
    """Touch the whole working set every interval_s and report how long each pass took."""
    sink = memoryview(bytearray(len(view[::PAGE_SIZE])))
    next_start = time.monotonic()
    while True:
        start = time.monotonic()
        touch_all_pages(view, sink)
        duration = time.monotonic() - start
        _emit(f"heartbeat {start:.6f} {duration:.6f}")

        # A pass that overran its period starts the next one at once, without catching up.
        next_start = max(next_start + interval_s, time.monotonic())
        time.sleep(max(0.0, next_start - time.monotonic()))


def run_hog(view: memoryview, leak_bytes: int, touch_pages: int, pause_s: float, seed: int) -> None:
    """Read random pages of view and leak leak_bytes of anonymous memory per pass, forever."""
    pages = len(view) // PAGE_SIZE
    rng = random.Random(seed)
    leaked = []
    passes = 0
    while True:
        for _ in range(touch_pages):
            view[rng.randrange(pages) * PAGE_SIZE]
        # Repeating one byte fills the buffer with memset, so every page is charged now.
        leaked.append(b"\x01" * leak_bytes)
        passes += 1
        _emit(f"pass {passes} {passes * leak_bytes}")
        time.sleep(pause_s)


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
