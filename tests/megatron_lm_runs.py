"""Megatron-LM runs for tests/test_patches.py, in subprocesses whose path starts with a Megatron-LM
copy. This module never imports megatron_spd, so ``megatron_lm_unpatched`` is what Megatron-LM
without the patch does with our checkpoints (a module that imported megatron_spd would have
registered its checkpoint classes with torch and hidden the refusal under test)."""
import json
import os
import sys
from pathlib import Path

import torch

VOCAB = 96  # the round-trip model's (tests/test_patches.py RT_CFG)


def megatron_lm_env() -> None:
    """torch.distributed's single-process env, and the test's CPU shims for Megatron-LM code
    written for CUDA (checkpointing.read_metadata all-reduces a device='cuda' tensor;
    save_checkpoint always reads the CUDA RNG state)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cuda_tensor = torch.tensor
    torch.tensor = lambda *a, **k: cuda_tensor(*a, **{**k, "device": "cpu"}) \
        if str(k.get("device")) == "cuda" else cuda_tensor(*a, **k)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()


# the flags of RT_CFG, for the runs without --use-checkpoint-args
RT_SHAPE = ["--num-layers", "3", "--hidden-size", "48", "--num-attention-heads", "6",
            "--ffn-hidden-size", "96", "--max-position-embeddings", "64", "--seq-length", "16",
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--norm-epsilon",
            "1e-6", "--use-rope-scaling", "--rope-scaling-factor", "8.0"]


def megatron_args(script_args, extra_args_provider=None):
    """Megatron-LM's own parsing, --use-checkpoint-args and validation of a CPU run."""
    from megatron.training import arguments as mlm_args
    from megatron.training import checkpointing
    from megatron.training import global_vars

    sys.argv = ["pretrain_gpt.py", "--transformer-impl", "local", "--micro-batch-size", "1",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "96", "--mock-data",
                "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
                "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
                "--ckpt-format", "torch_dist", "--train-iters", "1", "--save-interval", "1",
                "--no-load-optim", "--no-load-rng", "--no-save-optim", "--no-save-rng",
                *script_args]
    args = mlm_args.parse_args(extra_args_provider)
    if args.use_checkpoint_args:
        checkpointing.load_args_from_checkpoint(args)
    mlm_args.validate_args(args, {})
    if args.padded_vocab_size is None:  # build_tokenizer's job, skipped here
        args.padded_vocab_size = VOCAB
    if global_vars._GLOBAL_ARGS is None:
        global_vars.set_global_variables(args, build_tokenizer=False)
    else:
        global_vars.set_args(args)
    return args


def build_with_gpt_builder(args):
    """The model as gpt_builders.py builds it (pretrain_gpt.py up to core_v0.17, the server)."""
    import gpt_builders
    from megatron.training import arguments as mlm_args

    config = mlm_args.core_transformer_config_from_args(args)
    return gpt_builders.gpt_builder(args, True, True, config=config)


def megatron_lm_unpatched(work: str) -> None:
    """Run in a subprocess on the UNPATCHED copy (megatron_spd never imported): Megatron-LM's
    --use-checkpoint-args and its --finetune load on our SPD checkpoint. Results: unpatched.json."""
    megatron_lm_env()
    from megatron.training import checkpointing

    work = Path(work)
    out = {}
    try:
        megatron_args(["--load", str(work / "ours"), "--use-checkpoint-args"])
        out["use_checkpoint_args"] = "loaded"
    except Exception as e:  # noqa: BLE001
        out["use_checkpoint_args"] = f"{type(e).__name__}: {e}"
    from megatron.core import parallel_state, tensor_parallel

    # what megatron_spd.parallel.distributed.init and compat.apply do for the patched run
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1)
    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    args = megatron_args(["--load", str(work / "ours"), "--finetune", "--qk-layernorm",
                           *RT_SHAPE])
    model = build_with_gpt_builder(args)
    try:
        checkpointing.load_checkpoint([model], None, None, strict=True)
        out["finetune"] = "loaded"
    except Exception as e:  # noqa: BLE001
        out["finetune"] = f"{type(e).__name__}: {e}"
    out["megatron_spd_imported"] = any(m.startswith("megatron_spd") for m in sys.modules)
    (work / "unpatched.json").write_text(json.dumps(out))
