"""The one place tools build their command lines.

- ``parser(doc)``: every tool's (and subcommand's) ``argparse`` parser. ``allow_abbrev=False``:
  a shortened or misspelt flag is an error, never silently another flag.
- Adders for the arguments several tools share, each defined once (``add_source`` for
  ``--ckpt`` with ``--tokenizer``/``--no-verify``, ``add_plan``, ``add_tp``, ``add_json``,
  ``add_timeout``, ``add_text_field``).
- Megatron-LM's flag names where they mean the same (``MEGATRON_LM_ALIASES``: e.g.
  ``--tensor-model-parallel-size`` for ``--tp``, ``--load`` for ``--ckpt``).
- ``add_config(p, SomeConfig)``: a config dataclass's fields as options whose defaults and help
  come from the dataclass (field metadata ``help``, optionally ``flag``, ``choices``, ``type``),
  so each default lives once, in the dataclass. After parsing, the namespace holds the built
  dataclass (``args.<attr>``); an invalid value (the dataclass' own ``__post_init__`` check)
  is a usage error that names the problem.
- ``default_of(function, parameter)``: a tool option whose default is a package function's.

- Outputs (``add_json``, ``add_png``, ``add_out``): each output option is registered with what it
  writes (an ``io.OutputKind``); after parsing, every given output path is checked (writable;
  an existing path only if the kind may replace it, ``--overwrite`` where that is needed), so
  a run never does its work and then fails to write, and never replaces a user's files.
- ``run_config(args)``: the ``loading.run_config.RunConfig`` of a parsed command line (source,
  plan, tokenizer, verify, tp, timeout, JSON report, overwrite), built once here.
- ``entry``: the wrapper every tool's ``main`` goes through: it sets up logging (``logs``;
  ``--log-all-ranks``, on every parser, logs on every rank); a known error (``errors.SPDError``)
  prints one line ``error: ...`` (global rank 0 only) and exits 1; ``--debug`` (every parser
  has it) shows its traceback instead; any other exception keeps its traceback.

Every option is added through ``_add`` (the one place that attaches Megatron-LM's spellings)
and every parser is a ``Parser`` made by ``parser``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ..errors import SPDError
from ..files import JSON_REPORT, PNG_FIGURE, WORK_DIR, OutputKind, check_output
from . import logs

# Lazy here (function-local): ``loading`` and ``parallel`` import megatron-core (seconds), which
# a parser and ``--help`` do not need: ``run_config`` and ``add_timeout`` import them.




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


#: What an output option writes: a kind, or a function of the parsed namespace giving the kind
#: (e.g. ``--out`` of convert_checkpoint: a checkpoint or a Hugging Face directory per ``--to``).
KindOf = Union[OutputKind, Callable[[argparse.Namespace], OutputKind]]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also builds the config dataclasses registered with
    ``add_config`` into the namespace and checks the registered output paths after parsing,
    has ``--debug``, and prints usage errors on global rank 0 only."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)
        self._configs: list[tuple[str, type, dict[str, str]]] = []
        self._outputs: list[tuple[str | Callable[[argparse.Namespace], Any], str, KindOf]] = []
        # on the main parser and on every subcommand's, so it may follow the subcommand; read
        # by ``entry`` from the raw command line (it must work when parsing itself fails)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error instead of its one-line message")
        self.add_argument("--log-all-ranks", action="store_true", default=argparse.SUPPRESS,
                          help="log on every rank, each line marked [rank N] (default: global "
                               "rank 0 only)")

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for attr, cls, dests in self._configs:
            values = {name: getattr(ns, dest) for name, dest in dests.items() if hasattr(ns, dest)}
            try:
                setattr(ns, attr, cls(**values))
            except ValueError as e:
                self.error(str(e))
        for dest, flag, kind in self._outputs:
            path = dest(ns) if callable(dest) else getattr(ns, dest, None)
            if path is None:
                continue
            if not callable(dest) and Path(path).is_symlink():
                # the link's target is the output: checked, and then written, as itself
                path = str(Path(path).resolve())
                setattr(ns, dest, path)
            try:
                check_output(path, kind if isinstance(kind, OutputKind) else kind(ns),
                             overwrite=getattr(ns, "overwrite", False), flag=flag)
            except SPDError as e:
                self.error(str(e))
        return ns, rest

    def error(self, message: str):
        """Usage error: exit 2; every rank of a torchrun job parses, only global rank 0 prints."""
        if not rank0():
            self.exit(2)
        super().error(message)

    def add_output(self, dest: str | Callable[[argparse.Namespace], Any], flag: str,
                   kind: KindOf) -> None:
        """Check option ``dest`` (spelt ``flag``; or a path computed from the namespace) as an
        output of ``kind`` after parsing; an option naming a symlink is set to its target."""
        self._outputs.append((dest, flag, kind))


def parser(doc: Optional[str] = None, **kw: Any) -> Parser:
    """The parser of a tool (``doc``: its module docstring, shown in ``--help``)."""
    return Parser(description=doc, **kw)


def subcommands(p: Parser, dest: str = "cmd") -> argparse._SubParsersAction:
    """Required subcommands whose parsers are ``Parser``s too (``add_parser(name, help=...)``)."""
    return p.add_subparsers(dest=dest, required=True, parser_class=Parser)


#: Megatron-LM's names for options that mean the same thing here, accepted as aliases (a
#: Megatron-LM user's habits work; ``--help`` lists both spellings).
MEGATRON_LM_ALIASES = {
    "--tp": "--tensor-model-parallel-size",
    "--ckpt": "--load",
    "--mcore": "--load",
    "--tokenizer": "--tokenizer-model",
    "--seq-len": "--seq-length",
    "--micro-batch": "--micro-batch-size",
    "--steps": "--train-iters",
    "--warmup-steps": "--lr-warmup-iters",
    "--max-new-tokens": "--num-tokens-to-generate",
}


def _add(p: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str,
         **kw: Any) -> argparse.Action:
    """Every option of every tool is added here (with its Megatron-LM alias, if any)."""
    aliases = tuple(MEGATRON_LM_ALIASES[f] for f in flags if f in MEGATRON_LM_ALIASES)
    return p.add_argument(*flags, *aliases, **kw)


# ----- arguments several tools share --------------------------------------------------------------

def add_source(p, required: bool = False, help: Optional[str] = None) -> None:
    """``--ckpt`` and how to read it (``add_source_options``)."""
    _add(p, "--ckpt", required=required, default=None,
         help=help or "checkpoint (megatron-spd or Megatron-LM torch_dist: the directory, "
                      "iter_* or release), Hugging Face directory or .gguf file (default: the "
                      "bundled SmolLM2-135M-Instruct)")
    add_source_options(p)


def add_mcore(p) -> None:
    """convert_checkpoint.py's checkpoint source (one of its mutually exclusive sources)."""
    _add(p, "--mcore", metavar="DIR", help="checkpoint directory: megatron-spd or Megatron-LM "
                                           "torch_dist (the directory, iter_* or release)")


def add_source_options(p) -> None:
    """``--tokenizer`` (a checkpoint without one: Megatron-LM's) and ``--no-verify``;
    ``run_config(args)`` puts them into the run's ``RunConfig``."""
    _add(p, "--tokenizer", default=None, metavar="PATH",
         help="tokenizer to use instead of the source's own (tokenizer.json, tokenizer.model, "
              "a Hugging Face directory or a .gguf file); needed for a Megatron-LM checkpoint "
              "whose tokenizer is not where its args say")
    _add(p, "--no-verify", action="store_true",
         help="skip the sha256 check of a checkpoint's files at load (it reads every byte once "
              "more: ~4 s per GiB measured on one busy CPU core; for very large "
              "checkpoints); sizes are still checked")


def run_config(args: argparse.Namespace, **changes: Any):
    """The ``RunConfig`` of a parsed command line: whichever of ``--ckpt``, ``--plan``,
    ``--tokenizer``, ``--no-verify``, ``--tp``, ``--timeout-s``, ``--json`` and ``--overwrite`` its
    parser has (the others keep RunConfig's defaults); ``changes`` override (e.g. ``source``
    where a tool names it otherwise)."""
    from ..loading.run_config import RunConfig

    given = {"source": "ckpt", "plan": "plan", "tokenizer": "tokenizer", "tp": "tp",
             "timeout_s": "timeout_s", "json_out": "json", "overwrite": "overwrite"}
    values = {field: getattr(args, dest) for field, dest in given.items() if hasattr(args, dest)}
    if hasattr(args, "no_verify"):
        values["verify"] = not args.no_verify
    return RunConfig(**{**values, **changes})


def add_plan(p, required: bool = False, help: Optional[str] = None) -> None:
    _add(p, "--plan", required=required, default=None, metavar="PLAN.json",
         help=help or "SPD plan JSON to use instead of the model's own")


def add_tp(p) -> None:
    _add(p, "--tp", type=positive_int, default=None,
         help="tensor-parallel degree (default: the world size)")


def add_json(p: Parser, what: str = "the report",
             beside: Optional[Callable[[str], str]] = None) -> None:
    """``--json``; ``beside(json_path)``: the PNG the tool also writes next to it (checked too)."""
    _add(p, "--json", default=None, metavar="OUT.json", help=f"write {what} here (atomically)")
    p.add_output("json", "--json", JSON_REPORT)
    if beside is not None:
        p.add_output(lambda ns: beside(ns.json) if ns.json else None, "--json (its PNG)",
                     PNG_FIGURE)


def add_png(p: Parser, flag: str, what: str) -> None:
    """An optional PNG figure output (``--png``, ``--plot``)."""
    action = _add(p, flag, default=None, metavar="OUT.png", help=f"write {what} here (PNG)")
    p.add_output(action.dest, flag, PNG_FIGURE)


def add_out(p: Parser, kind: KindOf, help: str, *, required: bool = True,
            metavar: Optional[str] = None) -> None:
    """``--out`` (written as ``kind``) and ``--overwrite`` (replace an existing one of ours)."""
    _add(p, "--out", required=required, default=None, metavar=metavar, help=help)
    p.add_output("out", "--out", kind)
    _add(p, "--overwrite", action="store_true",
         help="replace an existing --out of the same kind (anything else is never replaced)")


def add_dir(p: Parser, flag: str, help: str) -> None:
    """A directory the tool adds files to without replacing it (``finetune --save``): checked
    to be a directory, or creatable, at parsing."""
    action = _add(p, flag, default=None, help=help)
    p.add_output(action.dest, flag, WORK_DIR)


def add_timeout(p) -> None:
    from ..parallel.distributed import DEFAULT_TIMEOUT_S

    _add(p, "--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
         help="torch.distributed timeout: how long ranks wait for a dead or stuck peer")


def add_text_field(p) -> None:
    _add(p, "--text-field", default="text", help="document field of a .jsonl/.parquet file")


def positive_int(text: str) -> int:
    """An option's ``type``: an integer >= 1 (a degree, a count of ranks, groups or threads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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


def default_of(function: Callable, parameter: str) -> Any:
    """The default of ``function``'s keyword ``parameter`` (an option that forwards to it)."""
    return inspect.signature(function).parameters[parameter].default


# ----- the wrapper of every tool's main ---------------------------------------------------------

def rank0() -> bool:
    """Global rank 0 (``logs.global_rank``: the parser and ``entry`` run before the process group
    exists, or after it is gone)."""
    return logs.global_rank() == 0


def entry(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tool's ``main(argv=None)``: logging is set up (``logs.setup``; every rank with
    ``--log-all-ranks``); an ``SPDError`` prints one line on global rank 0 and exits 1
    (``SystemExit``), unless ``--debug`` is on the command line, which re-raises it with its
    traceback. Other exceptions propagate unchanged (a bug shows its traceback)."""
    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None) -> Any:
        words = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in words
        logs.setup(all_ranks="--log-all-ranks" in words)
        try:
            return main(argv)
        except SPDError as e:
            if debug:
                raise
            if rank0():
                print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    return run
