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

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import InputError, OutputError

logger = logging.getLogger(__name__)

# ----- what an output path may replace -----------------------------------------------------------

@dataclass(frozen=True)
class OutputKind:
    """One kind of output: ``what`` it is called in messages, whether it is a ``directory``,
    which existing paths are ``ours`` (replaceable), whether replacing them needs
    ``overwrite``, and (directories) which ``foreign`` entries make one of ours not ours any more
    (named in the refusal, and kept)."""

    what: str
    directory: bool = False
    ours: Callable[[Path], bool] = lambda path: False
    needs_overwrite: bool = True
    foreign: Optional[Callable[[Path], list[str]]] = None

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
        extra = kind.foreign(path) if kind.directory and kind.foreign else []
        if extra:
            more = f", ... ({len(extra)} entries)" if len(extra) > 4 else ""
            raise OutputError(f"{flag} {path} also holds {', '.join(extra[:4])}{more}, not part "
                              f"of {kind.a_what}; it is never replaced while they are in it: "
                              "move them out, or choose another path")
        raise OutputError(f"{flag} {path} exists and is not {kind.a_what}{found}; it is never "
                          "replaced: choose another path")
    if kind.needs_overwrite and not overwrite:
        raise OutputError(f"{flag} {path} already holds {kind.a_what}; pass --overwrite to "
                          "replace it, or choose another path")


#: What makes a report, figure or document provably ours: a rerun replaces a file only if it
#: carries the mark this package writes (a user's config.json, notes.md or photo.png never do).
REPORT_MARK = ("written_by", "megatron-spd")  # the first key of every JSON report
MARKDOWN_MARK = "<!-- written by megatron-spd; a rerun replaces this file: edits here are lost -->"
PNG_MARK = ("Software", "megatron-spd")  # a PNG tEXt chunk (the value starts with it)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def mark_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with ``REPORT_MARK`` as its first key."""
    key, value = REPORT_MARK
    return {key: value, **{k: v for k, v in report.items() if k != key}}


def unmark_report(d: dict[str, Any]) -> dict[str, Any]:
    """A report as it was before ``mark_report`` (readers of our reports call it)."""
    return {k: v for k, v in d.items() if (k, v) != REPORT_MARK}


def _is_json_report(path: Path) -> bool:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get(REPORT_MARK[0]) == REPORT_MARK[1]


def _is_png(path: Path) -> bool:
    """A PNG whose text chunks (before the image data) hold ``PNG_MARK``; chunk headers are
    read one by one, so a huge or damaged file costs a few reads."""
    key, value = PNG_MARK
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return False
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC
                if kind == b"tEXt" and data.partition(b"\0")[0] == key.encode() and \
                        data.partition(b"\0")[2].startswith(value.encode()):
                    return True
    except OSError:
        return False


def _is_markdown(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == MARKDOWN_MARK
    except (OSError, ValueError):
        return False


#: Reports, figures and generated documents: a rerun replaces its own output without a flag.
JSON_REPORT = OutputKind("JSON report", ours=_is_json_report, needs_overwrite=False)
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


@contextlib.contextmanager
def saving_dir(final_dir: str | Path) -> Iterator[Path]:
    """The sibling ``.NAME.saving`` directory of ``final_dir``, claimed by this process for as
    long as the ``with`` lasts: a second writer of the same output is refused while the first
    holds it (an ``flock`` on the directory, which the kernel drops when its holder exits however
    it exits, so a killed save never blocks the next); what a killed save left in it (or a stale
    file or symlink in its place) is removed; if the body raises, the directory goes too, so a
    failed save (a full disk) leaves nothing behind."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.saving")
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        logger.info("removing %s, left by an interrupted save", tmp)
        tmp.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise OutputError(f"{final_dir} is being written by another process right now (it "
                              f"holds {tmp}); wait for it to finish, or choose another path")
        if any(tmp.iterdir()):
            logger.info("removing %s, left by an interrupted save", tmp)
            for entry in tmp.iterdir():
                _remove(entry)
        try:
            yield tmp
        except BaseException:
            if os.path.lexists(tmp) and os.stat(tmp, follow_symlinks=False).st_ino == \
                    os.fstat(fd).st_ino:
                _remove(tmp)
            raise
    finally:
        os.close(fd)


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def check_space(path: str | Path, need: int) -> None:
    """Raise OutputError ("no space left on DEVICE: needs N GiB, free M") unless the filesystem
    that will hold ``path`` has ``need`` bytes free."""
    where = _mount_point(Path(path))
    free = shutil.disk_usage(where).free
    if need > free:
        raise no_space(path, need, free)


def no_space(path: str | Path, need: int, free: Optional[int] = None) -> OutputError:
    """The one-line error for an output that does not fit on its filesystem."""
    where = _mount_point(Path(path))
    free = shutil.disk_usage(where).free if free is None else free
    return OutputError(f"no space left on {where}: {path} needs {need / 2**30:.2f} GiB, free "
                       f"{free / 2**30:.2f} GiB; free some space or choose another path "
                       "(nothing was written)")


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps: its cause, or a rank's failure inside a
    torch.distributed.checkpoint ``CheckpointException``) is a full disk."""
    todo: list[Any] = [error]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, tuple):
            todo.extend(e)
        elif isinstance(e, BaseException):
            if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
                    "No space left on device" in str(e):
                return True
            todo.extend([e.__cause__, e.__context__,
                         *(getattr(e, "failures", None) or {}).values()])
    return False


def _remove(path: Path) -> None:
    """Delete a file, a symlink (never its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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
    """A matplotlib figure written atomically as PNG, carrying ``PNG_MARK``."""
    import matplotlib

    mark = {PNG_MARK[0]: f"{PNG_MARK[1]} (matplotlib {matplotlib.__version__})"}
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, metadata=mark,
                                                    **savefig_kw))


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """A JSON report written atomically with ``REPORT_MARK``. If ``path`` cannot be written (a
    full disk, after an hour of evaluation) the report is not lost: it is written to the system's
    temporary directory, or else printed on stdout, and the OutputError says where it is."""
    text = json.dumps(mark_report(report), indent=2, default=_json_default) + "\n"
    try:
        atomic_write_text(path, text)
        return
    except OSError as e:
        reason = e.strerror or type(e).__name__
    try:
        fd, kept = tempfile.mkstemp(prefix=f"{Path(path).stem}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        where = f"it was written to {kept} instead"
    except OSError:
        print(text, flush=True)
        where = "it is printed above"
    raise OutputError(f"could not write the report to {path} ({reason}); nothing is lost: "
                      f"{where}")
