"""Drop-in for the reference Python ``ProgressTracker`` and ``TestArtifactsManager``, backed by
the ``eks-upgrade-agent`` binary (a local data dir) or its server::

    from eks_upgrade_agent import ProgressTracker, TestArtifactsManager, TaskType

Every change is durable when the call returns; the CLI, the server and this package read and
write the same store.
"""

from .artifacts import TestArtifactsManager
from .errors import (
    AlreadyExistsError,
    BackendError,
    BinaryNotFoundError,
    EksUpgradeAgentError,
    InvalidInputError,
    InvalidTransitionError,
    NotFoundError,
)
from .models import (
    ArtifactCollection,
    ArtifactStatus,
    ArtifactType,
    ProgressEvent,
    ProgressStatus,
    TaskProgress,
    TaskType,
    TestArtifact,
    TestSession,
    UpgradeProgress,
)
from .progress import ProgressTracker
from ._binary import find_binary

__all__ = [
    "UpgradeProgress",
    "AlreadyExistsError",
    "ArtifactCollection",
    "ArtifactStatus",
    "ArtifactType",
    "BackendError",
    "BinaryNotFoundError",
    "EksUpgradeAgentError",
    "InvalidInputError",
    "InvalidTransitionError",
    "NotFoundError",
    "ProgressEvent",
    "ProgressStatus",
    "ProgressTracker",
    "TaskProgress",
    "TaskType",
    "TestArtifact",
    "TestArtifactsManager",
    "TestSession",
    "find_binary",
]
