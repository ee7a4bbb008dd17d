"""regfuse: fused regularization penalties and norms over lists of tensors.

One kernel launch computes L1, L2, squared-L2 or elastic-net penalties (and their
gradients), any p-norm, the total norm or a gradient clipping over every tensor of a
list, whatever their number, shapes and dtypes; the group lasso and its proximal step do
the same with the groups (filters, neurons) of every tensor as the unit.
"""
import importlib as _importlib
import os as _os
import warnings as _warnings

import torch as _torch  # noqa: F401  (loaded first: the extension links against its libraries)


def _missing_extension_message(error: ImportError) -> str:
    """Why ``regfuse._C`` is missing and how to get it, for the warning at import."""
    package = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(package)
    in_checkout = all(_os.path.exists(_os.path.join(root, name)) for name in ("setup.py", "csrc"))
    if not isinstance(error, ModuleNotFoundError):  # built, but it does not load
        where = f"the extension in {package} does not load (built against another torch?)"
        fix = ("rebuild it against this torch: `pip install --no-build-isolation "
               f"{'-e .' if in_checkout else 'regfuse'}` (see the README's install section)")
    elif in_checkout:
        where = (f"regfuse is imported from the source checkout {root}, which has no build "
                 "(an installed copy, if any, is not what runs)")
        fix = ("build it in place: `pip install --no-build-isolation -e .` or `python setup.py "
               "build_ext --inplace` in the checkout, or run from another directory")
    else:
        where = f"the package at {package} was installed without its compiled extension"
        fix = "reinstall it: `pip install --no-build-isolation regfuse` (see the README's install section)"
    return (f"regfuse: the C++ extension regfuse._C cannot be imported ({error}): {where}. Only "
            f"the pure-PyTorch 'reference' backend is available, 10-100x slower. To fix it, {fix}.")


try:
    _importlib.import_module("._C", __name__)  # the compiled backends; the package works without them
except ImportError as _error:
    _warnings.warn(_missing_extension_message(_error), RuntimeWarning, stacklevel=2)

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
