"""``ProgressTracker``: the reference API over the ``eks-upgrade-agent`` binary (a data dir) or
a server. Every call that changes something returns once the change is durable."""

from __future__ import annotations

import atexit
import math
import os
import socket
import subprocess
import threading
import time
import urllib.request
import weakref
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._binary import find_binary
from ._http import Http, SseFollower, q
from ._local import ApplyChild, Binary, Follower
from .errors import AlreadyExistsError, EksUpgradeAgentError, InvalidInputError, NotFoundError
from .models import ProgressEvent, ProgressStatus, TaskProgress, TaskType, py_timedelta

#: Event kinds by which a task enters a status (its event's ``status``).
_STATUS_KINDS = {
    "task.started",
    "task.completed",
    "task.failed",
    "task.paused",
    "task.resumed",
    "task.cancelled",
    "task.retried",
}


def _iso(v: Optional[str]) -> Optional[str]:
    """Our RFC 3339 times as Python's ``isoformat()`` writes them."""
    if v is None:
        return None
    return datetime.fromisoformat(v.replace("Z", "+00:00")).isoformat()


def _value(x: Any) -> Any:
    return x.value if hasattr(x, "value") else x


class _LocalBackend:
    """A data dir, through one long-lived ``progress apply --ack-events`` child."""

    def __init__(self, binary: Binary, upgrade_id: str):
        self.binary = binary
        self.upgrade_id = upgrade_id
        self.apply = ApplyChild(binary, "progress", "apply", "--ack-events")

    def execute(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        return self.apply.call(cmd)

    def summary(self) -> Dict[str, Any]:
        return self.binary.json("progress", "upgrade", "show", self.upgrade_id)

    def task(self, task_id: str) -> Dict[str, Any]:
        return self.binary.json("progress", "task", "show", self.upgrade_id, task_id)

    def follower(self, since: int, on_event) -> threading.Thread:
        return Follower(self.binary, self.upgrade_id, since, on_event)

    def close(self) -> None:
        self.apply.close()


class _ServerBackend:
    """A server, through its HTTP API."""

    def __init__(self, http: Http, upgrade_id: str):
        self.http = http
        self.upgrade_id = upgrade_id
        self.lock = threading.Lock()

    def execute(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        cmd = dict(cmd)
        op = cmd.pop("op")
        u = q(cmd.pop("upgrade_id"))
        kind, _, verb = op.partition(".")
        if op == "upgrade.create":
            self.http.json("POST", "/api/v1/upgrades", dict(cmd, upgrade_id=self.upgrade_id))
            return {"events": []}
        if kind == "upgrade":
            self.http.json("POST", f"/api/v1/upgrades/{u}/{verb}", cmd)
            return {"events": []}
        if op == "task.add":
            return self.http.json("POST", f"/api/v1/upgrades/{u}/tasks", cmd)
        if op == "task.add_many":
            return self.http.json("POST", f"/api/v1/upgrades/{u}/tasks", cmd["tasks"])
        t = q(cmd.pop("task_id"))
        return self.http.json("POST", f"/api/v1/upgrades/{u}/tasks/{t}/{verb}", cmd)

    def summary(self) -> Dict[str, Any]:
        return self.http.json("GET", f"/api/v1/upgrades/{q(self.upgrade_id)}")

    def task(self, task_id: str) -> Dict[str, Any]:
        return self.http.json("GET", f"/api/v1/upgrades/{q(self.upgrade_id)}/tasks/{q(task_id)}")

    def follower(self, since: int, on_event) -> threading.Thread:
        return SseFollower(self.http, self.upgrade_id, since, on_event)

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProgressTracker:
    """Tracks one upgrade. ``storage_path`` is the data dir (``--data-dir``) the CLI and the
    server use too (``None``: the CLI's default). ``server=``/``token=`` (or ``EUA_SERVER`` /
    ``EUA_TOKEN``) report to a server instead. Constructing a tracker for an upgrade that exists
    resumes it. ``follow=True`` also runs the callbacks for changes other processes make."""

    def __init__(
        self,
        upgrade_id: str,
        plan_id: str,
        cluster_name: str,
        storage_path: Optional[str] = None,
        eventbridge_bus_name: Optional[str] = None,
        aws_region: str = "us-east-1",
        enable_websocket: bool = False,
        websocket_port: int = 8765,
        *,
        server: Optional[str] = None,
        token: Optional[str] = None,
        follow: bool = False,
        binary: Optional[str] = None,
    ) -> None:
        self.upgrade_id = upgrade_id
        self.plan_id = plan_id
        self.cluster_name = cluster_name
        self.storage_path = None if storage_path is None else str(storage_path)
        self.eventbridge_bus_name = eventbridge_bus_name
        self.aws_region = aws_region
        self.enable_websocket = enable_websocket
        self.websocket_port = websocket_port
        self.server = server if server is not None else (os.environ.get("EUA_SERVER") or None)
        token = token if token is not None else (os.environ.get("EUA_TOKEN") or None)
        self._event_callbacks: List[Callable[[ProgressEvent], Any]] = []
        self._status_callbacks: Dict[str, List[Callable[[TaskProgress], Any]]] = {}
        self._own_seqs: set = set()
        self._seen_seq = 0
        self._cb_lock = threading.RLock()
        self._follower: Optional[threading.Thread] = None
        self._ws_proc: Optional[subprocess.Popen] = None
        self._closed = False
        self._binary: Optional[Binary] = None
        if self.server:
            self._backend: Any = _ServerBackend(Http(self.server, token), upgrade_id)
        else:
            args: List[str] = []
            if self.storage_path is not None:
                args += ["--data-dir", self.storage_path]
            if eventbridge_bus_name:
                args += ["--eventbridge-bus-name", eventbridge_bus_name, "--aws-region", aws_region]
            self._binary = Binary(binary or find_binary(), args)
            self._backend = _LocalBackend(self._binary, upgrade_id)
        self.resumed = False
        try:
            self._backend.execute(
                {"op": "upgrade.create", "upgrade_id": upgrade_id, "plan_id": plan_id, "cluster_name": cluster_name}
            )
        except AlreadyExistsError:
            self.resumed = True
        _live.add(self)
        if follow:
            self._start_follow()
        if enable_websocket and not self.server:
            self._start_ws()

    # --- plumbing -------------------------------------------------------------------------

    def _exec(self, op: str, **fields: Any) -> Dict[str, Any]:
        if self._closed:
            raise EksUpgradeAgentError("this tracker was cleaned up")
        cmd = {"op": op, "upgrade_id": self.upgrade_id}
        cmd.update({k: v for k, v in fields.items() if v is not None})
        ack = self._backend.execute(cmd)
        events = [ProgressEvent.from_wire(e) for e in ack.get("events") or []]
        for e in events:
            if e.seq is not None:
                self._own_seqs.add(e.seq)
        self._dispatch(events)
        return {"ack": ack, "events": events}

    def _task_op(self, op: str, task_id: str, **fields: Any) -> Optional[ProgressEvent]:
        try:
            r = self._exec(op, task_id=task_id, **fields)
        except NotFoundError:
            return None
        own = [e for e in r["events"] if e.task_id == task_id]
        return own[0] if own else (r["events"][0] if r["events"] else None)

    def _dispatch(self, events: Sequence[ProgressEvent]) -> None:
        with self._cb_lock:
            for e in events:
                if e.task_id is None:
                    continue
                for fn in list(self._event_callbacks):
                    fn(e)
                fns = self._status_callbacks.get(_value(e.status), [])
                if fns and e.kind in _STATUS_KINDS:
                    task = self._task_model(e.task_id)
                    if task is not None:
                        for fn in list(fns):
                            fn(task)

    def _on_followed(self, raw: Dict[str, Any]) -> None:
        seq = raw.get("seq")
        if seq in self._own_seqs:
            self._own_seqs.discard(seq)
            return
        self._dispatch([ProgressEvent.from_wire(raw)])

    def _start_follow(self) -> None:
        since = int(self._backend.summary().get("last_seq", 0))
        self._follower = self._backend.follower(since, self._on_followed)
        self._follower.start()

    def _task_model(self, task_id: str) -> Optional[TaskProgress]:
        try:
            d = self._backend.task(task_id)
        except NotFoundError:
            return None
        return TaskProgress.from_wire(d, list(reversed(d.get("recent_events") or [])))

    # --- the upgrade ----------------------------------------------------------------------

    def start_upgrade(self, phase: str = "Initialization") -> None:
        self._exec("upgrade.start", phase=phase)

    def complete_upgrade(self) -> None:
        self._exec("upgrade.complete")

    def fail_upgrade(self, error_message: str) -> None:
        self._exec("upgrade.fail", error_message=error_message)

    def set_current_phase(self, phase: str) -> None:
        self._exec("upgrade.phase", phase=phase)

    # --- tasks ----------------------------------------------------------------------------

    def add_task(
        self,
        task_id: str,
        task_name: str,
        task_type: TaskType,
        parent_task_id: Optional[str] = None,
    ) -> TaskProgress:
        """Adds a task and returns it; an existing task id returns the stored task."""
        try:
            self._exec(
                "task.add",
                task_id=task_id,
                name=task_name,
                task_type=_value(task_type),
                parent_task_id=parent_task_id,
            )
        except AlreadyExistsError:
            pass
        task = self._task_model(task_id)
        assert task is not None
        return task

    def add_tasks(self, tasks: Sequence[TaskProgress]) -> None:
        self._exec(
            "task.add_many",
            tasks=[
                {
                    k: v
                    for k, v in {
                        "task_id": t.task_id,
                        "name": t.task_name,
                        "task_type": _value(t.task_type),
                        "parent_task_id": t.parent_task_id,
                        "total_steps": t.total_steps,
                    }.items()
                    if v is not None
                }
                for t in tasks
            ],
        )

    def start_task(self, task_id: str, message: str = "Task started") -> Optional[ProgressEvent]:
        return self._task_op("task.start", task_id, message=message)

    def complete_task(self, task_id: str, message: str = "Task completed") -> Optional[ProgressEvent]:
        return self._task_op("task.complete", task_id, message=message)

    def fail_task(self, task_id: str, error_message: str) -> Optional[ProgressEvent]:
        return self._task_op("task.fail", task_id, error_message=error_message)

    def update_task_progress(
        self, task_id: str, percentage: float, message: Optional[str] = None, **details: Any
    ) -> Optional[ProgressEvent]:
        pct = float(percentage)
        if not math.isfinite(pct):
            raise InvalidInputError(f"percentage must be a finite number in 0..=100, got {pct}")
        return self._task_op("task.update", task_id, percentage=pct, message=message, details=details)

    # Ours, beyond the reference: the other task operations.
    def pause_task(self, task_id: str, message: Optional[str] = None) -> Optional[ProgressEvent]:
        return self._task_op("task.pause", task_id, message=message)

    def resume_task(self, task_id: str, message: Optional[str] = None) -> Optional[ProgressEvent]:
        return self._task_op("task.resume", task_id, message=message)

    def cancel_task(self, task_id: str, message: Optional[str] = None) -> Optional[ProgressEvent]:
        return self._task_op("task.cancel", task_id, message=message)

    def retry_task(self, task_id: str, message: Optional[str] = None) -> Optional[ProgressEvent]:
        return self._task_op("task.retry", task_id, message=message)

    # --- reads ----------------------------------------------------------------------------

    def get_progress_summary(self) -> Dict[str, Any]:
        s = self._backend.summary()
        ct = s.get("current_task")
        return {
            "upgrade_id": s["upgrade_id"],
            "cluster_name": s["cluster_name"],
            "status": s["status"].upper(),
            "overall_percentage": s["overall_percentage"],
            "progress_percentage": s["progress_percentage"],
            "current_phase": s.get("current_phase"),
            "current_task": None
            if not ct
            else {
                "task_id": ct["task_id"],
                "task_name": ct["task_name"],
                "status": ct["status"].upper(),
                "percentage": ct["percentage"],
            },
            "started_at": _iso(s.get("started_at")),
            "duration": py_timedelta(s.get("duration")),
            "total_tasks": s["total_tasks"],
            "active_tasks": s["active_tasks"],
            "failed_tasks": s["failed_tasks"],
            "completed_tasks": s["completed_tasks"],
            "active_task_names": s["active_task_names"],
            "failed_task_names": s["failed_task_names"],
        }

    def get_task_progress(self, task_id: str) -> Optional[Dict[str, Any]]:
        try:
            d = self._backend.task(task_id)
        except NotFoundError:
            return None
        recent = list(reversed(d.get("recent_events") or []))
        return {
            "task_id": d["task_id"],
            "task_name": d["task_name"],
            "task_type": d["task_type"],
            "status": d["status"],
            "percentage": d["percentage"],
            "current_step": d.get("current_step"),
            "completed_steps": d.get("completed_steps", 0),
            "total_steps": d.get("total_steps"),
            "started_at": _iso(d.get("started_at")),
            "duration": py_timedelta(d.get("duration")),
            "error_message": d.get("error_message"),
            "recent_events": [
                {
                    "timestamp": _iso(e["timestamp"]),
                    "status": e["status"],
                    "message": e.get("message") or "",
                    "percentage": e["percentage"],
                }
                for e in recent
            ],
        }

    def calculate_progress_percentage(self) -> float:
        return float(self._backend.summary()["overall_percentage"])

    def get_current_task(self) -> Optional[TaskProgress]:
        ct = self._backend.summary().get("current_task")
        if not ct or ct["status"] != ProgressStatus.IN_PROGRESS.value:
            return None
        return self._task_model(ct["task_id"])

    def get_estimated_completion_time(self) -> Optional[str]:
        return _iso(self._backend.summary().get("estimated_completion"))

    # --- callbacks ------------------------------------------------------------------------

    def add_event_callback(self, callback: Callable[[ProgressEvent], Any]) -> None:
        with self._cb_lock:
            self._event_callbacks.append(callback)

    def add_status_callback(self, status: ProgressStatus, callback: Callable[[TaskProgress], Any]) -> None:
        with self._cb_lock:
            self._status_callbacks.setdefault(_value(status), []).append(callback)

    # --- the WebSocket (our server on loopback) -------------------------------------------

    @property
    def websocket_url(self) -> Optional[str]:
        if self.server:
            return self.server.replace("http", "ws", 1).rstrip("/") + f"/api/v1/upgrades/{q(self.upgrade_id)}/ws"
        if self._ws_proc is None:
            return None
        return f"ws://127.0.0.1:{self.websocket_port}/api/v1/upgrades/{q(self.upgrade_id)}/ws"

    def _start_ws(self) -> None:
        if self._ws_proc is not None and self._ws_proc.poll() is None:
            return
        assert self._binary is not None
        port = self.websocket_port or _free_port()
        self.websocket_port = port
        self._ws_proc = subprocess.Popen(
            self._binary.argv("serve", "--listen", f"127.0.0.1:{port}"),
            env=self._binary.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._ws_proc.poll() is not None:
                err = self._ws_proc.stderr.read() if self._ws_proc.stderr else ""
                self._ws_proc = None
                raise EksUpgradeAgentError(f"the WebSocket server did not start: {err.strip()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self._stop_ws()
        raise EksUpgradeAgentError(f"the WebSocket server on 127.0.0.1:{port} did not answer within 30 s")

    def _stop_ws(self) -> None:
        p, self._ws_proc = self._ws_proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    async def start_websocket_server(self) -> None:
        if not self.server:
            self._start_ws()

    async def stop_websocket_server(self) -> None:
        self._stop_ws()

    # --- the rest -------------------------------------------------------------------------

    def get_system_info(self) -> Dict[str, Any]:
        return {
            "upgrade_id": self.upgrade_id,
            "plan_id": self.plan_id,
            "cluster_name": self.cluster_name,
            "storage": {"server": self.server} if self.server else {"data_dir": self.storage_path},
            "eventbridge": {"enabled": bool(self.eventbridge_bus_name), "bus_name": self.eventbridge_bus_name},
            "websocket": {
                "enabled": self.websocket_url is not None,
                "port": self.websocket_port,
                "url": self.websocket_url,
            },
            "callbacks": {
                "event_callbacks": len(self._event_callbacks),
                "status_callbacks": sum(len(v) for v in self._status_callbacks.values()),
            },
        }

    def cleanup(self) -> None:
        """Closes the ``apply`` child (everything acknowledged is already durable), stops
        following and the WebSocket server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            self._follower.stop()  # type: ignore[attr-defined]
            self._follower = None
        self._stop_ws()
        self._backend.close()
        _live.discard(self)

    def __enter__(self) -> "ProgressTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


@atexit.register
def _cleanup_all() -> None:
    for t in list(_live):
        try:
            t.cleanup()
        except Exception:  # noqa: BLE001
            pass
