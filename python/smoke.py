"""Smoke test of an installed wheel: the bundled binary is found (no EUA_BIN, no PATH entry)
and the reference calls work on a fresh data dir. Run with the wheel's venv python."""

import os
import sys
import tempfile
from pathlib import Path

assert "EUA_BIN" not in os.environ, "run without EUA_BIN: the bundled binary must be found"

import eks_upgrade_agent  # noqa: E402
from eks_upgrade_agent import ArtifactType, ProgressTracker, TaskType, TestArtifactsManager  # noqa: E402

assert "site-packages" in eks_upgrade_agent.__file__, eks_upgrade_agent.__file__
binary = eks_upgrade_agent.find_binary()
assert Path(binary).parent == Path(sys.executable).parent, (binary, sys.executable)
print("bundled binary:", binary)

with tempfile.TemporaryDirectory() as d:
    with ProgressTracker("smoke-1", "plan-1", "cluster-1", storage_path=d) as t:
        t.start_upgrade("Initialization")
        t.add_task("task-1", "Deploy Infrastructure", TaskType.UPGRADE_STEP)
        t.start_task("task-1")
        e = t.update_task_progress("task-1", 50.0, "Half way complete")
        assert e.percentage == 50.0
        t.complete_task("task-1")
        t.complete_upgrade()
        s = t.get_progress_summary()
        assert s["status"] == "COMPLETED" and s["overall_percentage"] == 100.0, s
    with TestArtifactsManager(d) as m:
        session = m.create_session("smoke-1", "cluster-1")
        c = m.create_collection(session.session_id, "logs")
        f = Path(d) / "a.log"
        f.write_text("hello\n")
        a = m.add_artifact(session.session_id, c.collection_id, f, artifact_type=ArtifactType.LOG_FILE)
        assert a.file_size == 6
        assert m.get_session_summary(session.session_id)["total_artifacts"] == 1
print("smoke: ok")
