"""``TestArtifactsManager``: the reference API over the ``eks-upgrade-agent`` binary (a data
dir, through one long-lived ``artifacts apply`` child) or a server."""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._binary import find_binary
from ._http import Http, q
from ._local import ApplyChild, Binary
from .errors import ClosedError, EksUpgradeAgentError, InvalidInputError, NotFoundError
from .progress import is_id
from .models import ArtifactCollection, ArtifactStatus, ArtifactType, TestArtifact, TestSession

DEFAULT_PREFIX = "eks-upgrade-agent/artifacts"


def _value(x: Any) -> Any:
    return x.value if hasattr(x, "value") else x


def _iso(v: Optional[str]) -> Optional[str]:
    if v is None:
        return None
    return datetime.fromisoformat(v.replace("Z", "+00:00")).isoformat()


MAX_RETENTION_DAYS = 36500


class _LocalBackend:
    def __init__(self, binary: Binary, timeout: Optional[float] = None):
        self.binary = binary
        self.apply = ApplyChild(binary, "artifacts", "apply", timeout=timeout)

    def call(self, op: str, **fields: Any) -> Any:
        req = {"op": op}
        req.update({k: v for k, v in fields.items() if v is not None})
        return self.apply.call(req)["result"]

    def session_create(self, **f: Any) -> Dict[str, Any]:
        return self.call("session.create", **f)

    def session_get(self, session_id: str) -> Dict[str, Any]:
        return self.call("session.get", session_id=session_id)

    def session_complete(self, session_id: str) -> Dict[str, Any]:
        return self.call("session.complete", session_id=session_id)

    def collection_create(self, **f: Any) -> Dict[str, Any]:
        return self.call("collection.create", **f)

    def add(self, path: str, **f: Any) -> Dict[str, Any]:
        added = self.call("artifact.add", path=path, **f)
        return added[0]

    def search(self, query: Dict[str, Any]) -> Dict[str, Any]:
        return self.call("artifact.search", **query)

    def artifact(self, artifact_id: str) -> Dict[str, Any]:
        return self.call("artifact.get", artifact_id=artifact_id)

    def stats(self, session_id: Optional[str]) -> Dict[str, Any]:
        return self.call("stats", session_id=session_id)

    def upload(self, session: Optional[str] = None, artifact: Optional[str] = None) -> None:
        args = ["artifacts", "upload"]
        if session:
            args.append(f"--session={session}")
        if artifact:
            args.append(f"--artifact={artifact}")
        self.binary.json(*args)

    def cleanup_expired(self, as_of: Optional[str]) -> Dict[str, Any]:
        args = ["artifacts", "cleanup"]
        if as_of:
            args.append(f"--as-of={as_of}")
        return self.binary.json(*args)

    def close(self) -> None:
        self.apply.close()


class _ServerBackend:
    def __init__(self, http: Http):
        self.http = http

    def session_create(self, **f: Any) -> Dict[str, Any]:
        return self.http.json("POST", "/api/v1/sessions", {k: v for k, v in f.items() if v is not None})

    def session_get(self, session_id: str) -> Dict[str, Any]:
        v = self.http.json("GET", f"/api/v1/sessions/{q(session_id)}")
        out = dict(v.get("summary") or {})
        out["collections"] = v.get("collections") or []
        return out

    def session_complete(self, session_id: str) -> Dict[str, Any]:
        return self.http.json("POST", f"/api/v1/sessions/{q(session_id)}/complete")

    def collection_create(self, session_id: str, **f: Any) -> Dict[str, Any]:
        return self.http.json(
            "POST", f"/api/v1/sessions/{q(session_id)}/collections", {k: v for k, v in f.items() if v is not None}
        )

    def add(self, path: str, session_id: str, collection_id: str, **f: Any) -> Dict[str, Any]:
        params: List[tuple] = [("name", f.get("name") or Path(path).name)]
        if f.get("artifact_type"):
            params.append(("type", f["artifact_type"]))
        for k in ("description", "task_id", "step_id"):
            if f.get(k) is not None:
                params.append((k, f[k]))
        for t in f.get("tags") or []:
            params.append(("tag", t))
        if f.get("metadata"):
            params.append(("metadata", json.dumps(f["metadata"])))
        with open(path, "rb") as fh:
            data = fh.read()
        v = self.http.json(
            "POST",
            f"/api/v1/sessions/{q(session_id)}/collections/{q(collection_id)}/artifacts?"
            + urllib.parse.urlencode(params),
            raw=data,
        )
        return v[0] if isinstance(v, list) else v

    def search(self, query: Dict[str, Any]) -> Dict[str, Any]:
        names = {"session_id": "session", "collection_id": "collection", "upgrade_id": "upgrade",
                 "artifact_type": "type", "tags": "tag"}
        params: List[tuple] = []
        for k, v in query.items():
            if v is None:
                continue
            key = names.get(k, k)
            if k == "created_since":
                secs = max(1, int((datetime.now(timezone.utc) - datetime.fromisoformat(v)).total_seconds()))
                params.append(("since", f"{secs // 60 or 1}m" if secs >= 60 else "1m"))
            elif isinstance(v, list):
                params += [(key, x) for x in v]
            else:
                params.append((key, v))
        body, headers = self.http.call("GET", "/api/v1/artifacts?" + urllib.parse.urlencode(params))
        cursor = {k.lower(): v for k, v in headers.items()}.get("x-next-cursor")
        return {"artifacts": body, "next_cursor": cursor}

    def artifact(self, artifact_id: str) -> Dict[str, Any]:
        return self.http.json("GET", f"/api/v1/artifacts/{q(artifact_id)}")

    def stats(self, session_id: Optional[str]) -> Dict[str, Any]:
        path = "/api/v1/artifacts/stats"
        if session_id:
            path += "?session=" + q(session_id)
        return self.http.json("GET", path)

    def upload(self, session: Optional[str] = None, artifact: Optional[str] = None) -> None:
        self.http.json("POST", "/api/v1/maintenance/upload",
                       {k: v for k, v in {"session": session, "artifact": artifact}.items() if v})

    def cleanup_expired(self, as_of: Optional[str]) -> Dict[str, Any]:
        return self.http.json("POST", "/api/v1/maintenance/cleanup", {"as_of": as_of} if as_of else {})

    def close(self) -> None:
        pass


class TestArtifactsManager:
    """Sessions, collections and artifacts. ``base_directory`` is the data dir
    (``--data-dir``) the CLI and the server use too; ``server=``/``token=`` (or ``EUA_SERVER``
    / ``EUA_TOKEN``) use a server instead. ``s3_bucket``, ``s3_prefix``, ``aws_region`` and
    ``auto_upload`` are our S3 settings (uploads go through the durable upload queue)."""

    __test__ = False

    def __init__(
        self,
        base_directory: Any = None,
        s3_bucket: Optional[str] = None,
        s3_prefix: Optional[str] = None,
        aws_region: str = "us-east-1",
        retention_days: int = 30,
        auto_upload: bool = False,
        *,
        server: Optional[str] = None,
        token: Optional[str] = None,
        binary: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> None:
        if isinstance(retention_days, bool) or not isinstance(retention_days, int) or not (
            1 <= retention_days <= MAX_RETENTION_DAYS
        ):
            raise InvalidInputError(
                f"retention_days must be a whole number of days in 1..={MAX_RETENTION_DAYS}, got {retention_days!r}"
            )
        self.base_directory = None if base_directory is None else str(base_directory)
        self.s3_bucket = s3_bucket
        self.s3_prefix = s3_prefix or DEFAULT_PREFIX
        self.aws_region = aws_region
        self.retention_days = retention_days
        self.auto_upload = auto_upload
        self.server = server if server is not None else (os.environ.get("EUA_SERVER") or None)
        token = token if token is not None else (os.environ.get("EUA_TOKEN") or None)
        self._closed = False
        if self.server:
            backend: Any = _ServerBackend(Http(self.server, token, **({} if timeout is None else {"timeout": timeout})))
        else:
            args: List[str] = []
            if self.base_directory is not None:
                args += ["--data-dir", self.base_directory]
            env: Dict[str, str] = {}
            if s3_bucket:
                args += ["--s3-bucket", s3_bucket, "--s3-prefix", self.s3_prefix]
                if auto_upload:
                    args.append("--auto-upload")
                env["AWS_REGION"] = aws_region
            backend = _LocalBackend(Binary(binary or find_binary(), args, env), timeout)
        self._res = backend
        # Closes the apply child when this manager is collected without cleanup(), or at exit.
        self._finalizer = weakref.finalize(self, backend.close)
        self._lock = threading.Lock()

    @property
    def _backend(self) -> Any:
        if self._closed:
            raise ClosedError("this manager was cleaned up; create a new TestArtifactsManager to go on")
        return self._res

    # --- conversions ----------------------------------------------------------------------

    def _artifact(self, v: Dict[str, Any]) -> TestArtifact:
        return TestArtifact.model_validate(v)

    def _collection(self, v: Dict[str, Any], upgrade_id: Optional[str], artifacts: List[TestArtifact]) -> ArtifactCollection:
        return ArtifactCollection.model_validate(dict(v, upgrade_id=upgrade_id, artifacts=artifacts))

    def _session(self, v: Dict[str, Any], collections: Dict[str, ArtifactCollection]) -> TestSession:
        return TestSession.model_validate(dict(v, collections=collections, base_directory=self.base_directory))

    def _all(self, query: Dict[str, Any]) -> List[TestArtifact]:
        out: List[TestArtifact] = []
        query = dict(query, limit=10_000)
        while True:
            page = self._backend.search(query)
            out += [self._artifact(a) for a in page["artifacts"]]
            if not page.get("next_cursor"):
                return out
            query["cursor"] = page["next_cursor"]

    # --- sessions and collections ---------------------------------------------------------

    def create_session(
        self, upgrade_id: str, cluster_name: str, session_name: Optional[str] = None, description: Optional[str] = None
    ) -> TestSession:
        v = self._backend.session_create(
            upgrade_id=upgrade_id, cluster_name=cluster_name, name=session_name,
            description=description, retention_days=self.retention_days,
        )
        return self._session(v, {})

    def get_session(self, session_id: str) -> Optional[TestSession]:
        if not is_id(session_id):
            return None
        try:
            v = self._backend.session_get(session_id)
        except NotFoundError:
            return None
        by_collection: Dict[str, List[TestArtifact]] = {}
        for a in self._all({"session_id": session_id}):
            by_collection.setdefault(a.collection_id or "", []).append(a)
        cols = {
            c["collection_id"]: self._collection(c, v["upgrade_id"], list(reversed(by_collection.get(c["collection_id"], []))))
            for c in v["collections"]
        }
        return self._session(v, cols)

    def complete_session(self, session_id: str) -> bool:
        if not is_id(session_id):
            return False
        try:
            self._backend.session_complete(session_id)
        except NotFoundError:
            return False
        if self.auto_upload and (self.s3_bucket or self.server):
            self._backend.upload(session=session_id)
        return True

    def create_collection(
        self, session_id: str, collection_name: str, description: Optional[str] = None, task_id: Optional[str] = None
    ) -> Optional[ArtifactCollection]:
        if not is_id(session_id):
            return None
        try:
            v = self._backend.collection_create(
                session_id=session_id, name=collection_name, description=description, task_id=task_id
            )
            s = self._backend.session_get(session_id)
        except NotFoundError:
            return None
        return self._collection(v, s.get("upgrade_id"), [])

    # --- artifacts ------------------------------------------------------------------------

    def add_artifact(
        self,
        session_id: str,
        collection_id: str,
        file_path: Any,
        artifact_name: Optional[str] = None,
        artifact_type: ArtifactType = ArtifactType.LOG_FILE,
        description: Optional[str] = None,
        task_id: Optional[str] = None,
        step_id: Optional[str] = None,
        tags: Optional[List[str]] = None,
        **metadata: Any,
    ) -> Optional[TestArtifact]:
        """Adds a file (its bytes are stored once per SHA-256); ``None`` for an unknown
        session or collection, as in the reference."""
        if not (is_id(session_id) and is_id(collection_id)):
            return None
        path = os.path.abspath(os.fspath(file_path))
        if os.path.isdir(path):
            raise InvalidInputError(
                f"file_path {path!r} is a directory; add_artifact adds one file: pass a file, or "
                "call it once per file"
            )
        if not os.path.isfile(path):
            return None  # as the reference: a file that is not there adds nothing
        try:
            v = self._backend.add(
                path,
                session_id=session_id,
                collection_id=collection_id,
                name=artifact_name,
                artifact_type=_value(artifact_type),
                description=description,
                task_id=task_id,
                step_id=step_id,
                tags=list(tags) if tags else None,
                metadata=metadata or None,
            )
        except (NotFoundError, FileNotFoundError):
            return None
        return self._artifact(v)

    def upload_artifact(self, session_id: str, artifact_id: str) -> bool:
        if not (self.s3_bucket or self.server):
            return False
        try:
            a = self._backend.artifact(artifact_id)
            if a.get("session_id") != session_id:
                return False
            self._backend.upload(artifact=artifact_id)
            return self._backend.artifact(artifact_id)["status"] == ArtifactStatus.UPLOADED.value
        except EksUpgradeAgentError:
            return False

    def upload_session_artifacts(self, session_id: str) -> Dict[str, bool]:
        if not is_id(session_id) or self.get_session_summary(session_id) is None:
            return {}
        if not (self.s3_bucket or self.server):
            return {a.artifact_id: False for a in self._all({"session_id": session_id})}
        try:
            self._backend.upload(session=session_id)
        except EksUpgradeAgentError:
            pass
        return {a.artifact_id: a.status == ArtifactStatus.UPLOADED for a in self._all({"session_id": session_id})}

    def search_artifacts(
        self,
        session_id: Optional[str] = None,
        artifact_type: Optional[ArtifactType] = None,
        tags: Optional[List[str]] = None,
        task_id: Optional[str] = None,
        status: Optional[ArtifactStatus] = None,
        collection_id: Optional[str] = None,
        upgrade_id: Optional[str] = None,
    ) -> List[TestArtifact]:
        try:
            return self._all({
                "session_id": session_id,
                "artifact_type": _value(artifact_type) if artifact_type else None,
                "tags": list(tags) if tags else None,
                "task_id": task_id,
                "status": _value(status) if status else None,
                "collection_id": collection_id,
                "upgrade_id": upgrade_id,
            })
        except NotFoundError:
            return []

    def search_by_name(self, name_pattern: str, session_id: Optional[str] = None) -> List[TestArtifact]:
        try:
            return self._all({"name": name_pattern, "session_id": session_id})
        except NotFoundError:
            return []

    def get_recent_artifacts(self, hours: float = 24, session_id: Optional[str] = None) -> List[TestArtifact]:
        since = datetime.now(timezone.utc) - timedelta(hours=hours)
        if session_id is not None and (not is_id(session_id) or self.get_session_summary(session_id) is None):
            return []
        found = self._all({"session_id": session_id}) if session_id else self._all({})
        return [a for a in found if a.created_at >= since]

    def get_session_summary(self, session_id: str) -> Optional[Dict[str, Any]]:
        if not is_id(session_id):
            return None
        try:
            v = self._backend.session_get(session_id)
        except NotFoundError:
            return None
        types = {t.value: 0 for t in ArtifactType}
        types.update(v.get("artifact_types") or {})
        return {
            "session_id": v["session_id"],
            "name": v["name"],
            "upgrade_id": v["upgrade_id"],
            "cluster_name": v["cluster_name"],
            "started_at": _iso(v.get("started_at")),
            "completed_at": _iso(v.get("completed_at")),
            "collections_count": v["collections_count"],
            "total_artifacts": v["total_artifacts"],
            "total_size_bytes": v["total_size_bytes"],
            "uploaded_artifacts": v["uploaded_artifacts"],
            "artifact_types": types,
        }

    def cleanup_expired_sessions(self, as_of: Optional[datetime] = None) -> List[str]:
        """Removes the sessions whose retention has passed (judged at ``as_of``, ours: now by
        default); returns their ids."""
        when = None
        if as_of is not None:
            when = (as_of if as_of.tzinfo else as_of.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
            when = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        report = self._backend.cleanup_expired(when)
        return [s["session"]["session_id"] for s in report.get("sessions") or []]

    def get_artifact_statistics(self, session_id: Optional[str] = None) -> Dict[str, Any]:
        """Totals over every session, or one; an unknown session counts nothing (as the
        reference, which searched no session)."""
        try:
            if session_id is not None and not is_id(session_id):
                raise NotFoundError(session_id)
            s = self._backend.stats(session_id)
        except NotFoundError:
            return {
                "total_artifacts": 0,
                "total_size_bytes": 0,
                "average_size_bytes": 0,
                "type_distribution": {},
                "status_distribution": {},
                "sessions_searched": 0,
            }
        return {
            "total_artifacts": s["total_artifacts"],
            "total_size_bytes": s["total_size_bytes"],
            "average_size_bytes": s["average_size_bytes"],
            "type_distribution": dict(s.get("type_distribution") or {}),
            "status_distribution": dict(s.get("status_distribution") or {}),
            "sessions_searched": s["sessions_searched"],
        }

    def cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "TestArtifactsManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
