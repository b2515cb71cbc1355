"""The held set persisted to disk, so the next start locks before the targets start.

Early in boot, kubelet and containerd have not started yet, so a scan finds nothing
to lock. The snapshot names the files and extents locked before. The daemon locks those
that are unchanged (same device, inode, size and mtime) until the first scans confirm
or release them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from prelock import state
from prelock.config import Config
from prelock.plan import FileSource, PlannedFile, count_pages, path_selected

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
    """Replace the snapshot atomically."""
    record = {"version": FORMAT_VERSION, "files": [
        {"path": e.path, "dev": e.dev, "inode": e.inode, "size_bytes": e.size_bytes, "mtime_ns": e.mtime_ns,
         "tier": e.tier, "extents": [list(extent) for extent in e.extents]}
        for e in entries
    ]}
    state.write_json(Path(state_dir) / SNAPSHOT_FILE, record)


def parse_snapshot(record: object) -> list[SnapshotEntry]:
    """Check decoded snapshot JSON; raises ValueError naming the first malformed entry."""
    if not isinstance(record, dict) or record.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a version {FORMAT_VERSION} snapshot")
    if not isinstance(record.get("files"), list):
        raise ValueError("'files' is missing or not a list")
    return [_parse_entry(index, item) for index, item in enumerate(record["files"])]


def _parse_entry(index: int, item: object) -> SnapshotEntry:
    try:
        extents = tuple((int(first), int(last)) for first, last in item["extents"])
        entry = SnapshotEntry(str(item["path"]), int(item["dev"]), int(item["inode"]), int(item["size_bytes"]),
                              int(item["mtime_ns"]), item["tier"], extents)
    except KeyError as exc:
        raise ValueError(f"entry {index} has no {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"entry {index} has a value of the wrong type") from None
    if any(first < 0 or last <= first for first, last in entry.extents):
        raise ValueError(f"entry {index} ({entry.path!r}) has invalid extents")
    if entry.tier not in ("critical", "others"):
        raise ValueError(f"entry {index} ({entry.path!r}) has an invalid tier {entry.tier!r}")
    return entry


def read_snapshot(state_dir: str | os.PathLike) -> list[SnapshotEntry]:
    """Read the snapshot; a missing one is empty, and a damaged one is logged and ignored."""
    path = Path(state_dir) / SNAPSHOT_FILE
    try:
        return parse_snapshot(state.read_json(path))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("ignoring the snapshot %s: %s", path, exc.strerror)
    except ValueError as exc:
        log.warning("ignoring the snapshot %s: %s", path, exc)
    return []


def _selected(entry: SnapshotEntry, config: Config) -> bool:
    # The config may have changed since the snapshot was written.
    if entry.tier == "others" and not config.others:
        return False
    if entry.size_bytes > config.lock.max_file_size_bytes:
        return False
    return path_selected(entry.path, config.files.include, config.files.exclude)


def unchanged(entry: SnapshotEntry) -> bool:
    """Check that the path still names the same, unmodified file."""
    # NOTE: paths resolve in the daemon's own mount namespace. In a container that does
    # not share the host's root, host paths find other files or none, and the identity
    # check then skips them, so restoring from a snapshot does nothing there.
    try:
        st = os.stat(entry.path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (entry.dev, entry.inode, entry.size_bytes,
                                                                   entry.mtime_ns)


def planned_files(entries: Iterable[SnapshotEntry], config: Config) -> list[PlannedFile]:
    """Turn the unchanged entries that the config still selects into planned files, critical first."""
    planned = [
        PlannedFile(key=(e.dev, e.inode), path=e.path, tier=e.tier, size_bytes=e.size_bytes, extents=e.extents,
                    pages_planned=count_pages(list(e.extents)), pages_mapped=0, owners=(),
                    sources=(FileSource(0, None, e.path),))
        for e in entries if _selected(e, config) and unchanged(e)
    ]
    planned.sort(key=lambda p: p.tier != "critical")
    return planned
