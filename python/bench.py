"""Benchmark of the Python package in local mode (a data dir; the binary from the usual lookup:
bundled, EUA_BIN, PATH). Prints:

- ``update_task_progress_per_s``: calls per second from Python, each acknowledged durable by the
  ``progress apply`` child before it returns (target >= 5,000/s; the reference: about 215/s);
- ``add_artifact_per_s size=512B``: ``add_artifact`` of distinct 512-byte files per second, each
  stored and indexed by the ``artifacts apply`` child before it returns (target >= 1,000/s; the
  reference: 354/s at 100 artifacts, 14/s at 3,000).

Usage: python bench.py [--updates N] [--artifacts N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eks_upgrade_agent import ProgressTracker, TaskType, TestArtifactsManager, find_binary  # noqa: E402


def bench_updates(data: str, n: int) -> float:
    with ProgressTracker("bench", "plan", "cluster", storage_path=data) as t:
        t.start_upgrade()
        for i in range(10):
            t.add_task(f"t{i}", f"Task {i}", TaskType.UPGRADE_STEP)
            t.start_task(f"t{i}")
        for i in range(200):  # warm up
            t.update_task_progress(f"t{i % 10}", (i % 100) / 1.0, "warm")
        start = time.perf_counter()
        for i in range(n):
            t.update_task_progress(f"t{i % 10}", (i % 1000) / 10.0, "progress", step=i)
        elapsed = time.perf_counter() - start
        assert t.get_task_progress("t9")["percentage"] == ((n - 1) % 1000) / 10.0
    return n / elapsed


def bench_artifacts(data: str, files: Path, n: int) -> float:
    paths = []
    for i in range(n + 100):
        p = files / f"f{i:06}.log"
        p.write_bytes(os.urandom(512))
        paths.append(p)
    with TestArtifactsManager(data) as m:
        s = m.create_session("bench", "cluster")
        c = m.create_collection(s.session_id, "logs")
        for p in paths[:100]:  # warm up
            m.add_artifact(s.session_id, c.collection_id, p)
        start = time.perf_counter()
        for p in paths[100:]:
            m.add_artifact(s.session_id, c.collection_id, p, tags=["bench"])
        elapsed = time.perf_counter() - start
        assert m.get_session_summary(s.session_id)["total_artifacts"] == n + 100
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=20_000)
    ap.add_argument("--artifacts", type=int, default=3_000)
    a = ap.parse_args()
    print(f"binary: {find_binary()}")
    with tempfile.TemporaryDirectory() as d:
        rate = bench_updates(os.path.join(d, "progress"), a.updates)
        print(f"update_task_progress_per_s tasks=10 n={a.updates}: {rate:,.0f}  (target >= 5,000; reference ~215)")
        files = Path(d) / "files"
        files.mkdir()
        rate = bench_artifacts(os.path.join(d, "artifacts"), files, a.artifacts)
        print(f"add_artifact_per_s size=512B n={a.artifacts}: {rate:,.0f}  (target >= 1,000; reference 354 at 100, 14 at 3,000)")


if __name__ == "__main__":
    main()
