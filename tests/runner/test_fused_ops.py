"""The fused Triton small ops against the torch layers they replace (interpreted on a CPU)."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.rotary import rotate_and_store
from keel.models.config import RopeConfig
from keel.models.layers.activation import SiluAndMul
from keel.models.layers.norm import RMSNorm
from keel.models.layers.rotary import RotaryEmbedding
from tests.helpers import KERNEL_DEVICE


def test_rms_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=g).to(KERNEL_DEVICE)
    plain, fused = RMSNorm(48, 1e-6).to(KERNEL_DEVICE), RMSNorm(48, 1e-6, fused=True).to(KERNEL_DEVICE)
    weight = (torch.randn(48, generator=g).abs() + 0.5).to(KERNEL_DEVICE)
    plain.weight.data, fused.weight.data = weight, weight.clone()
    torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)


def test_silu_and_mul():
    x = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)  # > 1 column block
    torch.testing.assert_close(SiluAndMul(fused=True)(x), SiluAndMul()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["default", "llama3"])
def test_rotate_and_store_matches_the_reference_rotation(kind):
    rope = RopeConfig(theta=500000.0, kind=kind, factor=8.0, original_max_position=64)
    rotary = RotaryEmbedding(32, rope, 256).to(KERNEL_DEVICE)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(7, (4 + 2 + 2) * 32, generator=g).to(KERNEL_DEVICE)  # q, k, v side by side, as QKV gives them
    q = qkv[:, :128].reshape(7, 4, 32)
    k = qkv[:, 128:192].reshape(7, 2, 32)
    v = qkv[:, 192:].reshape(7, 2, 32)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 255], device=KERNEL_DEVICE)
    loc = torch.tensor([9, 3, 0, 4, 8, 1, 6], device=KERNEL_DEVICE)
    k_cache, v_cache = torch.zeros(10, 2, 32, device=KERNEL_DEVICE), torch.zeros(10, 2, 32, device=KERNEL_DEVICE)
    want_q, want_k = rotary(positions, q.clone(), k.clone())
    k_before = k.clone()
    rotate_and_store(q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, loc)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)  # rotated in place
    torch.testing.assert_close(k_cache[loc], want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(v_cache[loc], v) and torch.equal(k, k_before)  # k itself is left as it was
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[loc.cpu()] = False
    assert (k_cache[untouched.to(KERNEL_DEVICE)] == 0).all() and (v_cache[untouched.to(KERNEL_DEVICE)] == 0).all()


def test_rotate_and_store_normalises_each_head_first():
    """Qwen3's q_norm / k_norm fused into the rotation: as the RMSNorm layers, then the rotation."""
    rotary = RotaryEmbedding(32, RopeConfig(theta=10000.0), 64).to(KERNEL_DEVICE)
    g = torch.Generator().manual_seed(3)
    q = (3 * torch.randn(5, 4, 32, generator=g)).to(KERNEL_DEVICE)
    k, v = torch.randn(5, 2, 32, generator=g).to(KERNEL_DEVICE), torch.randn(5, 2, 32, generator=g).to(KERNEL_DEVICE)
    q_norm, k_norm = RMSNorm(32, 1e-6).to(KERNEL_DEVICE), RMSNorm(32, 1e-6).to(KERNEL_DEVICE)
    q_norm.weight.data = (torch.randn(32, generator=g).abs() + 0.5).to(KERNEL_DEVICE)
    k_norm.weight.data = (torch.randn(32, generator=g).abs() + 0.5).to(KERNEL_DEVICE)
    positions, loc = torch.tensor([0, 3, 7, 20, 63], device=KERNEL_DEVICE), torch.arange(5, device=KERNEL_DEVICE)
    k_cache, v_cache = torch.zeros(5, 2, 32, device=KERNEL_DEVICE), torch.zeros(5, 2, 32, device=KERNEL_DEVICE)
    want_q, want_k = rotary(positions, q_norm(q), k_norm(k))
    rotate_and_store(q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, loc,
                     (q_norm.weight, k_norm.weight, 1e-6))
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, want_k, atol=1e-5, rtol=1e-5)
