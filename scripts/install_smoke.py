"""Smoke test of an installed regfuse: the compiled ``cpu`` backend against torch.

``python scripts/install_smoke.py [--regfuse-under DIR] [--torch-outside DIR]``; run it
from a directory that holds no ``regfuse`` package, so that the import finds the install.
``--regfuse-under`` checks where regfuse was imported from (the environment it was
installed into, or the source tree of an editable install); ``--torch-outside`` checks
that torch was not installed into that environment (it must be the user's own).
Exits non-zero with a message on the first failure.
"""
from __future__ import annotations

import argparse
import os
import sys


def is_under(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regfuse-under", metavar="DIR")
    parser.add_argument("--torch-outside", metavar="DIR")
    args = parser.parse_args()

    import torch

    import regfuse

    print(f"install_smoke: regfuse {regfuse.__version__} from {regfuse.__file__}")
    print(f"install_smoke: torch {torch.__version__} from {torch.__file__}")
    if args.regfuse_under and not is_under(regfuse.__file__, args.regfuse_under):
        sys.exit(f"install_smoke: regfuse was not imported from under {args.regfuse_under}")
    if args.torch_outside and is_under(torch.__file__, args.torch_outside):
        sys.exit(f"install_smoke: torch was installed into {args.torch_outside}")

    backends = regfuse.available_backends("cpu")
    print(f"install_smoke: available_backends('cpu') = {backends}")
    if backends[0] != "cpu":
        sys.exit("install_smoke: the compiled cpu backend is not available")

    torch.manual_seed(0)
    tensors = [torch.randn(37), torch.randn(3, 129, dtype=torch.float64),
               torch.randn(5, 7).to(torch.bfloat16), torch.randn(())]
    for p in (1, 2, float("inf")):
        got = regfuse.norms(tensors, p=p, backend="cpu")
        want = torch.stack([torch.linalg.vector_norm(t.double(), p) for t in tensors])
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)

    params = [t.double().requires_grad_() for t in tensors]
    regfuse.penalty(params, l1=0.3, l2=0.2, backend="cpu").backward()
    for p in params:
        plain = p.detach().clone().requires_grad_()
        (0.3 * plain.abs().sum() + 0.2 * plain.square().sum()).backward()
        torch.testing.assert_close(p.grad, plain.grad)
    print("install_smoke: norms (p=1, 2, inf) and penalty gradients match torch: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
