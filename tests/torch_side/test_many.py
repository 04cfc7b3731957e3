"""Many weights at once: ``dequantize_many`` / ``dequantize_fp8_many`` give exactly what one call per weight
gives, and the grouped FP8 kernel behind the latter (one launch for many weights of one kind) gives the
bits of the oracle. On CPU the grouped kernel runs under Triton's interpreter; on a GPU (`pytest -m gpu`)
``dequantize_fp8_many`` groups compiled launches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    assert_bitwise_equal,
    bnb_quantize,
    fp8_reference_loops,
    random_fp8,
    random_scales,
)

import torch_side
from torch_side import _fp8, _triton
from torch_side._compile import Address, Addresses

pytest.importorskip("triton")
F = pytest.importorskip("bitsandbytes.functional")


def _fp8_members(shape, n, *, seed, dtype=torch.float8_e4m3fn, scale_shape=None, device="cpu"):
    scale_shape = scale_shape or (-(-shape[0] // 128), -(-shape[1] // 128))
    Ws = [random_fp8(shape, seed=seed + i, dtype=dtype).to(device) for i in range(n)]
    scales = [random_scales(scale_shape, seed=seed + 100 + i).to(device) for i in range(n)]
    return Ws, scales


@pytest.mark.parametrize("shape", [(130, 257), (256, 384), (1, 512), (7, 9)])
@pytest.mark.parametrize("transpose", [False, True])
def test_grouped_fp8_kernel_equals_the_oracle(shape, transpose):
    for dtype, scale_shape in [
        (torch.float8_e4m3fn, None),  # block scales, partial tiles
        (torch.float8_e5m2, None),
        (torch.float8_e4m3fn, (shape[0], 1)),  # per-row scales
        (torch.float8_e4m3fn, (1,)),  # one scale
    ]:
        Ws, scales = _fp8_members(shape, 3, seed=sum(shape), dtype=dtype, scale_shape=scale_shape)
        layout = torch_side.fp8_scale_layout(shape, scales[0].shape)
        outs = _triton.dequantize_fp8_group(
            Ws, scales, block=layout.block, grid_shape=layout.grid, dtype=torch.bfloat16, transpose=transpose
        )
        assert outs is not None and len(outs) == 3
        for W, s, out in zip(Ws, scales, outs, strict=True):
            want = torch_side.dequantize_fp8_reference(W, s, layout, torch.bfloat16)
            if layout.kind == "block":
                assert_bitwise_equal(want, fp8_reference_loops(W, s, layout.block, torch.bfloat16))
            assert_bitwise_equal(out, want.t() if transpose else want)


def test_grouped_fp8_kernel_writes_where_it_is_told():
    """``outs=``: the grouped kernel writes into the given outputs (the loader passes the addresses of arrays
    XLA allocated), and into nothing else."""
    Ws, scales = _fp8_members((130, 257), 3, seed=4)
    layout = torch_side.fp8_scale_layout((130, 257), scales[0].shape)
    outs = [torch.full((257, 130), 7.0, dtype=torch.bfloat16) for _ in Ws]
    returned = _triton.dequantize_fp8_group(
        Ws,
        scales,
        block=layout.block,
        grid_shape=layout.grid,
        dtype=torch.bfloat16,
        transpose=True,
        outs=outs,
    )
    assert returned is not None and all(r is o for r, o in zip(returned, outs, strict=True))
    for W, s, out in zip(Ws, scales, outs, strict=True):
        assert_bitwise_equal(out, torch_side.dequantize_fp8_reference(W, s, layout, torch.bfloat16).t())
    kw = dict(block=layout.block, grid_shape=layout.grid, dtype=torch.bfloat16, transpose=True)
    for bad, message in [
        (outs[:2], "2 outputs for 3 weights"),
        ([*outs[:2], outs[2].float()], r"outs\[2\] is torch.float32"),
        (
            [*outs[:2], torch.empty(130, 257, dtype=torch.bfloat16)],
            r"outs\[2\] must be a contiguous \(257, 130\)",
        ),
        ([*outs[:2], torch.empty(130, 257, dtype=torch.bfloat16).t()], "not contiguous"),
    ]:
        with pytest.raises(ValueError, match=message):
            _triton.dequantize_fp8_group(Ws, scales, outs=bad, **kw)


def test_groups_larger_than_a_launch_and_misaligned_members(monkeypatch):
    monkeypatch.setattr(_triton, "MAX_GROUP", 2)  # 5 weights: launches of 2, 2 and 1
    Ws, scales = _fp8_members((40, 136), 5, seed=7)
    outs = _triton.dequantize_fp8_group(
        Ws, scales, block=(128, 128), grid_shape=(1, 2), dtype=torch.float16, transpose=False
    )
    for W, s, out in zip(Ws, scales, outs, strict=True):
        assert_bitwise_equal(out, fp8_reference_loops(W, s, (128, 128), torch.float16))
    raw = torch.empty(40 * 136 + 1, dtype=torch.uint8)
    odd = raw[1:].view(torch.float8_e4m3fn).view(40, 136).copy_(Ws[0])  # 1 byte off 16-byte alignment
    assert (
        _triton.dequantize_fp8_group(
            [Ws[1], odd],
            scales[:2],
            block=(128, 128),
            grid_shape=(1, 2),
            dtype=torch.float16,
            transpose=False,
        )
        is None
    )


@pytest.mark.parametrize("transpose", [False, True])
def test_grouped_fp8_kernel_takes_stacked_rows(monkeypatch, transpose):
    """Weights and scales given as one ``[n, ...]`` tensor each, rows padded as the loader reads them (each
    row a multiple of 16 bytes, a row's tensor contiguous inside it): the bits of one call per weight, over
    several launches; a row stride that breaks 16-byte alignment launches nothing."""
    monkeypatch.setattr(_triton, "MAX_GROUP", 2)  # 5 weights: launches of 2, 2 and 1
    shape, n = (130, 257), 5
    Ws, scales = _fp8_members(shape, n, seed=11)
    layout = torch_side.fp8_scale_layout(shape, scales[0].shape)
    w_row, s_row = -(-shape[0] * shape[1] // 16) * 16, 4 * 4  # bytes; float32 scales: 4 elements per 16 bytes
    packed = torch.full((n, w_row), 0x7F, dtype=torch.uint8)  # padding: NaN in e4m3, never read
    scale_rows = torch.full((n, s_row // 4 * 2), float("nan"))
    for i in range(n):
        packed[i, : Ws[i].numel()] = Ws[i].view(torch.uint8).reshape(-1)
        scale_rows[i, : scales[i].numel()] = scales[i].reshape(-1)
    W = packed[:, : Ws[0].numel()].view(torch.float8_e4m3fn).unflatten(1, shape)
    S = scale_rows[:, : scales[0].numel()].unflatten(1, scales[0].shape)
    kw = dict(block=layout.block, grid_shape=layout.grid, dtype=torch.bfloat16, transpose=transpose)
    outs = _triton.dequantize_fp8_group(W, S, **kw)
    assert outs is not None and len(outs) == n
    for Wi, s, out in zip(Ws, scales, outs, strict=True):
        want = torch_side.dequantize_fp8_reference(Wi, s, layout, torch.bfloat16)
        assert_bitwise_equal(out, want.t() if transpose else want)
    odd = torch.zeros((n, w_row + 1), dtype=torch.uint8)[:, : Ws[0].numel()].view(torch.float8_e4m3fn)
    assert _triton.dequantize_fp8_group(odd.unflatten(1, shape), S, **kw) is None
    with pytest.raises(ValueError, match="4 tensors in argument 1 of a group of 5"):  # not read past its end
        _triton.dequantize_fp8_group(W, S[:4], **kw)
    # rows that are not contiguous (each a transposed weight; the row stride 16-byte aligned): not launched,
    # where the kernel would read them as contiguous
    square = torch.stack([random_fp8((64, 128), seed=i).t().contiguous() for i in range(2)]).transpose(1, 2)
    s2 = torch.stack([random_scales((1, 1), seed=i).expand(1, 4) for i in range(2)])[..., :1]
    kw2 = dict(block=(128, 128), grid_shape=(1, 1), dtype=torch.bfloat16, transpose=transpose)
    assert _triton.dequantize_fp8_group(square, s2, **kw2) is None
    assert _triton.dequantize_fp8_group(list(square), list(s2), **kw2) is None
    assert _triton.dequantize_fp8_group(square.contiguous(), s2, **kw2) is not None


def _tables_reference(columns, group):
    """The grouped launch's offset tables as a plain loop: per launch of ``group`` weights, each weight's
    element offset from the launch's first weight, one column per pointer argument."""
    ptrs = []
    for column in columns:
        if isinstance(column, torch.Tensor):
            ptrs.append([row.data_ptr() for row in column])
            size = column.element_size()
        else:
            ptrs.append([int(t.data_ptr()) for t in column])
            size = column[0].element_size()
        ptrs[-1] = (ptrs[-1], size)
    n = len(ptrs[0][0])
    return [
        [[(p[i] - p[start]) // size for p, size in ptrs] for i in range(start, min(n, start + group))]
        for start in range(0, n, group)
    ]


@pytest.mark.parametrize("group", [2, 65535])
def test_offset_tables_of_tensors_rows_and_addresses(monkeypatch, group):
    """The grouped launch's tables, from tensors, one tensor's rows, and bare addresses of either order
    (offsets of either sign), over one or several launches, equal a plain loop's; a column of another length
    raises, and an address or tensor off 16-byte alignment launches nothing."""
    monkeypatch.setattr(_triton, "MAX_GROUP", group)
    rng = np.random.default_rng(group)
    n = 7
    rows = torch.empty((n, 48), dtype=torch.uint8)  # rows 48 bytes apart
    tensors = [torch.empty(int(rng.integers(1, 9)) * 4, dtype=torch.float32) for _ in range(n)]
    base = 1 << 44
    order = rng.permutation(1000)[:n].astype(np.int64)
    order[[0, order.argmax()]] = order[[order.argmax(), 0]]  # the highest first: offsets of both signs
    addresses = base + 16 * order * 8
    listed = [Address(int(a), torch.bfloat16) for a in addresses]
    got = _triton._members([rows, tensors, Addresses(addresses, torch.bfloat16)])
    assert got is not None
    want = _tables_reference([rows, tensors, listed], group)
    assert [t.tolist() for t in got] == want
    assert all(t.dtype == torch.int64 for t in got)
    assert [t.tolist() for t in _triton._members([rows, tensors, listed])] == want
    assert any(v < 0 for table in want for row in table for v in row)  # out of order: both signs
    with pytest.raises(ValueError, match="6 tensors in argument 2 of a group of 7"):
        _triton._members([rows, tensors, Addresses(addresses[:6], torch.bfloat16)])
    odd = addresses.copy()
    odd[3] += 2
    assert _triton._members([rows, tensors, Addresses(odd, torch.bfloat16)]) is None
    assert (
        _triton._members([rows, tensors, [*listed[:3], Address(int(odd[3]), torch.bfloat16), *listed[4:]]])
        is None
    )
    assert (
        _triton._members([rows, [*tensors[:2], torch.empty(9, dtype=torch.uint8)[1:], *tensors[3:]], listed])
        is None
    )


@pytest.mark.parametrize("chunk", [32, 2])
def test_many_equals_one_call_per_weight(device, chunk, monkeypatch):
    """Mixed kinds, shapes, a transposed ([1, n]) weight, a Params4bit, a None quant state; FP8 in several
    layouts: the lists hold exactly what one call per weight returns. On a GPU, the second and later FP8
    weights of a kind are decoded by grouped launches."""
    grouped = []

    def counted(fn):
        def run(*args, **kwargs):
            outs = fn(*args, **kwargs)
            grouped.append((fn.__name__, None if outs is None else len(outs)))
            return outs

        return run

    monkeypatch.setattr(_fp8, "GROUP_CHUNK", chunk)  # 2: launched while the list is still being read
    monkeypatch.setattr(_triton, "dequantize_fp8_group", counted(_triton.dequantize_fp8_group))
    items = [bnb_quantize((64, 320), seed=i, device=device) for i in range(3)]
    items += [bnb_quantize((33, 130), nested=False, seed=9, device=device)]
    items += [bnb_quantize((64, 320), seed=11, device=device)]
    weights = [p for _, p, _ in items]
    states = [qs for _, _, qs in items]
    weights.append(items[0][1].t())  # bitsandbytes' convention for W.t(): the result is transposed back
    states.append(items[0][2])
    weights.append(torch.arange(6.0, device=device))  # no quant state: the weight itself
    states.append(None)
    for backend in ("auto", "triton") if device == "cuda" else ("auto",):
        for _ in range(2):  # the second round finds every kind checked already
            got = torch_side.dequantize_many(weights, states, backend=backend)
            for i, (W, qs) in enumerate(zip(weights, states, strict=True)):
                want = torch_side.dequantize(W, qs, backend="torch")
                assert got[i].shape == want.shape, i
                assert_bitwise_equal(got[i], want)
                if qs is not None and device == "cuda":
                    assert_bitwise_equal(got[i], F.dequantize_4bit(W, qs))
    bnb = pytest.importorskip("bitsandbytes")
    params = bnb.nn.Params4bit(torch.randn(64, 128).to(torch.bfloat16), requires_grad=False)
    if device == "cuda":
        params = params.cuda()
        got = torch_side.dequantize_many([params, params])
        for out in got:
            assert_bitwise_equal(out, F.dequantize_4bit(params.data, params.quant_state))

    Ws, scales = _fp8_members((300, 520), 4, seed=3, device=device)
    Ws += [random_fp8((576, 7168), seed=5).to(device)]
    scales += [random_scales((5, 56), seed=6).to(device)]
    Ws += [random_fp8((8, 16), seed=8, dtype=torch.float8_e5m2).to(device)]
    scales += [torch.tensor(0.5, device=device)]
    for transpose in (False, True):
        for _ in range(2):
            got = torch_side.dequantize_fp8_many(Ws, scales, torch.bfloat16, transpose=transpose)
            for W, s, out in zip(Ws, scales, got, strict=True):
                want = torch_side.dequantize_fp8(W, s, torch.bfloat16, transpose=transpose, backend="torch")
                assert_bitwise_equal(out, want)
    if device == "cuda":
        torch_side.dequantize_fp8_many(Ws, scales, torch.bfloat16, backend="triton")
        torch_side.dequantize_fp8_many(Ws, scales, torch.bfloat16, backend="triton")
        # the four (300, 520) weights
        assert ("dequantize_fp8_group", 4 if chunk == 32 else 2) in grouped, grouped


def test_many_names_the_bad_weight():
    _, p, qs = bnb_quantize((64, 64))
    with pytest.raises(ValueError, match="one per weight"):
        torch_side.dequantize_many([p, p], [qs])
    with pytest.raises(TypeError, match="weights must be a list of per-weight values, got a Tensor"):
        torch_side.dequantize_many(p, [qs])  # one weight, not a list: its rows are no weights
    with pytest.raises(TypeError, match="quant_states must be a list of per-weight values, got a QuantState"):
        torch_side.dequantize_many([p], qs)
    assert len(torch_side.dequantize_many(iter([p, p]), iter([qs, qs]))) == 2  # any iterable
    with pytest.raises(TypeError, match=r"weights\[1\]: .*FP8 data"):
        torch_side.dequantize_many([p, p.view(torch.float8_e4m3fn)], [qs, qs])
    Ws, scales = _fp8_members((64, 64), 2, seed=1)
    with pytest.raises(ValueError, match="one scale per weight"):
        torch_side.dequantize_fp8_many(Ws, scales[:1])
    with pytest.raises(TypeError, match="weights must be a list of per-weight values, got a Tensor"):
        torch_side.dequantize_fp8_many(Ws[0], scales[0])
    with pytest.raises(ValueError, match=r"weights\[1\]: scale_inv has shape \(3, 3\)"):
        torch_side.dequantize_fp8_many(Ws, [scales[0], torch.ones(3, 3)])


@pytest.mark.gpu
@pytest.mark.parametrize("transpose", [False, True])
def test_group_into_addresses_gives_the_bits_of_one_call_per_weight(transpose):
    """dequantize_fp8_group_into (the loader's grouped route): weights of a kind already checked, written to
    bare device addresses in one launch, hold what one call per weight returns; a kind no call checked yet,
    or an address off 16-byte alignment, writes nothing and says so."""
    torch_side.wait_for_kernels()
    shape = (200, 130)  # partial 128x128 tiles
    stacked = torch.stack(_fp8_members(shape, 5, seed=21, device="cuda")[0])
    scales = torch.stack(_fp8_members(shape, 5, seed=21, device="cuda")[1])
    Ws, Ss = stacked.unbind(0), scales.unbind(0)
    out_shape = shape[::-1] if transpose else shape
    outs = torch.full((5, *out_shape), 3.0, dtype=torch.float16, device="cuda")
    args = dict(block_size=None, transpose=transpose)
    order = [3, 0, 4, 1, 2]  # addresses below the first one's too: offsets of either sign
    addresses = [outs[i].data_ptr() for i in order]
    unseen = random_fp8((72, 40), seed=22).cuda()  # a shape no other test decodes: no plan for it
    assert not _fp8.fp8_planned(unseen, Ss[0][:1, :1], torch.float16, **args)
    assert not _fp8.dequantize_fp8_group_into([unseen], [Ss[0][:1, :1]], addresses[:1], torch.float16, **args)
    want = [torch_side.dequantize_fp8(W, s, torch.float16, **args) for W, s in zip(Ws, Ss, strict=True)]
    assert _fp8.fp8_planned(Ws[0], Ss[0], torch.float16, **args)
    assert _fp8.dequantize_fp8_group_into(Ws, Ss, addresses, torch.float16, **args)
    for i, w in zip(order, want, strict=True):
        assert_bitwise_equal(outs[i], w)
    assert not _fp8.dequantize_fp8_group_into(
        Ws[:2], Ss[:2], [addresses[0], addresses[1] + 2], torch.float16, **args
    )
