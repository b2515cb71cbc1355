"""The thrash verdict of `prelock doctor`: rules on the breakdown, PSI and the sampled rates.

judge() returns every rule it could evaluate, fired or not, with its condition and what
was observed, so the report can show why it reached its verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from prelock import sysmem
from prelock.doctor_breakdown import GIB, Breakdown, file_lru_bytes
from prelock.doctor_snapshot import Rates


# Verdicts from least to most severe. The report takes the most severe one whose rule fired.
HEALTHY = "healthy"
UNDER_PRESSURE = "under pressure"
THRASHING_RISK = "thrashing risk"
THRASHING = "thrashing"
UNKNOWN = "unknown"
SEVERITY = (HEALTHY, UNDER_PRESSURE, THRASHING_RISK, THRASHING)

# NOTE: these thresholds are starting points chosen from the livelock this tool was
# built for, not calibrated on a fleet. Each rule prints them with what it observed.
AVAILABLE_LOW_FRACTION = 0.10
UNACCOUNTED_RISK_FRACTION = 0.25
FILE_LRU_TO_MAPPED_RATIO = 2.0
PSI_SOME_PRESSURE_PERCENT = 10.0
PSI_FULL_THRASHING_PERCENT = 10.0
REFAULTS_PRESSURE_PER_S = 100.0
REFAULTS_THRASHING_PER_S = 1000.0
MAJOR_FAULTS_THRASHING_PER_S = 100.0
IO_FULL_THRASHING_PERCENT = 10.0


@dataclass(frozen=True)
class Rule:
    """One verdict rule: the condition with its thresholds, and what was observed."""

    key: str
    verdict: str
    condition: str
    observed: str
    fired: bool


@dataclass(frozen=True)
class Verdict:
    """The verdict, the rules behind it, and a note on where the pressure comes from."""

    state: str
    rules: tuple[Rule, ...]
    note: str | None = None


# Verdict


def judge(breakdown: Breakdown | None, meminfo: dict[str, int] | None,
          pressure: dict[str, sysmem.Pressure], rates: Rates | None) -> Verdict:
    """Evaluate every rule and return the most severe verdict among those that fired."""
    rules = [*_snapshot_rules(breakdown, meminfo), *_pressure_rules(pressure, rates), *_rate_rules(rates)]
    if not rules:
        return Verdict(UNKNOWN, ())
    fired = [rule.verdict for rule in rules if rule.fired]
    state = max(fired, key=SEVERITY.index, default=HEALTHY)
    return Verdict(state, tuple(rules), _scope_note(state, rules, breakdown))


def _scope_note(state: str, rules: list[Rule], breakdown: Breakdown | None) -> str | None:
    """Explain pressure signals on a node with plenty of memory available.

    PSI and vmstat are system-wide, so a memory cgroup that reclaims at its own limit
    raises them too while the node itself has memory to spare.
    """
    if state not in (UNDER_PRESSURE, THRASHING) or breakdown is None or breakdown.available_bytes is None:
        return None
    if any(rule.fired for rule in rules if rule.key in ("available_low", "unaccounted_high", "file_cache_small")):
        return None
    available_percent = percent_of(breakdown.available_bytes, breakdown.total_bytes)
    return (f"MemAvailable is {available_percent:.0f} % of MemTotal, so the pressure most likely comes from "
            "memory cgroups reclaiming at their own limits, not from the node running out of memory")


def percent_of(part: float, whole: float) -> float:
    """Return part as a percentage of whole, or 0.0 when whole is zero."""
    return part / whole * 100.0 if whole else 0.0


def _format_percent(value: float) -> str:
    """Format a percentage so that a small nonzero share does not read as 0.0."""
    return f"{value:.2f} %" if value < 1 else f"{value:.1f} %"


def _snapshot_rules(breakdown: Breakdown | None, meminfo: dict[str, int] | None) -> list[Rule]:
    if breakdown is None or not meminfo:
        return []
    total = breakdown.total_bytes
    available = breakdown.available_bytes
    available_low = available is not None and available < AVAILABLE_LOW_FRACTION * total
    available_text = ("MemAvailable missing" if available is None
                      else f"MemAvailable {_format_percent(percent_of(available, total))}")
    available_condition = f"MemAvailable < {AVAILABLE_LOW_FRACTION:.0%} of MemTotal"

    rules = [Rule("available_low", UNDER_PRESSURE, available_condition, available_text, available_low)]

    unaccounted_share = breakdown.unaccounted_bytes / total
    rules.append(Rule(
        "unaccounted_high", THRASHING_RISK,
        f"unaccounted memory > {UNACCOUNTED_RISK_FRACTION:.0%} of MemTotal and {available_condition}",
        f"unaccounted {_format_percent(unaccounted_share * 100)}, {available_text}",
        unaccounted_share > UNACCOUNTED_RISK_FRACTION and available_low))

    file_lru = file_lru_bytes(meminfo)
    mapped = meminfo.get("Mapped")
    if file_lru is not None and mapped is not None:
        # Mapped pages are in the file LRU. When they are most of it, reclaim has little
        # left to evict but pages that processes use, which are read back right away.
        rules.append(Rule(
            "file_cache_small", THRASHING_RISK,
            f"file LRU < {FILE_LRU_TO_MAPPED_RATIO:g} x Mapped and {available_condition}",
            f"file LRU {file_lru / GIB:.3f} GiB, Mapped {mapped / GIB:.3f} GiB, {available_text}",
            file_lru < FILE_LRU_TO_MAPPED_RATIO * mapped and available_low))
    return rules


def _pressure_rules(pressure: dict[str, sysmem.Pressure], rates: Rates | None) -> list[Rule]:
    rules = []
    for kind, threshold, verdict in (("some", PSI_SOME_PRESSURE_PERCENT, UNDER_PRESSURE),
                                     ("full", PSI_FULL_THRASHING_PERCENT, THRASHING)):
        condition = f"PSI memory {kind} >= {threshold:g} %"
        measured = rates.psi_percent.get(f"memory_{kind}") if rates else None
        line = getattr(pressure.get("memory"), kind, None)
        if measured is not None:
            value, where = measured, f"over {rates.interval_s:.1f} s"
        elif line is not None:
            value, where = line.avg10, "avg10"
        else:
            # Without PSI there is nothing to judge, and the sources list gives the reason.
            continue
        rules.append(Rule(f"psi_memory_{kind}", verdict, condition, f"{value:.1f} % ({where})", value >= threshold))
    return rules


def _rate_rules(rates: Rates | None) -> list[Rule]:
    if rates is None or rates.refaults_file_per_s is None:
        return []
    refaults = rates.refaults_file_per_s
    observed = f"{refaults:.0f} file refaults/s"
    rules = [Rule("refaults", UNDER_PRESSURE, f"file refaults >= {REFAULTS_PRESSURE_PER_S:g} pages/s",
                  observed, refaults >= REFAULTS_PRESSURE_PER_S)]

    major = rates.major_faults_per_s
    if major is not None:
        rules.append(Rule(
            "refaults_major_faults", THRASHING,
            f"file refaults >= {REFAULTS_THRASHING_PER_S:g} pages/s and major faults >= "
            f"{MAJOR_FAULTS_THRASHING_PER_S:g}/s",
            f"{observed}, {major:.0f} major faults/s",
            refaults >= REFAULTS_THRASHING_PER_S and major >= MAJOR_FAULTS_THRASHING_PER_S))

    io_full = rates.psi_percent.get("io_full")
    if io_full is not None:
        # Evicted code read back from disk shows up as tasks stalled on I/O.
        rules.append(Rule(
            "io_full_refaults", THRASHING,
            f"PSI io full >= {IO_FULL_THRASHING_PERCENT:g} % and file refaults >= {REFAULTS_PRESSURE_PER_S:g} pages/s",
            f"io full {io_full:.1f} %, {observed}",
            io_full >= IO_FULL_THRASHING_PERCENT and refaults >= REFAULTS_PRESSURE_PER_S))
    return rules
