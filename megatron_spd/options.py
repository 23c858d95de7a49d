"""Command-line metadata of config dataclasses, kept beside them and importing nothing else of the
package: a config dataclass in any layer declares its fields with ``option(default, help, ...)``
(and the ``type`` parsers below), and ``cli.common.add_config`` turns those fields into options.
So a default lives once, in its dataclass, and no layer below ``cli`` imports argparse or the CLI.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its command-line help (and ``flag``/``choices``/``type``) in the
    metadata ``add_config`` reads; mutable defaults (lists, dicts) are not supported."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def floats(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0) (an option's ``type``)."""
    return tuple(float(x) for x in text.split(",") if x.strip())


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())
