"""Known-vulnerability check of requirements.lock, the image's pinned dependencies.

    python -m tools.audit [LOCK]

pip-audit first, against PyPI's advisory data for each pinned release. Where that data cannot be
reached for every release (a registry mirror without PyPI's per-release JSON, no route to OSV), the
pins are checked against .ci/advisories/, a dated snapshot of the PyPA advisory database's entries for
them, and the output says so. Exit 1 if a pinned release is affected, 0 if none is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / ".ci" / "advisories"


def pins(lock: Path) -> dict[str, str]:
    """The lock file's ``name==version`` pins, names normalised."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", lock.read_text(), re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def pip_audit(lock: Path) -> tuple[dict[str, list[str]], set[str]] | None:
    """pip-audit's findings ({package: [advisory ids]}) and the packages it could not audit; None if it
    did not run."""
    proc = subprocess.run([sys.executable, "-m", "pip_audit", "-r", str(lock), "--require-hashes", "--disable-pip",
                           "-s", "pypi", "-f", "json", "--progress-spinner", "off", "--timeout", "30"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        print("pip-audit did not run (%d): %s" % (proc.returncode, proc.stderr.strip()[-500:]))
        return None
    found, skipped = {}, set()
    for dep in report["dependencies"]:
        if "skip_reason" in dep:
            skipped.add(dep["name"])
        elif dep.get("vulns"):
            found[dep["name"]] = [v["id"] for v in dep["vulns"]]
    return found, skipped


def affected(version: str, advisory: dict) -> bool:
    """True if an OSV advisory's PyPI ``affected`` entries cover ``version``."""
    try:
        v = Version(version)
    except InvalidVersion:
        return True
    for entry in advisory.get("affected", []):
        if version in entry.get("versions", []):
            return True
        for rng in entry.get("ranges", []):
            if rng.get("type") != "ECOSYSTEM":
                continue
            introduced = None
            for event in rng["events"]:
                if "introduced" in event:
                    introduced = Version(event["introduced"])
                elif introduced is not None and ("fixed" in event or "last_affected" in event):
                    end = Version(event.get("fixed") or event["last_affected"])
                    if introduced <= v and (v < end if "fixed" in event else v <= end):
                        return True
                    introduced = None
            if introduced is not None and v >= introduced:
                return True
    return False


def offline(pinned: dict[str, str]) -> dict[str, list[str]]:
    """The snapshot's advisories that cover a pinned release."""
    found: dict[str, list[str]] = {}
    for name, version in pinned.items():
        for path in sorted((SNAPSHOT / name).glob("*.yaml")):
            advisory = yaml.safe_load(path.read_text())
            if affected(version, advisory):
                found.setdefault(name, []).append(advisory["id"])
    return found


def main(argv: list[str]) -> int:
    lock = Path(argv[0]) if argv else REPO / "requirements.lock"
    pinned = pins(lock)
    online = pip_audit(lock)
    if online is not None and not online[1]:
        found, source = online[0], "pip-audit (PyPI)"
    else:
        unaudited = sorted(online[1]) if online else sorted(pinned)
        print("PyPI's advisory data was not reachable for %s: checking the snapshot in %s of %s"
              % (", ".join(unaudited), SNAPSHOT.relative_to(REPO),
                 re.findall(r"\d{4}-\d\d-\d\d", (SNAPSHOT / "README.md").read_text())[0]))
        found, source = offline(pinned), "the advisory snapshot"
        if online:
            found.update(online[0])
    for name, ids in sorted(found.items()):
        print("%s %s: %s" % (name, pinned.get(name, "?"), ", ".join(ids)))
    print("%d of %d pinned packages affected, by %s" % (len(found), len(pinned), source))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
