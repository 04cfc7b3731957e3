"""Where GPU kernels and references disagree (a diagnostic, not a test): prints the first mismatches."""

import copy

import torch

import torch_side


def show(name, got, want, extra=None):
    g, w = got.float().reshape(-1).cpu(), want.float().reshape(-1).cpu()
    bad = ((got.reshape(-1).cpu().view(torch.int16 if got.element_size() == 2 else torch.int32)
            != want.reshape(-1).cpu().view(torch.int16 if want.element_size() == 2 else torch.int32))
           & ~torch.isnan(g)).nonzero().reshape(-1)  # fmt: skip
    print(f"{name}: {len(bad)} differ")
    for i in bad[:6].tolist():
        print(f"  [{i}] got {g[i].item()!r} want {w[i].item()!r}" + (f" | {extra(i)}" if extra else ""))


for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
    w = torch.arange(256, dtype=torch.uint8).reshape(1, 256).view(fp8).cuda()
    s = torch.ones(1, 1, device="cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = torch_side.dequantize_fp8(w, s, dtype, backend="triton")
        want = torch_side.dequantize_fp8(w.cpu(), s.cpu(), dtype, backend="torch")
        show(f"{fp8} codes x1.0 -> {dtype}", got, want, lambda i: f"code {i:#04x}")

gen = torch.Generator().manual_seed(0)
w = (torch.randn(576, 7168, generator=gen) * 64).to(torch.float8_e4m3fn)
s = torch.rand(5, 56, generator=gen) * 1e-2 + 1e-4
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    got = torch_side.dequantize_fp8(w.cuda(), s.cuda(), dtype, backend="triton")
    want = torch_side.dequantize_fp8(w, s, dtype, backend="torch")
    wf, sf = (
        w.float().reshape(-1),
        s.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :7168].reshape(-1),
    )
    show(
        f"fp8 576x7168 -> {dtype}",
        got,
        want,
        lambda i, wf=wf, sf=sf: (
            f"w {wf[i].item()!r} byte {w.view(torch.uint8).reshape(-1)[i].item():#04x} s {sf[i].item()!r} exact {wf[i].item() * sf[i].item()!r}"
        ),
    )

import bitsandbytes.functional as F

x = (torch.randn(256, 512, generator=gen) * 1e-38).cuda()
packed, qs = F.quantize_4bit(x, compress_statistics=False)
bnb_cuda = F.dequantize_4bit(packed, qs)
tri = torch_side.dequantize(packed, qs, backend="triton")
qs_cpu = copy.deepcopy(qs)
qs_cpu.to("cpu")
ref = torch_side.dequantize(packed.cpu(), qs_cpu, backend="torch")
show("denormal nf4 triton vs bnb cuda", tri, bnb_cuda)
show("denormal nf4 torch(cpu) vs bnb cuda", ref, bnb_cuda)
show("denormal nf4 torch(cuda) vs bnb cuda", torch_side.dequantize(packed, qs, backend="torch"), bnb_cuda)
