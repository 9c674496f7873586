"""``ProgressTracker`` as the reference documents it, against a data dir and a server."""

from __future__ import annotations

import base64
import os
import re
import socket
import json
import subprocess
import sys
import threading
import time

from pathlib import Path

import pytest

from eks_upgrade_agent import (
    InvalidInputError,
    InvalidTransitionError,
    ProgressEvent,
    ProgressStatus,
    ProgressTracker,
    TaskProgress,
    TaskType,
)

SUMMARY_KEYS = {
    "upgrade_id", "cluster_name", "status", "overall_percentage", "progress_percentage",
    "current_phase", "current_task", "started_at", "duration", "total_tasks", "active_tasks",
    "failed_tasks", "completed_tasks", "active_task_names", "failed_task_names",
}
TASK_KEYS = {
    "task_id", "task_name", "task_type", "status", "percentage", "current_step",
    "completed_steps", "total_steps", "started_at", "duration", "error_message", "recent_events",
}
TIMEDELTA = re.compile(r"^(\d+ days?, )?\d+:\d\d:\d\d(\.\d{6})?$")


def test_the_seed_usage_example(backend):
    tracker = backend.tracker()
    tracker.start_upgrade("Initialization")
    task = tracker.add_task("task-1", "Deploy Infrastructure", TaskType.UPGRADE_STEP)
    assert isinstance(task, TaskProgress)
    assert (task.task_id, task.task_name, task.task_type) == ("task-1", "Deploy Infrastructure", TaskType.UPGRADE_STEP)
    assert task.status == ProgressStatus.NOT_STARTED and task.percentage == 0.0
    started = tracker.start_task("task-1", "Starting infrastructure deployment")
    assert isinstance(started, ProgressEvent)
    assert started.status == ProgressStatus.IN_PROGRESS
    assert started.message == "Starting infrastructure deployment"
    half = tracker.update_task_progress("task-1", 50.0, "Half way complete")
    assert half.percentage == 50.0 and half.task_id == "task-1" and half.task_type == TaskType.UPGRADE_STEP
    done = tracker.complete_task("task-1", "Infrastructure deployed successfully")
    assert done.status == ProgressStatus.COMPLETED and done.percentage == 100.0
    tracker.complete_upgrade()
    s = tracker.get_progress_summary()
    assert set(s) == SUMMARY_KEYS
    assert s["status"] == "COMPLETED"
    assert s["overall_percentage"] == s["progress_percentage"] == 100.0
    assert (s["total_tasks"], s["completed_tasks"], s["active_tasks"], s["failed_tasks"]) == (1, 1, 0, 0)
    assert s["current_phase"] == "Initialization"
    assert TIMEDELTA.match(s["duration"]), s["duration"]
    assert s["started_at"].endswith("+00:00")
    assert tracker.calculate_progress_percentage() == 100.0
    assert tracker.get_estimated_completion_time() is None


def test_enums_are_str_enums():
    assert TaskType.UPGRADE_STEP == "upgrade_step"
    assert ProgressStatus.IN_PROGRESS == "in_progress"
    assert [s.value for s in ProgressStatus] == [
        "not_started", "in_progress", "completed", "failed", "paused", "cancelled"]
    assert [t.value for t in TaskType] == ["upgrade_plan", "upgrade_step", "validation", "rollback", "cleanup"]


def test_unknown_tasks_give_none(backend):
    tracker = backend.tracker()
    assert tracker.start_task("nope") is None
    assert tracker.update_task_progress("nope", 10, "x") is None
    assert tracker.complete_task("nope") is None
    assert tracker.fail_task("nope", "boom") is None
    assert tracker.get_task_progress("nope") is None
    assert tracker.get_current_task() is None


def test_summary_names_running_and_failed_tasks_and_the_current_task(backend):
    tracker = backend.tracker()
    tracker.start_upgrade("nodes")
    for tid, name in [("a", "Alpha"), ("b", "Beta"), ("c", "Gamma")]:
        tracker.add_task(tid, name, TaskType.UPGRADE_STEP)
    tracker.start_task("b")
    tracker.update_task_progress("b", 30, "draining")
    tracker.start_task("c")
    tracker.start_task("a")
    failed = tracker.fail_task("a", "PDB blocks eviction")
    assert failed.status == ProgressStatus.FAILED
    s = tracker.get_progress_summary()
    assert s["status"] == "IN_PROGRESS"
    assert s["active_tasks"] == 2 and s["failed_tasks"] == 1 and s["total_tasks"] == 3
    assert s["active_task_names"] == ["Beta", "Gamma"]
    assert s["failed_task_names"] == ["Alpha"]
    assert s["current_task"] == {"task_id": "b", "task_name": "Beta", "status": "IN_PROGRESS", "percentage": 30.0}
    assert s["overall_percentage"] == pytest.approx(10.0)
    current = tracker.get_current_task()
    assert current.task_id == "b" and current.status == ProgressStatus.IN_PROGRESS
    eta = tracker.get_estimated_completion_time()
    assert eta is not None and eta.endswith("+00:00")
    tracker.complete_task("b")
    tracker.complete_task("c")
    s = tracker.get_progress_summary()
    assert s["current_task"]["task_id"] == "a" and s["current_task"]["status"] == "FAILED"
    assert tracker.get_current_task() is None


def test_task_progress_detail_and_recent_events(backend):
    tracker = backend.tracker()
    tracker.add_task("t", "T", TaskType.VALIDATION)
    tracker.start_task("t")
    for p in range(10, 80, 10):
        tracker.update_task_progress("t", p, f"at {p}", nodes=p // 10)
    d = tracker.get_task_progress("t")
    assert set(d) == TASK_KEYS
    assert (d["task_name"], d["task_type"], d["status"], d["percentage"]) == ("T", "validation", "in_progress", 70.0)
    assert [e["percentage"] for e in d["recent_events"]] == [30.0, 40.0, 50.0, 60.0, 70.0]
    assert set(d["recent_events"][0]) == {"timestamp", "status", "message", "percentage"}
    assert d["recent_events"][-1]["message"] == "at 70"
    assert TIMEDELTA.match(d["duration"] or "0:00:00") or d["duration"] is None


def test_event_details_are_kept(backend):
    tracker = backend.tracker()
    tracker.add_task("t", "T", TaskType.UPGRADE_STEP)
    tracker.start_task("t")
    e = tracker.update_task_progress("t", 42.5, "draining", pods=12, node="ip-10-0-1-23")
    assert e.details == {"pods": 12, "node": "ip-10-0-1-23"}
    assert e.event_id and e.seq > 0


def test_hierarchy_and_add_tasks(backend):
    tracker = backend.tracker()
    tracker.add_task("nodes", "Node groups", TaskType.UPGRADE_STEP)
    tracker.add_tasks([
        TaskProgress(task_id="ng-1", task_name="ng-1", task_type=TaskType.UPGRADE_STEP, parent_task_id="nodes"),
        TaskProgress(task_id="ng-2", task_name="ng-2", task_type=TaskType.UPGRADE_STEP, parent_task_id="nodes"),
    ])
    tracker.start_task("ng-1")
    tracker.update_task_progress("ng-1", 50, "half")
    parent = tracker.get_task_progress("nodes")
    assert parent["percentage"] == 25.0 and parent["status"] == "in_progress"
    assert tracker.get_progress_summary()["total_tasks"] == 3
    # Adding an existing id returns the stored task.
    again = tracker.add_task("ng-1", "ng-1", TaskType.UPGRADE_STEP, parent_task_id="nodes")
    assert again.percentage == 50.0


def test_bad_input_raises_and_changes_nothing(backend):
    tracker = backend.tracker()
    tracker.add_task("t", "T", TaskType.UPGRADE_STEP)
    tracker.start_task("t")
    tracker.update_task_progress("t", 40, "ok")
    with pytest.raises(InvalidInputError) as e:
        tracker.update_task_progress("t", 150, "too much")
    assert isinstance(e.value, ValueError) and "150" in str(e.value)
    assert e.value.code == "invalid_input", e.value.code
    with pytest.raises(ValueError):
        tracker.update_task_progress("t", float("nan"), "nan")
    # Nothing changed: still 40 % with the last good message.
    after = tracker.get_task_progress("t")
    assert after["percentage"] == 40.0 and after["recent_events"][-1]["message"] == "ok", after
    tracker.complete_task("t")
    with pytest.raises(InvalidTransitionError):
        tracker.start_task("t")
    assert tracker.get_task_progress("t")["percentage"] == 100.0


def test_callbacks_get_events_and_status_changes(backend):
    tracker = backend.tracker()
    events, completed, failed = [], [], []
    tracker.add_event_callback(events.append)
    tracker.add_status_callback(ProgressStatus.COMPLETED, completed.append)
    tracker.add_status_callback(ProgressStatus.FAILED, failed.append)
    tracker.add_task("a", "A", TaskType.UPGRADE_STEP)
    tracker.add_task("b", "B", TaskType.UPGRADE_STEP)
    tracker.start_task("a")
    tracker.update_task_progress("a", 60, "m")
    tracker.complete_task("a")
    tracker.start_task("b")
    tracker.fail_task("b", "boom")
    kinds = [(e.task_id, e.kind) for e in events]
    assert ("a", "task.progress") in kinds and ("a", "task.completed") in kinds and ("b", "task.failed") in kinds
    assert all(isinstance(e, ProgressEvent) for e in events)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert [t.task_id for t in completed] == ["a"] and completed[0].status == ProgressStatus.COMPLETED
    assert [t.task_id for t in failed] == ["b"] and failed[0].error_message == "boom"
    assert isinstance(completed[0], TaskProgress)


def test_follow_runs_callbacks_for_other_writers(backend):
    watcher = backend.tracker("u-follow", follow=True)
    seen, done = [], threading.Event()

    def on_event(e):
        seen.append(e)
        if e.kind == "task.completed":
            done.set()

    watcher.add_event_callback(on_event)
    writer = backend.tracker("u-follow")
    assert writer.resumed
    writer.add_task("t", "T", TaskType.UPGRADE_STEP)
    writer.start_task("t")
    writer.complete_task("t")
    assert done.wait(15), f"saw only {[e.kind for e in seen]}"
    # Each of the other writer's events once: all of the task's events, not just the last
    # ones, and no seq twice, also after a while of following.
    time.sleep(0.5)
    assert [e.kind for e in seen if e.task_id == "t"] == ["task.added", "task.started", "task.completed"]
    assert len({e.seq for e in seen}) == len(seen), [(e.seq, e.kind) for e in seen]
    # The watcher's own changes run its callbacks once, not twice.
    watcher.add_task("w", "W", TaskType.CLEANUP)
    time.sleep(0.5)
    assert [e.task_id for e in seen].count("w") == 1


def test_resume_from_storage(backend):
    first = backend.tracker()
    first.start_upgrade("planning")
    first.add_task("t", "T", TaskType.UPGRADE_PLAN)
    first.start_task("t")
    first.update_task_progress("t", 35, "planning")
    first.cleanup()
    second = backend.tracker()
    assert second.resumed
    s = second.get_progress_summary()
    assert s["status"] == "IN_PROGRESS" and s["current_phase"] == "planning" and s["total_tasks"] == 1
    assert second.update_task_progress("t", 70, "more").percentage == 70.0
    assert second.get_task_progress("t")["percentage"] == 70.0


def test_phases_and_failing_an_upgrade(backend):
    tracker = backend.tracker()
    tracker.start_upgrade()
    assert tracker.get_progress_summary()["current_phase"] == "Initialization"
    tracker.set_current_phase("control-plane")
    assert tracker.get_progress_summary()["current_phase"] == "control-plane"
    tracker.fail_upgrade("control plane upgrade timed out")
    assert tracker.get_progress_summary()["status"] == "FAILED"


def test_system_info_cleanup_and_context_manager(backend):
    with backend.tracker() as tracker:
        tracker.add_event_callback(lambda e: None)
        info = tracker.get_system_info()
        assert {"upgrade_id", "plan_id", "cluster_name", "storage", "eventbridge", "websocket", "callbacks"} <= set(info)
        assert info["eventbridge"] == {"enabled": False, "bus_name": None}
        assert info["callbacks"]["event_callbacks"] == 1
    tracker.cleanup()  # idempotent
    with pytest.raises(Exception):
        tracker.start_task("x")


def test_the_apply_child_is_closed_by_cleanup(local):
    tracker = local.tracker()
    tracker.add_task("t", "T", TaskType.UPGRADE_STEP)
    proc = tracker._backend.apply._proc
    assert proc is not None and proc.poll() is None
    tracker.cleanup()
    assert proc.poll() == 0


def _ws_first_message(port: int, path: str) -> dict:
    """A WebSocket handshake by hand (stdlib only) and the first text frame."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    while len(buf) < 2:
        buf += s.recv(4096)
    n = buf[1] & 0x7F
    off = 2
    if n == 126:
        while len(buf) < 4:
            buf += s.recv(4096)
        n, off = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        while len(buf) < 10:
            buf += s.recv(4096)
        n, off = int.from_bytes(buf[2:10], "big"), 10
    while len(buf) < off + n:
        buf += s.recv(65536)
    s.close()
    return json.loads(buf[off:off + n])


def test_enable_websocket_serves_the_reference_messages(local):
    from conftest import free_port

    port = free_port()
    tracker = local.tracker(enable_websocket=True, websocket_port=port)
    tracker.add_task("t", "T", TaskType.UPGRADE_STEP)
    tracker.start_task("t")
    assert tracker.get_system_info()["websocket"]["enabled"]
    msg = _ws_first_message(port, "/api/v1/upgrades/upgrade-123/ws")
    assert msg["type"] == "progress_summary"
    assert msg["data"]["overall_percentage"] == 0.0 and msg["data"]["active_tasks"] == 1
    assert msg["data"]["current_task"]["task_id"] == "t"
    tracker.cleanup()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_apply_child_is_closed_at_interpreter_exit(eua_bin, tmp_path):
    """A program that never calls ``cleanup()``: at exit, the interpreter closes the ``apply``
    child and waits for it, so no process of ours outlives the program."""
    pkg = str(Path(__file__).resolve().parent.parent)
    script = (
        f"import sys; sys.path.insert(0, {pkg!r})\n"
        "from eks_upgrade_agent import ProgressTracker, TaskType\n"
        f"t = ProgressTracker('u-exit', 'p', 'c', storage_path={str(tmp_path)!r})\n"
        "t.add_task('t', 'T', TaskType.UPGRADE_STEP)\n"
        "print(t._backend.apply._proc.pid, flush=True)\n"
    )
    # Output to a file, not a pipe: waiting for a pipe's end would also wait for the child.
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-c", script], env={**os.environ, "EUA_BIN": eua_bin},
                              stdout=f, stderr=subprocess.STDOUT, timeout=60).returncode
    assert code == 0, log.read_text()
    pid = int(log.read_text().split()[-1])
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        state = ""
    assert "State:" not in state or "Z (zombie)" in state, f"apply child {pid} outlived the program: {state[:200]}"
    # And what it acknowledged is there.
    with ProgressTracker("u-exit", "p", "c", storage_path=str(tmp_path)) as again:
        assert again.get_task_progress("t") is not None


def test_the_upgrade_model_is_the_reference_one(backend):
    """``tracker.progress`` is the reference's upgrade model: its field names, the tasks keyed
    by id, the overall percentage as the summary gives it."""
    from eks_upgrade_agent import UpgradeProgress

    tracker = backend.tracker()
    tracker.start_upgrade("Planning")
    tracker.add_task("a", "A", TaskType.UPGRADE_STEP)
    tracker.add_task("b", "B", TaskType.VALIDATION)
    tracker.start_task("a")
    tracker.update_task_progress("a", 50, "half")
    p = tracker.progress
    assert isinstance(p, UpgradeProgress)
    assert set(p.model_dump()) == {
        "upgrade_id", "plan_id", "cluster_name", "status", "started_at", "completed_at",
        "duration", "overall_percentage", "current_phase", "tasks", "metadata",
    }
    assert p.status == ProgressStatus.IN_PROGRESS and p.current_phase == "Planning"
    assert set(p.tasks) == {"a", "b"}
    assert p.tasks["a"].percentage == 50.0 and p.tasks["a"].task_name == "A"
    assert p.tasks["b"].task_type == TaskType.VALIDATION
    assert p.overall_percentage == tracker.calculate_progress_percentage() == 25.0
    assert p.started_at is not None
