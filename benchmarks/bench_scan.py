"""Benchmark one full scan and plan over N running processes.

Starts N copies of /usr/bin/sleep (dynamically linked, so each maps ld.so and libc),
runs prelock's scan and plan over every process on the machine several times, and
prints CPU and wall seconds per run. Processes are ended by PID afterwards.

    sudo .venv/bin/python benchmarks/bench_scan.py --processes 1000 --runs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import time

from prelock.config import Config
from prelock.scan import scan_and_plan


def start_sleepers(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["/usr/bin/sleep", "3600"]) for _ in range(count)]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(config: Config, mode: str, runs: int) -> None:
    walls, cpus = [], []
    for _ in range(runs):
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        plan, scan = scan_and_plan(config)
        walls.append(time.perf_counter() - wall_start)
        cpus.append(cpu_seconds() - cpu_start)
    print(f"mode={mode} targets_read={scan.targets_read} files={len(plan.files)} "
          f"wall_s median={statistics.median(walls):.3f} max={max(walls):.3f} "
          f"cpu_s median={statistics.median(cpus):.3f} max={max(cpus):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    sleepers = start_sleepers(args.processes)
    try:
        time.sleep(1.0)
        print(f"processes on the machine: {len([p for p in os.listdir('/proc') if p.isdigit()])}")
        for mode in ("working-set", "whole-file"):
            config = dataclasses.replace(Config(), lock=dataclasses.replace(Config().lock, mode=mode))
            measure(config, mode, args.runs)
    finally:
        for process in sleepers:
            process.kill()
        for process in sleepers:
            process.wait()


if __name__ == "__main__":
    main()
