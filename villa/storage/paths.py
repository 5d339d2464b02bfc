"""Where data and checkpoints live.

``PROJECT_DIR`` comes from the environment, else from a ``.env`` file in the repository root,
else it is the repository root itself, so a newcomer never needs to create ``.env``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def project_dir() -> Path:
    """The project directory (``PROJECT_DIR``), resolved once per call from env / ``.env`` / repo root."""
    if "PROJECT_DIR" not in os.environ:
        env_file = REPO_ROOT / ".env"
        if env_file.is_file():
            from dotenv import dotenv_values

            value = dotenv_values(env_file).get("PROJECT_DIR")
            if value:
                return Path(value).expanduser()
        return REPO_ROOT
    return Path(os.environ["PROJECT_DIR"]).expanduser()


def data_root() -> Path:
    """Default folder that holds datasets: ``${PROJECT_DIR}/data``."""
    return project_dir() / "data"


def checkpoint_root() -> Path:
    """Default folder that holds checkpoints: ``${PROJECT_DIR}/villa/checkpoints``."""
    return project_dir() / "villa" / "checkpoints"


def resolve_dataset_dir(data_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Accept a dataset given as a path or as a folder name under the data root."""
    candidate = Path(data_dir).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    under_root = Path(root) if root is not None else data_root()
    if not candidate.is_absolute() and (under_root / candidate).is_dir():
        return (under_root / candidate).resolve()
    from villa.storage.errors import VillaError

    raise VillaError(
        f"dataset folder not found: '{data_dir}' (looked in the current directory and {under_root})"
    )
