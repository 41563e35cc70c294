"""The process' C heap: memory used for a moment by work on thousands of nodes, given back to the kernel.

Python returns freed objects to glibc's allocator, which keeps most of that memory for later instead of
giving it back; the cgroup's limit counts it all the same. After a node list or a full reconcile of many
nodes (their pages, dumps and tables are gone by then), ``release()`` hands it back: some 9 MiB at
20,000 nodes, nothing worth the call at a few hundred.
"""

from __future__ import annotations

RELEASE_AFTER = 1000  # nodes listed or reconciled from which release() is worth its call


def release(nodes: int) -> None:
    """Give the C heap's free memory back to the kernel (glibc's ``malloc_trim``) after work on ``nodes``
    nodes, when they are RELEASE_AFTER or more; nothing on other C libraries."""
    if nodes < RELEASE_AFTER:
        return
    try:
        import ctypes  # only now: its import costs more than small clusters would gain

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
