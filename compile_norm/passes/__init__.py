"""Post-grad FX passes: canonicalize, gemma, residual, quant, lower (in that order)."""
