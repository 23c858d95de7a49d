"""A checkpoint is data, never code (issue 23): what an attacker or a careless user gets.

Every tool runs in this process (``tests.test_errors.run_tool``) on the tiny random model of
``tests.test_errors``. Payload cases plant an object whose unpickling creates a marker file (and,
for DCP metadata, then returns the real metadata, so the tool would otherwise finish with exit
0); the marker must never appear and the tool must exit 1 with one line naming the file and the
refused global.
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_spd.checkpoint.manifest import sha256_file
from tests.test_errors import META, _one_line, run_tool, tiny  # noqa: F401 (tiny: a fixture)

REFUSED = "refused to load"


class Payload:
    """Unpickled, creates ``marker`` and then becomes ``then`` (pickled bytes, or None)."""

    def __init__(self, marker: Path, then: bytes | None = None):
        self.marker, self.then = str(marker), then

    def __reduce__(self):
        code = f"__import__('pathlib').Path({self.marker!r}).touch()"
        if self.then is None:
            return (eval, (code,))
        return (eval, (f"({code}, __import__('pickle').loads({self.then!r}))[1]",))


def _rehash(ck: Path) -> None:
    """Update the manifest to the files as they are now (what an attacker does)."""
    meta = json.loads((ck / META).read_text())
    for rel in meta["files"]:
        f = ck / rel
        meta["files"][rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (ck / META).write_text(json.dumps(meta))


def _copy(tiny, tmp_path: Path, name: str = "ck") -> Path:
    ck = tmp_path / name
    shutil.copytree(tiny["ckpt"], ck)
    return ck


def _common_payload(ck: Path, marker: Path) -> None:
    common = torch.load(ck / "release" / "common.pt", weights_only=False)  # our own file
    common["extra"] = Payload(marker)
    torch.save(common, ck / "release" / "common.pt")
    _rehash(ck)


def _assert_refused(code: int, err: str, marker: Path, where: str) -> None:
    assert not marker.exists(), f"code from {where} ran"
    line = _one_line(err)
    assert code == 1 and REFUSED in line and where in line, err


# ----- 1. no code runs from a checkpoint ---------------------------------------------------------

def _route(tool: str, ck: Path, tiny, tmp_path: Path) -> tuple[str, ...]:
    """The command line of each route that opens checkpoint ``ck``."""
    return {"evaluate": ("evaluate", "--ckpt", str(ck), "--tasks", "none", "--ppl-ctx", "32",
                         "--ppl-text", str(tiny["text"])),
            "generate": ("generate", "--ckpt", str(ck), "--prompt", "w3 w4", "--max-new-tokens",
                         "2", "--no-stream"),
            "convert": ("convert_checkpoint", "--mcore", str(ck), "--to", "hf", "--out",
                        str(tmp_path / "hf"))}[tool]


@pytest.mark.parametrize("tool", ["evaluate", "generate", "convert"])
def test_common_pt_payload_never_runs(tiny, tmp_path, capsys, tool):
    ck, marker = _copy(tiny, tmp_path), tmp_path / "MARKER"
    _common_payload(ck, marker)
    code, err = run_tool(*_route(tool, ck, tiny, tmp_path), capsys=capsys)
    _assert_refused(code, err, marker, "common.pt")
    assert "eval" in _one_line(err)  # names the global it refused


def test_common_pt_payload_without_manifest_or_verify(tiny, tmp_path, capsys):
    """A plain Megatron-LM checkpoint (no manifest), and --no-verify: same refusal."""
    ck, marker = _copy(tiny, tmp_path), tmp_path / "MARKER"
    _common_payload(ck, marker)
    code, err = run_tool("convert_checkpoint", "--mcore", str(ck), "--no-verify", "--out",
                         str(tmp_path / "o1"), capsys=capsys)
    _assert_refused(code, err, marker, "common.pt")
    (ck / META).unlink()
    code, err = run_tool("convert_checkpoint", "--mcore", str(ck), "--tokenizer",
                         str(ck / "tokenizer"), "--out", str(tmp_path / "o2"), capsys=capsys)
    _assert_refused(code, err, marker, "common.pt")


def _metadata_payload(ck: Path, marker: Path) -> None:
    """.metadata that runs code and then returns the real metadata (so the load succeeds)."""
    meta = ck / "release" / ".metadata"
    meta.write_bytes(pickle.dumps(Payload(marker, then=meta.read_bytes())))
    _rehash(ck)


@pytest.mark.parametrize("tool", ["evaluate", "convert"])
def test_dcp_metadata_payload_never_runs(tiny, tmp_path, capsys, tool):
    ck, marker = _copy(tiny, tmp_path), tmp_path / "MARKER"
    _metadata_payload(ck, marker)
    code, err = run_tool(*_route(tool, ck, tiny, tmp_path), capsys=capsys)
    _assert_refused(code, err, marker, ".metadata")
    assert "builtins.eval" in _one_line(err)
    assert not (tmp_path / "hf").exists()


def test_real_dcp_metadata_reads_and_foreign_globals_are_refused(tiny, tmp_path):
    """Our allow-list reads a real .metadata; megatron-core's own reader class is covered; the
    bytes items of a DCP checkpoint (megatron's ShardedObjects) go through the same refusal."""
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import \
        CachedMetadataFileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from megatron_spd.convert.safe_load import UnsafePickleError

    ck, marker = _copy(tiny, tmp_path), tmp_path / "MARKER"
    real = CachedMetadataFileSystemReader(str(ck / "release")).read_metadata()
    assert "embedding.word_embeddings.weight" in real.state_dict_metadata
    _metadata_payload(ck, marker)
    # megatron-core 0.19 caches metadata per path across readers (the real one read above would
    # be returned, never the payload): read the file again as a new checkpoint would
    getattr(CachedMetadataFileSystemReader, "clear_metadata_cache", lambda: None)()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        CachedMetadataFileSystemReader(str(ck / "release")).read_metadata()

    class Item:  # the one attribute load_bytes reads
        class dest_index:
            fqn = "decoder.layers.self_attention.linear_proj._extra_state/shard_0_2"

    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    buf.seek(0)
    planner = DefaultLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    with pytest.raises(UnsafePickleError, match="_extra_state"):
        planner.load_bytes(Item, buf)
    assert not marker.exists()


def test_resume_optimizer_payload_never_runs(tiny, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    ft = ("finetune", "--ckpt", str(tiny["ckpt"]), "--data", str(tiny["text"]), "--save",
          str(tmp_path / "save"), "--save-interval", "1", "--seq-len", "16", "--micro-batch",
          "1", "--eval-samples", "1", "--distill", "0")
    code, err = run_tool(*ft, "--steps", "2", "--out", str(tmp_path / "o1"), capsys=capsys)
    assert code == 0, err
    optim = tmp_path / "save" / "step_0000001" / "trainer" / "optim_tp0.pt"
    blob = torch.load(optim, weights_only=True)  # our own file: it loads without any global
    blob["rng"]["extra"] = Payload(marker)
    torch.save(blob, optim)
    code, err = run_tool(*ft, "--steps", "3", "--out", str(tmp_path / "o2"), capsys=capsys)
    _assert_refused(code, err, marker, "optim_tp0.pt")


# ----- 2. an output is replaced only if it is provably ours ---------------------------------------

def test_reports_replace_only_files_that_carry_our_mark(tiny, tmp_path, capsys):
    """--json never replaces a user's JSON (an HF config, the checkpoint's own metadata); a
    report we wrote carries the mark and a rerun replaces it."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf)
    ck = _copy(tiny, tmp_path)
    config, meta = (hf / "config.json").read_text(), (ck / META).read_text()
    ev = ("evaluate", "--ckpt", str(tiny["ckpt"]), "--tasks", "none", "--ppl-ctx", "32",
          "--ppl-tokens", "64", "--ppl-split", "all", "--ppl-text", str(tiny["text"]))
    for target in (hf / "config.json", ck / META):
        code, err = run_tool(*ev, "--json", str(target), capsys=capsys)
        assert code == 2 and "is not a JSON report" in err and "never replaced" in err, err
    assert (hf / "config.json").read_text() == config and (ck / META).read_text() == meta
    report = tmp_path / "r.json"
    for _ in range(2):  # the second run replaces the first run's report
        assert run_tool(*ev, "--json", str(report), capsys=capsys)[0] == 0
    assert next(iter(json.loads(report.read_text()).items())) == ("written_by", "megatron-spd")


def test_markdown_and_png_replace_only_files_that_carry_our_mark(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_spd.errors import OutputError
    from megatron_spd.files import MARKDOWN_DOC, MARKDOWN_MARK, PNG_FIGURE, check_output, \
        save_figure

    doc = tmp_path / "mydoc.md"
    doc.write_text("# my notes\n")
    with pytest.raises(OutputError, match="is not a Markdown document"):
        check_output(doc, MARKDOWN_DOC)
    doc.write_text(MARKDOWN_MARK + "\n# results\n")
    check_output(doc, MARKDOWN_DOC)

    fig = plt.figure()
    photo = tmp_path / "photo.png"
    fig.savefig(photo, format="png")  # a PNG, but not one of ours
    with pytest.raises(OutputError, match="is not a PNG figure"):
        check_output(photo, PNG_FIGURE)
    save_figure(fig, tmp_path / "ours.png")
    plt.close(fig)
    check_output(tmp_path / "ours.png", PNG_FIGURE)


def test_checkpoint_with_user_files_is_never_replaced(tiny, tmp_path, capsys):
    ck = tmp_path / "ck"
    args = ("convert_checkpoint", "--hf", str(tiny["hf"]), "--out", str(ck), "--overwrite")
    assert run_tool(*args, capsys=capsys)[0] == 0
    (ck / "notes.txt").write_text("mine")
    (ck / "my_runs").mkdir()
    (ck / "my_runs" / "eval_results.json").write_text("{}")
    code, err = run_tool(*args, capsys=capsys)
    assert code == 2 and "my_runs/" in err and "notes.txt" in err, err
    assert (ck / "notes.txt").read_text() == "mine" and (ck / "my_runs/eval_results.json").exists()
    (ck / "notes.txt").unlink()
    shutil.rmtree(ck / "my_runs")
    assert run_tool(*args, capsys=capsys)[0] == 0  # nothing foreign left: ours to replace


def test_second_writer_of_one_output_is_refused(tmp_path):
    """While one process holds OUT's .saving directory, another save of OUT is refused and the
    first one's files stay; a stale .saving (a symlink, or a killed save's leftovers) is
    removed without touching what a symlink points to."""
    import subprocess
    import sys

    from megatron_spd.errors import OutputError
    from megatron_spd.files import saving_dir

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_spd.files import saving_dir\n"
         f"with saving_dir({str(out)!r}) as d:\n"
         "    (d / 'half').write_text('x'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="being written by another process"):
            with saving_dir(out):
                pass
        assert (tmp_path / ".out.saving" / "half").read_text() == "x"
    finally:
        holder.kill()
        holder.wait()
    with saving_dir(out) as d:  # the holder is gone: its leftovers are removed
        assert list(d.iterdir()) == []
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("k")
    shutil.rmtree(tmp_path / ".out.saving")
    (tmp_path / ".out.saving").symlink_to(target)
    with saving_dir(out) as d:
        assert not d.is_symlink()
    assert (target / "keep").read_text() == "k"


# ----- 3. resource limits -------------------------------------------------------------------------

def test_disk_full_save_cleans_up_and_says_so(tiny, tmp_path, capsys, monkeypatch):
    import errno

    from megatron_spd.checkpoint import save as store

    def full_disk(state, directory):
        (Path(directory) / "__0_0.distcp").write_bytes(b"\0" * 1000)  # a partial write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_weights", full_disk)
    code, err = run_tool("convert_checkpoint", "--hf", str(tiny["hf"]), "--out",
                         str(tmp_path / "ck"), capsys=capsys)
    line = _one_line(err)
    assert code == 1 and "no space left on " in line and "needs 0.00 GiB, free" in line, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .ck.saving left behind


def test_kv_cache_is_sized_to_the_context(tiny, capsys, monkeypatch):
    """--max-new-tokens 100000000 on a 64-token context: the cache holds at most the context
    (it was prompt + 100000000 tokens, and the kernel killed the process)."""
    from megatron_spd.inference import generation as engine

    sizes = []

    def record(rows, seq_len, **kw):
        sizes.append(seq_len)
        raise engine.GenerationError("stop here (test)")

    monkeypatch.setattr(engine, "new_cache", record)
    code, err = run_tool("generate", "--ckpt", str(tiny["ckpt"]), "--prompt", "w3 w4 w5",
                         "--max-new-tokens", "100000000", "--no-stream", capsys=capsys)
    assert code == 1 and "stop here" in err and sizes and sizes[0] <= 64, (sizes, err)


def test_a_kv_cache_that_cannot_fit_is_refused_with_the_numbers(tiny, capsys, monkeypatch):
    from megatron_spd.inference import generation as engine

    # about 2 layers x K,V x 1 row x 2 groups x ~23 tokens x head_dim 8 x 4 bytes = ~6 kB
    monkeypatch.setattr(engine, "available_memory", lambda: 100_000)
    code, err = run_tool("generate", "--ckpt", str(tiny["ckpt"]), "--prompt", "w3 w4 w5",
                         "--max-new-tokens", "20", "--no-stream", capsys=capsys)
    assert code == 0, err
    monkeypatch.setattr(engine, "available_memory", lambda: 1_000)
    code, err = run_tool("generate", "--ckpt", str(tiny["ckpt"]), "--prompt", "w3 w4 w5",
                         "--max-new-tokens", "20", "--no-stream", capsys=capsys)
    line = _one_line(err)
    assert code == 1 and "KV cache" in line and "needs 0.00 GiB" in line, err


def test_evaluate_json_on_a_full_disk_keeps_the_report(tiny, tmp_path, capsys, monkeypatch):
    import errno

    from megatron_spd import files

    real = files.atomic_write_text

    def full(path, text):
        if Path(path).name == "r.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(files, "atomic_write_text", full)
    monkeypatch.setattr(files.tempfile, "tempdir", str(tmp_path / "kept"))
    (tmp_path / "kept").mkdir()
    code, err = run_tool("evaluate", "--ckpt", str(tiny["ckpt"]), "--tasks", "none", "--ppl-ctx",
                         "32", "--ppl-tokens", "64", "--ppl-split", "all", "--ppl-text",
                         str(tiny["text"]), "--json", str(tmp_path / "r.json"), capsys=capsys)
    line = _one_line(err)
    assert code == 1 and "No space left on device" in line and "nothing is lost" in line, err
    kept = list((tmp_path / "kept").glob("r-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["perplexity"]["tokens"] > 0


# ----- 4. paths from a checkpoint stay inside it --------------------------------------------------

def test_paths_in_a_checkpoint_never_leave_it(tiny, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 1234)
    ev = ("evaluate", "--tasks", "none", "--ppl-ctx", "32", "--ppl-text", str(tiny["text"]))
    cases = [(lambda m: m["files"].update({"../secret.txt": {"bytes": 1, "sha256": "0"}}),
              "the manifest entry '../secret.txt' points outside"),
             (lambda m: m["files"].update({str(secret): {"bytes": 1}}), "points outside"),
             (lambda m: m["tokenizer"].update(path="../../secret.txt"),
              "the tokenizer path '../../secret.txt' points outside"),
             (lambda m: m["files"].update({"release/common.pt": {"sha256": "0"}}),
              "has no 'bytes'")]
    for i, (damage, expected) in enumerate(cases):
        ck = _copy(tiny, tmp_path, f"ck{i}")
        meta = json.loads((ck / META).read_text())
        damage(meta)
        (ck / META).write_text(json.dumps(meta))
        code, err = run_tool(*ev, "--ckpt", str(ck), capsys=capsys)
        line = _one_line(err)
        assert code == 1 and expected in line and "1234" not in line, err


def test_symlinked_out_is_resolved_at_parsing(tiny, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    code, err = run_tool("convert_checkpoint", "--hf", str(tiny["hf"]), "--out",
                         str(tmp_path / "link"), capsys=capsys)
    assert code == 0, err
    assert (target / META).is_file() and (tmp_path / "link").is_symlink()


# ----- 5. fuzzed inputs ---------------------------------------------------------------------------

def test_hf_weights_with_nan_are_refused_at_conversion(tiny, tmp_path, capsys):
    for to in ("mcore", "hf"):
        code, err = run_tool("convert_checkpoint", "--hf", str(tiny["nan_hf"]), "--to", to,
                             "--out", str(tmp_path / to), capsys=capsys)
        line = _one_line(err)
        assert code == 1 and "holds NaN or inf" in line and "linear_fc2" in line, err
        assert not (tmp_path / to).exists()


_EXTREMES = [2**64 - 1, 2**63 - 1, 2**62, 2**40, 2**32 - 1, 2**31, 0, 1]


def _write_tiny_gguf(path: Path) -> None:
    """A one-block llama GGUF (F32) that load_gguf reads: the real header the fuzzer mutates."""
    import gguf
    import numpy as np

    h, ffn, vocab, heads, kv = 16, 32, 32, 2, 1
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(h // heads)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)
    kvd = kv * h // heads
    for name, shape in {"token_embd.weight": (vocab, h), "output_norm.weight": (h,),
                        "output.weight": (vocab, h), "blk.0.attn_norm.weight": (h,),
                        "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (kvd, h),
                        "blk.0.attn_v.weight": (kvd, h), "blk.0.attn_output.weight": (h, h),
                        "blk.0.ffn_norm.weight": (h,), "blk.0.ffn_gate.weight": (ffn, h),
                        "blk.0.ffn_up.weight": (ffn, h), "blk.0.ffn_down.weight": (h, ffn)
                        }.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_mutants(data: bytes, path: Path, rng, n: int):
    """Counts, dims, n_dims, types and data offsets set to extremes, truncations, and random
    header bytes, at positions taken from the real header."""
    import struct

    import gguf

    reader = gguf.GGUFReader(str(path))
    infos = []  # (offset of n_dims, n_dims) of every tensor info
    for t in reader.tensors:
        at = t.field.offset + 8 + struct.unpack_from("<Q", data, t.field.offset)[0]
        infos.append((at, struct.unpack_from("<I", data, at)[0]))
    end = reader.data_offset
    for i in range(n):
        b, kind = bytearray(data), i % 6
        at, nd = rng.choice(infos)
        if kind == 0:  # tensor / key-value counts
            struct.pack_into("<Q", b, rng.choice([8, 16]), rng.choice(_EXTREMES))
        elif kind == 1 and rng.random() < 0.3:  # number of dimensions
            struct.pack_into("<I", b, at, rng.choice([2**32 - 1, 2**31, 5, 0]))
        elif kind == 1:  # one dimension
            struct.pack_into("<Q", b, at + 4 + 8 * rng.randrange(nd), rng.choice(_EXTREMES))
        elif kind == 2 and rng.random() < 0.5:  # tensor type
            struct.pack_into("<I", b, at + 4 + 8 * nd, rng.choice([2**32 - 1, 99, 2, 12]))
        elif kind == 2:  # data offset: huge, past the end
            struct.pack_into("<Q", b, at + 8 + 8 * nd,
                             rng.choice(_EXTREMES + [len(data), len(data) - 8]))
        elif kind == 3:
            b = b[:rng.randrange(len(data))]
        elif kind == 4:
            struct.pack_into("<Q", b, rng.randrange(0, end - 8), rng.choice(_EXTREMES))
        else:
            for _ in range(4):
                b[rng.randrange(end)] = rng.randrange(256)
        yield bytes(b)


def _safetensors_mutants(data: bytes, rng, n: int):
    """Huge, negative and zero dims, offsets past the end / negative / reversed, unknown dtypes,
    a huge header length, thousands of declared tensors, truncation."""
    import struct

    hlen = struct.unpack_from("<Q", data)[0]
    head, body = json.loads(data[8:8 + hlen]), data[8 + hlen:]
    names = [k for k in head if k != "__metadata__"]
    for i in range(n):
        h, kind, k = json.loads(json.dumps(head)), i % 6, rng.choice(names)
        if kind == 0:
            h[k]["shape"] = [rng.choice([2**40, 2**62, 2**31, -1, 0]) for _ in h[k]["shape"]]
        elif kind == 1:
            h[k]["data_offsets"] = [rng.choice([0, -8, len(body), 2**62]),
                                    rng.choice([len(body) + 4, 2**63, -1, 4])]
        elif kind == 2:
            h[k]["dtype"] = rng.choice(["XX", "F64", "I8", "", 7])
        elif kind == 5:
            h.update({f"x{j}": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}
                      for j in range(rng.choice([1, 1000]))})
        raw = json.dumps(h).encode()
        raw = struct.pack("<Q", len(raw)) + raw + body
        if kind == 3:
            raw = raw[:rng.randrange(len(raw))]
        elif kind == 4:
            raw = struct.pack("<Q", rng.choice(_EXTREMES + [len(raw)])) + raw[8:]
        yield raw


def test_fuzzed_gguf_and_safetensors_headers_are_refused_in_one_line(tiny, tmp_path):
    """300 seeded mutations of real headers: each loads or raises an SPDError of one line, and
    none allocates what it declares (peak RSS grows < 256 MiB; declared sizes reach 2**64)."""
    import random
    import resource
    import time

    from megatron_spd.convert.gguf import load_gguf, read_gguf
    from megatron_spd.convert.hf import read_safetensors_dir
    from megatron_spd.errors import SPDError

    rng, t0 = random.Random(23), time.perf_counter()
    real = tmp_path / "real.gguf"
    _write_tiny_gguf(real)
    load_gguf(read_gguf(real))  # the unmutated file loads: the mutants reach the deep paths
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad, refused = [], 0
    hf = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf)
    target = hf / "model.safetensors"
    cases = [(tmp_path / "m.gguf", m, lambda p: load_gguf(read_gguf(p)))
             for m in _gguf_mutants(real.read_bytes(), real, rng, 150)]
    cases += [(target, m, lambda p: read_safetensors_dir(p.parent))
              for m in _safetensors_mutants(target.read_bytes(), rng, 150)]
    for i, (path, data, load) in enumerate(cases):
        path.write_bytes(data)
        try:
            load(path)
        except SPDError as e:
            refused += 1
            if "\n" in str(e):
                bad.append((i, "two lines", str(e)[:200]))
        except Exception as e:  # anything else is a traceback for the user
            bad.append((i, type(e).__name__, str(e)[:200]))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert not bad, bad[:5]
    assert refused > 200 and grown_mib < 256, (refused, grown_mib)
    assert time.perf_counter() - t0 < 60
