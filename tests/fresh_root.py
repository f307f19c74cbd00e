"""A throw-away copy of the minimal bookworm root of scripts/build_fresh_root.sh,
to run commands in with chroot, as on a fresh Debian 12 machine.

The root gets the host's network (same network namespace), its resolv.conf,
the host's site set-up for reaching PyPI: its local CA certificates
(/usr/local/share/ca-certificates, which the root's ca-certificates package adds
to its bundle when the set-up installs it), /etc/pip.conf and pip's index
settings (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_CERT, index URLs from the
host's pip configuration too, http(s) only: local file indexes are not in the
root), and
two caches kept in CACHE/fresh-root/ between runs: apt's downloaded .debs and
pip's cache.  Nothing else of the host goes in.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VUB_CACHE", Path.home() / ".cache" / "vhost-user-balloon"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class FreshRootError(Exception):
    pass


def _run(cmd, timeout, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise FreshRootError(f"{' '.join(map(str, cmd))} failed (rc={p.returncode}):\n"
                             f"{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p.stdout


def build_tarball(timeout=900):
    """The cached rootfs tarball (built on first use)."""
    out = _run(["bash", str(ROOT / "scripts" / "build_fresh_root.sh")], timeout)
    path = Path(out.strip().splitlines()[-1])
    if not path.is_file() or path.stat().st_size == 0:
        raise FreshRootError(f"build_fresh_root.sh printed {path}, which is missing or empty")
    return path


def pip_index_env():
    """The host's pip index settings that also work inside the root."""
    env = {"PIP_CERT": os.environ["PIP_CERT"]} if os.environ.get("PIP_CERT") else {}
    for key, var in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL")):
        value = os.environ.get(var)
        if value is None:
            p = subprocess.run(["python3", "-m", "pip", "config", "get", f"global.{key}"],
                               capture_output=True, text=True)
            value = p.stdout.strip() if p.returncode == 0 else ""
        urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
        if urls:
            env[var] = " ".join(urls)
    return env


def checkout_files():
    """The checkout's files as git sees them (tracked and new, not ignored)."""
    out = _run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], 60)
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


class FreshRoot:
    """with FreshRoot(tmp_path) as r: r.run("apt-get update") ..."""

    def __init__(self, workdir, tarball=None):
        self.dir = Path(workdir) / "root"
        self.tarball = tarball or build_tarball()
        self.mounts = []

    def __enter__(self):
        t0 = time.monotonic()
        self.dir.mkdir(parents=True)
        _run(["tar", "-C", str(self.dir), "--numeric-owner", "-xpf", str(self.tarball)], 300)
        shutil.copy("/etc/resolv.conf", self.dir / "etc" / "resolv.conf")
        for f in ["/etc/pip.conf", *Path("/usr/local/share/ca-certificates").glob("*.crt")]:
            if os.path.isfile(f):
                (self.dir / str(f)[1:]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, self.dir / str(f)[1:])
        try:
            self._mount("proc", "proc", ["-t", "proc"])
            self._mount("/sys", "sys", ["--rbind"])
            self._mount("/dev", "dev", ["--rbind"])
            for cache, inside in (("apt-archives", "var/cache/apt/archives"),
                                  ("pip-cache", "root/.cache/pip")):
                host = CACHE / "fresh-root" / cache
                host.mkdir(parents=True, exist_ok=True)
                self._mount(str(host), inside, ["--bind"])
        except BaseException:
            self._umount()
            raise
        self.setup_seconds = time.monotonic() - t0
        return self

    def _mount(self, src, inside, opts):
        target = self.dir / inside
        target.mkdir(parents=True, exist_ok=True)
        _run(["mount", *opts, src, str(target)], 60)
        self.mounts.append(target)

    def _umount(self):
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True)
        self.mounts = []

    def __exit__(self, *exc):
        self._umount()
        if not any(self.dir.glob("proc/*")):        # never delete through a live mount
            shutil.rmtree(self.dir, ignore_errors=True)

    def copy_checkout(self, inside="root/vub"):
        """The checkout's files (no .venv, no build output) at /root/vub."""
        dest = self.dir / inside
        for f in checkout_files():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
        return "/" + inside

    def run(self, script, timeout=900, cwd="/"):
        """bash -c SCRIPT in the root with a clean environment; (rc, output)."""
        env = {"PATH": PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", "TERM": "dumb",
               "DEBIAN_FRONTEND": "noninteractive", **pip_index_env()}
        p = subprocess.run(["chroot", str(self.dir), "/bin/bash", "-c",
                            f"cd {cwd} && {script}"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout

    def check(self, script, timeout=900, cwd="/"):
        rc, out = self.run(script, timeout, cwd)
        if rc != 0:
            raise FreshRootError(f"in the fresh root: {script}\nfailed (rc={rc}):\n{out[-4000:]}")
        return out
