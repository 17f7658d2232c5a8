"""The GEMV kernels and the few-row projection path against float64 torch (interpreted on a CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel.kernels.gemv import ROWS_TILE, gemv, gemv_applies, gemv_rows_config
from keel.models.layers.embedding import LMHead
from keel.models.layers.linear import GateUpLinear, Linear
from keel.models.layers.norm import RMSNorm
from tests.helpers import KERNEL_DEVICE

EPS = 1e-6


def reference(x, weight, bias=None, norm_weight=None, residual=None, gate_up=False, eps=EPS):
    """The fused product in float64."""
    x, weight = x.double(), weight.double()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    out = F.linear(x, weight, None if bias is None else bias.double())
    if gate_up:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out if residual is None else out + residual.double()


@pytest.mark.parametrize("rows", [1, 3, 17])  # the one-row kernel; the several-row one, in one and two row tiles
@pytest.mark.parametrize("n", [40, 43])  # 43: the last column block is partial (of 2 or 4 a program)
@pytest.mark.parametrize("parts", ["plain", "bias", "norm", "residual", "gate_up", "all"])
def test_gemv_matches_float64(rows, n, parts):
    g = torch.Generator().manual_seed(rows * 100 + n)
    k = 96  # three K blocks of 32 when the config asks for 32
    gate_up = parts in ("gate_up", "all")
    x = torch.randn(rows, k, generator=g).to(KERNEL_DEVICE)
    weight = torch.randn(2 * n if gate_up else n, k, generator=g).to(KERNEL_DEVICE) / 8
    # gate/up projections have no bias in any supported model
    bias = torch.randn(n, generator=g).to(KERNEL_DEVICE) if parts in ("bias", "all") and not gate_up else None
    norm_weight = torch.rand(k, generator=g).add(0.5).to(KERNEL_DEVICE) if parts in ("norm", "all") else None
    residual = torch.randn(rows, n, generator=g).to(KERNEL_DEVICE) if parts in ("residual", "all") else None
    add_to = residual.clone() if residual is not None else None
    got = gemv(x, weight, bias, norm_weight, EPS, add_to, gate_up)
    assert got.shape == (rows, n) and got.dtype == x.dtype
    assert add_to is None or got is add_to  # added in place
    torch.testing.assert_close(got.double(), reference(x, weight, bias, norm_weight, residual, gate_up),
                               atol=1e-4, rtol=1e-4)


def test_long_k_rows_take_half_width_tiles_correctly():
    """K above 12288 (a down projection) runs the several-row kernel on 32-column tiles; the last one partial."""
    g = torch.Generator().manual_seed(7)
    rows, n, k = 3, 40, 12800
    x = torch.randn(rows, k, generator=g).to(KERNEL_DEVICE)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(KERNEL_DEVICE)
    norm_weight = torch.rand(k, generator=g).add(0.5).to(KERNEL_DEVICE)
    residual = torch.randn(rows, n, generator=g).to(KERNEL_DEVICE)
    got = gemv(x, weight, None, norm_weight, EPS, residual.clone())
    torch.testing.assert_close(got.double(), reference(x, weight, None, norm_weight, residual), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [16, 64, 4096, 12800, 14336])
@pytest.mark.parametrize("gate_up", [False, True])
def test_float32_rows_tiles_take_no_more_shared_memory_than_bfloat16s(k, gate_up):
    """The long-K float32 case (test above) asked for 261 KiB of shared memory on an H200 before."""
    half, full = gemv_rows_config(k, gate_up, 2), gemv_rows_config(k, gate_up, 4)
    assert full.block_k * 4 <= half.block_k * 2 or full.block_k == 16
    assert k % full.block_k == 0 and (full.block_n, full.num_stages) == (half.block_n, half.num_stages)


def test_gemv_writes_the_requested_dtype_and_rejects_bad_shapes():
    x = torch.randn(1, 64).to(KERNEL_DEVICE)
    weight = torch.randn(24, 64).to(KERNEL_DEVICE)
    assert gemv(x, weight, out_dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="weight"):
        gemv(x, torch.randn(24, 32).to(KERNEL_DEVICE))
    with pytest.raises(ValueError, match="add_to"):
        gemv(x, weight, add_to=torch.randn(2, 24).to(KERNEL_DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, weight, out=torch.empty(1, 23, device=KERNEL_DEVICE))
    assert gemv(x[:0], weight).shape == (0, 24)


def test_gemv_applies_to_a_few_rows_only():
    weight = torch.empty(8, 64)
    assert gemv_applies(torch.empty(1, 64), weight)
    assert gemv_applies(torch.empty(ROWS_TILE, 64), weight)
    assert not gemv_applies(torch.empty(ROWS_TILE + 1, 64), weight)
    assert not gemv_applies(torch.empty(0, 64), weight)
    assert not gemv_applies(torch.empty(1, 72)[:, :40], torch.empty(8, 40))  # K not in blocks of 16
    assert not gemv_applies(torch.empty(1, 64), torch.empty(64, 8).t())  # weight not contiguous


def _layer_pair(cls, *args, **kwargs):
    plain, fused = cls(*args, **kwargs), cls(*args, **kwargs, fused=True)
    g = torch.Generator().manual_seed(5)
    for p_plain, p_fused in zip(plain.parameters(), fused.parameters()):
        p_plain.data = torch.randn(p_plain.shape, generator=g) / 8
        p_fused.data = p_plain.data.clone()
    return plain.to(KERNEL_DEVICE), fused.to(KERNEL_DEVICE)


@pytest.mark.parametrize("rows", [1, 5, 20])  # the one-row kernel, the several-row one, cuBLAS (torch on a CPU)
def test_projection_layers_fuse_norm_residual_and_activation(rows):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(64, EPS).to(KERNEL_DEVICE)
    norm.weight.data = torch.rand(64, generator=g).add(0.5).to(KERNEL_DEVICE)
    x = torch.randn(rows, 64, generator=g).to(KERNEL_DEVICE)
    residual = torch.randn(rows, 48, generator=g).to(KERNEL_DEVICE)
    plain, fused = _layer_pair(Linear, 64, 48, bias=True)
    want = F.linear(norm(x), plain.weight, plain.bias) + residual
    for layer in (plain, fused):
        stream = residual.clone()
        assert layer(x, norm=norm, add_to=stream) is stream
        torch.testing.assert_close(stream, want, atol=1e-5, rtol=1e-5)
    plain_gu, fused_gu = _layer_pair(GateUpLinear, 64, 40)
    gate, up = F.linear(norm(x), plain_gu.weight).chunk(2, dim=-1)
    torch.testing.assert_close(fused_gu(x, norm=norm), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_gu(x, norm=norm), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
    plain_head, fused_head = _layer_pair(LMHead, 100, 64)
    logits = fused_head(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, plain_head(x), atol=1e-5, rtol=1e-5)
    for head in (plain_head, fused_head):  # into the front rows of a buffer (CUDA graphs of every size share one)
        buffer = torch.full((rows + 2, 100), 7.0, device=KERNEL_DEVICE)
        assert head(x, buffer[:rows]).data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer[:rows], logits, atol=1e-5, rtol=1e-5)
        assert buffer[rows:].eq(7).all()
