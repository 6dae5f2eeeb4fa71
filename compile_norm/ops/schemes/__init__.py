"""One file per quantization scheme, each declaring ``SCHEME`` (a ``quant.QuantScheme``).

The file name is the scheme's name; ``ops/quant.py`` finds every file here.
"""
