"""Skip tests marked `root` when the run is not as root.

Tests marked `root` need the real kernel with full privilege (mlock beyond
RLIMIT_MEMLOCK, pagemap PFNs, /proc/kpageflags, memory cgroups, other users'
processes). CI runs as root, so there they always run.
"""

from __future__ import annotations

import os

import pytest

NEEDS_ROOT = pytest.mark.skip(reason="needs root")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(NEEDS_ROOT)
