"""Post-grad FX passes: canonicalize, gemma, gated, residual, quant, lower (in that order)."""
