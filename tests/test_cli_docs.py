"""scripts/cli_docs.py: the man page and the bash completion are rendered from
the argument parsers, so every option and subcommand is in them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import cli_docs  # noqa: E402
from balloon_device.host import cli  # noqa: E402


def all_option_strings():
    out = set()
    for _, parser in cli_docs.parsers():
        for a in parser._actions:
            out.update(o for o in a.option_strings if a.help != "==SUPPRESS==")
        for sa in cli_docs.sub_actions(parser):
            for sp in sa.choices.values():
                out.update(o for a in sp._actions for o in a.option_strings)
    return out


def test_man_page_has_every_option_and_subcommand():
    page = cli_docs.man_page()
    flat = page.replace("\\-", "-")
    for opt in all_option_strings():
        assert f"\\fB{opt}\\fR" in flat or f"\\fB{opt}," in flat or f", \\fB{opt}" in flat, opt
    for name in cli.SUBCOMMANDS:
        assert f".SS vhost-user-balloon {name}" in flat
    for cmd in ("stats-interval", "events", "inhibit", "target"):
        assert f"\\fB{cmd}\\fR" in flat
    assert "--python-hot-path" not in flat          # hidden options stay hidden


def test_man_page_renders_without_warnings(tmp_path):
    src = tmp_path / "vhost-user-balloon.1"
    src.write_text(cli_docs.man_page())
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(src)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    p = subprocess.run(["groff", "-man", "-Tutf8", str(src)], capture_output=True, text=True,
                       timeout=60)
    text = re.sub(".\b", "", p.stdout)          # no overstrike (bold)
    assert "stats-interval" in text and "EXIT STATUS" in text


@pytest.fixture(scope="module")
def completion(tmp_path_factory):
    path = tmp_path_factory.mktemp("bash") / "vhost-user-balloon"
    path.write_text(cli_docs.bash_completion())
    return path


def complete(script, line):
    """COMPREPLY for the command line typed so far (the cursor at its end)."""
    words = line.split(" ")
    prog = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n_vhost_user_balloon\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    p = subprocess.run(["bash", "--norc", "-c", prog], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return sorted(w for w in p.stdout.splitlines() if w)


def test_bash_completion(completion, tmp_path):
    assert complete(completion, "vhost-user-balloon ") == sorted(
        [w for _, acts in cli_docs.options(cli._daemon_parser()) for a in acts
         for w in a.option_strings] + list(cli.SUBCOMMANDS))
    assert complete(completion, "vhost-user-balloon ct") == ["ctl"]
    assert complete(completion, "vhost-user-balloon backend") == ["backend-json"]
    assert complete(completion, "vhost-user-balloon --disc") == ["--discard"]
    assert complete(completion, "vhost-user-balloon --discard p") == ["punch-hole"]
    assert complete(completion, "vhost-user-balloon --log-format ") == ["json", "text"]
    assert complete(completion, "vhost-user-balloon ctl --socket-path /x st") == [
        "stats", "stats-interval", "status"]
    assert complete(completion, "vhost-user-balloon ctl --socket-path /x inhibit ") == [
        "--guest", "--help", "-h", "off", "on"]
    assert complete(completion, "vhost-user-balloon ctl --socket-path /x events --c") == [
        "--count"]
    assert complete(completion, "vhost-user-balloon qemu-args --lib") == ["--libvirt"]
    assert complete(completion, "vhost-user-balloon --memory 1") == []      # free value
    (tmp_path / "guest1.sock").write_text("")
    assert complete(completion, f"vhost-user-balloon --socket-path {tmp_path}/gu") == [
        f"{tmp_path}/guest1.sock"]
