"""regfuse: fused regularization penalties and norms over lists of tensors.

One kernel launch computes L1, L2, squared-L2 or elastic-net penalties (and their
gradients), any p-norm, the total norm or a gradient clipping over every tensor of a
list, whatever their number, shapes and dtypes.
"""
from .api import (add_penalty_grad_, available_backends, clip_grad_norm_, norms, penalty, prox_l1_,
                  total_norm)
from .reporting import sparsity_report
from .training import ActivationRegularizer, WeightRegularizer, gradient_penalty

__all__ = ["norms", "total_norm", "penalty", "add_penalty_grad_", "prox_l1_", "clip_grad_norm_",
           "available_backends", "gradient_penalty", "ActivationRegularizer", "WeightRegularizer", "sparsity_report"]
__version__ = "0.1.0"
