"""``pyflannel``: flanneld's command line."""

from __future__ import annotations

import os
import sys

from . import flags, log


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and the FLANNELD_* environment, then run the daemon (or ``diagnose``, ``check``)."""
    args = sys.argv[1:] if argv is None else argv
    from .kubeclient import allow_deep_json

    allow_deep_json()  # every node the API server stores must decode, before any thread starts
    if args[:1] == ["diagnose"]:
        from . import diagnose

        return diagnose.main(args[1:], os.environ)
    if args[:1] == ["check"]:
        from . import check

        return check.main(args[1:], os.environ)
    opts = flags.parse_or_exit_code(args, os.environ, "pyflannel")
    if isinstance(opts, int):
        return opts
    log.setup(opts.v, opts.log_format, opts.vmodule)
    from .daemon import main as run

    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
