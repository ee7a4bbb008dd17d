"""The multi-tensor table (csrc/multi_tensor.h, mirrored by regfuse/chunks.py) and what
its alignment rules promise: every slot of the flat gradient buffers starts on a 16-byte
boundary, and a tensor whose byte size is not a multiple of 16, or whose data pointer is
misaligned, changes nothing for the others (alignment is decided per chunk) nor any
result."""
import pytest
import torch

import regfuse
from cases import (BF16, F16, F32, F64, assert_close, assert_lists_close, max_abs, oracle_norms,
                   oracle_penalty, oracle_penalty_grads, oracle_prox)
from regfuse import chunks
from regfuse.backends.base import DTYPE_CODES

ITEMSIZE = {F32: 4, F64: 8, F16: 2, BF16: 2}
DTYPE_OF_CODE = {int(code): dtype for dtype, code in DTYPE_CODES.items()}


def _misaligned(numel: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A contiguous tensor whose data pointer is one element past a 16-byte boundary."""
    return torch.randn(numel + 1, generator=gen, dtype=F64).to(dtype)[1:]


def _odd_list(seed: int = 0) -> list[torch.Tensor]:
    """Byte sizes that are not multiples of 16 (a 37-element bias first), misaligned data
    pointers, every dtype, empty and 0-d tensors; small enough for the Triton interpreter,
    with full 512-element chunks (the interpreter's chunk) behind the odd ones."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=F32):
        return torch.randn(shape, generator=gen, dtype=F64).to(dtype)

    return [rand(37), rand(1030), _misaligned(700, F32, gen), rand(3, dtype=F64),
            rand(600, dtype=F64), rand(5, dtype=F16), rand(1100, dtype=F16),
            _misaligned(520, BF16, gen), rand(7, dtype=BF16), rand(0), rand(), rand(2, 64)]


def _sections(table: torch.Tensor, layout: chunks.MetaLayout) -> dict[str, list[int]]:
    values = table.cpu().tolist()
    n, c = layout.num_tensors, layout.num_chunks
    return {"ptrs": values[:n], "numels": values[n:2 * n], "dtypes": values[2 * n:3 * n],
            "chunk_offsets": values[3 * n:4 * n + 1], "chunk_tensor": values[4 * n + 1:4 * n + 1 + c],
            "chunk_start": values[4 * n + 1 + c:4 * n + 1 + 2 * c], "flat_offset": values[4 * n + 1 + 2 * c:]}


@pytest.mark.parametrize("chunk_size", [8, 512, 4096])
def test_table_sections_and_padded_flat_offsets(chunk_size):
    tensors = _odd_list()
    table, layout = chunks.build_metadata(tensors, chunk_size)
    assert table.numel() == layout.size
    s = _sections(table, layout)
    assert s["ptrs"] == [t.data_ptr() for t in tensors]
    assert s["numels"] == [t.numel() for t in tensors]
    assert s["dtypes"] == [int(DTYPE_CODES[t.dtype]) for t in tensors]
    for i, t in enumerate(tensors):
        owned = range(s["chunk_offsets"][i], s["chunk_offsets"][i + 1])
        assert len(owned) == -(-t.numel() // chunk_size)
        assert [s["chunk_tensor"][c] for c in owned] == [i] * len(owned)
        assert [s["chunk_start"][c] for c in owned] == [k * chunk_size for k in range(len(owned))]

    # Each dtype's slots, in list order: 16-byte aligned, packed without overlap and with
    # less than one vector of padding between them, all inside the flat buffer.
    assert s["flat_offset"] == list(layout.flat_offsets)
    for dtype, code in DTYPE_CODES.items():
        per_vector = 16 // ITEMSIZE[dtype]
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        next_free = 0
        for i in members:
            offset = s["flat_offset"][i]
            assert offset % per_vector == 0, f"tensor {i}: slot at {offset} is not 16-byte aligned"
            assert next_free <= offset < next_free + per_vector, f"tensor {i}: slot at {offset}"
            next_free = offset + tensors[i].numel()
        assert next_free <= layout.flat_sizes[code] < next_free + per_vector


@pytest.mark.skipif(getattr(chunks._C, "metadata", None) is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("chunk_size", [8, 512, 32768])
def test_native_table_equals_the_python_build(chunk_size):
    tensors = _odd_list(seed=1)
    native, num_chunks = chunks._C.metadata(tensors, chunk_size)
    layout = chunks._layout([t.numel() for t in tensors], [int(DTYPE_CODES[t.dtype]) for t in tensors],
                            chunk_size)
    python = chunks.build_host([t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                               [int(DTYPE_CODES[t.dtype]) for t in tensors], chunk_size, layout)
    assert num_chunks == layout.num_chunks
    assert torch.equal(native, python)


def _row_list(seed: int = 2) -> list[torch.Tensor]:
    """Row tables: odd row sizes (rows of 5 float32, 3 bfloat16), a 1-D tensor (rows of one
    element), 0-d, no rows (0, 4), empty rows (3, 0), a misaligned start, rows spanning
    several chunks."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=F32):
        return torch.randn(shape, generator=gen, dtype=F64).to(dtype)

    return [rand(7, 5), rand(4, 3, dtype=BF16), rand(9), rand(), rand(0, 4), rand(3, 0),
            _misaligned(60, F32, gen).view(4, 15), rand(2, 1200, dtype=F64), rand(3, 2)]


@pytest.mark.parametrize("chunk_size", [8, 512])
def test_row_table_shares_each_tensors_slot(chunk_size):
    tensors = _row_list()
    table, layout = chunks.build_metadata(tensors, chunk_size, rows=True)
    s = _sections(table, layout)
    rows = [t.shape[0] if t.dim() else 1 for t in tensors]
    assert layout.num_tensors == sum(rows)
    entry = 0
    next_free = {code: 0 for code in DTYPE_CODES.values()}
    for t, count in zip(tensors, rows):
        row = t.numel() // count if count else 0
        code = int(DTYPE_CODES[t.dtype])
        per_vector = 16 // ITEMSIZE[t.dtype]
        for r in range(count):
            e = entry + r
            assert s["ptrs"][e] == t.data_ptr() + r * row * ITEMSIZE[t.dtype]
            assert s["numels"][e] == row and s["dtypes"][e] == code
            if r == 0:  # the tensor's slot: aligned, after the previous one
                assert s["flat_offset"][e] % per_vector == 0
                assert next_free[code] <= s["flat_offset"][e] < next_free[code] + per_vector
            else:  # its later rows follow in the same slot, unpadded
                assert s["flat_offset"][e] == s["flat_offset"][e - 1] + row
        if count:
            next_free[code] = s["flat_offset"][entry + count - 1] + row
        entry += count
    for code, end in next_free.items():
        assert end <= layout.flat_sizes[code] < end + 16 // ITEMSIZE[DTYPE_OF_CODE[code]]


@pytest.mark.skipif(getattr(chunks._C, "metadata", None) is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("chunk_size", [8, 512, 32768])
def test_native_row_table_equals_the_python_build(chunk_size):
    tensors = _row_list(seed=3)
    native, num_chunks = chunks._C.metadata(tensors, chunk_size, 0, False, True)
    rows = [t.shape[0] if t.dim() else 1 for t in tensors]
    entries = chunks._row_entries([t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                                  [int(DTYPE_CODES[t.dtype]) for t in tensors], rows)
    layout = chunks._layout(entries[1], entries[2], chunk_size, entries[3])
    python = chunks.build_host(*entries[:3], chunk_size, layout)
    assert num_chunks == layout.num_chunks
    assert torch.equal(native, python)


@pytest.mark.parametrize("chunk_size", [0, -8, 12])
def test_chunk_size_keeps_alignment(chunk_size):
    with pytest.raises(ValueError, match="multiple of 8"):
        chunks.build_metadata([torch.randn(3)], chunk_size)


def test_odd_sizes_and_misaligned_tensors_norms(backend, device, skip_if_too_big):
    tensors = [t.to(device) for t in _odd_list()]
    skip_if_too_big(tensors)
    for p in (1, 2, float("inf")):
        assert_close(regfuse.norms(tensors, p, backend=backend), oracle_norms(tensors, p), what=f"p={p}")


def test_odd_sizes_and_misaligned_tensors_penalty_and_gradients(backend, device, skip_if_too_big):
    leaves = [t.to(device).requires_grad_() for t in _odd_list()]
    skip_if_too_big(leaves)
    coefficients = [0.5 + 0.25 * (i % 3) for i in range(len(leaves))]
    loss = regfuse.penalty(leaves, 0.5, 0.25, coefficients=coefficients, backend=backend)
    assert_close(loss, oracle_penalty(leaves, 0.5, 0.25, coefficients).to(loss.dtype), what="penalty")
    grads = torch.autograd.grad(loss, leaves)
    assert_lists_close(grads, oracle_penalty_grads(leaves, 0.5, 0.25, coefficients), what="grad")
    for i, g in enumerate(grads):
        if g.numel():
            assert g.data_ptr() % 16 == 0, f"gradient {i} does not start on a 16-byte boundary"


def test_odd_sizes_and_misaligned_tensors_in_place_ops(backend, device, skip_if_too_big):
    params = [t.to(device) for t in _odd_list()]
    skip_if_too_big(params)
    gen = torch.Generator().manual_seed(2)
    # Gradients misaligned in their own way: the kernels check input and output addresses.
    grads = [_misaligned(p.numel(), p.dtype, gen).view(p.shape).to(device) if i % 2 else
             torch.randn(p.shape, generator=gen, dtype=F64).to(device=device, dtype=p.dtype)
             for i, p in enumerate(params)]
    for p, g in zip(params, grads):
        p.grad = g
    before = [g.clone() for g in grads]
    regfuse.add_penalty_grad_(params, 0.5, 0.25, backend=backend)
    terms = oracle_penalty_grads(params, 0.5, 0.25)
    assert_lists_close([p.grad for p in params], [b.to(F64) + t for b, t in zip(before, terms)],
                       what="grad", magnitudes=[max(max_abs(b), max_abs(t)) for b, t in zip(before, terms)])

    expected = oracle_prox(params, 0.3)
    regfuse.prox_l1_(params, 0.3, backend=backend)
    assert_lists_close(params, expected, what="prox")
