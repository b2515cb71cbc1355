"""Run a test step as the unprivileged user nobody.

Tests in tests/unit and tests/kernel import this as `import privdrop`: pytest puts
tests/ on sys.path because tests/conftest.py sits there and tests/ has no __init__.py.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable

# The uid of nobody and gid of nogroup on Debian and Ubuntu. setuid and setgid take an id
# with no passwd entry too, so the id works on other distributions.
NOBODY_ID = 65534


def call_as_nobody(func: Callable[[], dict]) -> dict:
    """Run func as uid and gid NOBODY_ID in a forked child when root, else in this process.

    func returns a JSON-serializable dict, which the child sends back through a pipe. When
    func raises, the child prints its traceback to stderr and this call fails the test.
    Running as another user is what makes the kernel return EACCES for a file of mode 000,
    because root bypasses file modes.
    """
    if os.geteuid() != 0:
        return func()

    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        exit_code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY_ID)
            os.setuid(NOBODY_ID)
            with os.fdopen(write_fd, "w") as pipe:
                json.dump(func(), pipe)
            exit_code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(exit_code)

    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        output = pipe.read()
    _, wait_status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "unprivileged child failed; see its stderr"
    return json.loads(output)
