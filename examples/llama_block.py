"""A Llama-style decoder block written the way Hugging Face writes it, compiled with compile_norm.

RMSNorm class (float32 statistics, weight applied after casting back), residual adds, attention
with q/k/v/o projections, rotary embeddings and SDPA, SwiGLU MLP. The passes should turn each
norm into a compile_norm op and fuse the residual add into it.

    python examples/llama_block.py [--tiny] [--device cuda] [--out DIR]
"""

import torch
import torch.nn.functional as F
from torch import nn

from _common import default_dtype, inspect_and_print, parse_args


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, hidden, heads, kv_heads, max_pos):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, hidden_states):
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:s].to(q.dtype), self.sin[:s].to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LlamaMLP(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, intermediate, max_pos):
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads, max_pos)
        self.mlp = LlamaMLP(hidden, intermediate)
        self.input_layernorm = LlamaRMSNorm(hidden)
        self.post_attention_layernorm = LlamaRMSNorm(hidden)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class LlamaBlocks(nn.Module):
    """A few decoder layers and the final norm."""

    def __init__(self, layers, hidden, heads, kv_heads, intermediate, max_pos):
        super().__init__()
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden, heads, kv_heads, intermediate, max_pos) for _ in range(layers)
        )
        self.norm = LlamaRMSNorm(hidden)

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


def build(tiny: bool, device: str):
    """(model, inputs). ``compile-norm inspect examples/llama_block.py:tiny_cpu`` inspects the tiny
    CPU block (a target is called without arguments)."""
    torch.manual_seed(0)
    dtype = default_dtype(device)
    if tiny:
        layers, hidden, heads, kv, inter, batch, seq = 1, 96, 4, 2, 160, 2, 16
    elif device == "cuda":
        layers, hidden, heads, kv, inter, batch, seq = 2, 4096, 32, 8, 14336, 1, 1024
    else:
        layers, hidden, heads, kv, inter, batch, seq = 2, 576, 9, 3, 1536, 1, 128
    model = LlamaBlocks(layers, hidden, heads, kv, inter, max_pos=seq)
    with torch.no_grad():  # random norm weights, so a weight mix-up cannot hide
        for m in model.modules():
            if isinstance(m, LlamaRMSNorm):
                m.weight.normal_(1.0, 0.1)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    return model, (x,)


def tiny_cpu():
    """The tiny CPU build, a factory without arguments for ``compile-norm inspect``."""
    return build(True, "cpu")


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    model, inputs = build(args.tiny, args.device)
    inspect_and_print(model, inputs, args, "Llama decoder block")
