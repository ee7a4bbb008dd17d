"""The tensor lists the benchmarks run on, with shapes taken from published model configs.

Parameter lists are generated from each architecture's definition (nothing is
downloaded): ResNet-50 (torchvision), BERT-base (uncased), GPT-2 small and ViT-B/16.
The other workloads cover what the model lists do not: 2,000 tiny tensors (where launch
and per-tensor host costs dominate), mixed bfloat16/float32 lists, activations
captured from a network, and a size sweep for the bandwidth-against-size plot.

A :class:`Workload` holds only shapes and dtypes; :meth:`Workload.make` allocates the
tensors, so listing the workloads costs no memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

Shape = tuple[int, ...]
Spec = tuple[Shape, torch.dtype]


@dataclass(frozen=True)
class Workload:
    """A named list of tensor shapes and dtypes.

    ``kind`` is ``"params"`` (model parameters: every op runs on it), ``"activations"``
    (outputs captured in a forward pass: the activity penalty runs on it) or ``"sweep"``
    (one point of the size sweep: norms only, for the bandwidth plot).
    """

    name: str
    kind: str
    specs: tuple[Spec, ...]
    description: str
    values: str = "normal"  # "normal": N(0, 0.02) like initialized weights; "relu": max(N(0, 1), 0)

    @property
    def num_tensors(self) -> int:
        return len(self.specs)

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.specs)

    @property
    def nbytes(self) -> int:
        """Bytes of one pass over every element."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.specs)

    def make(self, device: "str | torch.device", seed: int = 0) -> list[torch.Tensor]:
        """Allocate the tensors on ``device`` with reproducible values."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        tensors = []
        for shape, dtype in self.specs:
            # Drawn on the CPU so that every device sees the same values.
            t = torch.randn(shape, generator=gen)
            t = t.clamp_min_(0) if self.values == "relu" else t.mul_(0.02)
            tensors.append(t.to(device=device, dtype=dtype))
        return tensors


def _f32(shapes: list[Shape]) -> tuple[Spec, ...]:
    return tuple((s, torch.float32) for s in shapes)


# ---- architectures -------------------------------------------------------------------

def _batch_norm(c: int) -> list[Shape]:
    return [(c,), (c,)]  # weight, bias (running statistics are buffers, not parameters)


def resnet50_shapes() -> list[Shape]:
    """torchvision ``resnet50()``: 161 parameters, 25,557,032 elements."""
    shapes: list[Shape] = [(64, 3, 7, 7), *_batch_norm(64)]
    in_c = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        out_c = width * 4  # bottleneck expansion
        for b in range(blocks):
            shapes += [(width, in_c, 1, 1), *_batch_norm(width),
                       (width, width, 3, 3), *_batch_norm(width),
                       (out_c, width, 1, 1), *_batch_norm(out_c)]
            if b == 0:  # the projection shortcut of each stage's first block
                shapes += [(out_c, in_c, 1, 1), *_batch_norm(out_c)]
            in_c = out_c
    shapes += [(1000, 2048), (1000,)]
    return shapes


def bert_base_shapes() -> list[Shape]:
    """``bert-base-uncased`` with its pooler: 199 parameters, 109,482,240 elements."""
    h, ffn, layers = 768, 3072, 12
    shapes: list[Shape] = [(30522, h), (512, h), (2, h), (h,), (h,)]  # embeddings + LayerNorm
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 3  # query, key, value
        shapes += [(h, h), (h,), (h,), (h,)]  # attention output dense + LayerNorm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,), (h,), (h,)]  # intermediate, output, LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def gpt2_small_shapes() -> list[Shape]:
    """GPT-2 small (``lm_head`` tied to ``wte``): 148 parameters, 124,439,808 elements."""
    h, ctx, vocab, layers = 768, 1024, 50257, 12
    shapes: list[Shape] = [(vocab, h), (ctx, h)]
    for _ in range(layers):
        shapes += [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,),  # ln_1, c_attn, c_proj
                   (h,), (h,), (h, 4 * h), (4 * h,), (4 * h, h), (h,)]  # ln_2, c_fc, c_proj
    shapes += [(h,), (h,)]  # ln_f
    return shapes


def vit_b16_shapes() -> list[Shape]:
    """ViT-B/16 at 224x224 with a 1000-class head: 152 parameters, 86,567,656 elements."""
    h, ffn, layers, tokens = 768, 3072, 12, (224 // 16) ** 2 + 1
    shapes: list[Shape] = [(1, 1, h), (1, tokens, h), (h, 3, 16, 16), (h,)]  # cls, pos, patch embed
    for _ in range(layers):
        shapes += [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,),  # norm1, qkv, proj
                   (h,), (h,), (ffn, h), (ffn,), (h, ffn), (h,)]  # norm2, fc1, fc2
    shapes += [(h,), (h,), (1000, h), (1000,)]  # final norm, head
    return shapes


def nanogpt_shapes(layers: int = 2, n_embd: int = 64, vocab: int = 65, block_size: int = 64) -> list[Shape]:
    """nanoGPT's ``GPT`` (``bias=False``, as its ``train.py``; ``lm_head`` tied to ``wte``):
    2 layers, n_embd 64, vocab 65, block_size 64 give 15 parameters, 107,712 elements."""
    h = n_embd
    shapes: list[Shape] = [(vocab, h), (block_size, h)]  # wte, wpe
    for _ in range(layers):  # ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
        shapes += [(h,), (3 * h, h), (h, h), (h,), (4 * h, h), (h, 4 * h)]
    return shapes + [(h,)]  # ln_f


def mlp_shapes() -> list[Shape]:
    """A 2-layer MLP on MNIST, ``Linear(784, 256)``, ``Linear(256, 10)``: 4 parameters."""
    return [(256, 784), (256,), (10, 256), (10,)]


def resnet_activation_shapes(batch: int) -> list[Shape]:
    """24 ReLU outputs of a ResNet-50-style trunk at 224x224: six per stage."""
    stages = ((256, 56), (512, 28), (1024, 14), (2048, 7))
    return [(batch, c, s, s) for c, s in stages for _ in range(6)]


# ---- the workloads ---------------------------------------------------------------------

def _mixed(shapes: list[Shape]) -> tuple[Spec, ...]:
    # bfloat16 weight matrices and kernels, float32 biases and norm parameters: a
    # typical low-precision model whose 1-D parameters stay in float32.
    return tuple((s, torch.bfloat16 if len(s) > 1 else torch.float32) for s in shapes)


def sweep(numel: int, pieces: int = 8) -> Workload:
    """A list of ``pieces`` equal float32 tensors holding ``numel`` elements in all."""
    each = max(1, numel // pieces)
    mantissa, exponent = f"{numel:.0e}".split("e")
    return Workload(f"sweep_{mantissa}e{int(exponent)}", "sweep",
                    _f32([(each,)] * pieces), f"{pieces} x {each:,} float32")


def sweep_sizes(largest: float) -> list[int]:
    """1e4, 3e4, 1e5, 3e5, ... up to ``largest`` elements."""
    sizes = [m * 10 ** e for e in range(4, 10) for m in (1, 3)]
    return [n for n in sizes if n <= largest]


def _model(name: str, shapes: Callable[[], list[Shape]], what: str) -> Workload:
    return Workload(name, "params", _f32(shapes()), what)


def model_workloads(activation_batch: int) -> dict[str, Workload]:
    """Every fixed (non-sweep) workload, by name."""
    loads = [
        _model("resnet50", resnet50_shapes, "ResNet-50 parameters, float32"),
        _model("bert_base", bert_base_shapes, "BERT-base parameters, float32"),
        _model("gpt2_small", gpt2_small_shapes, "GPT-2 small (124M) parameters, float32"),
        _model("vit_b16", vit_b16_shapes, "ViT-B/16 parameters, float32"),
        _model("nanogpt_2l", nanogpt_shapes, "nanoGPT, 2 layers, n_embd 64 (15 tensors), float32"),
        _model("mlp_2l", mlp_shapes, "2-layer MLP 784-256-10 (4 tensors), float32"),
        Workload("tiny_2000x256", "params", _f32([(256,)] * 2000), "2,000 float32 tensors of 256"),
        Workload("resnet50_mixed", "params", _mixed(resnet50_shapes()),
                 "ResNet-50 parameters, bfloat16 weights + float32 1-D"),
        Workload("gpt2_small_mixed", "params", _mixed(gpt2_small_shapes()),
                 "GPT-2 small (124M) parameters, bfloat16 weights + float32 1-D"),
        Workload("tiny_2000x256_mixed", "params",
                 tuple(((256,), torch.bfloat16 if i % 2 else torch.float32) for i in range(2000)),
                 "2,000 tensors of 256, bfloat16 and float32 alternating"),
        Workload("activations", "activations", _f32(resnet_activation_shapes(activation_batch)),
                 f"24 ReLU outputs, ResNet-50 trunk, batch {activation_batch}", values="relu"),
    ]
    return {w.name: w for w in loads}


def select(names: Optional[list[str]], largest_sweep: float, activation_batch: int,
           default: list[str]) -> list[Workload]:
    """The workloads to run: ``names`` (``"sweep"`` means every sweep point) or ``default``."""
    fixed = model_workloads(activation_batch)
    chosen = []
    for name in names or default:
        if name == "sweep":
            chosen += [sweep(n) for n in sweep_sizes(largest_sweep)]
        elif name in fixed:
            chosen.append(fixed[name])
        else:
            raise SystemExit(f"unknown workload {name!r}; choose from {[*fixed, 'sweep']}")
    return chosen
