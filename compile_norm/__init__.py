"""compile_norm: RMSNorm-family ops fused under torch.compile."""

from importlib.metadata import PackageNotFoundError, version as _version

from . import lowerings  # noqa: F401  (plain Inductor inlines our ops' references)
from . import ops
from . import kernels  # noqa: F401  (registers the device-kernel providers)
from .passes import trace  # noqa: F401  (names the log and its artifact for TORCH_LOGS)

ops.registry.check_env_priority()  # a typo'd COMPILE_NORM_PROVIDERS is said, not ignored
from .fuse import fuse
from .ops import (
    fused_add_rms_norm,
    providers_priority,
    rms_norm,
    rms_norm_add_rms_norm,
    rms_norm_gated,
    set_priority,
    which_provider,
)
from .options import CompileOptions, parse_options

try:
    __version__ = _version("compile_norm")
except PackageNotFoundError:  # running from a source checkout that is not installed
    __version__ = "0.1.0"
