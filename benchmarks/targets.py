"""The performance targets, checked against the rows of the same run.

Each target names the cases it covers (workload, operation) and a metric with a
threshold; it is MET when every covered case meets the threshold, and reports its
worst case. A case the run did not measure (a backend that is not built, a workload
left out) makes the target NOT MEASURED rather than met or missed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from report import Row, find
from timing import Limits

Case = tuple[str, str]  # (workload, op)


@dataclass
class Outcome:
    target: str
    measured: str
    met: Optional[bool]  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[self.met]


@dataclass
class Target:
    """``metric(row, rows) >= threshold`` for ``provider`` on every case."""

    text: str
    provider: str
    cases: list[Case]
    metric: Callable[[Row, Sequence[Row]], Optional[float]]
    threshold: float
    unit: str  # how a metric value prints: "x", "%", "e" (scientific) or "" (a count)
    at_most: bool = False  # the metric must be <= threshold instead

    def evaluate(self, rows: Sequence[Row]) -> Outcome:
        values, missing = [], []
        for workload, op in self.cases:
            row = find(rows, workload, op, self.provider)
            value = None if row is None else self.metric(row, rows)
            if value is None:
                missing.append(f"{workload}/{op}")
            else:
                values.append((value, f"{workload}/{op}"))
        label = f"{self.text} [{self.provider}]"
        if missing:
            return Outcome(label, "not measured: " + ", ".join(missing), None)
        worst, where = (max if self.at_most else min)(values)
        met = worst <= self.threshold if self.at_most else worst >= self.threshold
        scope = f" (worst of {len(values)}: {where})" if len(values) > 1 else ""
        return Outcome(label, f"{self._format(worst)}{scope}", met)

    def _format(self, value: float) -> str:
        if self.unit == "%":
            return f"{100 * value:.0f}%"
        if self.unit == "e":
            return f"{value:.1e}"
        return f"{value:.2f}x" if self.unit == "x" else f"{value:g}"


def _speedup_naive(row: Row, rows: Sequence[Row]) -> Optional[float]:
    return row.speedup_naive


def _speedup_foreach(row: Row, rows: Sequence[Row]) -> Optional[float]:
    return row.speedup_foreach


def _bandwidth_of(limit: float) -> Callable[[Row, Sequence[Row]], float]:
    return lambda row, rows: row.gbps * 1e9 / limit


def _speedup_compile(row: Row, rows: Sequence[Row]) -> Optional[float]:
    compiled = find(rows, row.workload, row.op, "compile")
    return compiled.median_s / row.median_s if compiled else None


def _rel_error(row: Row, rows: Sequence[Row]) -> Optional[float]:
    return row.rel_error


def _launches(row: Row, rows: Sequence[Row]) -> Optional[float]:
    return row.launches


def _backward_launches(row: Row, rows: Sequence[Row]) -> Optional[float]:
    forward = find(rows, row.workload, "penalty", row.provider)
    if forward is None or forward.launches is None or row.launches is None:
        return None
    return row.launches - forward.launches


def cpu_targets(limits: Limits) -> list[Target]:
    resnet, tiny = "resnet50", "tiny_2000x256"
    return [
        Target("norms(p=2), ResNet-50: >= 80% of flat.sum() bandwidth", "regfuse_cpu",
               [(resnet, "norms_p2")], _bandwidth_of(limits.read), 0.80, "%"),
        Target("norms(p=2), ResNet-50: >= 1.5x torch._foreach_norm", "regfuse_cpu",
               [(resnet, "norms_p2")], _speedup_foreach, 1.5, "x"),
        Target("penalty(l1, l2) fwd+bwd, ResNet-50: >= 3x naive fwd+bwd", "regfuse_cpu",
               [(resnet, "penalty_fwd_bwd")], _speedup_naive, 3.0, "x"),
        Target("add_penalty_grad_, ResNet-50: >= 6x naive fwd+bwd", "regfuse_cpu",
               [(resnet, "add_penalty_grad_")], _speedup_naive, 6.0, "x"),
        Target("norms(p=2), 2,000 x 256: >= 10x torch._foreach_norm", "regfuse_cpu",
               [(tiny, "norms_p2")], _speedup_foreach, 10.0, "x"),
        *clip_targets("regfuse_cpu", foreach_speedup=2.0, tiny_speedup=3.0),
        # One target per list, so that the short run (no ViT) judges ResNet-50.
        *[Target(f"{label}, {name}: >= 5x the naive loop", "regfuse_cpu", [(workload, op)],
                 _speedup_naive, 5.0, "x")
          for workload, name in ((resnet, "ResNet-50"), ("vit_b16", "ViT-B/16"))
          for op, label in (("group_penalty_fwd_bwd", "group_penalty fwd+bwd"),
                            ("prox_group_lasso_", "prox_group_lasso_"))],
    ]


# ResNet-50, GPT-2 small and 2,000 tiny tensors, each in float32 and bfloat16 + float32.
CLIP_WORKLOADS = ("resnet50", "resnet50_mixed", "gpt2_small", "gpt2_small_mixed", "tiny_2000x256",
                  "tiny_2000x256_mixed")


def clip_targets(provider: str, foreach_speedup: Optional[float] = None,
                 tiny_speedup: Optional[float] = None) -> list[Target]:
    """clip_grad_norm_ against torch's foreach path, clipping and not, and its accuracy."""
    targets = []
    for op, what in (("clip_grad_norm_", "clipping"), ("clip_grad_norm_unclipped", "max_norm=inf")):
        if foreach_speedup is not None:
            targets.append(Target(
                f"clip_grad_norm_ ({what}), ResNet-50 + GPT-2 + 2,000 tiny, f32 and bf16/f32: "
                f">= {foreach_speedup:g}x torch foreach", provider, [(w, op) for w in CLIP_WORKLOADS],
                _speedup_foreach, foreach_speedup, "x"))
        if tiny_speedup is not None:
            tiny = [(w, op) for w in CLIP_WORKLOADS if w.startswith("tiny")]
            targets.append(Target(f"clip_grad_norm_ ({what}), 2,000 tiny: >= {tiny_speedup:g}x torch foreach",
                                  provider, tiny, _speedup_foreach, tiny_speedup, "x"))
    targets.append(Target("clip_grad_norm_: returned norm within 1e-6 (relative) of float64", provider,
                          [(w, op) for w in CLIP_WORKLOADS for op in ("clip_grad_norm_", "clip_grad_norm_unclipped")],
                          _rel_error, 1e-6, "e", at_most=True))
    return targets


def gpu_targets(limits: Limits, backend: str) -> list[Target]:
    provider = f"regfuse_{backend}"
    large = ("resnet50", "gpt2_small")
    forward_ops = ("norms_p1", "norms_p2", "penalty")
    on_large = [(w, op) for w in large for op in forward_ops]
    on_tiny = [("tiny_2000x256", op) for op in forward_ops]
    return [
        Target("forward norms/penalty, ResNet-50 + GPT-2: >= 90% of copy bandwidth", provider,
               on_large, _bandwidth_of(limits.copy), 0.90, "%"),
        Target("forward norms/penalty, ResNet-50 + GPT-2: >= 30x naive", provider,
               on_large, _speedup_naive, 30.0, "x"),
        Target("forward norms/penalty, ResNet-50 + GPT-2: >= 1.3x torch._foreach_norm", provider,
               on_large, _speedup_foreach, 1.3, "x"),
        Target("forward norms/penalty, 2,000 x 256: >= 5x torch._foreach_norm", provider,
               on_tiny, _speedup_foreach, 5.0, "x"),
        Target("forward norms/penalty: ahead of torch.compile of the naive loop", provider,
               on_large + on_tiny, _speedup_compile, 1.0, "x"),
        Target("add_penalty_grad_, ResNet-50 + GPT-2: >= 85% of its 3-pass (copy) limit", provider,
               [(w, "add_penalty_grad_") for w in large], _bandwidth_of(limits.copy), 0.85, "%"),
        Target("one kernel launch per forward", provider,
               on_large + on_tiny, _launches, 1, "", at_most=True),
        Target("one kernel launch per backward (fwd+bwd minus fwd)", provider,
               [(w, "penalty_fwd_bwd") for w in large], _backward_launches, 1, "", at_most=True),
        Target("add_penalty_grad_: one kernel launch", provider,
               [(w, "add_penalty_grad_") for w in large], _launches, 1, "", at_most=True),
        *clip_targets(provider),
        Target("group_penalty fwd+bwd, prox_group_lasso_, ResNet-50 + ViT-B/16: >= 5x naive",
               provider, [(w, op) for w in ("resnet50", "vit_b16")
                          for op in ("group_penalty_fwd_bwd", "prox_group_lasso_")],
               _speedup_naive, 5.0, "x"),
    ]


def _speedup_torch(row: Row, rows: Sequence[Row]) -> Optional[float]:
    """Against the faster of torch's two ways (its foreach utility, the naive loop)."""
    ratios = [r for r in (row.speedup_naive, row.speedup_foreach) if r is not None]
    return min(ratios) if ratios else None


def host_targets(cases: Sequence[Case]) -> list[Target]:
    """Small lists, where the host's work is the cost: ``backend="auto"`` with Triton
    importable and without (see ``host_overhead.py``) no slower than torch, every case."""
    return [Target(f"time per call <= torch's (foreach utility and naive loop), every list and op, "
                   f"backend='auto' {what}", provider, list(cases), _speedup_torch, 1.0, "x")
            for provider, what in (("regfuse_auto", "with Triton importable"),
                                   ("regfuse_auto_no_triton", "without Triton"))]


def evaluate(rows: Sequence[Row], limits: Limits, device_type: str) -> list[Outcome]:
    """Every target of this device type, judged on ``rows``."""
    if device_type == "cuda":
        targets = gpu_targets(limits, "cuda") + gpu_targets(limits, "triton")
    else:
        targets = cpu_targets(limits)
    return [t.evaluate(rows) for t in targets]


def text(outcomes: Sequence[Outcome]) -> str:
    width = max((len(o.target) for o in outcomes), default=0)
    return "\n".join(f"{o.target.ljust(width)}  {o.measured:<60}  {o.verdict}" for o in outcomes)


def markdown(outcomes: Sequence[Outcome]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {o.target} | {o.measured} | {o.verdict} |" for o in outcomes]
    return "\n".join(lines)
