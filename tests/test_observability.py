"""contrib/prometheus (alert rules) and contrib/grafana (dashboard): promtool
checks the rules and runs their unit tests, every PromQL expression of the
dashboard parses, and every vhost_user_balloon_* series they use is one the
daemon really exports (scraped from a daemon with two guests, stats and the
policy).  promtool comes from scripts/promtool.sh (Debian's prometheus
package); the tests fail, never skip, when it cannot be had."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from balloon_device.host.policy import PolicyConfig
from test_metrics import scrape
from test_multi import GuestRig, make_daemon

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "contrib" / "prometheus" / "vhost-user-balloon.rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "vhost-user-balloon.rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "vhost-user-balloon-dashboard.json"
SUFFIXES = ("_bucket", "_count", "_sum")


@pytest.fixture(scope="module")
def promtool():
    p = subprocess.run(["bash", str(ROOT / "scripts" / "promtool.sh")], capture_output=True,
                       text=True, timeout=600)
    if p.returncode != 0 or not p.stdout.strip():
        pytest.fail(f"no promtool (scripts/promtool.sh rc={p.returncode}):\n{p.stderr[-2000:]}",
                    pytrace=False)
    return p.stdout.strip().splitlines()[-1]


def run(cmd, cwd=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}:\n{p.stdout}{p.stderr}"
    return p.stdout


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def rule_exprs():
    """The rules' one-line `expr:` values (promtool checks the file as a whole)."""
    return re.findall(r"^\s+expr: (.+)$", RULES.read_text(), re.M)


def test_rules_check_and_unit_tests(promtool):
    out = run([promtool, "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(rule_exprs())} rules found" in out
    out = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_dashboard_queries_parse(promtool, tmp_path):
    """Each panel query as a recording rule, so that promtool parses it."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}",
         "expr": e.replace("$guest", ".*").replace("$job", ".*")}
        for i, e in enumerate(dashboard_exprs())]}]}
    f = tmp_path / "dashboard.rules.yml"
    f.write_text(json.dumps(rules))            # JSON is YAML
    out = run([promtool, "check", "rules", str(f)])
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in out


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids) and dash["uid"] == "vhost-user-balloon"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "job", "guest"}
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every series name a daemon with guests, stats, discards and a policy exports."""
    d = make_daemon(tmp_path_factory.mktemp("obs"), metrics_port=0, policy=PolicyConfig())
    rig = GuestRig(d, "a")
    try:
        rig.report(2 << 20)
        d.guests["a"].device.latest_stats = {"available_memory": 1 << 30}
        d.guests["a"].device.stats_time = time.time()
        d.policy.tick()
        d.policy.last["sweeps"] = {"a": 1}      # as after a completed sweep
        names = {k[0] for k in scrape(d)}
    finally:
        rig.close()
        d.close()
    assert "vhost_user_balloon_policy_pressure" in names
    return names


def used_series(exprs):
    return {m for e in exprs for m in re.findall(r"\b(vhost_user_balloon_\w+|process_\w+)", e)}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_only_exported_series_are_used(exported, source):
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    for name in used_series(exprs):
        base = next((name[:-len(s)] for s in SUFFIXES if name.endswith(s)), name)
        assert name in exported or any(base + s in exported for s in SUFFIXES), name


def test_exposition_passes_promtool_lint(promtool, exported, tmp_path):
    """promtool check metrics on a real scrape (naming and help conventions)."""
    import urllib.request
    d = make_daemon(tmp_path, metrics_port=0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics.port}/metrics",
                                    timeout=5) as r:
            text = r.read()
    finally:
        d.close()
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       timeout=60)
    assert p.returncode == 0, (p.stdout + p.stderr).decode()
