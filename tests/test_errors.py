"""Nothing lost, nothing silent (issue 15): what a careless user gets from the tools.

Every tool runs in this process (``main(argv)``) on a tiny random model (2 blocks, context 64)
written by the fixture, so each refusal is checked without the cost of a real model:
- outputs: a user's directory, an existing file, one of our checkpoints without ``--overwrite``,
  an unwritable ``--json``: refused while parsing (exit 2), before any work, nothing touched;
- lengths beyond the model's context: refused (exit 1) right after the model is opened, naming
  the model's limit and the flag;
- NaN in a reported metric: an error naming it, never a result;
- known errors print one line ``error: ...`` (exit 1) and ``--debug`` shows the traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_spd.core.config import ModelConfig
from megatron_spd.errors import ContextError, InputError, MetricError, OutputError, check_finite
from megatron_spd.files import replace_dir
from tests.reference import random_full_state_dict
from tests.test_checkpoint import write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CTX = 64  # the tiny model's context
CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=64, vocab_size=96, max_seq_length=CTX)
META = "spd_checkpoint.json"


def _hf_dir(path: Path, full: dict) -> Path:
    from megatron_spd.convert.hf import save_hf
    from megatron_spd.data.tokenizer import load_tokenizer

    tok = load_tokenizer(write_tokenizer(path.parent / f"{path.name}_tok"))
    save_hf(path, CFG, full, tok)
    return path


def _tool(name: str):
    import importlib

    return importlib.import_module(f"megatron_spd.cli.{name}").main


def run_tool(name: str, *argv: str, capsys=None) -> tuple[int, str]:
    """(exit code, stderr) of ``tools/<name>.py argv`` run in this process."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    try:
        _tool(name)(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err if capsys else ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF directory, its megatron-spd checkpoint, one with a NaN weight, and a text."""
    root = tmp_path_factory.mktemp("tiny")
    full = random_full_state_dict(CFG, seed=0)
    hf = _hf_dir(root / "hf", full)
    nan = dict(full)
    nan["decoder.layers.0.mlp.linear_fc2.weight"] = full["decoder.layers.0.mlp.linear_fc2.weight"
                                                         ].clone().fill_(float("nan"))
    nan_hf = _hf_dir(root / "nan_hf", nan)
    _tool("convert_checkpoint")(["--hf", str(hf), "--out", str(root / "ckpt")])
    text = root / "text.txt"
    words = torch.randint(3, 96, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    text.write_text("\n\n".join(" ".join(f"w{w}" for w in words[i:i + 40])
                                for i in range(0, 400, 40)) + "\n")
    return {"root": root, "hf": hf, "nan_hf": nan_hf, "ckpt": root / "ckpt", "text": text}


def _one_line(err: str) -> str:
    """The one ``error: ...`` line of stderr (progress bars aside), without a traceback."""
    lines = [ln.split("\r")[-1] for ln in err.splitlines()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ----- LOSS: outputs never replace what is not ours -----------------------------------------------

def test_convert_out_never_deletes_a_users_directory(tiny, tmp_path, capsys):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    for extra in ([], ["--overwrite"]):  # not even with --overwrite: it is not ours
        code, err = run_tool("convert_checkpoint", "--hf", str(tiny["hf"]), "--out", str(d),
                             *extra, capsys=capsys)
        assert code == 2 and "notes.txt" in err and "never replaced" in err, err
    assert (d / "notes.txt").read_text() == "my notes\n"
    assert (d / "sub" / "data.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary left behind


def test_replace_dir_refuses_what_is_not_ours(tmp_path):
    """The mechanism itself, whatever its caller checked: a foreign directory or a file at the
    destination stays as it was and the new output stays in its temporary directory."""
    new = tmp_path / ".new"
    new.mkdir()
    (new / "x").write_text("new")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="keep.txt"):
        replace_dir(new, foreign, ours=lambda p: (p / "ours.json").is_file())
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="not a directory"):
        replace_dir(new, tmp_path / "file", ours=lambda p: True)
    assert (foreign / "keep.txt").read_text() == "mine" and (new / "x").is_file()
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new", "file", "foreign"]
    (foreign / "ours.json").write_text("{}")  # now it is ours: swapped, old one removed
    replace_dir(new, foreign, ours=lambda p: (p / "ours.json").is_file())
    assert sorted(p.name for p in foreign.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "foreign"]


def test_out_that_is_a_file_is_refused_at_parsing(tiny, tmp_path, capsys):
    f = tmp_path / "ckpt"
    f.write_text("not a directory")
    code, err = run_tool("convert_checkpoint", "--hf", str(tiny["hf"]), "--out", str(f),
                         capsys=capsys)
    assert code == 2 and "is an existing file" in err, err
    assert f.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no hidden .ckpt.old


def test_our_outputs_are_replaced_only_with_overwrite(tiny, tmp_path, capsys):
    """A checkpoint, a Hugging Face export and a plan: refused without --overwrite, replaced
    with it; a Hugging Face directory holding anything else is never replaced."""
    ck = tmp_path / "ck"
    args = ["--hf", str(tiny["hf"]), "--out", str(ck)]
    assert run_tool("convert_checkpoint", *args, capsys=capsys)[0] == 0
    code, err = run_tool("convert_checkpoint", *args, capsys=capsys)
    assert code == 2 and "already holds a megatron-spd checkpoint" in err and "--overwrite" in err
    assert run_tool("convert_checkpoint", *args, "--overwrite", capsys=capsys)[0] == 0
    assert (ck / META).is_file()

    hf = tmp_path / "hf"
    args = ["--mcore", str(ck), "--to", "hf", "--out", str(hf)]
    assert run_tool("convert_checkpoint", *args, capsys=capsys)[0] == 0
    code, err = run_tool("convert_checkpoint", *args, capsys=capsys)
    assert code == 2 and "already holds a Hugging Face model directory" in err, err
    assert run_tool("convert_checkpoint", *args, "--overwrite", capsys=capsys)[0] == 0
    (hf / "README.md").write_text("my model card")
    code, err = run_tool("convert_checkpoint", *args, "--overwrite", capsys=capsys)
    assert code == 2 and "README.md" in err and (hf / "README.md").is_file(), err

    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"mode": "local", "groups": 2, "baseline_ppl": 10.0,
                                "ppl": [10.0, 10.0], "sensitivity": [0.2, 0.1], "n_samples": 1,
                                "seq_len": 8}))
    plan = ["plan", "--sensitivity", str(sens), "--ratio", "0.5"]
    code, err = run_tool("spd", *plan, "--out", str(sens), capsys=capsys)
    assert code == 2 and "is not an SPD plan" in err, err  # the input survives
    assert json.loads(sens.read_text())["mode"] == "local"
    assert run_tool("spd", *plan, "--out", str(tmp_path / "p.json"), capsys=capsys)[0] == 0
    code, err = run_tool("spd", *plan, "--out", str(tmp_path / "p.json"), capsys=capsys)
    assert code == 2 and "already holds an SPD plan" in err, err
    assert run_tool("spd", *plan, "--out", str(tmp_path / "p.json"), "--overwrite",
                    capsys=capsys)[0] == 0


def test_output_paths_are_checked_before_any_work(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [("evaluate", "--json", str(tmp_path / "file" / "r.json"), "is a file, not a dir"),
             ("evaluate", "--json", str(tmp_path), "is a directory"),
             ("evaluate", "--json", str(tmp_path / "file"), "is not a JSON report"),
             ("spd", "sensitivity", "--png", str(tmp_path / "file"), "is not a PNG figure"),
             ("finetune", "--out", str(tmp_path / "o"), "--save", str(tmp_path / "file"),
              "is an existing file")]
    for name, *argv, expected in cases:
        code, err = run_tool(name, "--ckpt", str(tiny["ckpt"]), *argv, capsys=capsys) \
            if name == "evaluate" else run_tool(name, *argv, capsys=capsys)
        assert code == 2 and expected in err, (argv, err)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_unwritable_json_directory_is_refused_at_parsing(tiny, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = run_tool("evaluate", "--ckpt", str(tiny["ckpt"]), "--json",
                             str(ro / "r.json"), capsys=capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2 and "cannot write in" in err, err


# ----- SILENT: NaN is an error naming the metric ------------------------------------------------

def test_nan_metric_is_an_error_not_a_result(tiny, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, err = run_tool("evaluate", "--ckpt", str(tiny["nan_hf"]), "--tasks", "none",
                         "--ppl-text", str(tiny["text"]), "--ppl-ctx", "32", "--ppl-tokens",
                         "96", "--json", str(out), capsys=capsys)
    line = _one_line(err)
    assert code == 1 and "ppl is nan" in line, err
    assert not out.exists() or "NaN" not in out.read_text()
    with pytest.raises(MetricError, match=r"b\[1\] is inf"):
        check_finite({"a": 1.0, "b": [2.0, float("inf")], "n": None}, "x")


# ----- HANG: lengths beyond the model's context ---------------------------------------------------

def test_lengths_beyond_the_context_are_refused_before_any_work(tiny, tmp_path, capsys):
    ck = str(tiny["ckpt"])
    cases = [("evaluate", ["--ckpt", ck, "--tasks", "none", "--ppl-ctx", "100"], "--ppl-ctx"),
             ("spd", ["sensitivity", "--ckpt", ck, "--seq-len", "100", "--samples", "1"],
              "--seq-len"),
             ("spd", ["distill", "--ckpt", ck, "--plan", str(tmp_path / "p.json"),
                      "--seq-len", "100", "--out", str(tmp_path / "d")], "--seq-len"),
             ("finetune", ["--ckpt", ck, "--seq-len", "100", "--out", str(tmp_path / "ft")],
              "--seq-len"),
             ("benchmark", ["measure", "--model", ck, "--prompt", "60", "--new-tokens", "8",
                            "--repeats", "1", "--ratios", "0", "--no-stock"], "context of 64")]
    from megatron_spd.core.plan import SPDPlan

    SPDPlan.from_spd_blocks(2, 2, [1], "b2b").save(tmp_path / "p.json")
    for name, argv, flag in cases:
        code, err = run_tool(name, *argv, capsys=capsys)
        line = _one_line(err)
        assert code == 1 and flag in line and "64" in line, (name, err)
    assert not (tmp_path / "d").exists() and not (tmp_path / "ft").exists()
    with pytest.raises(ContextError):  # the library call refuses the same way
        from megatron_spd.errors import check_context
        check_context(CTX + 1, CTX, "--seq-len")


# ----- UNCLEAR: one clear line for every bad input -------------------------------------------------

def test_damaged_checkpoint_metadata_gives_one_line(tiny, tmp_path, capsys):
    """Random bytes, a JSON list or a missing key in spd_checkpoint.json, and a damaged
    common.pt (the Megatron-LM args; same size, so only the skipped sha256 would notice): one
    line each, and none repeats torch's advice to load with weights_only=False."""
    import shutil

    def without_format(meta):
        d = json.loads(meta.read_text())
        del d["format"]
        meta.write_text(json.dumps(d))

    cases = [(lambda m: m.write_bytes(os.urandom(64)), "is not valid JSON"),
             (lambda m: m.write_text("[1, 2]"), "holds a JSON list"),
             (without_format, "format None is not"),
             (lambda m: (m.parent / "release" / "common.pt").write_bytes(
                 os.urandom((m.parent / "release" / "common.pt").stat().st_size)),
              "common.pt cannot be read")]
    for damage, expected in cases:
        ck = tmp_path / "ck"
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(tiny["ckpt"], ck)
        damage(ck / META)
        code, err = run_tool("evaluate", "--ckpt", str(ck), "--tasks", "none", "--no-verify",
                             capsys=capsys)
        line = _one_line(err)
        assert code == 1 and expected in line and "weights_only" not in line, err


def test_bad_inputs_give_one_line(tiny, tmp_path, capsys):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(bytes(range(128, 256)) * 8)
    for text, expected in ((empty, "empty file"), (binary, "cannot be read as UTF-8 text")):
        code, err = run_tool("evaluate", "--ckpt", str(tiny["ckpt"]), "--tasks", "none",
                             "--ppl-ctx", "32", "--ppl-text", str(text), capsys=capsys)
        assert code == 1 and expected in _one_line(err), err

    import shutil
    hf = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf)
    (hf / "config.json").write_text('{"hidden_size": 32,')
    code, err = run_tool("convert_checkpoint", "--hf", str(hf), "--out", str(tmp_path / "o"),
                         capsys=capsys)
    assert code == 1 and "config.json is not valid JSON" in _one_line(err), err

    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"mode": "cumulative", "sensitivities": [1, 2]}))
    code, err = run_tool("spd", "plan", "--sensitivity", str(sens), "--ratio", "0.5", "--out",
                         str(tmp_path / "p.json"), capsys=capsys)
    assert code == 1 and "is not a sensitivity sweep" in _one_line(err), err

    for argv, expected in ((["sensitivity", "--micro-batch", "0"], "--micro-batch >= 1"),
                           (["sensitivity", "--tp", "0"], "must be a positive integer")):
        code, err = run_tool("spd", *argv, capsys=capsys)
        assert code == 2 and expected in err, err


def test_debug_shows_the_traceback(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["--ckpt", str(tiny["ckpt"]), "--tasks", "none", "--ppl-ctx", "32", "--ppl-text",
            str(empty)]
    with pytest.raises(InputError, match="empty file"):  # re-raised: Python prints it
        _tool("evaluate")([*argv, "--debug"])
    # once end to end, as a user sees it (a spawn costs seconds): one line, exit 1
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1 and "empty file" in _one_line(proc.stderr), proc.stderr[-2000:]
