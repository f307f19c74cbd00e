#!/usr/bin/env python3
"""Long fuzzing run of the vhost-user frontend channel against a running daemon.

    python scripts/fuzz_frontend.py --messages 1000000 [--seed N] [--minutes M]

Starts `python -m balloon_device.host.cli --socket-path S --keep-listening` and
plays random sessions (tests/fuzz/vhost_gen.py: valid, nearly valid and
hostile messages, fds of every kind, rings over random guest memory) until
--messages fuzzed messages were sent (GET_FEATURES probes not counted).

After every message: well-framed replies or a clean disconnect, within
10 s (else a hang).  After every session: daemon alive, fd count back to
its idle baseline, a fresh frontend answered.  A crashed daemon is counted
and restarted; its log is kept.  Prints messages sent, sessions, crashes,
hangs, fd leaks, oracle violations; exit status 0 only if all are 0.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from fuzz.source import RandomSource  # noqa: E402
from fuzz.vhost_gen import DaemonProcess, Hang, SessionRunner, Violation, gen_session  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this long anyway")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-actions", type=int, default=80, help="random actions per session")
    p.add_argument("--log-level", default="error",
                   help="daemon log level (warning logs every refused message: large logs)")
    p.add_argument("--workdir", default=None)
    ns = p.parse_args()
    seed = ns.seed if ns.seed is not None else int.from_bytes(os.urandom(4), "little")
    src = RandomSource(seed)
    d = DaemonProcess(ns.workdir, log_level=ns.log_level).start()
    print(f"seed {seed}; daemon pid {d.pid}, socket {d.path}, log {d.log_path}; "
          f"idle fd count {d.baseline}", flush=True)
    stats = dict(messages=0, sessions=0, crashes=0, hangs=0, fd_leaks=0, violations=0,
                 unanswered_probes=0)
    t0 = time.monotonic()
    last = t0
    try:
        while stats["messages"] < ns.messages:
            if ns.minutes is not None and time.monotonic() - t0 > ns.minutes * 60:
                print("time limit reached", flush=True)
                break
            session_seed = src.int(0, 2**63)
            actions = gen_session(RandomSource(session_seed), ns.max_actions)
            runner = SessionRunner(d.connect())
            try:
                runner.run(actions)
            except Hang as e:
                stats["hangs"] += 1
                print(f"HANG (session seed {session_seed}): {e}", flush=True)
            except Violation as e:
                stats["violations"] += 1
                print(f"VIOLATION (session seed {session_seed}): {e}", flush=True)
            except OSError:  # e.g. ECONNRESET while sending fds: a disconnect; liveness below
                pass
            finally:
                runner.close()
            stats["messages"] += runner.sent
            stats["sessions"] += 1
            excess = d.wait_idle()
            if not d.alive():
                stats["crashes"] += 1
                print(f"CRASH (session seed {session_seed}), exit {d.proc.poll()}:\n"
                      f"{d.log_tail()}", flush=True)
                d.ensure_running()
                continue
            if excess:
                stats["fd_leaks"] += 1
                print(f"FD LEAK of {excess} (session seed {session_seed})", flush=True)
                d.baseline += excess  # report each leak once
            if not d.probe():
                stats["unanswered_probes"] += 1
                print(f"fresh frontend not answered (session seed {session_seed})", flush=True)
            d.wait_idle()
            now = time.monotonic()
            if now - last > 30:
                last = now
                rate = stats["messages"] / (now - t0)
                print(f"  {stats['messages']} messages, {stats['sessions']} sessions, "
                      f"{rate:.0f} msg/s", flush=True)
    finally:
        rc = d.stop()
    elapsed = time.monotonic() - t0
    print(f"messages sent:   {stats['messages']}")
    print(f"sessions:        {stats['sessions']}")
    print(f"crashes:         {stats['crashes']}")
    print(f"hangs:           {stats['hangs']}")
    print(f"fd leaks:        {stats['fd_leaks']}")
    print(f"violations:      {stats['violations']}")
    print(f"unanswered:      {stats['unanswered_probes']}")
    print(f"elapsed:         {elapsed:.0f} s ({stats['messages'] / max(elapsed, 1e-9):.0f} msg/s); "
          f"daemon exit code {rc}; seed {seed}")
    bad = sum(v for k, v in stats.items() if k not in ("messages", "sessions"))
    return 1 if bad or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
