"""The guard switches themselves."""

import pytest
import torch

from keel.debug.guards import DISABLE_ENV, disabled_guards, guard_on
from keel.runner.cuda_graph import write_all_rows


def test_unknown_guard_names_are_refused(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "bounded-write, no-such-guard")
    with pytest.raises(ValueError, match="no-such-guard"):
        disabled_guards()


def test_a_guard_switches_off_for_one_test(monkeypatch):
    assert guard_on("bounded-write")
    monkeypatch.setenv(DISABLE_ENV, "bounded-write")
    assert not guard_on("bounded-write") and guard_on("optional-explicit")
    static = torch.full((8,), 9)
    write_all_rows([(static, torch.tensor([5, 6]), 0)], size=4)
    assert static.tolist() == [5, 6, 9, 9, 9, 9, 9, 9]  # off: padded rows keep the last replay's values
