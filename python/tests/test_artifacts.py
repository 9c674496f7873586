"""``TestArtifactsManager`` as the reference documents it, against a data dir and a server."""

from __future__ import annotations

import hashlib

from eks_upgrade_agent import (
    ArtifactCollection,
    ArtifactStatus,
    ArtifactType,
    InvalidInputError,
    TestArtifact,
    TestSession,
)


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_sessions_collections_and_artifacts(backend, tmp_path):
    m = backend.manager()
    session = m.create_session("upgrade-123", "my-cluster", session_name="run 1", description="pre-flight")
    assert isinstance(session, TestSession)
    assert (session.upgrade_id, session.cluster_name, session.name, session.description) == (
        "upgrade-123", "my-cluster", "run 1", "pre-flight")
    assert session.retention_days == 30 and session.completed_at is None and session.collections == {}
    coll = m.create_collection(session.session_id, "Upgrade Logs", description="logs", task_id="task-1")
    assert isinstance(coll, ArtifactCollection)
    assert (coll.name, coll.description, coll.task_id, coll.upgrade_id) == ("Upgrade Logs", "logs", "task-1", "upgrade-123")
    data = b"kubelet started\n" * 40
    f = write(tmp_path, "files/kubelet.log", data)
    a = m.add_artifact(session.session_id, coll.collection_id, f, tags=["upgrade", "infrastructure"],
                       task_id="task-1", step_id="drain", description="kubelet", node="ip-1")
    assert isinstance(a, TestArtifact)
    assert a.name == "kubelet.log" and a.artifact_type == ArtifactType.LOG_FILE
    assert a.file_size == len(data) and a.file_hash == hashlib.sha256(data).hexdigest()
    assert a.status == ArtifactStatus.CREATED and a.upgrade_id == "upgrade-123"
    assert sorted(a.tags) == ["infrastructure", "upgrade"] and a.metadata == {"node": "ip-1"}
    assert (a.task_id, a.step_id, a.description) == ("task-1", "drain", "kubelet")
    got = m.get_session(session.session_id)
    assert list(got.collections) == [coll.collection_id]
    assert [x.artifact_id for x in got.collections[coll.collection_id].artifacts] == [a.artifact_id]
    assert m.complete_session(session.session_id) is True
    assert m.get_session(session.session_id).completed_at is not None


def test_the_ingest_mark_is_a_reserved_metadata_key(backend, tmp_path):
    """G121: ``eua_pending_run`` (which gc deletes reports by) is refused, nothing stored."""
    m = backend.manager()
    s = m.create_session("u", "c")
    coll = m.create_collection(s.session_id, "logs")
    f = write(tmp_path, "a.log", b"x")
    try:
        m.add_artifact(s.session_id, coll.collection_id, f, eua_pending_run="x")
    except InvalidInputError as e:
        assert 'metadata key "eua_pending_run" is reserved' in str(e), str(e)
    else:
        raise AssertionError("the reserved key was accepted")
    assert m.get_session(s.session_id).collections[coll.collection_id].artifacts == []


def test_unknown_ids_give_none_or_false(backend, tmp_path):
    m = backend.manager()
    f = write(tmp_path, "a.txt", b"x")
    assert m.get_session("nope") is None
    assert m.complete_session("nope") is False
    assert m.create_collection("nope", "c") is None
    s = m.create_session("u", "c")
    assert m.add_artifact(s.session_id, "nope", f) is None
    assert m.add_artifact("nope", "nope", f) is None
    assert m.get_session_summary("nope") is None
    assert m.upload_artifact(s.session_id, "nope") is False


def test_search_by_every_criterion(backend, tmp_path):
    m = backend.manager()
    s1 = m.create_session("u1", "prod")
    s2 = m.create_session("u2", "prod")
    c1 = m.create_collection(s1.session_id, "logs")
    c2 = m.create_collection(s1.session_id, "results")
    c3 = m.create_collection(s2.session_id, "logs")
    log = m.add_artifact(s1.session_id, c1.collection_id, write(tmp_path, "Kubelet.LOG", b"k"), tags=["node", "kubelet"], task_id="ng-1")
    res = m.add_artifact(s1.session_id, c2.collection_id, write(tmp_path, "junit.xml", b"<x/>"),
                         artifact_type=ArtifactType.TEST_RESULT, tags=["smoke"])
    other = m.add_artifact(s2.session_id, c3.collection_id, write(tmp_path, "other.log", b"o"), tags=["node"])
    ids = lambda xs: sorted(x.artifact_id for x in xs)  # noqa: E731
    assert ids(m.search_artifacts(session_id=s1.session_id)) == ids([log, res])
    assert ids(m.search_artifacts(artifact_type=ArtifactType.TEST_RESULT)) == [res.artifact_id]
    assert ids(m.search_artifacts(tags=["node"])) == ids([log, other])
    assert ids(m.search_artifacts(tags=["node", "kubelet"])) == [log.artifact_id]
    assert ids(m.search_artifacts(task_id="ng-1")) == [log.artifact_id]
    assert ids(m.search_artifacts(status=ArtifactStatus.CREATED)) == ids([log, res, other])
    assert ids(m.search_artifacts(collection_id=c2.collection_id)) == [res.artifact_id]
    assert ids(m.search_artifacts(upgrade_id="u2")) == [other.artifact_id]
    assert ids(m.search_by_name("kubelet")) == [log.artifact_id]
    assert ids(m.search_by_name("LOG")) == ids([log, other])
    assert ids(m.search_by_name("log", session_id=s2.session_id)) == [other.artifact_id]
    assert ids(m.get_recent_artifacts(hours=1)) == ids([log, res, other])
    assert ids(m.get_recent_artifacts(hours=1, session_id=s2.session_id)) == [other.artifact_id]


def test_summaries_and_statistics(backend, tmp_path):
    m = backend.manager()
    s = m.create_session("u1", "prod", session_name="s")
    c = m.create_collection(s.session_id, "logs")
    m.add_artifact(s.session_id, c.collection_id, write(tmp_path, "a.log", b"a" * 100))
    m.add_artifact(s.session_id, c.collection_id, write(tmp_path, "b.xml", b"b" * 300), artifact_type=ArtifactType.TEST_RESULT)
    summary = m.get_session_summary(s.session_id)
    assert set(summary) == {"session_id", "name", "upgrade_id", "cluster_name", "started_at", "completed_at",
                            "collections_count", "total_artifacts", "total_size_bytes", "uploaded_artifacts",
                            "artifact_types"}
    assert (summary["collections_count"], summary["total_artifacts"], summary["total_size_bytes"]) == (1, 2, 400)
    assert summary["uploaded_artifacts"] == 0
    assert summary["artifact_types"] == {t.value: {"log_file": 1, "test_result": 1}.get(t.value, 0) for t in ArtifactType}
    stats = m.get_artifact_statistics()
    assert set(stats) == {"total_artifacts", "total_size_bytes", "average_size_bytes", "type_distribution",
                          "status_distribution", "sessions_searched"}
    assert (stats["total_artifacts"], stats["total_size_bytes"], stats["average_size_bytes"]) == (2, 400, 200.0)
    assert stats["type_distribution"]["log_file"] == 1 and stats["status_distribution"]["created"] == 2
    assert m.get_artifact_statistics(session_id=s.session_id)["sessions_searched"] == 1


def test_same_bytes_are_stored_once_and_never_replaced(backend, tmp_path):
    m = backend.manager()
    s = m.create_session("u1", "prod")
    c = m.create_collection(s.session_id, "logs")
    a = m.add_artifact(s.session_id, c.collection_id, write(tmp_path, "x/report.xml", b"one"))
    b = m.add_artifact(s.session_id, c.collection_id, write(tmp_path, "y/report.xml", b"two"))
    assert a.artifact_id != b.artifact_id and a.file_hash != b.file_hash
    assert m.get_session_summary(s.session_id)["total_artifacts"] == 2


def test_retention_removes_expired_sessions(backend, tmp_path):
    from datetime import datetime, timedelta, timezone

    short = backend.manager(retention_days=1)
    long = backend.manager(retention_days=30)
    s_old = short.create_session("u1", "prod")
    assert s_old.retention_days == 1
    c = short.create_collection(s_old.session_id, "logs")
    short.add_artifact(s_old.session_id, c.collection_id, write(tmp_path, "a.log", b"a"))
    s_open = short.create_session("u2", "prod")
    s_kept = long.create_session("u3", "prod")
    assert short.complete_session(s_old.session_id)
    assert long.complete_session(s_kept.session_id)
    assert short.cleanup_expired_sessions() == []
    two_days_on = datetime.now(timezone.utc) + timedelta(days=2)
    assert short.cleanup_expired_sessions(as_of=two_days_on) == [s_old.session_id]
    assert short.get_session(s_old.session_id) is None
    assert short.get_session(s_open.session_id) is not None
    assert long.get_session(s_kept.session_id) is not None
    assert short.search_artifacts(session_id=s_old.session_id) == []


def test_without_s3_uploads_report_false(local, tmp_path):
    # (A server uploads with its own S3 settings: the Rust S3 tests cover those.)
    m = local.manager()
    s = m.create_session("u1", "prod")
    c = m.create_collection(s.session_id, "logs")
    a = m.add_artifact(s.session_id, c.collection_id, write(tmp_path, "a.log", b"a"))
    assert m.upload_artifact(s.session_id, a.artifact_id) is False
    assert m.upload_session_artifacts(s.session_id) == {a.artifact_id: False}
