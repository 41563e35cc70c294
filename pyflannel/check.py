"""``pyflannel check``: does the overlay carry this node's traffic, and if not, why and how to fix it.

It reads the datapath probes' results from the pyflannel running on this node (``/probes`` on its
health port, which answers only clients on the same host), prints them per peer with each problem
and its fix, then runs ``pyflannel diagnose``'s checks of the node and the cluster. It takes the
daemon's flags (for ``--healthz-ip``/``--healthz-port`` and what diagnose needs) and changes nothing.
"""

from __future__ import annotations

import http.client
import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from . import diagnose, flags
from .diagnose import Problem
from .probe import NO_RESPONDER, OFFLOAD_OFF_FIX, OK, TCP, UNREACHABLE, checksum_fix, offload_off, problem_text

TIMEOUT = 5.0  # seconds for the daemon's answer


class Unanswered(Exception):
    """The daemon's probe results could not be read; the message says why and what to do."""


def fetch(opts: flags.Options) -> dict[str, Any]:
    """The running daemon's ``/probes``; raises Unanswered."""
    if not opts.datapath_probe_port:
        raise Unanswered("the datapath probes are off (--datapath-probe-port=0)")
    if not opts.healthz_port:
        raise Unanswered("pyflannel serves its probe results on its health port: give check the DaemonSet's "
                         "--healthz-port")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(opts.healthz_ip, opts.healthz_ip)
    conn = http.client.HTTPConnection(host, opts.healthz_port, timeout=TIMEOUT)
    where = "%s port %d" % (host, opts.healthz_port)
    try:
        conn.request("GET", "/probes")
        answer = conn.getresponse()
        body = answer.read()
    except OSError as exc:
        raise Unanswered("pyflannel does not answer on %s (%s): is it running on this node with this "
                         "--healthz-port?" % (where, exc)) from exc
    finally:
        conn.close()
    if answer.status != 200:
        raise Unanswered("pyflannel on %s answered /probes with %d: %s" % (
            where, answer.status, body.decode("utf-8", "replace").strip() or answer.reason))
    try:
        report = json.loads(body)
    except ValueError as exc:
        raise Unanswered("pyflannel on %s answered /probes with something that is not JSON: %s" % (where, exc)) from exc
    if not isinstance(report, dict):
        raise Unanswered("pyflannel on %s answered /probes with unexpected JSON" % where)
    return report


def _ago(now: float, when: float) -> str:
    return "%.0f s ago" % max(0.0, now - when) if when else "never"


def _ms(seconds: float | None) -> str:
    return "%.2f ms" % (seconds * 1000) if seconds is not None else "—"


def _result_line(family: str, r: dict[str, Any], now: float) -> str:
    """An ``ok`` peer's last probe."""
    peer = "%s %s %s (via %s)" % (family, r["name"], r["address"], r["via"])
    if r["outcome"] == NO_RESPONDER:
        return ("%s: reachable (the reset of the TCP probe came back after %s), but no probe responder answers "
                "there (pyflannel with another or no --datapath-probe-port, or flanneld), %s"
                % (peer, _ms(r["rtt"]), _ago(now, r["when"])))
    full = "full size %d bytes" % r["size"] if r["size"] else "no full-size probe"
    return "%s: TCP %s, UDP, %s, %s" % (peer, _ms(r["rtt"]), full, _ago(now, r["when"]))


def show(report: dict[str, Any], out: TextIO) -> int:
    """Print the probe results of every family; the number of problems."""
    now = float(report["now"])
    offload = report["checksum_offload"]
    port = int(report["port"])
    print("Datapath probes of pyflannel on this node: every %g s up to %d peers per family, TCP and UDP port %d; a "
          "problem counts once seen %d rounds in a row" % (report["interval"], report["sample"], port,
                                                            report["confirm"]), file=out)
    problems = 0
    for fam in report["families"]:
        family, device = fam["family"], fam["device"]
        header = "%s through %s from %s: %d peers programmed, last round %s" % (
            family, device, fam["address"], fam["peers"], _ago(now, fam["last_round"]))
        trouble = []
        if fam["responder"]:
            trouble.append(Problem("%s: this node does not answer probes on %s port %d: %s\nThe other nodes see it as "
                                   "unreachable." % (header, fam["address"], port, fam["responder"]),
                                   ["another program holds the port: give every node another --datapath-probe-port"]))
        if fam["skipped"]:
            trouble.append(Problem("%s: not probing: %s" % (header, fam["skipped"]),
                                   ["see the node checks below, and the pyflannel log of this node"]))
        if trouble:
            problems += diagnose.write(out, trouble)
        else:
            rounds = -(-fam["peers"] // report["sample"]) if fam["peers"] else 0
            diagnose.write(out, "%s; every peer is probed within %d round%s (%s)" % (
                header, rounds, "" if rounds == 1 else "s", _duration(rounds * report["interval"])))
        problems += _peers(fam, report, out)
    devices = offload["devices"]
    for device, on in devices.items():
        state = {True: "on", False: "off", None: "unknown (the device is missing)"}[on]
        if offload["turned_off_on"]:
            state += ", turned off when the checksum-offload bug was seen: " + offload["turned_off_on"]
        diagnose.write(out, "tx checksum offload of %s: %s (--vxlan-checksum-offload=%s)" % (device, state,
                                                                                            offload["mode"]))
    if offload["bug"]:
        first = next(iter(devices), "flannel.1")
        fix = OFFLOAD_OFF_FIX if offload_off(devices.values()) else checksum_fix(first)
        problems += diagnose.write(out, [Problem(offload["bug"], [fix])])
    return problems


def _duration(seconds: float) -> str:
    if seconds < 120:
        return "%.0f s" % seconds
    if seconds < 7200:
        return "%.0f min" % (seconds / 60)
    return "%.1f h" % (seconds / 3600)


def _peers(fam: dict[str, Any], report: dict[str, Any], out: TextIO) -> int:
    """One line per peer: its problem with the fix, or its last result."""
    now = float(report["now"])
    family, device = fam["family"], fam["device"]
    problems = {p["name"]: p for p in fam["problems"]}
    latest = {r["name"]: r for r in fam["recent"]}
    found = 0
    for name in sorted(set(problems) | set(latest)):
        p = problems.get(name)
        if p is None:
            r = latest[name]
            if r["outcome"] in (OK, NO_RESPONDER):
                diagnose.write(out, _result_line(family, r, now))
            continue
        peer = "%s (%s, via %s)" % (name, p["address"], p["via"])
        if not p["confirmed"]:
            print("warn  %s %s: %s, %d round so far; probed again next round" % (family, peer, p["detail"],
                                                                                   p["rounds"]), file=out)
            continue
        offload = report["checksum_offload"]["devices"].get(device) if fam["vxlan"] else None
        head, fix = problem_text(p["problem"], family, device, fam["vxlan"], fam["tunnel_port"], report["port"],
                                 p["size"], peer, offload)
        why = "%d rounds in a row, the first %s: %s" % (p["rounds"], _ago(now, p["since"]), p["detail"])
        if p["problem"] == UNREACHABLE:
            why += "\nPods on this node cannot reach the pods of %s." % name
        elif p["problem"] == TCP:
            why += "\nPings between pods work, TCP connections hang."
        found += diagnose.write(out, [Problem(head + "\n" + why, [fix])])
    shown = len(set(problems) | set(latest))
    if fam["peers"] > shown:
        print("      (%d other peers were not probed recently; they show up here as the rotation reaches them)"
              % (fam["peers"] - shown), file=out)
    return found


def main(argv: list[str], environ: Mapping[str, str], proc: str = "/proc", out: TextIO | None = None) -> int:
    """``pyflannel check [flags]``: 0 if the probes and every node check passed, 1 if not, 2 on bad flags."""
    opts = flags.parse_or_exit_code(argv, environ, "pyflannel check",
                                    "Prints the datapath probes' results of the pyflannel running on this node, "
                                    "then diagnose's checks; takes the daemon's flags and changes nothing.")
    if isinstance(opts, int):
        return opts
    out = out or sys.stdout
    try:
        found = show(fetch(opts), out)
    except Unanswered as exc:
        found = diagnose.write(out, [Problem("no datapath probe results: %s" % exc,
                                             ["run it in the flannel container of the node with the DaemonSet's "
                                              "arguments: kubectl -n kube-flannel exec <pod> -c kube-flannel -- "
                                              "/opt/bin/flanneld check <its args>"])])
    print("Node checks (pyflannel diagnose):", file=out)
    return diagnose.run_checks(opts, environ, proc, out, found)
