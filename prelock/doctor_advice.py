"""Recommendations of `prelock doctor`: what to change on the node, with the exact commands.

recommend() returns only the recommendations whose condition holds, each with the
reason observed on this node.
"""

from __future__ import annotations

from dataclasses import dataclass

from prelock import sysmem
from prelock.doctor_breakdown import GIB, Breakdown, Holder
from prelock.doctor_node import CgroupState, Protection
from prelock.doctor_verdict import THRASHING, THRASHING_RISK, UNDER_PRESSURE, Verdict, percent_of

# Unaccounted memory above this share of MemTotal is worth attributing to a driver.
DRIVER_MEMORY_FRACTION = 0.10


@dataclass(frozen=True)
class Recommendation:
    """One change to make: why, the exact commands or settings, and a note on applying them."""

    key: str
    title: str
    reason: str
    commands: tuple[str, ...]
    note: str | None = None


# Recommendations

KUBELET_EVICTION_PERCENT = 5
# kubelet's defaults for the other hard eviction signals on Linux. Setting eviction-hard
# replaces the whole default set, so the suggestion repeats them.
KUBELET_OTHER_EVICTION_DEFAULTS = "nodefs.available<10%,imagefs.available<15%,nodefs.inodesFree<5%"
MGLRU_MIN_TTL_MS = 1000


@dataclass(frozen=True)
class RecommendationInputs:
    breakdown: Breakdown | None
    holders: tuple[Holder, ...]
    verdict: Verdict
    protection: Protection
    lru_gen: sysmem.LruGen | None
    cgroups: CgroupState
    sysfs_root: str

    @property
    def driver_memory_suspected(self) -> bool:
        if any(holder.kind in ("slab", "module") for holder in self.holders):
            return True
        breakdown = self.breakdown
        return breakdown is not None and breakdown.unaccounted_bytes > DRIVER_MEMORY_FRACTION * breakdown.total_bytes

    @property
    def at_risk(self) -> bool:
        return self.verdict.state in (UNDER_PRESSURE, THRASHING_RISK, THRASHING) or self.driver_memory_suspected


def recommend(inputs: RecommendationInputs) -> list[Recommendation]:
    """Return the recommendations that apply, each with its reason and exact setting."""
    recommendations = [
        _recommend_prelock(inputs),
        _recommend_mglru(inputs),
        _recommend_kubelet(inputs),
        _recommend_eviction_rate(inputs),
        _recommend_early_oom(inputs),
        _recommend_driver_memory(inputs),
    ]
    return [recommendation for recommendation in recommendations if recommendation is not None]


def _recommend_prelock(inputs: RecommendationInputs) -> Recommendation | None:
    protection = inputs.protection
    if protection.daemon_pids:
        return None
    reason = ("No `prelock run` process is running, so under memory pressure the kernel evicts the code "
              "pages of kubelet, containerd and sshd and reads them back from disk. The node then thrashes "
              "instead of reaching the OOM killer.")
    kubelet = protection.kubelet
    if kubelet.cached_bytes is not None and kubelet.size_bytes:
        reason += (f" kubelet has {percent_of(kubelet.cached_bytes, kubelet.size_bytes):.0f} % of its "
                   "executable in the page cache now.")
    return Recommendation(
        "run_prelock", "Lock the code of running programs with prelock", reason,
        ("systemctl enable --now prelock.service",),
        "The unit runs /usr/local/bin/prelock run -c /etc/prelock/prelock.yaml. If it is not installed "
        "yet, run sudo ./scripts/install-and-run.sh --systemd in a checkout of the prelock source, which "
        "installs prelock and the unit, then enables and starts it. Or copy systemd/prelock.service from "
        "the source to /etc/systemd/system/ and run systemctl daemon-reload before the command above. "
        "On Kubernetes, run the prelock DaemonSet (deploy/kubernetes/ in the prelock source) instead.")


def _recommend_mglru(inputs: RecommendationInputs) -> Recommendation | None:
    lru_gen = inputs.lru_gen
    directory = "/sys/kernel/mm/lru_gen"
    enable = f"echo y > {directory}/enabled"
    set_ttl = f"echo {MGLRU_MIN_TTL_MS} > {directory}/min_ttl_ms"
    effect = (f"min_ttl_ms={MGLRU_MIN_TTL_MS} keeps the pages used in the last {MGLRU_MIN_TTL_MS} ms resident "
            "and runs the OOM killer when it cannot, instead of thrashing.")
    if lru_gen is None:
        reason = (f"{inputs.sysfs_root}/kernel/mm/lru_gen is missing, so this kernel has no multi-gen LRU "
                  f"(Linux 6.1+ with CONFIG_LRU_GEN). With it, {effect}")
        return Recommendation("mglru_min_ttl", "MGLRU thrashing prevention (not available on this kernel)",
                              reason, (enable, set_ttl), "Only on a kernel built with CONFIG_LRU_GEN.")
    if lru_gen.enabled and lru_gen.min_ttl_ms > 0:
        return None
    state = f"enabled={lru_gen.enabled_mask:#06x}, min_ttl_ms={lru_gen.min_ttl_ms}"
    commands = (set_ttl,) if lru_gen.enabled else (enable, set_ttl)
    persist = f"To keep it across reboots, add the tmpfiles.d line: w {directory}/min_ttl_ms - - - - {MGLRU_MIN_TTL_MS}"
    return Recommendation("mglru_min_ttl", "Turn on MGLRU thrashing prevention",
                          f"MGLRU is present ({state}). {effect}", commands, persist)


def _recommend_kubelet(inputs: RecommendationInputs) -> Recommendation | None:
    kubelet = inputs.protection.kubelet
    if kubelet.pid is not None and kubelet.system_reserved_memory and kubelet.eviction_hard_memory:
        return None
    if kubelet.pid is None:
        current = "No running kubelet was found; if this node runs one, check its settings."
    else:
        current = (f"kubelet runs with system-reserved memory {kubelet.system_reserved_memory or 'not set'} "
                   f"and eviction-hard memory.available {kubelet.eviction_hard_memory or 'not set (default 100Mi)'}.")
    reason = (f"{current} kubelet evicts pods when memory.available falls below --eviction-hard, and the "
              "default of 100Mi is reached only after reclaim has started evicting code pages. "
              "--system-reserved keeps memory for the node agents out of what pods may request. Memory that "
              "a driver allocates is charged to no pod, so eviction does not pick the pod behind it.")
    reserved_gib = _system_reserved_gib(inputs)
    eviction = f"memory.available<{KUBELET_EVICTION_PERCENT}%,{KUBELET_OTHER_EVICTION_DEFAULTS}"
    note = (f"These are kubelet flags. In the kubelet config file, set systemReserved: {{memory: {reserved_gib}Gi}} "
            f"and evictionHard with memory.available: \"{KUBELET_EVICTION_PERCENT}%\" and the other three "
            "signals, because a partial evictionHard drops their defaults.")
    return Recommendation("kubelet_reserved", "Reserve memory for the node and evict pods earlier", reason,
                          (f"--system-reserved=memory={reserved_gib}Gi", f"--eviction-hard='{eviction}'"), note)


def _system_reserved_gib(inputs: RecommendationInputs) -> int:
    """Suggest system.slice usage plus 25 %, or 5 % of MemTotal, rounded up to GiB (at least 1)."""
    system_slice = [group for group in inputs.cgroups.groups if group.name == "system.slice"]
    if system_slice:
        target_bytes = system_slice[0].usage_bytes * 1.25
    elif inputs.breakdown is not None:
        target_bytes = inputs.breakdown.total_bytes * 0.05
    else:
        target_bytes = GIB
    return max(1, -(-int(target_bytes) // GIB))


def _recommend_eviction_rate(inputs: RecommendationInputs) -> Recommendation | None:
    if not inputs.at_risk:
        return None
    reason = ("When a node goes NotReady, the node controller evicts its pods. A pod that exhausts node memory "
              "outside its cgroup then starts on the next node and takes that node down too. "
              "--node-eviction-rate (default 0.1 nodes per second) limits how fast pods are evicted from "
              "failed nodes while the zone is healthy. At 0.01, it is at most one node every 100 s.")
    return Recommendation("node_eviction_rate", "Slow down pod eviction from failed nodes", reason,
                          ("kube-controller-manager --node-eviction-rate=0.01",),
                          "This is a control-plane flag, set once per cluster.")


def _recommend_early_oom(inputs: RecommendationInputs) -> Recommendation | None:
    if inputs.protection.early_oom:
        return None
    reason = ("No early-OOM daemon (earlyoom, systemd-oomd, nohang) is running. The kernel OOM killer fires "
              "only when reclaim fails, and reclaim keeps succeeding while it can evict code pages, so the "
              "node livelocks. earlyoom kills a process as soon as MemAvailable falls below -m percent. It "
              "ranks processes by oom_score, which does not include driver memory, so add --prefer with the "
              "name of the workload that holds the driver.")
    return Recommendation(
        "early_oom", "Run an early-OOM daemon", reason,
        ("apt-get install earlyoom", "earlyoom -m 5 --avoid '^(kubelet|containerd|sshd|systemd|prelock)$'"),
        "Install with dnf on Fedora and RHEL. Put the arguments into the earlyoom service's configuration, "
        "then run systemctl enable --now earlyoom.")


def _recommend_driver_memory(inputs: RecommendationInputs) -> Recommendation | None:
    breakdown = inputs.breakdown
    if not inputs.driver_memory_suspected or breakdown is None:
        return None
    unaccounted = breakdown.unaccounted_bytes
    reason = (f"{unaccounted / GIB:.1f} GiB ({percent_of(unaccounted, breakdown.total_bytes):.1f} % of MemTotal) "
              "is in no meminfo category.")
    for holder in inputs.holders:
        if holder.kind == "slab" and holder.estimate_bytes:
            reason += f" Slab {holder.name} tracks about {holder.estimate_bytes / GIB:.1f} GiB of driver pages."
    modules = [holder.name for holder in inputs.holders if holder.kind == "module"]
    if modules:
        reason += f" Loaded accelerator modules: {', '.join(modules)}."
    reason += (" Memory that a kernel driver allocates for a process is charged to no memory cgroup, so the "
               "pod's memory limit does not bound it and kubelet does not count it as pod usage.")

    device_files = sorted({holder.device_files for holder in inputs.holders if holder.device_files})
    devices = " ".join(device_files) or "/dev/dri/* /dev/accel/*"
    note = ("fuser lists the processes that hold the driver's device files open. Stop or fix the one that "
            "leaks: the driver frees what it allocated for a process when that process exits. To alert on "
            f"this, watch breakdown.unaccounted.percent_of_total in the JSON (above {DRIVER_MEMORY_FRACTION:.0%}).")
    return Recommendation("driver_memory", "Find the driver memory that no cgroup limits", reason,
                          (f"fuser -v {devices}", "prelock doctor --json --interval 0"), note)
