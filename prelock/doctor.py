"""Analysis behind `prelock doctor`: memory breakdown, thrash verdict and recommendations.

`collect` reads procfs and sysfs once (twice for the rates, `interval_s` apart) and
returns a Report of plain records. The analysis steps (breakdown, holders, rates,
verdict, recommendations) are pure functions of what was read, so tests feed them
fixture trees. doctor_snapshot reads the memory files and samples the rates,
doctor_breakdown splits MemTotal and lists holders, doctor_verdict judges, doctor_node
reads cgroups, processes and kubelet, and doctor_advice recommends. This module
re-exports their records and entry points. Nothing here prints: prelock.cli.doctor
renders the records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from prelock import native
from prelock.doctor_advice import Recommendation, RecommendationInputs, recommend
from prelock.doctor_breakdown import GIB, Breakdown, Category, Holder, SlabUsage, build_breakdown, find_holders, top_slabs
from prelock.doctor_node import (STATE_DIRS, CgroupState, CgroupUsage, KubeletState, ProcessInfo, Protection, StatusFile,
                                 find_daemons, inspect_kubelet, inspect_protection, is_prelock_run, kubelet_settings,
                                 measure_file, read_cgroups, read_status_files, scan_processes)
from prelock.doctor_snapshot import Rates, Snapshot, Source, compute_rates, read_snapshot, sample_rates
from prelock.doctor_verdict import (HEALTHY, SEVERITY, THRASHING, THRASHING_RISK, UNDER_PRESSURE, UNKNOWN, Rule, Verdict,
                                    judge)

__all__ = [
    "GIB", "HEALTHY", "SEVERITY", "STATE_DIRS", "THRASHING", "THRASHING_RISK", "UNDER_PRESSURE", "UNKNOWN",
    "Breakdown", "Category", "CgroupState", "CgroupUsage", "Holder", "KubeletState", "ProcessInfo", "Protection",
    "Rates", "Recommendation", "RecommendationInputs", "Report", "Rule", "SlabUsage", "Snapshot", "Source",
    "StatusFile", "Verdict",
    "build_breakdown", "collect", "compute_rates", "find_daemons", "find_holders", "inspect_kubelet", "inspect_protection",
    "is_prelock_run", "judge", "kubelet_settings", "measure_file", "read_cgroups", "read_snapshot",
    "read_status_files", "recommend", "sample_rates", "scan_processes", "top_slabs",
]


@dataclass(frozen=True)
class Report:
    procfs: str
    sysfs: str
    page_size: int
    snapshot: Snapshot
    breakdown: Breakdown | None
    holders: tuple[Holder, ...]
    top_slabs: tuple[SlabUsage, ...]
    rates: Rates | None
    rates_note: str | None
    cgroups: CgroupState
    protection: Protection
    verdict: Verdict
    recommendations: tuple[Recommendation, ...]


# The whole report


def collect(procfs_root: str = "/proc", sysfs_root: str = "/sys", interval_s: float = 5.0,
            state_dirs: tuple[str, ...] | None = STATE_DIRS,
            sleep: Callable[[float], None] = time.sleep) -> Report:
    """Read everything, sample the rates over interval_s, and analyse it into a Report."""
    page_size = native.PAGE_SIZE
    snapshot = read_snapshot(procfs_root, sysfs_root)
    rates, rates_note = sample_rates(procfs_root, interval_s, snapshot, sleep)

    breakdown = build_breakdown(snapshot.meminfo) if snapshot.meminfo else None
    holders = tuple(find_holders(snapshot.modules, snapshot.slabs, snapshot.meminfo, page_size))
    cgroups = read_cgroups(sysfs_root)
    protection = inspect_protection(procfs_root, snapshot.meminfo, state_dirs)
    verdict = judge(breakdown, snapshot.meminfo, snapshot.pressure, rates)
    inputs = RecommendationInputs(breakdown, holders, verdict, protection, snapshot.lru_gen, cgroups, sysfs_root)

    return Report(procfs_root, sysfs_root, page_size, snapshot, breakdown, holders,
                  tuple(top_slabs(snapshot.slabs, page_size)), rates, rates_note, cgroups, protection, verdict,
                  tuple(recommend(inputs)))
