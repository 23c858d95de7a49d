"""Outputs: atomic writes of files and directories, and what an output path may replace (and
``read_json_object``, the one reader of small JSON inputs with a clear error).

Everything user-facing (plans, JSON reports, checkpoints, figures) goes through here: write to a
sibling temporary path, flush to disk, then ``os.replace`` (atomic on POSIX within one
filesystem), so a killed writer never leaves a half-written output.

What an output may replace is decided once, here, by its ``OutputKind``: a path that does not
exist, an empty directory, or an existing output of that kind the kind recognises as its own
(``ours``), the last only with ``overwrite`` where the kind says so. ``check_output`` applies the
rule before any work (tools call it while parsing arguments) and ``replace_dir`` applies it again
at the moment of the swap, so nothing else, a user's files above all, is ever deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, OutputError

# ----- what an output path may replace -----------------------------------------------------------

@dataclass(frozen=True)
class OutputKind:
    """One kind of output: ``what`` it is called in messages, whether it is a ``directory``,
    which existing paths are ``ours`` (replaceable) and whether replacing them needs
    ``overwrite``."""

    what: str
    directory: bool = False
    ours: Callable[[Path], bool] = lambda path: False
    needs_overwrite: bool = True

    @property
    def a_what(self) -> str:
        """``what`` with its indefinite article, for messages."""
        vowel_sound = self.what[0] in "aeiouAEIOU" or self.what.startswith("SPD")
        return ("an " if vowel_sound else "a ") + self.what


def _listing(directory: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_writable(path: str | Path, flag: str = "output") -> None:
    """Raise OutputError unless ``path`` can be created: its nearest existing ancestor is a
    directory in which a file can be created (probed, so permissions, read-only filesystems
    and ACLs all count)."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is a file, not a directory; choose another "
                          "path")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); choose a "
                          "writable path") from None


def check_output(path: str | Path, kind: OutputKind, *, overwrite: bool = False,
                 flag: str = "--out") -> None:
    """Raise OutputError (naming what is there) unless ``kind`` may be written at ``path``."""
    path = Path(path)
    check_writable(path, flag)
    if not path.exists() and not path.is_symlink():
        return
    if kind.directory:
        if not path.is_dir():
            raise OutputError(f"{flag} {path} is an existing file, not a directory; choose "
                              "another path (it is never replaced)")
        if not any(path.iterdir()):
            return
        found = f" (it holds {_listing(path)})"
    else:
        if not path.is_file():
            there = "a directory" if path.is_dir() else "not a regular file"
            raise OutputError(f"{flag} {path} is {there}; give the path of a file to write the "
                              f"{kind.what} to")
        found = ""
    if not kind.ours(path):
        raise OutputError(f"{flag} {path} exists and is not {kind.a_what}{found}; it is never "
                          "replaced: choose another path")
    if kind.needs_overwrite and not overwrite:
        raise OutputError(f"{flag} {path} already holds {kind.a_what}; pass --overwrite to "
                          "replace it, or choose another path")


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _is_markdown(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    return path.suffix.lower() in (".md", ".markdown")


#: Reports, figures and generated documents: a rerun replaces its own output without a flag.
PNG_FIGURE = OutputKind("PNG figure", ours=_is_png, needs_overwrite=False)
MARKDOWN_DOC = OutputKind("Markdown document", ours=_is_markdown, needs_overwrite=False)
#: A directory a tool adds files to and never replaces (a training run's save directory).
WORK_DIR = OutputKind("directory", directory=True, ours=lambda path: True, needs_overwrite=False)


def read_json_object(path: str | Path, what: str,
                     error: type[Exception] = InputError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file and ``what`` it should be when it
    is not valid UTF-8 JSON or not an object (random bytes, a list, a truncated write)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path} is not valid JSON ({type(e).__name__}: {e}); it should be "
                    f"{what}") from None
    if not isinstance(d, dict):
        raise error(f"{path} holds a JSON {type(d).__name__}, not {what}")
    return d


# ----- atomic writes -----------------------------------------------------------------------------

def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def replace_dir(tmp_dir: str | Path, final_dir: str | Path, *,
                ours: Callable[[Path], bool]) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``. ``final_dir`` may be absent, an empty
    directory, or a directory ``ours`` recognises (the caller has decided it may be replaced):
    that one is swapped out with two renames, so at every instant either the old or the new
    directory is complete, then removed. Anything else raises OutputError and stays untouched."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.is_symlink() or (final_dir.exists() and not final_dir.is_dir()):
        raise OutputError(f"{final_dir} exists and is not a directory; it is never replaced "
                          f"(the new output stays in {tmp_dir})")
    if not final_dir.exists() or not any(final_dir.iterdir()):
        os.replace(tmp_dir, final_dir)  # rename(2) replaces an empty directory atomically
        return
    if not ours(final_dir):
        raise OutputError(f"{final_dir} exists and holds {_listing(final_dir)}, which is not "
                          f"ours to replace (the new output stays in {tmp_dir})")
    old = tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.", suffix=".old")
    os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old)


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename onto ``path``: binary outputs (torch.save, PNG) get the
    same all-or-nothing guarantee; the unique temporary name keeps concurrent writers apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_figure(fig, path: str | Path, dpi: int = 120, **savefig_kw: Any) -> None:
    """A matplotlib figure written atomically as PNG."""
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, **savefig_kw))
