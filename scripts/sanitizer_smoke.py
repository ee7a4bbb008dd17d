"""Every op of every compiled backend once, on awkward lists: the program to run under
``compute-sanitizer`` (scripts/gpu_check.sh does), short enough for its slowdown.

``python scripts/sanitizer_smoke.py [--device cuda] [--backends cuda triton]``

Each op runs on lists with odd sizes (tails shorter than a chunk and than a vector),
mixed dtypes, a float64 member (float64 accumulation), empty and 0-d tensors,
non-contiguous views, tensors at offsets that break 16-byte alignment and a few hundred
tiny tensors, and is compared with the ``reference`` backend on the same values, so a
kernel that reads or writes the wrong elements fails here even where the sanitizer
would not see it. Under ``compute-sanitizer`` run it with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: with the caching allocator an out-of-bounds access
lands in memory torch holds, which the sanitizer counts as valid.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from torch import Tensor

import regfuse

TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def tensor_lists(device: torch.device) -> dict[str, list[Tensor]]:
    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    strided = rand(65, 130)[:, 1::2]  # non-contiguous: every other column
    offset = rand(4101)[1:]  # a 4-byte offset from the allocation: no 16-byte alignment
    return {
        "mixed_half": [rand(37), rand(3, 4097, dtype=torch.float16), rand(65537, dtype=torch.bfloat16),
                       rand(()), rand(0), strided, offset],
        "with_float64": [rand(4099, dtype=torch.float64), rand(129), rand(0, 3, dtype=torch.float16),
                         rand((1 << 17) + 3)],
        "many_tiny": [rand(1 + i % 7, dtype=(torch.float32, torch.float16)[i % 2]) for i in range(300)],
    }


def check(name: str, got: Tensor | list[Tensor], want: Tensor | list[Tensor]) -> None:
    got_list = got if isinstance(got, list) else [got]
    want_list = want if isinstance(want, list) else [want]
    for g, w in zip(got_list, want_list, strict=True):
        tol = TOLERANCES[w.dtype]
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


def same_layout(t: Tensor) -> Tensor:
    """A copy of ``t`` with its strides and its offset from a 16-byte boundary, so that the
    in-place ops meet the same non-contiguous or misaligned memory as the others."""
    if t.dim() and not t.is_contiguous():
        copy = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
    elif t.storage_offset():
        copy = t.new_zeros(t.numel() + t.storage_offset())[t.storage_offset():].view(t.shape)
    else:
        copy = torch.empty_like(t)
    return copy.copy_(t.detach())


def copies(tensors: list[Tensor], grads: bool = False) -> list[Tensor]:
    out = [same_layout(t) for t in tensors]
    if grads:
        torch.manual_seed(1)  # the same gradients for the backend and for the reference
        for t in out:
            t.grad = torch.randn_like(t)
    return out


def run_ops(backend: str, tensors: list[Tensor]) -> list[tuple[str, Callable[[str], object]]]:
    """(op name, function of the backend name returning what to compare)."""
    n = len(tensors)
    coefficients = [0.5 + (i % 3) for i in range(n)]

    def norms(p: float, squared: bool = False):
        return lambda b: regfuse.norms(tensors, p=p, squared=squared, backend=b)

    def penalty_fwd_bwd(b: str):
        leaves = [t.requires_grad_() for t in copies(tensors)]
        loss = regfuse.penalty(leaves, l1=1e-2, l2=3e-2, coefficients=coefficients, backend=b)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    def add_penalty_grad(b: str):
        params = copies(tensors, grads=True)
        regfuse.add_penalty_grad_(params, l1=1e-2, l2=3e-2, coefficients=coefficients, backend=b)
        return [p.grad for p in params]

    def prox(b: str):
        params = copies(tensors)
        regfuse.prox_l1_(params, 0.3, coefficients=coefficients, backend=b)
        return params

    def clip(b: str):  # the total norm (a reduction), then the in-place scale
        params = copies(tensors, grads=True)
        total = regfuse.clip_grad_norm_(params, 0.5, backend=b)
        return [total] + [p.grad for p in params]

    def group_norms(b: str):  # the table over rows: one entry per slice along dim 0
        return regfuse.group_norms(tensors, backend=b)

    def group_penalty_fwd_bwd(b: str):  # L1_L2 over rows, then the backward over rows
        leaves = [t.requires_grad_() for t in copies(tensors)]
        loss = regfuse.group_penalty(leaves, 3e-2, l1=1e-2, coefficients=coefficients, backend=b)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    def prox_group(b: str):  # norms over rows, then the in-place scale with one factor per row
        params = copies(tensors)
        regfuse.prox_group_lasso_(params, 0.3, l1_threshold=0.1, coefficients=coefficients, backend=b)
        return params

    return [("norms_p1", norms(1)), ("norms_p2", norms(2)), ("norms_inf", norms(float("inf"))),
            ("norms_sq", norms(2, squared=True)), ("norms_p3", norms(3)), ("norms_p0.5", norms(0.5)),
            ("norms_p0", norms(0)), ("norms_-inf", norms(float("-inf"))),
            ("penalty_fwd_bwd", penalty_fwd_bwd), ("add_penalty_grad_", add_penalty_grad),
            ("prox_l1_", prox), ("clip_grad_norm_", clip), ("group_norms", group_norms),
            ("group_penalty_fwd_bwd", group_penalty_fwd_bwd), ("prox_group_lasso_", prox_group)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+",
                        help="default: every available backend for the device but reference")
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = args.backends or [b for b in regfuse.available_backends(device) if b != "reference"]
    if not backends:
        sys.exit(f"sanitizer_smoke: no compiled backend available for {device}")

    torch.manual_seed(0)
    lists = tensor_lists(device)
    for backend in backends:
        for list_name, tensors in lists.items():
            for op_name, op in run_ops(backend, tensors):
                check(f"{backend} {op_name} on {list_name}", op(backend), op("reference"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous kernel error surfaces here
        num_ops = len(run_ops(backend, []))
        print(f"sanitizer_smoke: {backend} on {device}: {len(lists)} lists x {num_ops} ops match "
              "reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
