"""What a long-running agent meets: interrupted calls, threads, hung or dropped children,
callbacks that raise, odd ids, other locales; each against a data dir and a server where it
applies."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eks_upgrade_agent import (
    InvalidInputError,
    ProgressStatus,
    ProgressTracker,
    TaskType,
    TestArtifactsManager,
)
from eks_upgrade_agent.errors import BackendError, ClosedError, EksUpgradeAgentError


def _children() -> list:
    """Our live child processes (zombies included: an unreaped child is a leak too)."""
    me, out = os.getpid(), []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.append((int(p), fields[0]))
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Interrupt(Exception):
    pass


def _interrupted(pid: int, call) -> None:
    """Runs ``call`` while the child ``pid`` is stopped and a signal handler raises into the
    wait (as Ctrl-C or a timeout decorator does); then lets the child go on."""
    def on_alarm(*_):
        raise _Interrupt()

    old = signal.signal(signal.SIGALRM, on_alarm)
    os.kill(pid, signal.SIGSTOP)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(_Interrupt):
            call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    time.sleep(0.3)  # an answer the child writes now must not reach a later call


def test_an_interrupted_call_never_shifts_later_answers(local, tmp_path):
    t = local.tracker()
    t.add_task("a", "A", TaskType.UPGRADE_STEP)
    t.start_task("a")
    _interrupted(t._res.backend.apply.pid, lambda: t.update_task_progress("a", 10, "ten"))
    for pct in (20, 30, 40):
        ev = t.update_task_progress("a", pct, f"p{pct}")
        assert (ev.percentage, ev.message) == (pct, f"p{pct}")
    assert t.start_task("zzz-unknown") is None
    assert t.get_task_progress("a")["percentage"] == 40

    m = local.manager()
    s = m.create_session("u", "c")
    _interrupted(m._res.apply.pid, lambda: m.create_session("u", "c", session_name="lost?"))
    assert m.get_session(s.session_id).session_id == s.session_id
    c = m.create_collection(s.session_id, "logs")
    assert c is not None and c.name == "logs"


def test_threads_share_a_tracker_and_a_manager(backend, tmp_path):
    t = backend.tracker()
    n_threads, n_calls = 6, 20
    for i in range(n_threads):
        t.add_task(f"t{i}", f"T{i}", TaskType.UPGRADE_STEP)
    errors = []

    def work(i):
        try:
            for k in range(1, n_calls + 1):
                ev = t.update_task_progress(f"t{i}", k, f"{i}:{k}")
                assert (ev.task_id, ev.percentage, ev.message) == (f"t{i}", k, f"{i}:{k}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    for i in range(n_threads):
        assert t.get_task_progress(f"t{i}")["percentage"] == n_calls

    m = backend.manager()
    s = m.create_session("u", "c")
    c = m.create_collection(s.session_id, "logs")
    files = []
    for i in range(n_threads):
        f = tmp_path / f"f{i}.log"
        f.write_text(f"file {i}\n")
        files.append(f)
    got = {}

    def add(i):
        try:
            got[i] = m.add_artifact(s.session_id, c.collection_id, files[i])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert {i: a.name for i, a in got.items()} == {i: f"f{i}.log" for i in range(n_threads)}


def test_follow_runs_each_callback_once_and_remembers_little(backend):
    t = backend.tracker(follow=True)
    t.DISPATCHED_MAX = 16
    seen, entered = [], []
    t.add_event_callback(lambda e: seen.append(e.seq))
    t.add_status_callback(ProgressStatus.COMPLETED, lambda task: entered.append(task.task_id))
    t.start_upgrade()
    for i in range(12):
        t.add_task(f"t{i}", f"T{i}", TaskType.UPGRADE_STEP)
        t.start_task(f"t{i}")
        t.update_task_progress(f"t{i}", 50, "half")
        t.complete_task(f"t{i}")
    backend.cli("progress", "task", "add", "upgrade-123", "x", "--name", "X", "--type", "validation")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(seen) < 49:
        time.sleep(0.05)
    time.sleep(1)
    assert len(seen) == 49 and len(set(seen)) == 49, sorted(seen)
    assert sorted(entered) == sorted(f"t{i}" for i in range(12))
    assert len(t._dispatched) <= 16


def test_a_raising_callback_neither_fails_the_call_nor_skips_the_others(backend, caplog):
    t = backend.tracker()
    got, tasks = [], []

    def bad(e):
        raise RuntimeError("callback bug")

    t.add_event_callback(bad)
    t.add_event_callback(lambda e: got.append(e.kind))
    t.add_status_callback(ProgressStatus.IN_PROGRESS, lambda task: 1 / 0)
    t.add_status_callback(ProgressStatus.IN_PROGRESS, lambda task: tasks.append(task.task_id))
    with caplog.at_level(logging.ERROR, logger="eks_upgrade_agent"):
        t.add_task("a", "A", TaskType.UPGRADE_STEP)
        ev = t.start_task("a")
    assert ev is not None and ev.kind == "task.started"
    assert got == ["task.added", "task.started"] and tasks == ["a"]
    assert t.get_task_progress("a")["status"] == "in_progress"
    assert "callback bug" in caplog.text and "ZeroDivisionError" in caplog.text


def test_ids_starting_with_a_dash_are_read_back(backend):
    t = backend.tracker("-u1", follow=True)
    seen = []
    t.add_event_callback(lambda e: seen.append(e.task_id))
    t.add_task("-t", "Dash", TaskType.UPGRADE_STEP)
    assert t.start_task("-t").task_id == "-t"
    assert t.get_task_progress("-t")["status"] == "in_progress"
    assert t.get_progress_summary()["upgrade_id"] == "-u1"
    assert t.get_current_task().task_id == "-t"
    time.sleep(0.5)
    assert seen == ["-t", "-t"]
    m = backend.manager()
    assert m.upload_session_artifacts("-s") == {}
    assert m.get_session("-h") is None


def test_trackers_and_managers_dropped_without_cleanup_leave_no_child_or_fd(local):
    gc.collect()
    fds, kids = _fds(), _children()
    for i in range(4):
        t = ProgressTracker(f"d{i}", "p", "c", storage_path=str(local.data_dir))
        t.add_task("a", "A", TaskType.UPGRADE_STEP)
        f = ProgressTracker(f"f{i}", "p", "c", storage_path=str(local.data_dir), follow=True)
        f.add_event_callback(lambda e: None)
        m = TestArtifactsManager(str(local.data_dir))
        m.create_session("u", "c")
        del t, f, m
        with pytest.raises(InvalidInputError):
            ProgressTracker("bad id", "p", "c", storage_path=str(local.data_dir))
    gc.collect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_fds(), _children()) != (fds, kids):
        time.sleep(0.1)
    assert (_fds(), _children()) == (fds, kids)


def test_odd_ids_answer_like_unknown_ones(backend):
    t = backend.tracker()
    m = backend.manager()
    for bad in ("a b", "x/y", "", "\x00", ".", "..", "-h", "n" * 200):
        assert t.start_task(bad) is None, bad
        assert t.update_task_progress(bad, 5, "m") is None, bad
        assert t.complete_task(bad) is None, bad
        assert t.fail_task(bad, "e") is None, bad
        assert t.get_task_progress(bad) is None, bad
        assert m.get_session(bad) is None, bad
        assert m.get_session_summary(bad) is None, bad
        assert m.complete_session(bad) is False, bad
        assert m.create_collection(bad, "c") is None, bad
    stats = m.get_artifact_statistics("nope")
    assert (stats["total_artifacts"], stats["sessions_searched"]) == (0, 0)
    assert m.upload_session_artifacts("nope") == {}
    assert m.get_recent_artifacts(session_id="nope") == []
    assert m.search_artifacts(session_id="nope") == []


def test_add_artifact_of_a_directory_or_a_missing_file_is_the_same_on_both(backend, tmp_path):
    m = backend.manager()
    s = m.create_session("u", "c")
    c = m.create_collection(s.session_id, "logs")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "one.log").write_text("1")
    (d / "two.log").write_text("2")
    with pytest.raises(InvalidInputError, match="is a directory"):
        m.add_artifact(s.session_id, c.collection_id, d)
    assert m.add_artifact(s.session_id, c.collection_id, tmp_path / "missing.log") is None
    assert m.get_session_summary(s.session_id)["total_artifacts"] == 0


def test_status_callbacks_see_every_entry_into_a_status(backend):
    t = backend.tracker()
    watcher = backend.tracker(follow=True)
    mine, followed = [], []
    for st in ProgressStatus:
        t.add_status_callback(st, lambda task, st=st: mine.append((task.task_id, st.value)))
        watcher.add_status_callback(st, lambda task, st=st: followed.append((task.task_id, st.value)))
    t.start_upgrade()
    t.add_task("solo", "Solo", TaskType.UPGRADE_STEP)
    t.update_task_progress("solo", 10, "straight to progress")
    t.update_task_progress("solo", 20, "still running")
    t.add_task("parent", "P", TaskType.UPGRADE_PLAN)
    t.add_task("kid", "K", TaskType.UPGRADE_STEP, parent_task_id="parent")
    t.start_task("kid")
    t.complete_task("kid")
    want = {("solo", "in_progress"), ("kid", "in_progress"), ("parent", "in_progress"),
            ("kid", "completed"), ("parent", "completed")}
    assert sorted(mine) == sorted(want)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(followed) < len(want):
        time.sleep(0.05)
    time.sleep(0.5)
    assert sorted(followed) == sorted(want)


def test_a_non_utf8_locale_changes_nothing(local, eua_bin, tmp_path):
    pkg = str(Path(__file__).resolve().parent.parent)
    script = (
        f"import sys; sys.path.insert(0, {pkg!r})\n"
        "import locale; assert locale.getpreferredencoding(False) != 'UTF-8'\n"
        "from eks_upgrade_agent import ProgressTracker, TaskType\n"
        f"t = ProgressTracker('u', 'p', 'c', storage_path={str(local.data_dir)!r})\n"
        "t.add_task('a', 'Déploiement ✓', TaskType.UPGRADE_STEP)\n"
        "ev = t.start_task('a', 'démarré ✓')\n"
        "assert ev.message == 'démarré ✓', ascii(ev.message)\n"
        "assert t.get_task_progress('a')['task_name'] == 'Déploiement ✓'\n"
        "assert t.update_task_progress('a', 5, 'plain').message == 'plain'\n"
        "t.cleanup()\n"
    )
    env = {**local.env(), "EUA_BIN": eua_bin, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii:backslashreplace"}
    path = tmp_path / "locale_check.py"  # a file: a C locale cannot pass this on argv
    path.write_text(script, encoding="utf-8")
    p = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert local.cli_json("progress", "task", "show", "u", "a")["task_name"] == "Déploiement ✓"


def test_after_cleanup_every_call_raises_and_nothing_is_started(backend):
    t = backend.tracker()
    m = backend.manager()
    m.create_session("u", "c")
    t.cleanup()
    m.cleanup()
    kids = _children()
    for call in (lambda: t.add_task("a", "A", TaskType.CLEANUP), t.get_progress_summary,
                 lambda: t.get_task_progress("a"), lambda: m.create_session("u", "c"),
                 lambda: m.get_session("x"), m.get_artifact_statistics):
        with pytest.raises(ClosedError, match="cleaned up"):
            call()
    assert _children() == kids


def test_a_hung_child_times_out_and_the_next_call_works(local):
    t = local.tracker(timeout=1.5)
    t.add_task("a", "A", TaskType.UPGRADE_STEP)
    pid = t._res.backend.apply.pid
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="did not answer within 1.5 s"):
            t.start_task("a")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert time.monotonic() - start < 10
    assert t._res.backend.apply.pid != pid
    # The timed-out start may or may not have been committed; the tracker goes on either way.
    assert t.update_task_progress("a", 30, "after").percentage == 30


def test_the_same_bad_input_raises_the_same_class_on_both(backend):
    t = backend.tracker()
    t.add_task("a", "A", TaskType.UPGRADE_STEP)
    for call in (
        lambda: t.add_task("b", "B", "bogus"),
        lambda: t.update_task_progress("a", 150, "x"),
        lambda: t.update_task_progress("a", 5, "\ud800"),
        lambda: t.update_task_progress("a", 7, "x", deep=eval("[" * 200 + "]" * 200)),
        lambda: t.update_task_progress("a", 1, "x" * 2_000_000),
        lambda: t.update_task_progress("a", 1, "x", bad=float("nan")),
        lambda: backend.manager(retention_days=0),
        lambda: backend.manager(retention_days="7"),
    ):
        with pytest.raises(InvalidInputError):
            call()
    # and the tracker still works
    assert t.update_task_progress("a", 9, "ok").percentage == 9
    assert not isinstance(InvalidInputError("x"), BackendError)
    assert issubclass(ClosedError, EksUpgradeAgentError)


def test_reference_restart_code_keeps_working_after_a_resume(backend, caplog):
    first = backend.tracker()
    first.start_upgrade("planning")
    first.add_task("t", "T", TaskType.UPGRADE_STEP)
    first.start_task("t")
    first.add_task("done", "D", TaskType.CLEANUP)
    first.start_task("done")
    first.complete_task("done")
    first.cleanup()
    with caplog.at_level(logging.WARNING, logger="eks_upgrade_agent"):
        again = backend.tracker(plan_id="other-plan", cluster_name="other-cluster")
    assert again.resumed
    # The stored plan and cluster win, as the reference loaded them from its file.
    info = again.get_system_info()
    assert (info["plan_id"], info["cluster_name"]) == ("plan-456", "my-cluster")
    assert "other-plan" in caplog.text
    assert again.start_upgrade("control-plane") is None
    assert again.get_progress_summary()["current_phase"] == "control-plane"
    assert again.start_task("t") is None
    assert again.complete_task("done") is None
    assert again.update_task_progress("t", 60, "on").percentage == 60
    assert again.complete_task("t").kind == "task.completed"
    again.complete_upgrade()
    again.complete_upgrade()
    assert again.get_progress_summary()["status"] == "COMPLETED"
    # Never started: complete_upgrade() and fail_upgrade() start it first, as the reference.
    fresh = backend.tracker("never-started")
    fresh.complete_upgrade()
    assert fresh.get_progress_summary()["status"] == "COMPLETED"
    failing = backend.tracker("never-started-2")
    failing.fail_upgrade("gave up")
    assert failing.get_progress_summary()["status"] == "FAILED"


REFERENCE_FILE = """{
  "upgrade_id": "upgrade-123", "plan_id": "plan-456", "cluster_name": "my-cluster",
  "status": "in_progress", "current_phase": "Initialization", "overall_percentage": 50.0,
  "duration": "0:00:01.500000", "started_at": "2025-10-20 05:25:00.869209+00:00",
  "completed_at": null, "estimated_completion": null,
  "tasks": {
    "task-1": {"task_id": "task-1", "task_name": "Deploy Infrastructure", "task_type": "upgrade_step",
      "status": "completed", "percentage": 100.0, "current_step": null, "total_steps": null,
      "completed_steps": 0, "started_at": "2025-10-20 05:25:00.870001+00:00",
      "completed_at": "2025-10-20 05:25:00.870781+00:00", "duration": "0:00:00.000780",
      "error_message": null, "retry_count": 0, "parent_task_id": null,
      "events": [{"event_id": "0b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d11",
        "timestamp": "2025-10-20 05:25:00.870001+00:00", "task_id": "task-1",
        "task_type": "upgrade_step", "status": "in_progress", "message": "Starting",
        "details": {}, "percentage": 0.0}], "metadata": {}},
    "task-2": {"task_id": "task-2", "task_name": "Validate", "task_type": "validation",
      "status": "in_progress", "percentage": 40.0, "started_at": "2025-10-20 05:25:01.0+00:00",
      "completed_at": null, "duration": null, "error_message": null, "retry_count": 0,
      "parent_task_id": null, "events": [], "metadata": {}}
  },
  "metadata": {}
}"""


def test_a_tracker_resumes_what_the_reference_saved_in_storage_path(local):
    progress = local.data_dir / "progress"
    progress.mkdir(parents=True)
    (progress / "upgrade_upgrade-123.json").write_text(REFERENCE_FILE)
    t = local.tracker()
    assert t.resumed and t.imported_from == str(progress / "upgrade_upgrade-123.json")
    s = t.get_progress_summary()
    assert (s["status"], s["total_tasks"], s["completed_tasks"]) == ("IN_PROGRESS", 2, 1)
    assert t.get_task_progress("task-2")["percentage"] == 40.0
    assert t.start_task("task-2") is None
    t.complete_task("task-2")
    t.cleanup()
    # Once in our store, ours is newer: the file is not imported again.
    again = local.tracker()
    assert again.resumed and again.imported_from is None
    assert again.get_task_progress("task-2")["status"] == "completed"
