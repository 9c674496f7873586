"""The reference models (pydantic v2) with the reference field names, plus a few of ours
(``seq``, ``kind``, ``upgrade_id`` on events; ``session_id``, ``collection_id`` and
``export_name`` on artifacts) that the reference did not have."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field


class ProgressStatus(str, Enum):
    NOT_STARTED = "not_started"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    PAUSED = "paused"
    CANCELLED = "cancelled"


class TaskType(str, Enum):
    UPGRADE_PLAN = "upgrade_plan"
    UPGRADE_STEP = "upgrade_step"
    VALIDATION = "validation"
    ROLLBACK = "rollback"
    CLEANUP = "cleanup"


class ArtifactType(str, Enum):
    LOG_FILE = "log_file"
    TEST_RESULT = "test_result"
    CONFIGURATION = "configuration"
    SCREENSHOT = "screenshot"
    METRICS_DATA = "metrics_data"
    BACKUP = "backup"
    REPORT = "report"
    DIAGNOSTIC = "diagnostic"


class ArtifactStatus(str, Enum):
    CREATED = "created"
    UPLOADED = "uploaded"
    ARCHIVED = "archived"
    DELETED = "deleted"
    FAILED = "failed"


class _Model(BaseModel):
    model_config = ConfigDict(use_enum_values=False, extra="ignore")


def _seconds(v: Any) -> Optional[timedelta]:
    if v is None or isinstance(v, timedelta):
        return v
    return timedelta(seconds=float(v))


class ProgressEvent(_Model):
    event_id: str
    timestamp: datetime
    task_id: Optional[str] = None
    task_type: Optional[TaskType] = None
    status: ProgressStatus
    message: str = ""
    details: Dict[str, Any] = Field(default_factory=dict)
    percentage: float = 0.0
    # Ours.
    seq: Optional[int] = None
    kind: Optional[str] = None
    upgrade_id: Optional[str] = None

    @classmethod
    def from_wire(cls, v: Dict[str, Any]) -> "ProgressEvent":
        v = dict(v)
        if v.get("message") is None:
            v["message"] = ""
        return cls.model_validate(v)


class TaskProgress(_Model):
    task_id: str
    task_name: str
    task_type: TaskType
    parent_task_id: Optional[str] = None
    status: ProgressStatus = ProgressStatus.NOT_STARTED
    started_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    duration: Optional[timedelta] = None
    percentage: float = 0.0
    current_step: Optional[str] = None
    total_steps: Optional[int] = None
    completed_steps: int = 0
    error_message: Optional[str] = None
    retry_count: int = 0
    events: List[ProgressEvent] = Field(default_factory=list)

    @classmethod
    def from_wire(cls, v: Dict[str, Any], events: Optional[List[Dict[str, Any]]] = None) -> "TaskProgress":
        v = dict(v)
        v["duration"] = _seconds(v.get("duration"))
        if "task_name" not in v and "name" in v:
            v["task_name"] = v["name"]
        v["events"] = [ProgressEvent.from_wire(e) for e in (events or [])]
        return cls.model_validate(v)


class UpgradeProgress(_Model):
    """The reference's upgrade model (the saved file's top level): the upgrade and its tasks
    keyed by id. Task ``events`` are not filled (read them with ``get_task_progress``)."""

    upgrade_id: str
    plan_id: str
    cluster_name: str
    status: ProgressStatus = ProgressStatus.NOT_STARTED
    started_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    duration: Optional[timedelta] = None
    overall_percentage: float = 0.0
    current_phase: Optional[str] = None
    tasks: Dict[str, TaskProgress] = Field(default_factory=dict)
    metadata: Dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_wire(cls, v: Dict[str, Any]) -> "UpgradeProgress":
        tasks = {t["task_id"]: TaskProgress.from_wire(t) for t in (v.get("tasks") or [])}
        return cls.model_validate(
            {
                "upgrade_id": v["upgrade_id"],
                "plan_id": v["plan_id"],
                "cluster_name": v["cluster_name"],
                "status": v.get("status") or "not_started",
                "started_at": v.get("started_at"),
                "completed_at": v.get("completed_at"),
                "duration": _seconds(v.get("duration")),
                "overall_percentage": v.get("overall_percentage") or 0.0,
                "current_phase": v.get("current_phase"),
                "tasks": tasks,
                "metadata": v.get("metadata") or {},
            }
        )


class TestArtifact(_Model):
    __test__ = False  # not a pytest test class

    artifact_id: str
    name: str
    description: Optional[str] = None
    artifact_type: ArtifactType
    local_path: Optional[str] = None
    file_size: int
    file_hash: str
    s3_bucket: Optional[str] = None
    s3_key: Optional[str] = None
    s3_url: Optional[str] = None
    created_at: datetime
    uploaded_at: Optional[datetime] = None
    status: ArtifactStatus
    task_id: Optional[str] = None
    step_id: Optional[str] = None
    upgrade_id: Optional[str] = None
    metadata: Dict[str, Any] = Field(default_factory=dict)
    tags: List[str] = Field(default_factory=list)
    # Ours.
    session_id: Optional[str] = None
    collection_id: Optional[str] = None
    export_name: Optional[str] = None


class ArtifactCollection(_Model):
    collection_id: str
    name: str
    description: Optional[str] = None
    upgrade_id: Optional[str] = None
    task_id: Optional[str] = None
    artifacts: List[TestArtifact] = Field(default_factory=list)
    created_at: datetime
    metadata: Dict[str, Any] = Field(default_factory=dict)
    # Ours.
    session_id: Optional[str] = None


class TestSession(_Model):
    __test__ = False

    session_id: str
    name: str
    description: Optional[str] = None
    upgrade_id: str
    cluster_name: str
    collections: Dict[str, ArtifactCollection] = Field(default_factory=dict)
    started_at: datetime
    completed_at: Optional[datetime] = None
    base_directory: Optional[str] = None
    retention_days: int = 30


def py_timedelta(seconds: Optional[float]) -> Optional[str]:
    """``str(timedelta(seconds=...))``, as the reference printed durations."""
    if seconds is None:
        return None
    return str(timedelta(seconds=float(seconds)))
