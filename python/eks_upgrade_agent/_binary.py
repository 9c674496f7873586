"""Finding the ``eks-upgrade-agent`` binary: the one bundled with the wheel (in the scripts
directory of the installation, as ruff's ``find_ruff_bin`` looks for it), then ``EUA_BIN``, then
``eks-upgrade-agent`` on ``PATH``."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from .errors import BinaryNotFoundError

EXE = "eks-upgrade-agent" + (".exe" if sys.platform == "win32" else "")


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def bundled_candidates() -> list[Path]:
    """Where a wheel install puts the binary: the interpreter's scripts dir, the user scheme's,
    and ``bin/`` beside the package (``pip install --target``)."""
    out = [Path(sysconfig.get_path("scripts")) / EXE]
    if sys.version_info >= (3, 10):
        user_scheme = sysconfig.get_preferred_scheme("user")
    elif os.name == "nt":
        user_scheme = "nt_user"
    elif sys.platform == "darwin" and sys._framework:  # type: ignore[attr-defined]
        user_scheme = "osx_framework_user"
    else:
        user_scheme = "posix_user"
    try:
        out.append(Path(sysconfig.get_path("scripts", scheme=user_scheme)) / EXE)
    except KeyError:
        pass
    out.append(Path(__file__).resolve().parent.parent / "bin" / EXE)
    return out


def find_binary() -> str:
    """The path of the binary to run; raises ``BinaryNotFoundError`` naming all three places."""
    for p in bundled_candidates():
        if _is_exe(p):
            return str(p)
    env = os.environ.get("EUA_BIN")
    if env:
        if _is_exe(Path(env)):
            return env
        raise BinaryNotFoundError(
            f"EUA_BIN is {env!r}, which is not an executable file: point it at the "
            "eks-upgrade-agent binary or unset it"
        )
    found = shutil.which(EXE)
    if found:
        return found
    tried = ", ".join(str(p) for p in bundled_candidates())
    raise BinaryNotFoundError(
        "the eks-upgrade-agent binary was not found: not bundled with this installation "
        f"(looked at {tried}), EUA_BIN is not set, and {EXE} is not on PATH; install the "
        "eks-upgrade-agent wheel, set EUA_BIN to the binary, or put it on PATH"
    )
