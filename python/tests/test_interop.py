"""What Python writes, the CLI reads, and back; and finding the binary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from eks_upgrade_agent import TaskType

PKG = str(Path(__file__).resolve().parent.parent)


def test_python_writes_the_cli_reads(backend):
    tracker = backend.tracker("u-int")
    tracker.start_upgrade("nodes")
    tracker.add_task("ng-1", "Node group 1", TaskType.UPGRADE_STEP)
    tracker.start_task("ng-1")
    tracker.update_task_progress("ng-1", 40, "draining", pods=12)
    show = backend.cli_json("progress", "upgrade", "show", "u-int")
    assert show["overall_percentage"] == 40.0 and show["current_phase"] == "nodes"
    assert show["active_task_names"] == ["Node group 1"]
    task = backend.cli_json("progress", "task", "show", "u-int", "ng-1")
    assert task["recent_events"][0]["details"] == {"pods": 12}
    assert task["recent_events"][0]["message"] == "draining"


def test_the_cli_writes_python_reads(backend):
    tracker = backend.tracker("u-int")
    backend.cli("progress", "task", "add", "u-int", "t", "--name", "From the CLI", "--type", "validation")
    backend.cli("progress", "task", "start", "u-int", "t")
    backend.cli("progress", "task", "update", "u-int", "t", "--percent", "55", "-m", "cli")
    d = tracker.get_task_progress("t")
    assert (d["task_name"], d["task_type"], d["percentage"]) == ("From the CLI", "validation", 55.0)
    assert d["recent_events"][-1]["message"] == "cli"
    assert tracker.update_task_progress("t", 60, "python").percentage == 60.0


def test_artifacts_python_adds_the_cli_reads_and_back(backend, tmp_path):
    m = backend.manager()
    s = m.create_session("u1", "prod")
    c = m.create_collection(s.session_id, "logs")
    f = tmp_path / "kubelet.log"
    f.write_bytes(b"hello from python\n")
    a = m.add_artifact(s.session_id, c.collection_id, f, tags=["node"])
    found = backend.cli_json("artifacts", "search", "--session", s.session_id, "--tag", "node")
    assert [x["artifact_id"] for x in found] == [a.artifact_id]
    out = tmp_path / "out.log"
    backend.cli("artifacts", "get", a.artifact_id, "--out", str(out))
    assert out.read_bytes() == b"hello from python\n"
    g = tmp_path / "junit.xml"
    g.write_bytes(b"<testsuite/>")
    backend.cli("artifacts", "add", s.session_id, c.collection_id, str(g), "--type", "test_result")
    names = sorted(x.name for x in m.search_artifacts(session_id=s.session_id))
    assert names == ["junit.xml", "kubelet.log"]


def test_python_export_uses_the_reference_names(local, tmp_path):
    tracker = local.tracker("u-exp")
    tracker.start_upgrade()
    tracker.add_task("t", "T", TaskType.UPGRADE_STEP)
    tracker.start_task("t")
    tracker.update_task_progress("t", 30, "m")
    out = tmp_path / "upgrade_u-exp.json"
    local.cli("progress", "export", "u-exp", "--out", str(out))
    v = json.loads(out.read_text())
    assert v["overall_percentage"] == 30.0 and v["tasks"]["t"]["percentage"] == 30.0
    assert [e["percentage"] for e in v["tasks"]["t"]["events"]] == [0.0, 0.0, 30.0]
    assert "overall_progress" not in v and "progress_percentage" not in v["tasks"]["t"]


def _run_find(env):
    code = "import eks_upgrade_agent as e\ntry:\n    print(e.find_binary())\nexcept e.BinaryNotFoundError as x:\n    print('ERR', x)\n"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=PKG).stdout


def test_binary_lookup_order_and_error(eua_bin, tmp_path):
    base = {"PYTHONPATH": PKG, "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    # EUA_BIN first (nothing is bundled in this environment).
    assert _run_find(dict(base, EUA_BIN=eua_bin, PATH="")).strip() == eua_bin
    # Then PATH.
    d = tmp_path / "bin"
    d.mkdir()
    (d / "eks-upgrade-agent").symlink_to(eua_bin)
    assert _run_find(dict(base, PATH=str(d))).strip() == str(d / "eks-upgrade-agent")
    # None: the error names all three.
    err = _run_find(dict(base, PATH=str(tmp_path / "empty")))
    assert err.startswith("ERR") and "bundled" in err and "EUA_BIN" in err and "PATH" in err, err
    # A wrong EUA_BIN is named, not skipped.
    err = _run_find(dict(base, EUA_BIN=str(tmp_path / "missing"), PATH=str(d)))
    assert err.startswith("ERR") and "missing" in err, err
