"""Where the research scripts' outputs go and how their records name files: paths inside the
repository are recorded relative to it, so a result JSON reads the same on every checkout."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | Path) -> Path:
    """``path`` relative to the repository when it is inside it (what results may record)."""
    p = Path(path).resolve()
    return p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
