"""The one place tools build their command lines.

- ``parser(doc)``: every tool's (and subcommand's) ``argparse`` parser. ``allow_abbrev=False``:
  a shortened or misspelt flag is an error, never silently another flag.
- Adders for the arguments several tools share, each defined once (``add_source`` for
  ``--ckpt``, ``add_plan``, ``add_tp``, ``add_json``, ``add_timeout``, ``add_text_field``).
- ``add_config(p, SomeConfig)``: a config dataclass's fields as options whose defaults and help
  come from the dataclass (field metadata ``help``, optionally ``flag``, ``choices``, ``type``),
  so each default lives once, in the dataclass. After parsing, the namespace holds the built
  dataclass (``args.<attr>``); an invalid value (the dataclass' own ``__post_init__`` check)
  is a usage error that names the problem.
- ``default_of(function, parameter)``: a tool option whose default is a package function's.

Hooks for what comes later: every option is added through ``_add`` (the one place to attach
alternative spellings of a flag, e.g. Megatron-LM's names) and every parser is a ``Parser``
made by ``parser`` (the one place for tool-wide error handling and output-path checks).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any, Callable, Iterable, Optional, Sequence


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the tool's docstring as written and appends "(default: X)" to an option's help
    unless the default is None/False or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, [], ()) and "default" not in text
                and not isinstance(default, bool) and default is not argparse.SUPPRESS):
            shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            text += f" (default: {shown})"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also builds the config dataclasses registered with
    ``add_config`` into the namespace after parsing."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)
        self._configs: list[tuple[str, type, dict[str, str]]] = []

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for attr, cls, dests in self._configs:
            values = {name: getattr(ns, dest) for name, dest in dests.items() if hasattr(ns, dest)}
            try:
                setattr(ns, attr, cls(**values))
            except ValueError as e:
                self.error(str(e))
        return ns, rest


def parser(doc: Optional[str] = None, **kw: Any) -> Parser:
    """The parser of a tool (``doc``: its module docstring, shown in ``--help``)."""
    return Parser(description=doc, **kw)


def subcommands(p: Parser, dest: str = "cmd") -> argparse._SubParsersAction:
    """Required subcommands whose parsers are ``Parser``s too (``add_parser(name, help=...)``)."""
    return p.add_subparsers(dest=dest, required=True, parser_class=Parser)


def _add(p: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str,
         **kw: Any) -> argparse.Action:
    """Every option of every tool is added here."""
    return p.add_argument(*flags, **kw)


# ----- arguments several tools share --------------------------------------------------------------

def add_source(p, required: bool = False, help: Optional[str] = None) -> None:
    _add(p, "--ckpt", required=required, default=None,
         help=help or "megatron-spd checkpoint, Hugging Face directory or .gguf file "
                      "(default: the bundled SmolLM2-135M-Instruct)")


def add_plan(p, required: bool = False, help: Optional[str] = None) -> None:
    _add(p, "--plan", required=required, default=None, metavar="PLAN.json",
         help=help or "SPD plan JSON to use instead of the model's own")


def add_tp(p) -> None:
    _add(p, "--tp", type=int, default=None,
         help="tensor-parallel degree (default: the world size)")


def add_json(p, what: str = "the report") -> None:
    _add(p, "--json", default=None, metavar="OUT.json", help=f"write {what} here (atomically)")


def add_timeout(p) -> None:
    from .distributed import DEFAULT_TIMEOUT_S

    _add(p, "--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
         help="torch.distributed timeout: how long ranks wait for a dead or stuck peer")


def add_text_field(p) -> None:
    _add(p, "--text-field", default="text", help="document field of a .jsonl/.parquet file")


def floats(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0) (an option's ``type``)."""
    return tuple(float(x) for x in text.split(",") if x.strip())


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# ----- config dataclasses as options ------------------------------------------------------------

def add_config(p: Parser, cls: type, *, attr: str, exclude: Iterable[str] = (),
               dests: Optional[dict[str, str]] = None, title: Optional[str] = None) -> None:
    """Add ``cls``'s fields (except ``exclude``) as options of ``p``; after parsing,
    ``args.<attr>`` is ``cls(**those options)``.

    Per field: flag ``--name-with-dashes`` (or metadata ``flag``; ``dests`` renames a field's
    destination, and its flag with it, where two configs of one parser share a field name);
    default = the field's; help = metadata ``help``; ``choices`` and ``type`` from metadata,
    else the type of the default. A bool field is a switch: ``--name`` when it defaults to
    False, ``--no-name`` (or metadata ``flag``) when it defaults to True.
    """
    skip, dests = set(exclude), dict(dests or {})
    group = p.add_argument_group(title) if title else p
    built: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = f.metadata
        dest = dests.get(f.name, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"dest": dest, "default": default, "help": meta.get("help")}
        if isinstance(default, bool):
            flag = meta.get("flag") or ("--no-" if default else "--") + dest.replace("_", "-")
            kw["action"] = "store_false" if default else "store_true"
            if default and kw["help"]:
                kw["help"] = f"turn off: {kw['help']}"
        else:
            flag = meta.get("flag") if f.name not in dests else None
            flag = flag or "--" + dest.replace("_", "-")
            typ = meta.get("type") or (type(default) if default is not None else None)
            if typ is None:
                raise TypeError(f"{cls.__name__}.{f.name}: a field defaulting to None needs "
                                "metadata 'type' to become an option")
            kw["type"] = typ
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            else:
                kw["metavar"] = meta.get("metavar") or flag.lstrip("-").replace("-", "_").upper()
        _add(group, flag, **kw)
        built[f.name] = dest
    p._configs.append((attr, cls, built))


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its command-line help (and ``flag``/``choices``/``type``) in the
    metadata ``add_config`` reads; mutable defaults (lists, dicts) are not supported."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def default_of(function: Callable, parameter: str) -> Any:
    """The default of ``function``'s keyword ``parameter`` (an option that forwards to it)."""
    return inspect.signature(function).parameters[parameter].default
