"""Residual add -> RMSNorm -> FP8 dynamic per-token quantization -> FP8 matmul, compiled with
compile_norm.

The quantization is written by hand as serving code writes it (scale = row amax / 448, clamped
below, then a saturating cast to float8_e4m3fn) and feeds ``torch._scaled_mm`` with row-wise
scales. The passes should fuse add + norm + quantization into one op. FP8 matmuls need a CUDA
GPU with compute capability 8.9 or newer (H100, L4, ...); elsewhere this example says so and
exits.

    python examples/fp8_block.py [--tiny] [--out DIR]
"""

import sys

import torch
from torch import nn

from _common import inspect_and_print, parse_args

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_supported(device: str) -> str | None:
    """None when FP8 matmuls run here, else why not."""
    if device != "cuda" or not torch.cuda.is_available():
        return "FP8 matmuls (torch._scaled_mm) need a CUDA GPU; this run is on the CPU"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return f"FP8 matmuls need compute capability 8.9 or newer; this GPU has {cap[0]}.{cap[1]}"
    return None


def quant_fp8_per_token(y: torch.Tensor):
    """Dynamic per-token FP8: one float32 scale per row, as vLLM-style serving code does it."""
    yf = y.float()
    amax = yf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax / FP8_MAX, min=1.0 / (FP8_MAX * 512.0))
    q = (yf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class FP8Linear(nn.Module):
    """A linear layer with an FP8 weight (per output channel scale) and FP8 activations."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w_scale = weight.float().abs().amax(dim=1, keepdim=True) / FP8_MAX  # [N, 1]
        self.register_buffer("weight", (weight.float() / w_scale).to(FP8))  # [N, K]
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # [1, N]

    def forward(self, q, scale):
        lead = q.shape[:-1]
        out = torch._scaled_mm(q.reshape(-1, q.shape[-1]), self.weight.t(),
                               scale_a=scale.reshape(-1, 1), scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)
        return out.reshape(*lead, -1)


class FP8Block(nn.Module):
    """Per layer: h = x + residual; y = norm(h); out = fp8_linear(quant(y))."""

    def __init__(self, layers, hidden, out_features):
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(layers))
        self.projs = nn.ModuleList(
            FP8Linear(torch.randn(out_features, hidden) / hidden**0.5) for _ in range(layers)
        )
        self.down = nn.ModuleList(
            nn.Linear(out_features, hidden, bias=False) for _ in range(layers)
        )
        for m in (*self.norms, *self.down):  # not .to(bf16) on the whole model: FP8 would go too
            m.to(torch.bfloat16)

    def forward(self, x, residual):
        for norm, proj, down in zip(self.norms, self.projs, self.down):
            residual = x + residual
            q, scale = quant_fp8_per_token(norm(residual))
            x = down(proj(q, scale))
        return x, residual


def build(tiny: bool, device: str = "cuda"):
    torch.manual_seed(0)
    layers, hidden, inter, tokens = (1, 256, 512, 32) if tiny else (2, 4096, 14336, 2048)
    model = FP8Block(layers, hidden, inter)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(1.0, 0.1)
    model = model.to(device).eval()
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    return model, (x, torch.randn_like(x))


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    why = fp8_supported(args.device)
    if why:
        print(f"skipping the FP8 example: {why}")
        sys.exit(0)
    model, inputs = build(args.tiny, args.device)
    # A quantized value may land one FP8 step (12.5 %) apart when the compiled norm rounds a
    # hair differently; through the matmul that stays a small share of the output.
    inspect_and_print(model, inputs, args, "add + RMSNorm + FP8 per-token quant + FP8 matmul",
                      tolerances={torch.bfloat16: (0.1, 0.05)})
