"""The fused Triton small ops against the torch layers they replace (interpreted on a CPU)."""

from __future__ import annotations

import pytest
import torch

from keel.models.config import RopeConfig
from keel.models.layers.activation import SiluAndMul
from keel.models.layers.norm import RMSNorm
from keel.models.layers.rotary import RotaryEmbedding
from tests.helpers import KERNEL_DEVICE


def test_rms_norm_with_and_without_residual():
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(5, 48, generator=g).to(KERNEL_DEVICE), torch.randn(5, 48, generator=g).to(KERNEL_DEVICE)
    plain, fused = RMSNorm(48, 1e-6).to(KERNEL_DEVICE), RMSNorm(48, 1e-6, fused=True).to(KERNEL_DEVICE)
    weight = (torch.randn(48, generator=g).abs() + 0.5).to(KERNEL_DEVICE)
    plain.weight.data, fused.weight.data = weight, weight.clone()
    torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
    for a, b in zip(fused.add_and_norm(x, residual), plain.add_and_norm(x, residual)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_silu_and_mul():
    x = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)  # > 1 column block
    torch.testing.assert_close(SiluAndMul(fused=True)(x), SiluAndMul()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["default", "llama3"])
def test_rotary_in_place_on_strided_views(kind):
    rope = RopeConfig(theta=500000.0, kind=kind, factor=8.0, original_max_position=64)
    plain = RotaryEmbedding(32, rope, 256).to(KERNEL_DEVICE)
    fused = RotaryEmbedding(32, rope, 256, fused=True).to(KERNEL_DEVICE)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(7, (4 + 2 + 2) * 32, generator=g).to(KERNEL_DEVICE)  # q, k, v side by side, as QKV gives them
    q = qkv[:, :128].reshape(7, 4, 32)
    k = qkv[:, 128:192].reshape(7, 2, 32)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 255], device=KERNEL_DEVICE)
    v_before = qkv[:, 192:].clone()
    want_q, want_k = plain(positions, q.clone(), k.clone())
    got_q, got_k = fused(positions, q, k)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, 192:], v_before)  # rotating q and k in place left v alone
