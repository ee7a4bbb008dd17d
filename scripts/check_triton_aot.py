#!/usr/bin/env python3
"""Compile every Triton kernel variant the triton backend launches for real GPUs (sm_80 and
sm_90) ahead of time, through Triton's own compiler down to a cubin, with no GPU.

Without a GPU the tests run the Triton kernels through the interpreter, which accepts
code that the compiler rejects (types that differ between branches, hints on the wrong
values, ...). This check closes that gap:

1. The backend's functions (``regfuse.backends.triton``: every reduction, the backward of
   every reduction that has a fused one, into new buffers and in place, the proximal step)
   are called on small CPU tensor lists with float32 and with float64 accumulation, with
   kernel launches recorded instead of run.
2. Each distinct launch is compiled with the signature, constexprs and pointer alignment
   that a real launch would specialize, for each target. Alignment and masking are
   per-chunk run-time branches inside each kernel, so every compile covers both ways.
3. Checks: every run-time integer argument is ``do_not_specialize`` (one compile per
   shape family), and the kernels that stream over tensor elements emit 16-byte vector
   accesses (their aligned path really vectorizes).

Needs torch and triton (ptxas comes with Triton's bundled CUDA tools), no GPU and no nvcc.
Exits non-zero on the first kind of failure, after reporting all of them.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # the package works without Triton; nothing to check then
    print(f"check_triton_aot: triton is not importable ({exc}); skipped")
    sys.exit(0)

import torch  # noqa: E402

from regfuse.backends import triton as backend  # noqa: E402
from regfuse.backends.base import Reduction  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
POINTER_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
                 torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}
# Kernels whose full chunks of aligned tensors must use 16-byte accesses, and which ones.
VECTOR_ACCESSES = {"_reduce_kernel": ("ld",), "_grad_kernel": ("ld", "st"), "_update_kernel": ("ld", "st")}
_VECTOR = r"{}\.global(?:\.[\w:]+)*\.(?:v4\.(?:b32|f32|u32)|v2\.(?:b64|f64|u64))"


def record_launches() -> list[tuple]:
    """(kernel, args, kwargs) of every launch the backend makes for the lists below."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        gen = torch.Generator().manual_seed(0)
        for extra in ([], [torch.float64]):  # float32, then float64 accumulation
            dtypes = [torch.float32, torch.float16, torch.bfloat16, *extra]
            tensors = [torch.randn(5000 + 3 * i, generator=gen).to(d) for i, d in enumerate(dtypes)]
            acc = torch.float64 if extra else torch.float32
            n = len(tensors)
            weights = torch.rand(2, n, dtype=acc)
            for op in Reduction:
                backend.reduce(tensors, op, weights if op == Reduction.PENALTY else None, acc,
                               2.5 if op == Reduction.LP else 0.0)
                shape = {Reduction.PENALTY: (), Reduction.L1_L2: (2, n)}.get(op, (n,))
                grad_out, norms = torch.ones(shape, dtype=acc), torch.ones(shape, dtype=acc)
                for into in (None, [torch.zeros_like(t) for t in tensors]):
                    try:
                        backend.backward(tensors, op, grad_out, norms, weights, acc, into)
                    except ValueError:  # no fused gradient for this reduction
                        pass
            backend.prox_l1_(tensors, torch.rand(n, dtype=acc))
            backend.scale_(tensors, torch.rand(n, dtype=acc))
    finally:
        JITFunction.run = original
    return launches


def specialize(kernel: JITFunction, args: tuple, kwargs: dict, problems: list[str]):
    """What a launch with these arguments compiles: (signature, constexprs, attrs, options)."""
    names = [param.name for param in kernel.params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:  # as Triton specializes a pointer argument
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "u1"
        elif isinstance(value, int):
            if not param.do_not_specialize:
                problems.append(f"{kernel.__name__}: integer argument {param.name!r} is specialized "
                                "(one compile per value class); mark it do_not_specialize")
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, attrs, options


def describe(kernel: JITFunction, constexprs: dict) -> str:
    return f"{kernel.__name__}({', '.join(f'{k}={v}' for k, v in constexprs.items())})"


# (target, kernel, signature, constexprs, attrs, options) of every compile; module-level so
# that forked workers inherit it and take jobs by index.
JOBS: list[tuple] = []


def compile_job(index: int) -> list[str]:
    """Compiles job ``index``; returns what is wrong with it (nothing when it is fine)."""
    target, kernel, signature, constexprs, attrs, options = JOBS[index]
    what = f"sm_{target.arch} {describe(kernel, constexprs)}"
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options)
    except Exception as exc:  # report every failing variant, not just the first
        return [f"{what}: does not compile: {type(exc).__name__}: {exc}"]
    problems = [] if compiled.asm.get("cubin") else [f"{what}: no cubin (ptxas did not run)"]
    for access in VECTOR_ACCESSES.get(kernel.__name__, ()):
        if not re.search(_VECTOR.format(access), compiled.asm["ptx"]):
            problems.append(f"{what}: no 16-byte vector {access}.global in the PTX")
    return problems


def main() -> int:
    problems: list[str] = []
    variants = {}
    for kernel, args, kwargs in record_launches():
        signature, constexprs, attrs, options = specialize(kernel, args, kwargs, problems)
        key = (kernel.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        variants.setdefault(key, (kernel, signature, constexprs, attrs, options))
    JOBS.extend((target, *variant) for target in TARGETS for variant in variants.values())
    start = time.perf_counter()
    workers = min(len(JOBS), os.cpu_count() or 1)
    if workers > 1:  # compiles are independent; Triton caches the results on disk
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(compile_job, range(len(JOBS)))
    else:
        results = [compile_job(index) for index in range(len(JOBS))]
    problems += [problem for result in results for problem in result]
    if problems:
        print("check_triton_aot: FAILED", *sorted(set(problems)), sep="\n  ", file=sys.stderr)
        return 1
    kernels = sorted({key[0] for key in variants})
    archs = ", ".join(f"sm_{t.arch}" for t in TARGETS)
    print(f"check_triton_aot: {len(variants)} variants of {len(kernels)} kernels ({', '.join(kernels)}) "
          f"compiled for {archs} with triton {triton.__version__} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
