"""The chain acceptance kernel against the verifier's torch rule (interpreted on a CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.accept import accept_chains
from keel.runner.sampler import SamplingBatch
from keel.spec import SIMULATE_ACCEPT_ENV
from keel.spec.verify import verify
from tests.helpers import KERNEL_DEVICE


def _greedy_rows(n: int, g: torch.Generator) -> SamplingBatch:
    return SamplingBatch(greedy=torch.ones(n, dtype=torch.bool), temperatures=torch.ones(n),
                         top_ks=torch.full((n,), 50), top_ps=torch.ones(n), min_ps=torch.zeros(n),
                         seeds=torch.randint(0, 2**62, (n,), generator=g),
                         steps=torch.randint(0, 500, (n,), generator=g),
                         penalties=None, all_greedy=True, needs_filter=False, num_top_logprobs=0, wants_logprobs=False)


@pytest.mark.parametrize("simulate", [None, "1", "2.5", "4"])
def test_accept_chains_is_the_torch_rule(simulate, monkeypatch):
    g = torch.Generator().manual_seed(11)
    k, vocab = 3, 50
    num_draft = torch.tensor([0, 3, 1, 3, 2, 3, 3])
    starts = torch.cumsum(1 + num_draft, 0) - 1 - num_draft
    rows = int((1 + num_draft).sum())
    logits = torch.randn(rows, vocab, generator=g)
    argmax = logits.argmax(dim=-1)
    drafts = torch.randint(0, vocab, (len(num_draft), k), generator=g)
    for part, matching in enumerate([0, 3, 1, 1, 2, 0, 2]):  # drafts that agree with the target's argmax
        drafts[part, :matching] = argmax[starts[part]:starts[part] + matching]
    batch = _greedy_rows(rows, g)
    if simulate is not None:
        monkeypatch.setenv(SIMULATE_ACCEPT_ENV, simulate)
    want = verify(logits, batch, starts, num_draft, drafts, None)  # on the CPU: the torch rule
    dev = KERNEL_DEVICE
    tokens, counts = accept_chains(argmax.to(dev), starts.to(dev), num_draft.to(dev), drafts.to(dev),
                                   batch.seeds.to(dev), batch.steps.to(dev),
                                   None if simulate is None else float(simulate) - 1.0)
    assert torch.equal(counts.cpu(), want.counts)
    assert torch.equal(tokens.cpu(), want.row_tokens)
    if simulate is None:
        assert counts.tolist() == [1, 4, 2, 2, 3, 1, 3]
