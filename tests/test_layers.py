"""Import direction: host -> device -> vhostuser, never the reverse.

Layers (lowest first):
    vhostuser            generic vhost-user library (vhostuser/testing: its test doubles)
    balloon_device       the virtio-balloon device (no sockets, no Prometheus, no host side)
    balloon_device.host  everything that runs devices on a host
A module may import its own layer and the layers below it.  Benchmarks,
scripts and the demo never import from tests/.
"""

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package prefix -> packages it must never import (checked by prefix)
FORBIDDEN = {
    "vhostuser": ("balloon_device", "tests"),
    "balloon_device": ("balloon_device.host", "tests"),
    "balloon_device.host": ("tests",),
}
NO_TESTS = ("benchmarks", "scripts")


def module_name(path, root):
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path, root):
    """Absolute names of every module `path` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    mod = module_name(path, root)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names]  # `from pkg import submodule`
    return out


def layer_of(mod):
    best = None
    for layer in FORBIDDEN:
        if mod == layer or mod.startswith(layer + "."):
            if best is None or len(layer) > len(best):
                best = layer
    return best


def violations(root):
    bad = []
    for pyfile in sorted(root.rglob("*.py")):
        rel = pyfile.relative_to(root)
        if rel.parts[0] in (".venv", "build", ".git"):
            continue
        if rel.parts[0] in NO_TESTS:
            for name in imports_of(pyfile, root):
                if name == "tests" or name.startswith("tests."):
                    bad.append(f"{rel} imports {name}")
            continue
        layer = layer_of(module_name(pyfile, root))
        if layer is None:
            continue
        for name in imports_of(pyfile, root):
            for above in FORBIDDEN[layer]:
                if name == above or name.startswith(above + "."):
                    bad.append(f"{rel} ({layer}) imports {name}")
    return sorted(set(bad))


def test_no_layer_reaches_up():
    assert violations(ROOT) == []


def test_benchmarks_and_scripts_exist_to_be_checked():
    for d in NO_TESTS + ("vhostuser", "balloon_device", "balloon_device/host"):
        assert any((ROOT / d).glob("*.py")), d


@pytest.mark.parametrize("where, code", [
    ("vhostuser/x.py", "from balloon_device import device\n"),
    ("vhostuser/x.py", "import balloon_device.host.cli\n"),
    ("balloon_device/x.py", "from .host import metrics\n"),
    ("balloon_device/x.py", "from . import host\n"),
    ("balloon_device/sub/x.py", "from ..host.metrics import X\n"),
    ("balloon_device/x.py", "from balloon_device.host.metrics import X\n"),
    ("benchmarks/x.py", "from tests.harness import Guest\n"),
    ("balloon_device/host/x.py", "import tests.conftest\n"),
])
def test_checker_catches_a_layer_reaching_up(tmp_path, where, code):
    for pkg in ("vhostuser", "balloon_device", "balloon_device/host", "balloon_device/sub",
                "benchmarks"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / where).write_text(code)
    assert violations(tmp_path), f"{where}: {code!r} not caught"


def test_checker_allows_downward_imports(tmp_path):
    for pkg in ("vhostuser", "balloon_device", "balloon_device/host"):
        os.makedirs(tmp_path / pkg, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "balloon_device/host/x.py").write_text(
        "from ..device import D\nfrom vhostuser.loop import Server\nfrom . import y\n")
    (tmp_path / "balloon_device/x.py").write_text("from vhostuser.vring import Chain\n")
    assert violations(tmp_path) == []
