"""pyroute2's rtnetlink message classes, loaded without running the package's ``__init__``.

``import pyroute2`` imports its IPRoute, NDB and asyncio machinery eagerly (about 70 ms of CPU and
13 MiB); the message classes alone cost about 20 ms. The package is entered as a bare namespace
so that only the modules named here load.
"""

import importlib.util
import sys
import types

if "pyroute2" not in sys.modules:
    _spec = importlib.util.find_spec("pyroute2")
    if _spec is None or not _spec.submodule_search_locations:
        raise ImportError("pyroute2 is not installed")
    _pkg = types.ModuleType("pyroute2")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    _pkg.__spec__ = _spec
    sys.modules["pyroute2"] = _pkg

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.ndmsg import ndmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

__all__ = ["ifaddrmsg", "ifinfmsg", "ndmsg", "rtmsg"]
