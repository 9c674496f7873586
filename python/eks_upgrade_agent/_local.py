"""Talking to the binary on a data dir: one-shot commands with JSON output, and long-lived
``apply`` children (one request line, one acknowledgement line)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .errors import BackendError, CallTimeoutError, ClosedError, EksUpgradeAgentError, InvalidInputError, error_from


def _error_from_stderr(stderr: str, argv: Sequence[str]) -> EksUpgradeAgentError:
    for line in reversed(stderr.strip().splitlines()):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if isinstance(v, dict) and isinstance(v.get("error"), dict):
            e = v["error"]
            return error_from(str(e.get("code", "failed")), str(e.get("message", "")))
    text = stderr.strip() or f"{' '.join(argv)} failed"
    return EksUpgradeAgentError(text.removeprefix("error: ") if hasattr(text, "removeprefix") else text)


class Binary:
    """The binary with its global flags (``--data-dir``, S3 and EventBridge settings)."""

    def __init__(self, path: str, global_args: Sequence[str] = (), env: Optional[Dict[str, str]] = None):
        self.path = path
        self.global_args = list(global_args)
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.env["EUA_ERROR_FORMAT"] = "json"
        # Never the user's table output or a server from the environment: this object chose.
        self.env.pop("EUA_OUTPUT", None)
        self.env.pop("EUA_SERVER", None)

    def argv(self, *args: str) -> List[str]:
        return [self.path, *self.global_args, *args]

    def run(self, *args: str) -> str:
        """Runs a command; its stdout, or the error it reported as an exception. Pipes are
        UTF-8 whatever the locale (the binary reads and writes UTF-8)."""
        argv = self.argv(*args)
        p = subprocess.run(argv, env=self.env, capture_output=True, encoding="utf-8", errors="replace")
        if p.returncode != 0:
            raise _error_from_stderr(p.stderr, argv)
        return p.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run("-o", "json", *args))


#: Default seconds a call waits for its acknowledgement (``EUA_CALL_TIMEOUT`` overrides).
DEFAULT_CALL_TIMEOUT = 60.0

#: Longest request line the binary accepts (``progress apply``/``artifacts apply`` MAX_LINE).
MAX_LINE = 1024 * 1024


def call_timeout(value: Optional[float] = None) -> float:
    if value is not None:
        return float(value)
    env = os.environ.get("EUA_CALL_TIMEOUT")
    return float(env) if env else DEFAULT_CALL_TIMEOUT


class ApplyChild:
    """A long-lived ``progress apply --ack-events`` or ``artifacts apply`` child: each call
    writes one line carrying a fresh ``id`` and waits (at most ``timeout`` seconds) for the
    acknowledgement carrying the same ``id`` (written once the change is durable).

    One lock per child serialises write+read, so threads may share it. A call that does not
    finish normally (an exception, ``KeyboardInterrupt``, a signal handler's exception, a
    timeout, an answer that is not its own) poisons the child: it is killed and the next call
    starts a fresh one, so no later call can read an earlier call's answer. Whether the
    interrupted request was committed is then unknown, as for any interrupted call. After
    ``close()`` the child is never restarted."""

    def __init__(self, binary: Binary, *args: str, timeout: Optional[float] = None):
        self._binary = binary
        self._args = args
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._stderr: Optional[Any] = None
        self._buf = bytearray()
        self._poll_in: Any = None
        self._poll_out: Any = None
        self._next_id = 0
        self._lines_sent = 0
        self._closed = False
        self.timeout = call_timeout(timeout)

    @property
    def pid(self) -> Optional[int]:
        p = self._proc
        return None if p is None else p.pid

    def _start(self) -> subprocess.Popen:
        if self._closed:
            raise ClosedError("this object was cleaned up: its eks-upgrade-agent child is closed; create a new one")
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._discard()
        self._stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            self._binary.argv(*self._args),
            env=self._binary.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
        )
        assert proc.stdin is not None and proc.stdout is not None
        os.set_blocking(proc.stdin.fileno(), False)
        self._poll_in = select.poll()
        self._poll_in.register(proc.stdout.fileno(), select.POLLIN)
        self._poll_out = select.poll()
        self._poll_out.register(proc.stdin.fileno(), select.POLLOUT)
        self._lines_sent = 0
        self._proc = proc
        return proc

    def _stderr_tail(self) -> str:
        f = self._stderr
        if f is None:
            return ""
        try:
            f.seek(0)
            text = f.read()[-2000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return text

    def _exited(self, proc: subprocess.Popen) -> BackendError:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        tail = self._stderr_tail()
        self._discard()
        msg = f"the eks-upgrade-agent child ({' '.join(self._args)}) exited with status {code}"
        return BackendError(msg + (f": {tail}" if tail else ""))

    def _remaining(self, deadline: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CallTimeoutError(
                f"the eks-upgrade-agent child ({' '.join(self._args)}) did not answer within "
                f"{self.timeout:g} s; it was stopped and the next call starts a new one (raise the "
                "limit with timeout= or EUA_CALL_TIMEOUT)"
            )
        return max(1, int(left * 1000))

    def _write(self, proc: subprocess.Popen, data: bytes, deadline: float) -> None:
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                self._poll_out.poll(self._remaining(deadline))
                continue
            except (BrokenPipeError, OSError):
                raise self._exited(proc) from None
            view = view[n:]

    def _readline(self, proc: subprocess.Popen, deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            if not self._poll_in.poll(self._remaining(deadline)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._exited(proc)
            self._buf += chunk

    def call(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Sends one request; returns the acknowledgement (``ok`` true) or raises its error."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            try:
                line = json.dumps(dict(request, id=rid), separators=(",", ":"), default=str, allow_nan=False)
            except ValueError as e:
                raise InvalidInputError(
                    f"cannot send this request: {e}; details and metadata must hold finite numbers, "
                    "strings, booleans, None, lists and dicts"
                ) from None
            data = line.encode("utf-8") + b"\n"
            if len(data) > MAX_LINE:
                raise InvalidInputError(
                    f"the request is {len(data)} bytes as JSON; the limit is {MAX_LINE}: send smaller "
                    "details, metadata or messages"
                )
            proc = self._start()
            deadline = time.monotonic() + self.timeout
            try:
                self._lines_sent += 1
                line_no = self._lines_sent
                self._write(proc, data, deadline)
                raw = self._readline(proc, deadline)
                v = json.loads(raw.decode("utf-8"))
                # Ours: the same id; or, for a line the child could not parse (so it could not
                # read the id), an error naming the same line number.
                mine = isinstance(v, dict) and (
                    v.get("id") == rid or ("id" not in v and v.get("ok") is False and v.get("line") == line_no)
                )
                if not mine:
                    raise BackendError(
                        f"the eks-upgrade-agent child answered {raw[:200]!r} to request {rid}; it was "
                        "stopped and the next call starts a new one"
                    )
            except BaseException:
                self._poison()
                raise
        if not v.get("ok"):
            raise error_from(str(v.get("code", "failed")), str(v.get("error", "")))
        return v

    def _poison(self) -> None:
        """Kills the child (its pipes may hold a half-written request or an unread answer)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - best effort; _discard closes the pipes
                pass
        self._discard()

    def _discard(self) -> None:
        proc, self._proc = self._proc, None
        self._buf = bytearray()
        self._poll_in = self._poll_out = None
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
        err, self._stderr = self._stderr, None
        if err is not None:
            err.close()

    def close(self) -> None:
        """Closes the child's input (it finishes what it has and exits); never restarts it."""
        got = self._lock.acquire(timeout=self.timeout)
        try:
            self._closed = True
            proc = self._proc
            if proc is None:
                return
            try:
                if proc.stdin:
                    proc.stdin.close()
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - closing must not raise
                proc.kill()
                try:
                    proc.wait(timeout=5)
                except Exception:  # noqa: BLE001
                    pass
            self._discard()
        finally:
            if got:
                self._lock.release()


class Follower(threading.Thread):
    """Reads ``progress events UPGRADE --since S --follow -o json`` (one event per line) and
    hands each event to ``on_event`` until stopped or the upgrade ends."""

    def __init__(self, binary: Binary, upgrade_id: str, since: int, on_event):
        super().__init__(daemon=True, name=f"eua-follow-{upgrade_id}")
        self._proc = subprocess.Popen(
            binary.argv("-o", "json", "progress", "events", "--since", str(since), "--follow", "--", upgrade_id),
            env=binary.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            encoding="utf-8",
            errors="replace",
        )
        self._on_event = on_event

    def run(self) -> None:
        assert self._proc.stdout is not None
        for line in self._lines():
            try:
                self._on_event(json.loads(line))
            except Exception:  # noqa: BLE001 - a callback error must not stop following
                pass

    def _lines(self) -> Iterator[str]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip():
                yield line

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        if threading.current_thread() is not self:
            self.join(timeout=5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
