"""``ProgressTracker``: the reference API over the ``eks-upgrade-agent`` binary (a data dir) or
a server. Every call that changes something returns once the change is durable."""

from __future__ import annotations

import logging
import math
import unicodedata
import os
import socket
import subprocess
import threading
import time
import urllib.request
import weakref
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._binary import find_binary
from ._http import Http, SseFollower, q
from ._local import ApplyChild, Binary, Follower
from .errors import (
    AlreadyExistsError,
    ClosedError,
    EksUpgradeAgentError,
    InvalidInputError,
    InvalidTransitionError,
    NotFoundError,
)
from .models import ProgressEvent, ProgressStatus, TaskProgress, TaskType, UpgradeProgress, py_timedelta

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


log = logging.getLogger("eks_upgrade_agent")

MAX_ID_LEN = 128


def is_id(v: Any) -> bool:
    """Whether ``v`` can be an id in the store (the binary's ``check_id``): 1..=128 bytes, no
    whitespace or control characters, no ``/`` or ``\\``, not ``.`` or ``..``. Other strings
    name nothing that exists, so lookups answer ``None`` for them as for any unknown id."""
    if not isinstance(v, str) or not v or v in (".", ".."):
        return False
    if len(v.encode("utf-8", "surrogatepass")) > MAX_ID_LEN:
        return False
    return not any(c.isspace() or c in "/\\" or unicodedata.category(c) == "Cc" for c in v)


def run_callbacks(fns: Sequence[Callable[[Any], Any]], arg: Any) -> None:
    """Runs every callback; one that raises is logged (``eks_upgrade_agent`` logger) and the
    others still run: the change is committed whatever a callback does."""
    for fn in fns:
        try:
            fn(arg)
        except Exception:  # noqa: BLE001
            log.exception("a callback (%r) raised; the change it was told about is committed", fn)


def _iso(v: Optional[str]) -> Optional[str]:
    """Our RFC 3339 times as Python's ``isoformat()`` writes them."""
    if v is None:
        return None
    return datetime.fromisoformat(v.replace("Z", "+00:00")).isoformat()


def _value(x: Any) -> Any:
    return x.value if hasattr(x, "value") else x


class _LocalBackend:
    """A data dir, through one long-lived ``progress apply --ack-events`` child."""

    def __init__(self, binary: Binary, upgrade_id: str, timeout: Optional[float] = None):
        self.binary = binary
        self.upgrade_id = upgrade_id
        self.apply = ApplyChild(binary, "progress", "apply", "--ack-events", timeout=timeout)

    def execute(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        return self.apply.call(cmd)

    def summary(self) -> Dict[str, Any]:
        return self.binary.json("progress", "upgrade", "show", "--", self.upgrade_id)

    def task(self, task_id: str) -> Dict[str, Any]:
        return self.binary.json("progress", "task", "show", "--", self.upgrade_id, task_id)

    def import_file(self, path: str) -> None:
        self.binary.run("progress", "import", "--", path)

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


class _Resources:
    """What a tracker must release: its backend (the ``apply`` child), its follower and its
    WebSocket server. Held apart from the tracker so a ``weakref.finalize`` can release them
    when the tracker is collected without ``cleanup()`` (and at interpreter exit)."""

    def __init__(self) -> None:
        self.backend: Any = None
        self.follower: Optional[threading.Thread] = None
        self.ws_proc: Optional[subprocess.Popen] = None

    def stop_ws(self) -> None:
        p, self.ws_proc = self.ws_proc, None
        if p is not None:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
            if p.stderr is not None:
                p.stderr.close()

    def close(self) -> None:
        f, self.follower = self.follower, None
        if f is not None:
            f.stop()  # type: ignore[attr-defined]
        self.stop_ws()
        if self.backend is not None:
            self.backend.close()


class ProgressTracker:
    """Tracks one upgrade. ``storage_path`` is the data dir (``--data-dir``) the CLI and the
    server use too (``None``: the CLI's default). ``server=``/``token=`` (or ``EUA_SERVER`` /
    ``EUA_TOKEN``) report to a server instead. Constructing a tracker for an upgrade that exists
    resumes it. ``follow=True`` also runs the callbacks for changes other processes make.
    ``timeout`` (ours; default 60 s or ``EUA_CALL_TIMEOUT``) bounds each call to the binary or
    the server."""

    #: Most seqs remembered to run callbacks once per event when following.
    DISPATCHED_MAX = 4096

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
        timeout: Optional[float] = None,
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
        self._following = False
        self._dispatched: "OrderedDict[int, None]" = OrderedDict()
        self._task_status: Dict[str, str] = {}
        self._cb_lock = threading.RLock()
        self._closed = False
        self._binary: Optional[Binary] = None
        self._res = _Resources()
        # Released when this tracker is collected or at interpreter exit, whichever first;
        # cleanup() runs it at once.
        self._finalizer = weakref.finalize(self, self._res.close)
        try:
            if self.server:
                self._res.backend = _ServerBackend(Http(self.server, token, **({} if timeout is None else {"timeout": timeout})), upgrade_id)
            else:
                args: List[str] = []
                if self.storage_path is not None:
                    args += ["--data-dir", self.storage_path]
                if eventbridge_bus_name:
                    args += ["--eventbridge-bus-name", eventbridge_bus_name, "--aws-region", aws_region]
                self._binary = Binary(binary or find_binary(), args)
                self._res.backend = _LocalBackend(self._binary, upgrade_id, timeout)
            self.resumed = False
            self.imported_from: Optional[str] = None
            self._import_reference_file()
            try:
                self._backend.execute(
                    {"op": "upgrade.create", "upgrade_id": upgrade_id, "plan_id": plan_id, "cluster_name": cluster_name}
                )
            except AlreadyExistsError:
                self.resumed = True
                self._adopt_stored()
            if follow:
                self._start_follow()
            if enable_websocket and not self.server:
                self._start_ws()
        except BaseException:
            self._closed = True
            self._finalizer()
            raise

    # --- resuming -------------------------------------------------------------------------

    def _import_reference_file(self) -> None:
        """A migrating team's agent saved ``{storage_path}/progress/upgrade_{id}.json``: when
        our store has no such upgrade, import that file (``progress import``) so the tracker
        resumes it as the reference would. Local mode only (a server's store is its own)."""
        if self.server or self.storage_path is None or not is_id(self.upgrade_id):
            return
        path = os.path.join(self.storage_path, "progress", f"upgrade_{self.upgrade_id}.json")
        if not os.path.isfile(path):
            return
        try:
            self._res.backend.import_file(path)
        except AlreadyExistsError:
            return  # already in our store: ours is newer than the file
        self.imported_from = path

    def _adopt_stored(self) -> None:
        """On resume, the stored plan and cluster win over the constructor's (as the reference,
        which loaded its file); a difference is logged."""
        s = self._backend.summary()
        for field in ("plan_id", "cluster_name"):
            stored = s.get(field)
            if stored is not None and stored != getattr(self, field):
                log.warning(
                    "upgrade %s resumed: its stored %s %r is kept (this tracker was given %r)",
                    self.upgrade_id, field, stored, getattr(self, field),
                )
                setattr(self, field, stored)

    # --- plumbing -------------------------------------------------------------------------

    @property
    def _backend(self) -> Any:
        if self._closed:
            raise ClosedError("this tracker was cleaned up; create a new ProgressTracker to go on")
        return self._res.backend

    def _exec(self, op: str, **fields: Any) -> Dict[str, Any]:
        cmd = {"op": op, "upgrade_id": self.upgrade_id}
        cmd.update({k: v for k, v in fields.items() if v is not None})
        ack = self._backend.execute(cmd)
        events = [ProgressEvent.from_wire(e) for e in ack.get("events") or []]
        self._dispatch(events, ack.get("status_changes"))
        return {"ack": ack, "events": events}

    def _task_op(self, op: str, task_id: str, **fields: Any) -> Optional[ProgressEvent]:
        if not is_id(task_id):
            return None  # names no task that can exist: the reference's None for unknown ids
        try:
            r = self._exec(op, task_id=task_id, **fields)
        except NotFoundError:
            return None
        own = [e for e in r["events"] if e.task_id == task_id]
        return own[0] if own else (r["events"][0] if r["events"] else None)

    def _first_time(self, seq: Optional[int]) -> bool:
        """When following, whether ``seq`` was not dispatched yet (own acknowledgements and
        the follower both see our events, in either order); remembers it, boundedly."""
        if not self._following or seq is None:
            return True
        if seq in self._dispatched:
            return False
        self._dispatched[seq] = None
        while len(self._dispatched) > self.DISPATCHED_MAX:
            self._dispatched.popitem(last=False)
        return True

    def _dispatch(self, events: Sequence[ProgressEvent], status_changes: Optional[Sequence[Dict[str, Any]]] = None) -> None:
        """Runs the callbacks for committed ``events`` once each. A task enters a status when
        its status changes: from the acknowledgement's ``status_changes`` for our own calls,
        from the last status this tracker knew for followed events."""
        with self._cb_lock:
            entered: Dict[int, List[str]] = {}
            if status_changes is not None:
                for c in status_changes:
                    if c.get("task_id") is not None and c.get("from") != c.get("to"):
                        entered.setdefault(int(c["seq"]), []).append(c["task_id"])
            for e in events:
                if not self._first_time(e.seq):
                    continue
                if e.task_id is None:
                    continue
                status = _value(e.status)
                before = self._task_status.get(e.task_id)
                self._task_status[e.task_id] = status
                run_callbacks(list(self._event_callbacks), e)
                if status_changes is not None:
                    changed = e.task_id in entered.get(e.seq or -1, ())
                elif before is None:
                    changed = e.kind in _STATUS_KINDS
                else:
                    changed = before != status
                fns = self._status_callbacks.get(status, [])
                if fns and changed:
                    task = self._task_model(e.task_id)
                    if task is not None:
                        run_callbacks(list(fns), task)

    def _on_followed(self, raw: Dict[str, Any]) -> None:
        self._dispatch([ProgressEvent.from_wire(raw)])

    @staticmethod
    def _weak_handler(tracker: "ProgressTracker") -> Callable[[Dict[str, Any]], None]:
        """The follower's handler, holding the tracker weakly: a following tracker dropped
        without ``cleanup()`` is still collected (and its finalizer stops the follower)."""
        ref = weakref.ref(tracker)

        def on_event(raw: Dict[str, Any]) -> None:
            t = ref()
            if t is not None and not t._closed:
                t._on_followed(raw)

        return on_event

    def _start_follow(self) -> None:
        s = self._backend.summary()
        since = int(s.get("last_seq", 0))
        for t in s.get("tasks") or []:
            self._task_status[t["task_id"]] = t["status"]
        self._following = True
        self._res.follower = self._backend.follower(since, self._weak_handler(self))
        self._res.follower.start()

    def _task_model(self, task_id: str) -> Optional[TaskProgress]:
        if not is_id(task_id):
            return None
        try:
            d = self._backend.task(task_id)
        except NotFoundError:
            return None
        return TaskProgress.from_wire(d, list(reversed(d.get("recent_events") or [])))

    # --- the upgrade ----------------------------------------------------------------------

    def _upgrade_status(self) -> str:
        return str(self._backend.summary()["status"])

    def start_upgrade(self, phase: str = "Initialization") -> None:
        """Starts the upgrade. Already running (a restarted agent's usual code): sets the
        phase and returns, as the reference did."""
        try:
            self._exec("upgrade.start", phase=phase)
        except InvalidTransitionError:
            if self._upgrade_status() != ProgressStatus.IN_PROGRESS.value:
                raise
            self.set_current_phase(phase)

    def complete_upgrade(self) -> None:
        """Completes the upgrade; one never started is started first (the reference set the
        status whatever it was). Completing a completed upgrade is a no-op."""
        try:
            self._exec("upgrade.complete")
        except InvalidTransitionError:
            status = self._upgrade_status()
            if status == ProgressStatus.COMPLETED.value:
                return
            if status != ProgressStatus.NOT_STARTED.value:
                raise
            self._exec("upgrade.start")
            self._exec("upgrade.complete")

    def fail_upgrade(self, error_message: str) -> None:
        """Fails the upgrade; one never started is started first, as for ``complete_upgrade``."""
        try:
            self._exec("upgrade.fail", error_message=error_message)
        except InvalidTransitionError:
            if self._upgrade_status() != ProgressStatus.NOT_STARTED.value:
                raise
            self._exec("upgrade.start")
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
        """Starts a task; ``None`` for an unknown one, and also for one already running (a
        restarted agent starting it again: nothing changes, nothing is recorded)."""
        try:
            return self._task_op("task.start", task_id, message=message)
        except InvalidTransitionError:
            if self._task_status_now(task_id) == ProgressStatus.IN_PROGRESS.value:
                return None
            raise

    def complete_task(self, task_id: str, message: str = "Task completed") -> Optional[ProgressEvent]:
        """Completes a task; ``None`` for an unknown one or one already completed."""
        try:
            return self._task_op("task.complete", task_id, message=message)
        except InvalidTransitionError:
            if self._task_status_now(task_id) == ProgressStatus.COMPLETED.value:
                return None
            raise

    def _task_status_now(self, task_id: str) -> Optional[str]:
        d = self.get_task_progress(task_id)
        return None if d is None else str(d["status"])

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
        if not is_id(task_id):
            return None
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

    @property
    def progress(self) -> UpgradeProgress:
        """The upgrade and its tasks as the reference's ``tracker.progress`` model, read now
        (the first 10,000 tasks; a snapshot, not a live object)."""
        return UpgradeProgress.from_wire(self._backend.summary())

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
        if self._res.ws_proc is None:
            return None
        return f"ws://127.0.0.1:{self.websocket_port}/api/v1/upgrades/{q(self.upgrade_id)}/ws"

    def _start_ws(self) -> None:
        p = self._res.ws_proc
        if p is not None and p.poll() is None:
            return
        assert self._binary is not None
        port = self.websocket_port or _free_port()
        self.websocket_port = port
        p = self._res.ws_proc = subprocess.Popen(
            self._binary.argv("serve", "--listen", f"127.0.0.1:{port}"),
            env=self._binary.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if p.poll() is not None:
                err = p.stderr.read() if p.stderr else ""
                self._res.stop_ws()
                raise EksUpgradeAgentError(f"the WebSocket server did not start: {err.strip()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self._res.stop_ws()
        raise EksUpgradeAgentError(f"the WebSocket server on 127.0.0.1:{port} did not answer within 30 s")

    def _stop_ws(self) -> None:
        self._res.stop_ws()

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
        following and the WebSocket server. Idempotent; afterwards every call raises
        ``ClosedError``. A tracker dropped without it is cleaned up when collected, and at
        interpreter exit."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "ProgressTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
