"""softce: fused soft-label classification losses (loss and gradient in one pass).

Functional API (PyTorch tensors with autograd, or NumPy arrays)::

    softce.cross_entropy, softce.kl_div, softce.binary_cross_entropy_with_logits,
    softce.distillation_loss, softce.cross_entropy_with_probs, softce.TopK,
    softce.set_num_threads, softce.get_num_threads, softce.set_gradient_cache (torch)

Modules (need torch): softce.nn.CrossEntropyLoss, KLDivLoss, BCEWithLogitsLoss,
DistillationLoss. See docs/python.md.

Class-parallel (the class dimension split across torch.distributed ranks):
cross_entropy(..., process_group=group) and distillation_loss(..., process_group=group);
see docs/distributed.md.
"""

import sys as _sys

from .functional import (
    TopK,
    binary_cross_entropy_with_logits,
    cross_entropy,
    cross_entropy_with_probs,
    distillation_loss,
    get_num_threads,
    kl_div,
    set_num_threads,
    simd_target,
)

from .linear import linear_cross_entropy, linear_distillation_loss  # fused output layer
from . import aggregate  # soft labels from noisy votes (NumPy): softce.aggregate.*
from . import _core as _core_module
__version__ = _core_module.version  # the one version: CMakeLists.txt's project()

__all__ = [
    "TopK",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "cross_entropy_with_probs",
    "distillation_loss",
    "get_num_threads",
    "kl_div",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "set_num_threads",
    "simd_target",
]

# With torch already imported, register the softce::* custom operators now, so that the
# first call may happen inside torch.compile. Without torch, nothing of it is imported.
if _sys.modules.get("torch") is not None:
    from . import _torch  # noqa: F401


def __getattr__(name):
    # softce.nn needs torch; import it on first use only (PEP 562).
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    if name == "set_gradient_cache":  # needs torch too
        from ._gradient_cache import set_gradient_cache

        return set_gradient_cache
    raise AttributeError(f"module 'softce' has no attribute {name!r}")
