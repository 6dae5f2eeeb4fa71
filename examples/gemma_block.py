"""A Gemma 2/3-style decoder block, compiled with compile_norm.

Gemma's norm multiplies by ``1 + weight`` in float32 (weights start at zero) and rounds once at
the end; each layer has four norms (before and after attention, before and after the MLP), and
Gemma 3 adds per-head q/k norms on the head dimension. The passes should find every one, fold
the ``1 + w`` into the op's weight_offset and fuse the residual adds.

    python examples/gemma_block.py [--tiny] [--device cuda] [--out DIR]
"""

import torch
import torch.nn.functional as F
from torch import nn

from _common import default_dtype, inspect_and_print, parse_args


class Gemma3RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        # Gemma: (1 + w) in float32, then one rounding (Llama rounds before the multiply)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GemmaAttention(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = Gemma3RMSNorm(head_dim)  # Gemma 3: norms on each head's q and k
        self.k_norm = Gemma3RMSNorm(head_dim)

    def forward(self, hidden_states):
        b, s, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states).view(b, s, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(hidden_states).view(b, s, self.kv_heads, self.head_dim))
        v = self.v_proj(hidden_states).view(b, s, self.kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class GemmaMLP(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, intermediate):
        super().__init__()
        self.self_attn = GemmaAttention(hidden, heads, kv_heads, head_dim)
        self.mlp = GemmaMLP(hidden, intermediate)
        self.input_layernorm = Gemma3RMSNorm(hidden)
        self.post_attention_layernorm = Gemma3RMSNorm(hidden)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(hidden)
        self.post_feedforward_layernorm = Gemma3RMSNorm(hidden)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states


class GemmaBlocks(nn.Module):
    def __init__(self, layers, hidden, heads, kv_heads, head_dim, intermediate):
        super().__init__()
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(hidden, heads, kv_heads, head_dim, intermediate)
            for _ in range(layers)
        )
        self.norm = Gemma3RMSNorm(hidden)

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


def build(tiny: bool, device: str):
    """(model, inputs). ``compile-norm inspect examples/gemma_block.py:tiny_cpu`` inspects the tiny
    CPU block (a target is called without arguments)."""
    torch.manual_seed(0)
    dtype = default_dtype(device)
    if tiny:
        layers, hidden, heads, kv, head_dim, inter, batch, seq = 1, 80, 4, 2, 32, 160, 2, 16
    elif device == "cuda":  # Gemma 3 12B shapes: hidden 3840, 16 heads of 256, 8 kv heads
        layers, hidden, heads, kv, head_dim, inter, batch, seq = 2, 3840, 16, 8, 256, 15360, 1, 1024
    else:
        layers, hidden, heads, kv, head_dim, inter, batch, seq = 2, 640, 4, 1, 256, 2048, 1, 128
    model = GemmaBlocks(layers, hidden, heads, kv, head_dim, inter)
    with torch.no_grad():  # trained Gemma norm weights are far from zero
        for m in model.modules():
            if isinstance(m, Gemma3RMSNorm):
                m.weight.normal_(0.0, 0.3)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    return model, (x,)


def tiny_cpu():
    """The tiny CPU build, a factory without arguments for ``compile-norm inspect``."""
    return build(True, "cpu")


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    model, inputs = build(args.tiny, args.device)
    inspect_and_print(model, inputs, args, "Gemma 3 decoder block")
