"""SIGKILL the daemon's serving process under a running guest, and check that
nobody noticed (tests/e2e/test_restart_qemu.py, scripts/kill_cycles.py).

    d = Daemon(workdir, args=["--stats-interval", "1"]).start()   # supervised
    g = Guest(balloon="vhost-user", vhost_socket=d.socket_path,
              steps=[("integrity", "integrity 256 100000 2500")]).start()
    results = kill_cycles(d, g, cycles=5, rng=random.Random(1))

Per cycle: wait a random time (the guest allocates, frees, reports meanwhile;
every third cycle also moves the balloon target so that inflate, deflate and
CONFIG_CHANGE_MSG are under way), SIGKILL the serving process, then measure
how long until its successor serves (status answers, session restored) and
until the guest's next report is completed. The guest and QEMU are checked
after every cycle (check_quiet).
"""

import os
import re
import signal
import statistics
import time

from balloon_device.host.harness.qemu import MIB

# What QEMU prints when a vhost-user backend goes away or misbehaves
QEMU_BAD = re.compile(r"vhost|disconnect|Failed to|error", re.I)
# What the guest kernel prints when a virtqueue goes wrong, or memory was corrupted
GUEST_BAD = re.compile(r"virtio.*(error|not a head|broken|bad|timeout)|id \d+ is not a head|"
                       r"memory corruption|BUG:|Oops|integrity-badpage", re.I)


class KillCycleError(AssertionError):
    pass


def _child(d):
    return d.status()["process"]["pid"]


def _wait(pred, timeout, what, d, g):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:  # the control socket is away during the restart
            v = None
        if v:
            return v
        if not g.alive():
            raise KillCycleError(f"QEMU died while waiting for {what}:\n{g.diagnostics()}")
        if d.proc.poll() is not None:
            raise KillCycleError(f"the supervisor exited while waiting for {what}:\n"
                                 f"{d.log_text()}")
        time.sleep(0.02)
    raise KillCycleError(f"timed out after {timeout}s waiting for {what}\n"
                         f"daemon:\n{d.log_text(60)}\nguest:\n{g.serial_tail(20)}")


def check_quiet(g, qemu_log_start=0):
    """Nothing in QEMU's log about vhost-user or errors, nothing wrong in the guest's."""
    qemu = g.qemu_log.read_text(errors="replace").split("\n\n", 1)[-1]
    bad = [ln for ln in qemu.splitlines() if QEMU_BAD.search(ln)]
    if bad:
        raise KillCycleError("QEMU logged: " + " | ".join(bad[:5]))
    serial = [ln for ln in g.serial_text().splitlines() if GUEST_BAD.search(ln)]
    if serial:
        raise KillCycleError("the guest logged: " + " | ".join(serial[:5]))
    rounds = [m for m in g.markers() if m.name == "integrity-round"]
    bad_rounds = [m.line for m in rounds
                  if m["bad_bytes"] != "0" or m.values.get("held_bad_bytes", "0") != "0"]
    if bad_rounds:
        raise KillCycleError("integrity found corrupted bytes: " + " | ".join(bad_rounds[:3]))
    return len(rounds)


def kill_cycles(d, g, cycles, rng, min_wait=0.5, max_wait=6.0, serve_timeout=120,
                log=print, target_mib=64, how="kill"):
    """how: "kill" (SIGKILL of the serving process) or "upgrade" (`ctl upgrade`)."""
    results = []
    for cycle in range(cycles):
        if cycle % 3 == 1:
            d.set_target(target_mib * MIB)
        elif cycle % 3 == 2:
            d.set_target(0)
        time.sleep(rng.uniform(min_wait, max_wait))
        st = d.status()
        pid = st["process"]["pid"]
        chains0 = st["counters"]["report_chains"]
        t_kill = time.monotonic()
        if how == "upgrade":
            d.ctl({"cmd": "upgrade"})
        else:
            os.kill(pid, signal.SIGKILL)
        st = _wait(lambda: (lambda s: s if s["process"]["pid"] != pid and s["connected"] else None)(
            d.status()), serve_timeout, "the next serving process", d, g)
        t_serving = time.monotonic()
        if not st["process"]["restored"]:
            raise KillCycleError(f"cycle {cycle}: the new process did not restore the session:\n"
                                 f"{d.log_text(60)}")
        base_chains = st["counters"]["report_chains"]
        base_discarded = st["counters"]["bytes_discarded"]
        st = _wait(lambda: (lambda s: s if s["counters"]["report_chains"] > base_chains
                            and s["counters"]["bytes_discarded"] > base_discarded else None)(
            d.status()), serve_timeout, "the next report to be served", d, g)
        t_report = time.monotonic()
        rounds = check_quiet(g)
        r = {"cycle": cycle, "gap_s": t_serving - t_kill, "next_report_s": t_report - t_kill,
             "chains_before": chains0, "restarts": st["process"]["restarts"],
             "integrity_rounds": rounds, "memfd_mib": (g.memfd_allocated() or 0) / MIB}
        results.append(r)
        log(f"cycle {cycle} ({how}): served again after {r['gap_s'] * 1e3:.0f} ms, next report after "
            f"{r['next_report_s']:.2f} s; {rounds} integrity rounds clean; "
            f"memfd {r['memfd_mib']:.0f} MiB")
    return results


def summary(results):
    gaps = sorted(r["gap_s"] for r in results)
    reports = sorted(r["next_report_s"] for r in results)
    return {"cycles": len(results),
            "gap_p50_ms": statistics.median(gaps) * 1e3, "gap_max_ms": gaps[-1] * 1e3,
            "next_report_p50_s": statistics.median(reports), "next_report_max_s": reports[-1]}
