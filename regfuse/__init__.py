"""regfuse: fused regularization penalties and norms over lists of tensors.

One kernel launch computes L1, L2, squared-L2 or elastic-net penalties (and their
gradients), any p-norm, the total norm or a gradient clipping over every tensor of a
list, whatever their number, shapes and dtypes; the group lasso and its proximal step do
the same with the groups (filters, neurons) of every tensor as the unit.
"""
from .api import (add_penalty_grad_, available_backends, clip_grad_norm_, clip_grads_with_norm_, norms,
                  penalty, prox_l1_, total_norm)
from .groups import group_norms, group_penalty, prox_group_lasso_
from .norm_logging import grad_norms, weight_norms
from .proximal import ProximalStep
from .reporting import sparsity_report
from .training import ActivationRegularizer, WeightRegularizer, gradient_penalty

__all__ = ["norms", "total_norm", "penalty", "add_penalty_grad_", "prox_l1_", "clip_grad_norm_",
           "clip_grads_with_norm_", "available_backends", "group_norms", "group_penalty",
           "prox_group_lasso_", "ProximalStep", "gradient_penalty", "ActivationRegularizer",
           "WeightRegularizer", "sparsity_report", "grad_norms", "weight_norms"]
__version__ = "0.1.0"
