"""Shared assertions: a module's state_dict before and after an operation."""
import torch


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"
