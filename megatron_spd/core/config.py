"""Model architecture description, independent of parallelism.

One small dataclass is the single source of truth for a model's shape: converters produce it,
checkpoints store it (as JSON), and ``transformer_config`` turns it into megatron-core's
``TransformerConfig`` for a given TP degree. Keeping it separate from ``TransformerConfig`` lets a
checkpoint written at TP=3 be described without any TP degree at all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..parallel import compat

#: A model's weights at TP=1 under megatron-core's names and layouts, fp32: the interchange format
#: between converters, recipes and checkpoints (model.py shards it for a rank and gathers it back).
FullStateDict = dict[str, torch.Tensor]


@dataclass
class ModelConfig:
    """A decoder-only transformer of the LLaMA family (Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, or
    the biased LayerNorm/GeLU OPT style).

    Fields beyond the plain shape carry megatron-core / Megatron-LM names and semantics (so a
    checkpoint's config maps one to one onto Megatron-LM arguments):
    ``kv_channels`` (per-head dimension; None = hidden_size / num_attention_heads),
    ``add_qkv_bias`` (bias on the fused q/k/v projection only, Qwen2; ``add_bias_linear`` puts a
    bias on every linear), ``qk_layernorm`` (a norm over head_dim on each head's query and key,
    before RoPE, Qwen3), ``rope_scaling`` / ``rope_scaling_factor`` (GPTModel's Llama-3.x RoPE
    frequency scaling, whose other constants megatron-core fixes at low_freq_factor 1,
    high_freq_factor 4, original_max_position_embeddings 8192).

    ``sliding_window`` records the source model's attention window (Mistral). megatron-core's
    local attention cannot window, but attention over at most ``sliding_window`` tokens is full
    attention, so such a model is accepted with its context (``max_seq_length``) capped to the
    window, and a config asking for a longer context is refused.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_length: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    normalization: str = "RMSNorm"          # RMSNorm | LayerNorm
    activation: str = "swiglu"              # swiglu | gelu
    add_bias_linear: bool = False
    tie_word_embeddings: bool = False
    position_embedding_type: str = "rope"   # rope | learned_absolute
    kv_channels: Optional[int] = None       # head_dim; None = hidden_size // num_attention_heads
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    rope_scaling: bool = False              # Llama-3.x RoPE scaling (megatron's GPTModel)
    rope_scaling_factor: float = 8.0
    sliding_window: Optional[int] = None    # the source's window; max_seq_length <= it

    def __post_init__(self) -> None:
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}; give kv_channels "
                             "(the head dimension) explicitly")
        if self.kv_channels is not None and (self.kv_channels < 2 or self.kv_channels % 2):
            raise ValueError(f"kv_channels (head dimension) must be an even number >= 2 for "
                             f"RoPE, got {self.kv_channels}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_query_groups {self.num_query_groups}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation must be swiglu or gelu, got {self.activation!r}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError("position_embedding_type must be rope or learned_absolute, "
                             f"got {self.position_embedding_type!r}")
        if self.rope_scaling and (self.position_embedding_type != "rope"
                                  or self.rope_scaling_factor <= 0):
            raise ValueError("rope_scaling needs position_embedding_type 'rope' and a positive "
                             f"rope_scaling_factor, got {self.position_embedding_type!r} and "
                             f"{self.rope_scaling_factor}")
        if self.sliding_window is not None and self.max_seq_length > self.sliding_window:
            raise ValueError(
                f"max_seq_length {self.max_seq_length} exceeds sliding_window "
                f"{self.sliding_window}: megatron-core's local attention cannot restrict "
                "attention to a window, and up to the window full attention is exact; set "
                f"max_seq_length <= {self.sliding_window}")

    @property
    def head_dim(self) -> int:
        """Per-head dimension (megatron's ``kv_channels``); never derive it from hidden/heads."""
        return self.kv_channels if self.kv_channels is not None \
            else self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether the fused q/k/v projection has a bias (megatron: add_bias_linear or add_qkv_bias)."""
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def block_matmul_parameters(self) -> int:
        """Weights of one block's linear layers (QKV, output projection, fc1, fc2): what every
        token is multiplied with (the analytic latency model's FLOPs and bytes per block)."""
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * hd * h
        proj = self.num_attention_heads * hd * h
        mlp = (3 if self.gated else 2) * f * h
        return qkv + proj + mlp

    def num_parameters(self) -> int:
        """Parameter count of the full (unsharded) model."""
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        ln = 2 if self.normalization == "LayerNorm" else 1
        norms = 2 * h * ln + (2 * hd * ln if self.qk_layernorm else 0)
        biases = (self.num_attention_heads + 2 * self.num_query_groups) * hd if self.qkv_bias else 0
        if self.add_bias_linear:
            biases += h + (2 if self.gated else 1) * f + h
        per_layer = self.block_matmul_parameters() + norms + biases
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        pos = self.max_seq_length * h if self.position_embedding_type == "learned_absolute" else 0
        final = h * (2 if self.normalization == "LayerNorm" else 1)
        return self.num_layers * per_layer + emb + pos + final

    def transformer_config(self, tp: int = 1, *, sequence_parallel: bool = False,
                           params_dtype: torch.dtype = torch.float32, **overrides: Any):
        """megatron-core ``TransformerConfig`` for this model at TP degree ``tp``.

        Dropout is 0 (inference, distillation and the exactness tests need determinism; fine-tuning
        can override). Fusions and initialisation follow the device (``device_flags``).
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=self.gated,
            activation_func=F.silu if self.gated else F.gelu,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tp,
            sequence_parallel=sequence_parallel and tp > 1,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
        )
        kwargs.update(device_flags(self, on_gpu=compat.on_gpu()))
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


# Fusions Megatron-LM's pretrain_gpt.py turns on by default (megatron/training/arguments.py: each
# has a --no-...-fusion flag), with what megatron needs to run each one.
_GPU_FUSIONS = {
    # jit_fuser is torch.compile (megatron/core/jit.py), whose GPU backend is triton
    "bias_activation_fusion": ("triton",),
    "bias_dropout_fusion": ("triton",),
    # fused_softmax.py imports these CUDA extensions when a shape qualifies
    "masked_softmax_fusion": ("scaled_upper_triang_masked_softmax_cuda",
                              "scaled_masked_softmax_cuda", "scaled_softmax_cuda"),
    # transformer_config.py refuses it without Transformer Engine
    "apply_rope_fusion": ("transformer_engine",),
}


def device_flags(cfg: ModelConfig, *, on_gpu: bool,
                 importable: Callable[[str], bool] = compat.importable) -> dict[str, Any]:
    """Fusion (and initialisation) settings of ``cfg``'s TransformerConfig on a GPU or the CPU.

    CPU: ``compat.CPU_CONFIG`` (every fusion off; weights initialised on CPU). CUDA: the stock
    Megatron-LM defaults, i.e. each fusion in ``_GPU_FUSIONS`` is on where megatron can run it
    (its kernel package is importable and the model has what it fuses: RoPE for the rope
    fusion, biases for the plain-GeLU fusion, as arguments.py:964 and :995 decide). Off on GPU
    too: ``gradient_accumulation_fusion`` (it accumulates into ``main_grad``, which only megatron
    DDP allocates, and this package also runs plain backward: recipes, tests; a DDP trainer
    may pass it as an override) and ``persist_layer_norm`` (apex's LayerNorm only; the local
    spec's RMSNorm is torch's, which refuses it).
    """
    if not on_gpu:
        return dict(compat.CPU_CONFIG)
    flags = {name: all(importable(m) for m in needs) for name, needs in _GPU_FUSIONS.items()}
    if cfg.position_embedding_type != "rope":
        flags["apply_rope_fusion"] = False
    if not cfg.gated and not cfg.add_bias_linear:
        flags["bias_activation_fusion"] = False
    return {**flags, "gradient_accumulation_fusion": False, "persist_layer_norm": False,
            "use_cpu_initialization": False}
