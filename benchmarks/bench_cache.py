"""Benchmark `prelock cache` against util-linux fincore and vmtouch, side by side.

Part 1 creates FILES files of mixed sizes under a temporary directory on disk, evicts
every other file from the page cache, and times each tool over all of them. Part 2
starts PROCESSES copies of /usr/bin/sleep and times `prelock cache --top 20`, with
fincore and vmtouch on the same mapped files as a reference that skips the process scan.
Each round runs every tool once, in turn, after one warm-up round; the tables show the
median and maximum over the rounds. Files and processes are removed and ended by PID.

    sudo .venv/bin/python benchmarks/bench_cache.py --files 20000 --processes 1000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
PRELOCK = [sys.executable, "-c", "from prelock.cli import main; main()"]

# (share of files, smallest size, largest size) in bytes.
SIZE_CLASSES = ((0.70, 0, 16 << 10), (0.25, 16 << 10, 256 << 10), (0.05, 256 << 10, 2 << 20))
FILES_PER_DIRECTORY = 200


def file_sizes(count: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    sizes = []
    for share, low, high in SIZE_CLASSES:
        sizes += [rng.randint(low, high) for _ in range(round(count * share))]
    rng.shuffle(sizes)
    return sizes[:count]


def create_files(directory: str, sizes: list[int]) -> list[str]:
    """Write the files, sync them, and evict every other one from the page cache."""
    block = os.urandom(max(sizes) + PAGE)
    paths = []
    for index, size in enumerate(sizes):
        subdirectory = os.path.join(directory, f"d{index // FILES_PER_DIRECTORY:03d}")
        os.makedirs(subdirectory, exist_ok=True)
        path = os.path.join(subdirectory, f"f{index:05d}")
        with open(path, "wb") as f:
            f.write(block[index % PAGE:index % PAGE + size])
        paths.append(path)
    os.sync()
    for path in paths[::2]:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return paths


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600)
    elapsed = time.perf_counter() - start
    # fincore exits 1 when a file vanished after the list was taken, because other
    # processes on the machine come and go. Its time still counts; other failures raise.
    if result.returncode not in (0, 1) or (result.returncode == 1 and command[0] != "fincore"):
        raise RuntimeError(f"{command[0]} failed with exit code {result.returncode}: {result.stderr[-500:]}")
    return elapsed


def compare(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Run every command once as a warm-up, then `runs` rounds with each command in turn."""
    for command in commands.values():
        timed(command)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            walls[name].append(timed(command))
    return walls


def print_table(title: str, walls: dict[str, list[float]], pages: int) -> None:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\n{title} ({pages:,} pages; load average after the runs: {load})")
    print("| tool | wall s (median / max) | pages/s (median) |")
    print("| --- | ---: | ---: |")
    for name, values in walls.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} / {max(values):.3f} | {pages / median:,.0f} |")


def resident_pages_by_tool(directory: str, paths: list[str]) -> dict[str, int]:
    """Return the total resident pages each tool reports, to check that they agree."""
    report = json.loads(subprocess.run([*PRELOCK, "cache", "-r", directory, "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    fincore = subprocess.run(["fincore", "--raw", "--noheadings", "--output", "PAGES", *paths], check=True,
                             capture_output=True, text=True).stdout
    vmtouch = subprocess.run(["vmtouch", directory], check=True, capture_output=True, text=True).stdout
    vmtouch_line = next(line for line in vmtouch.splitlines() if "Resident Pages" in line)
    return {
        "prelock": report["sum"]["cached_pages"],
        "fincore": sum(int(line) for line in fincore.split()),
        "vmtouch": int(vmtouch_line.split()[2].split("/")[0]),
    }


def bench_files(count: int, runs: int) -> None:
    directory = tempfile.mkdtemp(prefix="prelock-bench-cache-", dir="/var/tmp")
    try:
        sizes = file_sizes(count)
        paths = create_files(directory, sizes)
        pages = sum((size + PAGE - 1) // PAGE for size in sizes)
        print(f"files={len(paths)} total={sum(sizes) / (1 << 20):.0f}MiB pages={pages} "
              f"resident pages per tool: {resident_pages_by_tool(directory, paths)}")
        commands = {
            "prelock cache -r DIR (cachestat)": [*PRELOCK, "cache", "-r", directory, "--terse", "--backend",
                                                 "cachestat"],
            "prelock cache -r DIR (mincore)": [*PRELOCK, "cache", "-r", directory, "--terse", "--backend",
                                               "mincore"],
            "fincore FILE...": ["fincore", "--raw", "--bytes", "--noheadings", *paths],
            "vmtouch DIR": ["vmtouch", directory],
        }
        print_table(f"{len(paths):,} files", compare(commands, runs), pages)
    finally:
        shutil.rmtree(directory)


def mapped_files() -> tuple[list[str], int]:
    """Return the measurable files that processes map now, and their total pages."""
    report = json.loads(subprocess.run([*PRELOCK, "cache", "--top", "1000000000", "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    measured = [entry for entry in report["files"] if entry["error"] is None and os.path.isfile(entry["path"])]
    return [entry["path"] for entry in measured], sum(entry["pages"] for entry in measured)


def bench_top(processes: int, runs: int) -> None:
    sleepers = [subprocess.Popen(["/usr/bin/sleep", "3600"]) for _ in range(processes)]
    try:
        time.sleep(1.0)
        paths, pages = mapped_files()
        print(f"\nprocesses on the machine: {len([p for p in os.listdir('/proc') if p.isdigit()])}, "
              f"mapped files: {len(paths)}")
        commands = {
            "prelock cache --top 20 (cachestat)": [*PRELOCK, "cache", "--top", "20", "--backend", "cachestat"],
            "prelock cache --top 20 (mincore)": [*PRELOCK, "cache", "--top", "20", "--backend", "mincore"],
            "fincore on the mapped files": ["fincore", "--raw", "--bytes", "--noheadings", *paths],
            "vmtouch on the mapped files": ["vmtouch", *paths],
            "prelock cache --help (start-up only)": [*PRELOCK, "cache", "--help"],
        }
        print_table(f"--top over {processes:,} extra processes", compare(commands, runs), pages)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
        for sleeper in sleepers:
            sleeper.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bench_files(args.files, args.runs)
    bench_top(args.processes, args.runs)


if __name__ == "__main__":
    main()
