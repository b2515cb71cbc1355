"""MemTotal breakdown: meminfo split into categories that do not overlap, and likely holders of the rest.

Both steps are pure functions of parsed procfs records, so tests feed them fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass

from prelock import sysmem

GIB = 1 << 30

# Modules of GPUs and accelerators, with the device files their users hold open.
ACCELERATOR_MODULES = {
    "nvidia": ("NVIDIA GPU driver", "/dev/nvidia*"),
    "nvidia_uvm": ("NVIDIA unified memory", "/dev/nvidia-uvm*"),
    "nvidia_drm": ("NVIDIA DRM", "/dev/dri/*"),
    "nvidia_modeset": ("NVIDIA mode setting", "/dev/nvidia-modeset"),
    "nvidia_peermem": ("NVIDIA GPUDirect RDMA", "/dev/nvidia*"),
    "nouveau": ("NVIDIA GPU (nouveau)", "/dev/dri/*"),
    "amdgpu": ("AMD GPU", "/dev/dri/* /dev/kfd"),
    "radeon": ("AMD GPU (radeon)", "/dev/dri/*"),
    "i915": ("Intel GPU", "/dev/dri/*"),
    "xe": ("Intel GPU (xe)", "/dev/dri/*"),
    "habanalabs": ("Intel Gaudi accelerator", "/dev/accel/* /dev/hl*"),
    "ivpu": ("Intel NPU", "/dev/accel/*"),
    "amdxdna": ("AMD NPU", "/dev/accel/*"),
    "qaic": ("Qualcomm Cloud AI accelerator", "/dev/accel/*"),
    "neuron": ("AWS Inferentia/Trainium", "/dev/neuron*"),
    "apex": ("Google Edge TPU", "/dev/apex_*"),
}

# Slab caches with one object per page that a driver allocated with alloc_pages, which
# no meminfo field counts. The NVIDIA driver's cache name can carry a numeric suffix, as
# in nvidia_pte_cache-2782818403.
PAGE_TRACKING_SLABS = {
    "nvidia_pte_cache": ("NVIDIA GPU driver: one object per system-memory page it allocated", "/dev/nvidia*"),
}


@dataclass(frozen=True)
class Category:
    """A share of MemTotal, computed from the meminfo fields named in `formula`."""

    key: str
    label: str
    size_bytes: int
    formula: str


@dataclass(frozen=True)
class Breakdown:
    """MemTotal split into categories that do not overlap, plus what no category explains.

    `details` are meminfo values that lie inside the categories (or outside MemTotal).
    They are shown for context and never summed.
    """

    total_bytes: int
    available_bytes: int | None
    categories: tuple[Category, ...]
    unaccounted_bytes: int
    details: tuple[Category, ...]


@dataclass(frozen=True)
class Holder:
    """A likely holder of unaccounted memory, with an estimate where one can be made."""

    kind: str
    name: str
    description: str
    estimate_bytes: int | None
    method: str
    device_files: str | None = None


@dataclass(frozen=True)
class SlabUsage:
    name: str
    size_bytes: int
    active_objects: int
    object_size_bytes: int


# Breakdown


def build_breakdown(meminfo: dict[str, int]) -> Breakdown:
    """Split MemTotal into meminfo categories that do not overlap.

    Cached includes Shmem, so the page cache is shown as Cached - Shmem plus Shmem.
    On x86_64 and arm64 kernels built with CONFIG_VMAP_STACK (the default), thread
    stacks come from vmalloc and are in both KernelStack and VmallocUsed, so vmalloc
    counts VmallocUsed - KernelStack. VmallocUsed counts only pages vmalloc allocated,
    not ioremap ranges. A kernel that prints 0 there (some do) leaves vmalloc
    memory in the unaccounted remainder. SwapCached pages that a process maps are also
    in AnonPages, so with swap in use the sum can count them twice and understate the
    unaccounted remainder by up to SwapCached.
    """
    categories = tuple(_categories(meminfo))
    accounted = sum(category.size_bytes for category in categories)
    total = meminfo["MemTotal"]
    return Breakdown(total, meminfo.get("MemAvailable"), categories, total - accounted, tuple(_details(meminfo)))


def _categories(m: dict[str, int]) -> list[Category]:
    rows: list[Category] = []

    def add(key: str, label: str, formula: str, *fields: str, value: int | None = None) -> None:
        if all(name in m for name in fields):
            rows.append(Category(key, label, max(0, value if value is not None else m[fields[0]]), formula))

    add("free", "free", "MemFree", "MemFree")
    add("page_cache_file", "page cache, file-backed", "Cached - Shmem", "Cached",
        value=m.get("Cached", 0) - m.get("Shmem", 0))
    add("shmem", "page cache, shmem and tmpfs", "Shmem", "Shmem")
    add("buffers", "buffers (block device cache)", "Buffers", "Buffers")
    add("swap_cache", "swap cache", "SwapCached", "SwapCached")
    add("anon", "anonymous (process memory)", "AnonPages", "AnonPages")
    add("slab_reclaimable", "slab, reclaimable", "SReclaimable", "SReclaimable")
    add("slab_unreclaimable", "slab, unreclaimable", "SUnreclaim", "SUnreclaim")
    add("kernel_reclaimable_other", "other reclaimable kernel memory", "KReclaimable - SReclaimable",
        "KReclaimable", "SReclaimable", value=m.get("KReclaimable", 0) - m.get("SReclaimable", 0))
    add("kernel_stack", "kernel stacks", "KernelStack", "KernelStack")
    add("page_tables", "page tables", "PageTables", "PageTables")
    add("secondary_page_tables", "secondary page tables (KVM, IOMMU)", "SecPageTables", "SecPageTables")
    add("percpu", "per-CPU allocations", "Percpu", "Percpu")
    add("vmalloc", "vmalloc, without kernel stacks", "VmallocUsed - KernelStack", "VmallocUsed",
        value=m.get("VmallocUsed", 0) - m.get("KernelStack", 0))
    if "Hugetlb" in m:
        add("hugetlb", "hugetlb pool", "Hugetlb", "Hugetlb")
    else:
        add("hugetlb", "hugetlb pool", "HugePages_Total * Hugepagesize", "HugePages_Total", "Hugepagesize",
            value=m.get("HugePages_Total", 0) * m.get("Hugepagesize", 0))
    add("zswap", "zswap compressed pool", "Zswap", "Zswap")
    add("gpu_active", "GPU driver, in use", "GPUActive", "GPUActive")
    add("gpu_reclaim", "GPU driver pools, reclaimable", "GPUReclaim", "GPUReclaim")
    add("hardware_corrupted", "hardware corrupted (poisoned)", "HardwareCorrupted", "HardwareCorrupted")
    return rows


def _details(m: dict[str, int]) -> list[Category]:
    rows: list[Category] = []

    def add(key: str, label: str, formula: str, value: int | None) -> None:
        if value is not None:
            rows.append(Category(key, label, value, formula))

    add("available", "available (estimate)", "MemAvailable", m.get("MemAvailable"))
    add("file_lru", "file LRU, in page cache", "Active(file) + Inactive(file)", file_lru_bytes(m))
    add("mapped", "mapped by processes, in page cache", "Mapped", m.get("Mapped"))
    add("anon_thp", "transparent huge pages, in anonymous", "AnonHugePages", m.get("AnonHugePages"))
    add("mlocked", "mlocked, in the categories above", "Mlocked", m.get("Mlocked"))
    add("unevictable", "unevictable, in the categories above", "Unevictable", m.get("Unevictable"))
    add("dirty", "dirty, in page cache", "Dirty", m.get("Dirty"))
    add("unaccepted", "not yet accepted by the guest, in free", "Unaccepted", m.get("Unaccepted"))
    add("balloon", "balloon driver, may be outside MemTotal", "Balloon", m.get("Balloon"))
    return rows


def file_lru_bytes(meminfo: dict[str, int]) -> int | None:
    if "Active(file)" not in meminfo or "Inactive(file)" not in meminfo:
        return None
    return meminfo["Active(file)"] + meminfo["Inactive(file)"]


# Holders of unaccounted memory


def find_holders(modules: list[sysmem.Module] | None, slabs: list[sysmem.SlabCache] | None,
                 meminfo: dict[str, int] | None, page_size: int) -> list[Holder]:
    """List loaded accelerator drivers, page-tracking slabs and balloon memory.

    The size of a module in /proc/modules does not include the pages it allocates, so
    modules get no estimate. A page-tracking slab gets active objects x page size.
    """
    holders = []
    for slab in slabs or ():
        for prefix, (description, device_files) in PAGE_TRACKING_SLABS.items():
            if slab.name.startswith(prefix):
                method = (f"{slab.active_objects:,} active objects x {page_size}-byte page "
                          f"(the slab itself uses {slab.size_bytes(page_size) / GIB:.2f} GiB)")
                holders.append(Holder("slab", slab.name, description, slab.active_objects * page_size, method,
                                      device_files))
    for module in modules or ():
        if module.name in ACCELERATOR_MODULES:
            description, device_files = ACCELERATOR_MODULES[module.name]
            method = (f"module loaded ({module.size_bytes:,} bytes of code and static data). "
                      "The pages it allocates are counted in no meminfo field.")
            holders.append(Holder("module", module.name, description, None, method, device_files))
    if meminfo and meminfo.get("Balloon"):
        holders.append(Holder("meminfo", "Balloon", "virtual machine balloon driver", meminfo["Balloon"],
                              "meminfo Balloon. Drivers that take these pages out of MemTotal instead leave "
                              "none of them in the unaccounted memory."))
    return holders


def top_slabs(slabs: list[sysmem.SlabCache] | None, page_size: int, count: int = 5) -> list[SlabUsage]:
    usage = [SlabUsage(slab.name, slab.size_bytes(page_size), slab.active_objects, slab.object_size_bytes)
             for slab in slabs or ()]
    return sorted(usage, key=lambda item: item.size_bytes, reverse=True)[:count]
