"""megatron_spd.cli.common: options from config dataclasses (defaults and help from the dataclass, the
built dataclass in the namespace, its validation as a usage error), no abbreviated flags, and
every tool's parser reading its defaults from the package instead of a copy."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest

from megatron_spd import options
from megatron_spd.cli import common as cli


@dataclass
class Toy:
    steps: int = options.option(3, "how many steps")
    rate: float = options.option(0.5, "a rate", flag="--learning-rate")
    mode: str = options.option("a", "a mode", choices=("a", "b"))
    ratios: tuple[float, ...] = options.option((0.0, 1.0), "ratios", type=options.floats)
    source: Optional[str] = options.option(None, "where from", type=str)
    stream: bool = options.option(True, "stream the output")
    verbose: bool = options.option(False, "say more")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _parser():
    p = cli.parser("toy")
    cli.add_config(p, Toy, attr="toy")
    return p


def test_config_dataclass_as_options(capsys):
    args = _parser().parse_args([])
    assert args.toy == Toy()
    args = _parser().parse_args(["--steps", "7", "--learning-rate", "0.1", "--mode", "b",
                                 "--ratios", "0,0.5", "--source", "x", "--no-stream",
                                 "--verbose"])
    assert args.toy == Toy(7, 0.1, "b", (0.0, 0.5), "x", False, True)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--steps", "0"])
    assert "steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: --step is not --steps
        _parser().parse_args(["--step", "2"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "how many steps (default: 3)" in text and "a rate (default: 0.5)" in text
    assert "ratios (default: 0.0,1.0)" in text and "turn off: stream the output" in text


def test_renamed_destination_and_function_defaults():
    p = cli.parser()
    p.add_argument("--steps", type=int, default=1)
    cli.add_config(p, Toy, attr="toy", dests={"steps": "toy_steps"}, exclude=("ratios",))
    args = p.parse_args(["--steps", "2", "--toy-steps", "5"])
    assert args.steps == 2 and args.toy.steps == 5 and args.toy.ratios == (0.0, 1.0)

    def f(x, *, mode="fast"):
        return x

    assert cli.default_of(f, "mode") == "fast"


def test_tools_take_their_defaults_from_the_package():
    """The published run's B2B epochs (2) and calibration (4 x 512), FinetuneConfig's and
    GenerationConfig's defaults: what the tools parse when given nothing."""
    from megatron_spd.evaluate.run import EvalConfig
    from megatron_spd.inference import GenerationConfig
    from megatron_spd.recipe.distill import B2BConfig
    from megatron_spd.recipe.run import Calibration
    from megatron_spd.train import FinetuneConfig
    from megatron_spd.cli import evaluate, finetune, generate, spd

    d = spd.parse_args(["distill", "--plan", "p.json", "--out", "o"])
    assert d.b2b == B2BConfig() and d.calib == Calibration()
    assert (d.calib.samples, d.calib.seq_len) == (32, 512)  # docs/recovery.md: the default recipe
    assert finetune.parse_args(["--out", "o"]).config == FinetuneConfig()
    assert generate.parse_args(["--prompt", "x"]).generation == GenerationConfig()
    assert evaluate.parse_args([]).eval == EvalConfig()
    for cls in (B2BConfig, Calibration, FinetuneConfig, GenerationConfig, EvalConfig):
        for f in dataclasses.fields(cls):  # every option has help text in the dataclass
            assert f.name == "add_bos" or f.metadata.get("help"), (cls.__name__, f.name)


def test_entry_logs_plain_lines_on_rank_0_or_every_rank(capsys, monkeypatch):
    """The one logging set-up (cli/logs.py): a package module's line reaches stdout unchanged on
    global rank 0, nothing on another rank, and with --log-all-ranks every rank's line, marked;
    a line written while a progress bar runs does not land inside the bar."""
    import logging
    import sys

    from tqdm import tqdm

    log = logging.getLogger("megatron_spd.some.module")

    @cli.entry
    def main(argv=None):
        p = cli.parser("toy")
        p.parse_args(argv)
        with tqdm(total=2, file=sys.stderr) as bar:
            log.info("[finetune] step 1 loss 1.0")
            bar.update(1)

    monkeypatch.setenv("RANK", "0")
    main([])
    assert capsys.readouterr().out == "[finetune] step 1 loss 1.0\n"
    monkeypatch.setenv("RANK", "1")
    main([])
    assert capsys.readouterr().out == ""
    main(["--log-all-ranks"])
    assert capsys.readouterr().out == "[rank 1] [finetune] step 1 loss 1.0\n"
