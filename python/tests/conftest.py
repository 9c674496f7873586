"""Fixtures: the binary (``EUA_BIN``, required: the suite fails without it, never skips), and a
backend parameter that runs each test against a data dir and against a server the test starts
(``eks-upgrade-agent serve`` on 127.0.0.1 and a free port)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eks_upgrade_agent import ProgressTracker, TestArtifactsManager  # noqa: E402


@pytest.fixture(scope="session")
def eua_bin() -> str:
    b = os.environ.get("EUA_BIN")
    assert b, "set EUA_BIN to the eks-upgrade-agent binary (scripts/test does)"
    assert os.access(b, os.X_OK), f"EUA_BIN={b} is not executable"
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer /healthz within 30 s")


class Backend:
    """Where a test's data lives: ``kind`` is ``local`` (a data dir) or ``server``."""

    def __init__(self, kind: str, data_dir: Path, binary: str):
        self.kind = kind
        self.data_dir = data_dir
        self.binary = binary
        self.url = None
        self._proc = None
        self._open = []
        if kind == "server":
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self._proc = subprocess.Popen(
                [binary, "--data-dir", str(data_dir), "serve", "--listen", f"127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env=self.env(),
            )
            wait_healthy(self.url, self._proc)

    def env(self):
        env = dict(os.environ)
        for k in ("EUA_SERVER", "EUA_TOKEN", "EUA_OUTPUT", "EUA_DATA_DIR", "EUA_CONFIG", "EUA_TOKENS"):
            env.pop(k, None)
        env["XDG_CONFIG_HOME"] = str(self.data_dir / "config-home")
        return env

    def tracker(self, upgrade_id="upgrade-123", plan_id="plan-456", cluster_name="my-cluster", **kw) -> ProgressTracker:
        if self.kind == "server":
            kw.setdefault("server", self.url)
        else:
            kw.setdefault("storage_path", str(self.data_dir))
        t = ProgressTracker(upgrade_id, plan_id, cluster_name, **kw)
        self._open.append(t)
        return t

    def manager(self, **kw) -> TestArtifactsManager:
        if self.kind == "server":
            kw.setdefault("server", self.url)
            m = TestArtifactsManager(None, **kw)
        else:
            m = TestArtifactsManager(str(self.data_dir), **kw)
        self._open.append(m)
        return m

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The CLI on the same store: ``--server`` for a server, ``--data-dir`` otherwise."""
        where = ["--server", self.url] if self.kind == "server" else ["--data-dir", str(self.data_dir)]
        p = subprocess.run([self.binary, *where, *args], capture_output=True, text=True, env=self.env())
        if check:
            assert p.returncode == 0, f"{args}: {p.stderr}"
        return p

    def cli_json(self, *args: str):
        return json.loads(self.cli("-o", "json", *args).stdout)

    def close(self) -> None:
        for o in self._open:
            o.cleanup()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=15)


@pytest.fixture(params=["local", "server"])
def backend(request, tmp_path, eua_bin, monkeypatch):
    for k in ("EUA_SERVER", "EUA_TOKEN", "EUA_DATA_DIR", "EUA_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    b = Backend(request.param, tmp_path / "data", eua_bin)
    yield b
    b.close()


@pytest.fixture
def local(tmp_path, eua_bin, monkeypatch):
    for k in ("EUA_SERVER", "EUA_TOKEN", "EUA_DATA_DIR", "EUA_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    b = Backend("local", tmp_path / "data", eua_bin)
    yield b
    b.close()
