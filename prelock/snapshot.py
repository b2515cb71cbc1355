"""The held set persisted to disk, so the next start locks before the targets start.

Early in boot, kubelet and containerd have not started yet, so a scan finds nothing
to lock; the snapshot names the files and extents held before, and the daemon locks
those that are unchanged (same device, inode, size and mtime) until the first scans
confirm or release them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from prelock.plan import FileSource, PlannedFile, count_pages

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SnapshotEntry:
    path: str
    dev: int
    inode: int
    size_bytes: int
    mtime_ns: int
    tier: str
    extents: tuple[tuple[int, int], ...]


def entry_for_held(held) -> SnapshotEntry | None:
    """Describe a held file, reading its identity through the daemon's own mapping."""
    try:
        st = os.stat(f"/proc/self/map_files/{held.addr:x}-{held.addr + held.length_bytes:x}")
    except OSError:
        return None
    # A deleted file cannot be found again by path after a restart.
    if st.st_nlink == 0:
        return None
    return SnapshotEntry(held.path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, held.tier,
                         tuple(held.extents))


def write_snapshot(state_dir: str | os.PathLike, entries: Iterable[SnapshotEntry]) -> None:
    """Replace the snapshot atomically (write a temporary file, then rename)."""
    record = {"version": FORMAT_VERSION, "files": [
        {"path": e.path, "dev": e.dev, "inode": e.inode, "size_bytes": e.size_bytes, "mtime_ns": e.mtime_ns,
         "tier": e.tier, "extents": [list(extent) for extent in e.extents]}
        for e in entries
    ]}
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / (SNAPSHOT_FILE + ".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(directory / SNAPSHOT_FILE)


def parse_snapshot(text: str) -> list[SnapshotEntry]:
    """Parse snapshot JSON; raises ValueError on any malformed entry."""
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("version") != FORMAT_VERSION:
        raise ValueError(f"expected a version {FORMAT_VERSION} snapshot")
    entries = []
    for item in record["files"]:
        extents = tuple((int(first), int(last)) for first, last in item["extents"])
        if any(first < 0 or last <= first for first, last in extents):
            raise ValueError(f"invalid extents for {item['path']!r}")
        if item["tier"] not in ("critical", "others"):
            raise ValueError(f"invalid tier {item['tier']!r}")
        entries.append(SnapshotEntry(str(item["path"]), int(item["dev"]), int(item["inode"]),
                                     int(item["size_bytes"]), int(item["mtime_ns"]), item["tier"], extents))
    return entries


def read_snapshot(state_dir: str | os.PathLike) -> list[SnapshotEntry]:
    """Read the snapshot; a missing one is empty, and a damaged one is logged and ignored."""
    path = Path(state_dir) / SNAPSHOT_FILE
    try:
        return parse_snapshot(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the snapshot %s: %s", path, exc)
        return []


def unchanged(entry: SnapshotEntry) -> bool:
    """Whether the path still names the same, unmodified file."""
    # NOTE: paths resolve in the daemon's own mount namespace. In a container that does
    # not share the host's root, host paths find other files or none, and the identity
    # check then skips them, so restoring from a snapshot does nothing there.
    try:
        st = os.stat(entry.path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (entry.dev, entry.inode, entry.size_bytes,
                                                                   entry.mtime_ns)


def planned_files(entries: Iterable[SnapshotEntry]) -> list[PlannedFile]:
    """Turn the unchanged entries into planned files, critical first."""
    planned = [
        PlannedFile(key=(e.dev, e.inode), path=e.path, tier=e.tier, size_bytes=e.size_bytes, extents=e.extents,
                    pages_planned=count_pages(list(e.extents)), pages_mapped=0, owners=(),
                    sources=(FileSource(0, None, e.path),))
        for e in entries if unchanged(e)
    ]
    planned.sort(key=lambda p: p.tier != "critical")
    return planned
