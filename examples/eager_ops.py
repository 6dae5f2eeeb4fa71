"""compile_norm demo: the ops, their providers, and what eager dispatch picks."""

import torch

import compile_norm
from compile_norm.ops import registry

device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(8, 4096, dtype=torch.bfloat16, device=device)
residual = torch.randn_like(x)
weight = torch.randn(4096, dtype=torch.bfloat16, device=device)

out, residual_out = torch.ops.compile_norm.fused_add_rms_norm(x, residual, weight, 1e-6)
q, scale, _ = torch.ops.compile_norm.fused_add_rms_norm_fp8_dynamic(x, residual, weight, 1e-6)
print(f"compile_norm {compile_norm.__version__} on {device}")
print(f"fused_add_rms_norm -> {tuple(out.shape)} {out.dtype}")
print(f"fused_add_rms_norm_fp8_dynamic -> q {q.dtype}, scales {tuple(scale.shape)}")
for op in ("rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_fp8_dynamic"):
    chosen = registry.which_provider(op, x, residual, weight, 1e-6) if "add" in op else (
        registry.which_provider(op, x, weight, 1e-6)
    )
    order = " > ".join(p.name for p in registry.chain(op))
    print(f"{op:34s} providers: {order:20s} eager call uses: {chosen}")
