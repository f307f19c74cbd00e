"""`vhost-user-balloon status`: every served guest as a plain text table.

    vhost-user-balloon status --control-socket /run/vhost-user-balloon/control.sock
    vhost-user-balloon status --socket-path /run/vub/web1.sock --watch 2
"""

import argparse
import json
import sys
import time

from .control import request
from .status import GuestStatus

COLUMNS = ("GUEST", "STATE", "TARGET", "ACTUAL", "REPORTED", "RETURNED", "LAST REPORT",
           "GUEST AVAIL", "HOST RAM", "SESSIONS")


def human_bytes(n):
    if n is None:
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def human_age(seconds):
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def row(st):
    """One table row of a GuestStatus (or of its to_dict() form, as sent by ctl)."""
    if isinstance(st, dict):
        st = GuestStatus.from_dict(st)
    dev, c = st.device, st.device.counters
    state = ("serving" if dev.driver_ok else "connected") if st.connected else "waiting"
    if st.process.get("unit") == "unreachable":
        state = "no answer"   # its own process is restarting or hung (supervisor.py)
    return (st.name, state, human_bytes(dev.target_bytes),
            human_bytes(dev.actual_bytes), human_bytes(c.get("bytes_reported", 0)),
            human_bytes(c.get("bytes_discarded", 0) + c.get("bytes_inflate_discarded", 0)),
            human_age(dev.last_report_age), human_bytes(dev.stats.get("available_memory")),
            human_bytes(st.ram_backed_bytes), str(st.sessions))


def format_table(statuses):
    rows = [COLUMNS] + [row(st) for st in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    if not statuses:
        lines.append("(no guests)")
    return "\n".join(lines)


def fetch(path):
    """(guest statuses, policy snapshot or None)."""
    reply = request(path, {"cmd": "list"})
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "daemon refused the request"))
    return reply["guests"], reply.get("policy")


def policy_line(last):
    """One line on the host memory policy's last decision."""
    if not last:
        return "policy: on, no decision yet"
    words = [f"policy: host {human_bytes(last['host_available'])} available",
             "under pressure" if last.get("pressure") else "no pressure"]
    if last.get("busy"):
        words.append("allocating: " + ", ".join(last["busy"]))
    if last.get("sweeping"):
        words.append("sweeping " + last["sweeping"])
    if last.get("fast"):
        words.append("fast reclaim: " + ", ".join(
            f"{n} -> {human_bytes(p * 4096)}" for n, p in sorted(last["fast"].items())))
    if last.get("stalling"):
        words.append("QEMU stalling: " + ", ".join(
            f"{n} ({last.get('host_pressure', {}).get(n, {}).get('stall_ms_per_s', 0):.0f} ms/s)"
            for n in last["stalling"]))
    words.append(f"sweeps done: {sum(last.get('sweeps', {}).values())}")
    words.append(f"fast reclaims done: {sum(last.get('fast_done', {}).values())}")
    if last.get("taskstats_error"):
        words.append(last["taskstats_error"])
    return "; ".join(words)


def parser():
    p = argparse.ArgumentParser(prog="vhost-user-balloon status",
                                description="every guest a running daemon serves, as a table")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--control-socket")
    where.add_argument("--socket-path", help="the daemon's vhost-user socket (control is PATH.ctl)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="S",
                   help="refresh every S seconds (default 2) until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the raw status list as JSON")
    return p


def main(argv, out=None):
    ns = parser().parse_args(argv)
    out = out or sys.stdout
    path = ns.control_socket or ns.socket_path + ".ctl"
    try:
        while True:
            try:
                guests, policy = fetch(path)
            except RuntimeError as e:
                print(f"vhost-user-balloon: error: {e}", file=sys.stderr)
                return 1
            if ns.json:
                text = json.dumps(guests, indent=2, sort_keys=True)
            else:
                text = format_table(guests)
                if policy is not None:
                    text += "\n" + policy_line(policy)
            if ns.watch:
                if out.isatty():
                    out.write("\033[H\033[2J")
                out.write(time.strftime("%H:%M:%S ") + path + "\n")
            out.write(text + "\n")
            out.flush()
            if not ns.watch:
                return 0
            time.sleep(ns.watch)
    except KeyboardInterrupt:
        return 0
