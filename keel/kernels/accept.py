"""Greedy acceptance of draft chains in one launch.

keel.spec.verify decides, per drafted request, how many draft tokens the target's argmax confirms and which
token follows them. In torch that is ~30 small kernels over [requests, drafts] tensors, each costing more host
time to launch than device time to run; at batch 1 the host is the bottleneck of a speculative round
(docs/speculative.md). This kernel does a request per program: the same arithmetic, the same outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from keel.kernels.noise import _row_key, _uniform

ACCEPT_KEY = 0xFFFFFFFF  # keel.spec.verify's: the "token id" keying each position's accept draw


@triton.jit
def _accept_chain_kernel(argmax_ptr, starts_ptr, num_draft_ptr, drafts_ptr, seeds_ptr, steps_ptr, row_tokens_ptr,
                         counts_ptr, num_columns, stride_d, whole, frac, KEY: tl.constexpr, SIMULATE: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    part = tl.program_id(0)
    start = tl.load(starts_ptr + part)
    num_draft = tl.load(num_draft_ptr + part)
    j = tl.arange(0, BLOCK_D)
    is_draft = j < num_draft
    # (rows past the accepted token are junk, as in torch: the draft columns, then 0)
    drafts = tl.load(drafts_ptr + part * stride_d + j, mask=j < num_columns, other=0)
    target = tl.load(argmax_ptr + start + j, mask=j <= num_draft, other=0)
    # the leading drafts equal to the target's argmax at the row before them
    accepted = tl.min(tl.where(is_draft & (drafts == target), BLOCK_D, j), 0)
    if SIMULATE:  # whole + 1 drafts with probability frac, keyed as the sampler's draws are
        u = _uniform(_row_key(tl.load(seeds_ptr + start), tl.load(steps_ptr + start)),
                     tl.full((), KEY, tl.int64))
        accepted = tl.minimum(num_draft, whole + (u < frac).to(tl.int64))
    final = tl.sum(tl.where(j == accepted, target, 0), 0)
    tl.store(row_tokens_ptr + start + j, tl.where(j == accepted, final, drafts), mask=j <= num_draft)
    tl.store(counts_ptr + part, accepted + 1)


def accept_chains(argmax: torch.Tensor, starts: torch.Tensor, num_draft: torch.Tensor, drafts: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor, simulate_mean: Optional[float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification of chains (keel.spec.verify.verify's rule): argmax [rows] int64, the target's per
    logits row; part i's rows start at starts[i], one for its last token and one per draft; drafts [parts, K];
    seeds, steps [rows]. With `simulate_mean` (KEEL_SIMULATE_ACCEPT_LEN - 1), the accepted count is drawn instead.
    Returns (row_tokens [rows]: part i emits row_tokens[starts[i] + j] for j < counts[i], counts [parts])."""
    parts, k = drafts.shape
    row_tokens = torch.empty_like(argmax)
    counts = torch.empty(parts, dtype=torch.int64, device=argmax.device)
    if parts:
        whole = int(simulate_mean or 0.0)
        frac = (simulate_mean or 0.0) - whole
        _accept_chain_kernel[(parts,)](argmax, starts, num_draft, drafts, seeds.to(torch.int64),
                                       steps.to(torch.int64), row_tokens, counts, k, drafts.stride(0), whole, frac,
                                       KEY=ACCEPT_KEY, SIMULATE=simulate_mean is not None,
                                       BLOCK_D=triton.next_power_of_2(k + 1), num_warps=1)
    return row_tokens, counts
