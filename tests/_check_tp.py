import torch
from megatron_spd.config import ModelConfig
from megatron_spd.plan import SPDPlan
from megatron_spd.spec import build_model
from megatron_spd.model import forward_logits, gather_full_state_dict, load_full_state_dict
from megatron_spd.grads import reduce_tp_partial_grads

def run(cfg, plan, full, tokens, sp=False):
    m = build_model(cfg, plan, sequence_parallel=sp)
    load_full_state_dict(m, full)
    out = forward_logits(m, tokens)
    (out.float().pow(2).mean()).backward()
    reduce_tp_partial_grads(m)
    return out.detach(), gather_full_state_dict(m, grads=True)

def init_full(cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    full = gather_full_state_dict(m)
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.dim() == 1 else v for k, v in full.items()}
