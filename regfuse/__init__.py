"""regfuse: fused regularization penalties and norms over lists of tensors.

One kernel launch computes L1, L2, squared-L2 or elastic-net penalties (and their
gradients) over every tensor of a list, whatever their number, shapes and dtypes.
"""
from .api import add_penalty_grad_, available_backends, norms, penalty, prox_l1_
from .reporting import sparsity_report
from .training import ActivationRegularizer, WeightRegularizer, gradient_penalty

__all__ = ["norms", "penalty", "add_penalty_grad_", "prox_l1_", "available_backends",
           "gradient_penalty", "ActivationRegularizer", "WeightRegularizer", "sparsity_report"]
__version__ = "0.1.0"
