"""Compute kernels for the nested factored forward: the PyTorch reference, a Triton path and the dispatcher.

Math layer: these modules import nothing from nsn_peft outside this package.
"""

from .dispatch import TRITON_MAX_TOKENS, nested_linear, use_triton
from .reference import check_nested_args, nested_linear_reference
from .triton_nested import TRITON_AVAILABLE, KernelConfig, choose_config, nested_linear_triton

__all__ = [
    "TRITON_AVAILABLE",
    "TRITON_MAX_TOKENS",
    "KernelConfig",
    "check_nested_args",
    "choose_config",
    "nested_linear",
    "nested_linear_reference",
    "nested_linear_triton",
    "use_triton",
]
