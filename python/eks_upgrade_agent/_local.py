"""Talking to the binary on a data dir: one-shot commands with JSON output, and long-lived
``apply`` children (one request line, one acknowledgement line)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .errors import BackendError, EksUpgradeAgentError, error_from


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
        """Runs a command; its stdout, or the error it reported as an exception."""
        argv = self.argv(*args)
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        if p.returncode != 0:
            raise _error_from_stderr(p.stderr, argv)
        return p.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run("-o", "json", *args))

    def spawn(self, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(*args),
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )


class ApplyChild:
    """A long-lived ``progress apply --ack-events`` or ``artifacts apply`` child: each call
    writes one line and waits for its acknowledgement (written once the change is durable)."""

    def __init__(self, binary: Binary, *args: str):
        self._binary = binary
        self._args = args
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._binary.spawn(*self._args)
        return self._proc

    def call(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Sends one request; returns the acknowledgement (``ok`` true) or raises its error."""
        line = json.dumps(request, separators=(",", ":"), default=str, allow_nan=False)
        with self._lock:
            proc = self._start()
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
                ack = proc.stdout.readline()
            except (BrokenPipeError, OSError) as e:
                self._proc = None
                raise BackendError(f"the eks-upgrade-agent child exited: {e}") from e
            if not ack:
                code = proc.wait()
                self._proc = None
                raise BackendError(f"the eks-upgrade-agent child exited with status {code}")
        v = json.loads(ack)
        if not v.get("ok"):
            raise error_from(str(v.get("code", "failed")), str(v.get("error", "")))
        return v

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - closing must not raise
            proc.kill()
        finally:
            if proc.stdout:
                proc.stdout.close()


class Follower(threading.Thread):
    """Reads ``progress events UPGRADE --since S --follow -o json`` (one event per line) and
    hands each event to ``on_event`` until stopped or the upgrade ends."""

    def __init__(self, binary: Binary, upgrade_id: str, since: int, on_event):
        super().__init__(daemon=True, name=f"eua-follow-{upgrade_id}")
        self._proc = subprocess.Popen(
            binary.argv("-o", "json", "progress", "events", upgrade_id, "--since", str(since), "--follow"),
            env=binary.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
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
