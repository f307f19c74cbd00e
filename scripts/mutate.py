#!/usr/bin/env python3
"""Named mutations: apply one small change to the code, run tests, report
whether some test noticed (killed) or not (survived).

Each mutation names a file, an exact snippet and its replacement.  It runs
on a temporary copy of the tree (tracked and new files plus the built C
extensions), never on the checkout; C mutations rebuild the extension in the
copy (`python c_ext/build_discard.py`).  A snippet that is not in the file
(exactly `count` times) is an error: "mutation X does not apply: snippet not
found", exit status 2, never a pass.  Keep the snippets in step when the code
they name changes.

    python scripts/mutate.py --list
    python scripts/mutate.py                       # all, each with its own tests
    python scripts/mutate.py reset-noop stale-region-table
    python scripts/mutate.py discard-raise -- tests/test_balloon_state.py -k failed
    python scripts/mutate.py --rev 49659af reset-noop -- tests/test_balloon.py tests/test_protocol.py

Before the mutations, the same tests run on an unmutated copy (--no-baseline
skips that): a baseline failure makes every "killed" meaningless, so it stops
the run.  Exit status: 0 if every mutation was killed, 1 if one survived, 2
on an error.  Results are documented in docs/reliability.md.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STATE_TESTS = ["tests/test_balloon_state.py"]
CHAIN_TESTS = ["tests/test_balloon.py", "tests/test_balloon_state.py"]


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: list
    what: str
    count: int = 1
    c_build: str = None          # build script to run in the copy after applying
    extra: list = field(default_factory=list)   # more (path, old, new) edits


MUTATIONS = [
    # C and twin together: one side alone is caught by the differential tests
    Mutation(
        # the counters keep the inward range; only the system call grows by one
        # host page on each side, on regions of 2 MiB pages or more
        "discard-round-outward", "c_ext/discard.c",
        "rc = discard_one(r->mode, r->fd, off + delta, hva + delta, m);",
        "rc = discard_one(r->mode, r->fd,\n"
        "                 off + delta - (r->page_size >= (1u << 21) ? r->page_size : 0),\n"
        "                 hva + delta - (r->page_size >= (1u << 21) ? r->page_size : 0),\n"
        "                 m + (r->page_size >= (1u << 21) ? 2ull * r->page_size : 0));",
        STATE_TESTS, "the discard (C and twin) rounds its system call outward on "
        "huge-page regions",
        c_build="c_ext/build_discard.py",
        extra=[("balloon_device/discard/twin.py",
                "err = discard_one(mode, fd, off + delta, hva + delta, m)",
                "out = page if page >= 1 << 21 else 0\n"
                "            err = discard_one(mode, fd, off + delta - out, hva + delta - out, "
                "m + 2 * out)")]),
    Mutation(
        "trim-round-outward", "c_ext/discard.c",
        "*lo = (base + mask) & ~mask;\n    hi = (base + n) & ~mask;",
        "*lo = mask > 4095 ? (base & ~mask) : ((base + mask) & ~mask);\n"
        "    hi = mask > 4095 ? ((base + n + mask) & ~mask) : ((base + n) & ~mask);",
        STATE_TESTS, "the trim (C and twin) rounds outward on huge-page regions",
        c_build="c_ext/build_discard.py",
        extra=[("balloon_device/discard/twin.py",
                "lo = (start + mask) & ~mask\n    hi = (start + length) & ~mask",
                "lo = start & ~mask if mask > 4095 else (start + mask) & ~mask\n"
                "    hi = (start + length + mask) & ~mask & _U64 if mask > 4095 "
                "else (start + length) & ~mask")]),
    Mutation(
        "stale-region-table", "balloon_device/discard/engine.py",
        "return memory is self.memory and self.generation is not None \\\n"
        "            and memory.generation == self.generation",
        "return memory is self.memory and self.generation is not None",
        STATE_TESTS, "the cached region table outlives ADD_MEM_REG / SET_MEM_TABLE"),
    Mutation(
        "discard-raise", "balloon_device/device.py",
        '        for err in res.errors:\n            log.error("discard failed: %s", err)\n'
        "\n    def _handle_reporting",
        '        if res.errors:\n            raise RuntimeError("; ".join(res.errors))\n'
        "\n    def _handle_reporting",
        STATE_TESTS, "a failed discard raises out of the chain's handling instead of "
        "counting skipped_error and going on"),
    Mutation(
        "reset-noop", "balloon_device/device.py",
        "    def reset(self):\n        self._cancel_stats_timer()\n        self._reset_state()",
        "    def reset(self):\n        self._cancel_stats_timer()",
        STATE_TESTS + ["tests/test_protocol.py"],
        "device reset keeps poison_val, actual, acked features and the half-inflated page"),
    Mutation(
        "deflate-on-oom-not-offered", "balloon_device/features.py",
        "        f |= DEFLATE_ON_OOM", "        pass",
        STATE_TESTS + ["tests/test_cli.py"], "--deflate-on-oom does not offer the feature"),
    Mutation(
        "poison-ignored", "balloon_device/device.py",
        "return not self.inhibited and not self.poison_val",
        "return not self.inhibited",
        CHAIN_TESTS, "reports are discarded although the guest poisons its free pages"),
    Mutation(
        "complete-before-discard", "balloon_device/device.py",
        "                if self.discard_allowed:\n"
        "                    raw = chain.raw if chain.raw is not None else "
        "pack_segments(chain.segments)\n",
        "                if self.discard_allowed:\n"
        "                    queue.push(chain.head, 0)\n"
        "                    raw = chain.raw if chain.raw is not None else "
        "pack_segments(chain.segments)\n",
        CHAIN_TESTS, "the chain is completed before its memory is discarded"),
]
BY_NAME = {m.name: m for m in MUTATIONS}


class MutationError(Exception):
    pass


def tree_files(root):
    """Tracked and new (not ignored) files, plus the built C extensions."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True).stdout
    files = [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]
    for pkg in ("vhostuser", "balloon_device"):
        files += [os.path.join(pkg, f) for f in os.listdir(os.path.join(root, pkg))
                  if f.endswith(".so")]
    return files


def copy_tree(root, dest, rev=None):
    """The working tree (rev None) or commit `rev` (git archive), plus the
    working tree's built C extensions (rebuilt by C mutations anyway)."""
    files = tree_files(root)
    if rev is not None:
        os.makedirs(dest)
        archive = subprocess.run(["git", "-C", root, "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        files = [f for f in files if f.endswith(".so")]
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def apply(mutation, tree):
    edits = [(mutation.path, mutation.old, mutation.new)] + list(mutation.extra)
    for rel, old, new in edits:
        path = os.path.join(tree, rel)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise MutationError(f"mutation {mutation.name} does not apply: "
                                f"{rel} does not exist") from None
        n = text.count(old)
        if n != mutation.count:
            raise MutationError(
                f"mutation {mutation.name} does not apply: snippet not found in {rel} "
                f"({n} matches, {mutation.count} expected):\n{old}")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
    if mutation.c_build:
        cp = subprocess.run([sys.executable, mutation.c_build], cwd=tree,
                            capture_output=True, text=True)
        if cp.returncode != 0:
            raise MutationError(f"mutation {mutation.name}: {mutation.c_build} failed:\n"
                                f"{cp.stdout[-2000:]}{cp.stderr[-2000:]}")


def run_tests(tree, tests, timeout):
    """pytest in the copy: (returncode, failed test ids, seconds)."""
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import balloon_device, vhostuser;"
                            "print(balloon_device.__file__, vhostuser.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True, check=True)
    if any(not p.startswith(tree) for p in where.stdout.split()):
        raise MutationError(f"the copy does not import its own code: {where.stdout}")
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         "-rf", *tests], cwd=tree, env=env, capture_output=True, text=True,
                        timeout=timeout)
    failed = [ln.split()[1] for ln in cp.stdout.splitlines() if ln.startswith("FAILED ")]
    return cp.returncode, failed, time.monotonic() - t0, cp.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="do not run the tests on an unmutated copy first")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    ap.add_argument("--check", action="store_true",
                    help="only check that every chosen mutation still applies (no tests)")
    ap.add_argument("--rev", help="mutate the tree of this commit instead of the working "
                    "tree (e.g. to show that a mutation survived the tests before a change)")
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = []
    if "--" in argv:       # what follows goes to pytest
        rest = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28s} {m.path:28s} {m.what}")
        return 0
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        print(f"unknown mutations: {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = [BY_NAME[n] for n in args.names] or MUTATIONS
    if args.check:
        bad = 0
        for m in chosen:
            for rel, old, _ in [(m.path, m.old, m.new)] + list(m.extra):
                try:
                    with open(os.path.join(ROOT, rel)) as f:
                        n = f.read().count(old)
                except FileNotFoundError:
                    n = -1
                if n != m.count:
                    bad += 1
                    print(f"mutation {m.name} does not apply: snippet not found in {rel} "
                          f"({n} matches, {m.count} expected)")
        print(f"{len(chosen) - bad} of {len(chosen)} mutations apply")
        return 2 if bad else 0
    results = []
    with tempfile.TemporaryDirectory(prefix="vub-mutate-") as tmp:
        if not args.no_baseline:
            base = os.path.join(tmp, "baseline")
            copy_tree(ROOT, base, args.rev)
            tests = rest or sorted({t for m in chosen for t in m.tests})
            rc, failed, secs, out = run_tests(base, tests, args.timeout)
            print(f"baseline ({' '.join(tests)}): rc={rc} in {secs:.0f} s", flush=True)
            if rc != 0:
                print(out[-4000:])
                print("the unmutated tree fails these tests: no mutation result means anything",
                      file=sys.stderr)
                return 2
            shutil.rmtree(base)
        for m in chosen:
            tree = os.path.join(tmp, m.name)
            copy_tree(ROOT, tree, args.rev)
            try:
                apply(m, tree)
                tests = rest or m.tests
                rc, failed, secs, out = run_tests(tree, tests, args.timeout)
            except MutationError as e:
                print(f"ERROR {e}", file=sys.stderr, flush=True)
                results.append((m, "error", []))
                shutil.rmtree(tree, ignore_errors=True)
                continue
            shutil.rmtree(tree, ignore_errors=True)
            verdict = "killed" if rc == 1 else "survived" if rc == 0 else f"broken(rc={rc})"
            results.append((m, verdict, failed))
            print(f"{verdict:9s} {m.name:28s} {secs:5.0f} s  "
                  f"{'by ' + failed[0] if failed else ''}", flush=True)
            if rc not in (0, 1):
                print(out[-3000:])
    print("\nsummary:")
    for m, verdict, failed in results:
        print(f"  {m.name:28s} {verdict:9s} {m.what}")
    if any(v == "error" or v.startswith("broken") for _, v, _ in results):
        return 2
    return 1 if any(v == "survived" for _, v, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
