"""Small RMSNorm-bearing model code, written the way the real models write it.

The norm classes copy the forward code of Hugging Face transformers (LlamaRMSNorm, also used
by Mistral, Qwen2 and Qwen3 as Qwen3RMSNorm; GemmaRMSNorm of Gemma 1/2/3; T5LayerNorm;
Olmo2RMSNorm) and torch's own nn.RMSNorm / F.rms_norm, so graph passes are tested on the graphs
real models produce. transformers itself is not imported. Weights are random (not the ones /
zeros models start from) so a test notices a weight applied wrongly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _random_weight(hidden: int, dtype: torch.dtype, offset: float = 1.0) -> nn.Parameter:
    return nn.Parameter(offset + 0.1 * torch.randn(hidden).to(dtype), requires_grad=False)


class LlamaRMSNorm(nn.Module):
    """transformers LlamaRMSNorm (also MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)."""

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = _random_weight(hidden_size, dtype)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """transformers GemmaRMSNorm (Gemma, Gemma 2, Gemma 3): ``(1 + w)`` in float32."""

    def __init__(self, dim, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = _random_weight(dim, dtype, offset=0.0)

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        # Llama does x.to(float16) * w whilst Gemma is (x * w).to(float16)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5LayerNorm(nn.Module):
    """transformers T5LayerNorm: x (input dtype) times a float32 rsqrt."""

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = _random_weight(hidden_size, dtype)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # convert into half-precision if necessary
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class Olmo2RMSNorm(nn.Module):
    """transformers Olmo2RMSNorm: weight applied in float32, one rounding at the end."""

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = _random_weight(hidden_size, dtype)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class TorchRMSNorm(nn.Module):
    """torch.nn.RMSNorm over the last dim (its weight is optional: elementwise_affine)."""

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32, affine=True):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps, elementwise_affine=affine, dtype=dtype)
        if affine:
            self.norm.weight = _random_weight(hidden_size, dtype)

    def forward(self, x):
        return self.norm(x)


class FunctionalRMSNorm(nn.Module):
    """F.rms_norm as library code calls it."""

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32, affine=True):
        super().__init__()
        self.weight = _random_weight(hidden_size, dtype) if affine else None
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)


NORMS = {
    "llama": LlamaRMSNorm,
    "gemma": GemmaRMSNorm,
    "t5": T5LayerNorm,
    "olmo2": Olmo2RMSNorm,
    "nn_rmsnorm": TorchRMSNorm,
    "f_rms_norm": FunctionalRMSNorm,
}


class Qwen3QKNorm(nn.Module):
    """The q/k part of transformers Qwen3Attention.forward: per-head RMSNorm of head_dim."""

    def __init__(self, hidden_size, num_heads, head_dim=128, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.head_dim = head_dim
        self.q_norm = LlamaRMSNorm(head_dim, eps=eps, dtype=dtype)  # Qwen3RMSNorm
        self.k_norm = LlamaRMSNorm(head_dim, eps=eps, dtype=dtype)

    def forward(self, q, k):
        # q, k: outputs of q_proj / k_proj, [batch, seq, heads * head_dim]
        input_shape = q.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(q.view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(k.view(hidden_shape)).transpose(1, 2)
        return query_states, key_states


class LlamaBlockNorms(nn.Module):
    """The norm and residual skeleton of a Llama decoder layer plus the final norm.

    Attention and MLP are stood in for by elementwise functions, so the test is about the
    norms, residual adds and their surroundings, not matmul numerics.
    """

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(hidden_size, eps=eps, dtype=dtype)
        self.post_attention_layernorm = LlamaRMSNorm(hidden_size, eps=eps, dtype=dtype)
        self.norm = LlamaRMSNorm(hidden_size, eps=eps, dtype=dtype)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = torch.tanh(hidden_states)  # self_attn
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = F.silu(hidden_states)  # mlp
        hidden_states = residual + hidden_states
        return self.norm(hidden_states)
