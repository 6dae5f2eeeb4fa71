"""A small Hugging Face LlamaForCausalLM (random weights, nothing downloaded) compiled with
compile_norm: what fused, the logits against eager, and the time against stock torch.compile.

    python examples/hf_model.py [--tiny] [--device cuda] [--out DIR]
"""

import sys

import torch

from _common import default_dtype, inspect_and_print, parse_args


class Logits(torch.nn.Module):
    """The causal LM without a KV cache, returning logits only (a plain tensor to compare)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(tiny: bool, device: str):
    import transformers

    torch.manual_seed(0)
    if tiny:
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        batch, seq = 1, 16
    else:
        size = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=8192)
        batch, seq = 1, 256 if device == "cuda" else 64
    config = transformers.LlamaConfig(max_position_embeddings=max(seq, 128), **size)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # random norm weights (HF initializes them to one)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    model = Logits(model).to(device=device, dtype=default_dtype(device)).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    return model, (input_ids,)


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("skipping the Hugging Face example: transformers is not installed "
              "(pip install 'compile_norm[hf]')")
        sys.exit(0)
    model, inputs = build(args.tiny, args.device)
    report = inspect_and_print(model, inputs, args, "LlamaForCausalLM (random weights)")
    logits = report.numerics[0]
    print(f"logits diff vs eager: max abs {logits.max_abs:.3g}, max rel {logits.max_rel:.3g}")
