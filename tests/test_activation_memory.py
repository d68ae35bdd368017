"""``benchmarks/activation_memory.py``: the per-rank FSDP2 model-state formula against hand-computed bytes and
against the storages a real 2-rank FSDP2 + AdamW step allocates (odd dim 0, dim 0 below the rank count, frozen and
0-dim parameters), the all-gather bytes of a unit, and the peak of a sequence of allocator events."""

import os
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from two_ranks import run_ranks

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import activation_memory as am  # noqa: E402  (benchmarks/ is not a package)

# (shape, trainable): a padded dim 0 (5 rows over 2 ranks), a frozen vector, a 0-dim scalar, 1 row over 2 ranks
SHAPES = [((5, 3), True), ((7,), False), ((), True), ((1, 4), True)]


def test_chunk_rows_follow_torch_chunk():
    for dim0 in range(0, 12):
        for ranks in range(1, 6):
            pieces = [c.size(0) for c in torch.arange(dim0).chunk(ranks)] if dim0 else []
            pieces += [0] * (ranks - len(pieces))  # torch.chunk returns fewer pieces; FSDP2 pads with empty ones
            assert [am.chunk_rows(dim0, ranks, r) for r in range(ranks)] == pieces


def test_state_bytes_by_hand():
    # 1 rank (unsharded): weights 4 x (15 + 7 + 1 + 4); gradients 4 x (15 + 1 + 4); AdamW 2 x 4 x numel + 4 per
    # trainable parameter
    assert am.fsdp2_state_bytes(SHAPES, 1) == {"param_bytes": 108, "grad_bytes": 80, "optim_bytes": 124 + 12 + 36}
    # 2 ranks: every rank holds the padded 3 x 3, 4, 1 and 1 x 4 elements of weights (gradients: 3 x 3, 1, 1 x 4);
    # AdamW follows the unpadded rows: rank 0 has rows 3 and 1, rank 1 rows 2 and 0
    assert am.fsdp2_state_bytes(SHAPES, 2, 0) == {"param_bytes": 72, "grad_bytes": 56, "optim_bytes": 76 + 12 + 36}
    assert am.fsdp2_state_bytes(SHAPES, 2, 1) == {"param_bytes": 72, "grad_bytes": 56, "optim_bytes": 52 + 12 + 4}


def test_unit_gather_bytes_pads_dim0_and_skips_scalars():
    # (5, 3) gathers 2 x 3 rows of 3, (7,) 2 x 4 elements, the scalar stays replicated; 2 bytes each (bf16)
    assert am.unit_gather_bytes([(5, 3), (7,), ()], 2, 2) == (18 + 8) * 2
    assert am.unit_gather_bytes([(5, 3)], 1, 4) == 60


def test_peak_increase_in_time_order():
    assert am.peak_increase([(3, -5), (1, 10), (2, -4), (4, 6)]) == 10  # 10, 6, 1, 7
    assert am.peak_increase([(1, 4), (2, -4), (3, 4), (4, 5)]) == 9
    assert am.peak_increase([(0, -3)]) == 0


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(5, 3))
        self.frozen = nn.Parameter(torch.randn(7), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.row = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):  # B x 3
        h = x @ self.a.t()  # B x 5
        return self.scale * (h.sum() + self.frozen.sum()) + (self.row * h[:, :4]).sum()


def _worker(rank, out_dir):
    from unilm_vl import fsdp2

    torch.manual_seed(0)
    model = _Tiny()
    shapes = [(tuple(p.shape), p.requires_grad) for p in model.parameters()]
    _, replicated = fsdp2.shard_module(model, fsdp2.device_mesh(torch.device("cpu")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 3)).backward()
    fsdp2.all_reduce_replicated_grads(replicated)
    optimizer.step()
    torch.save({"measured": am.measure_states(model, optimizer), "shapes": shapes}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_formula_equals_real_fsdp2_storages(tmp_path):
    run_ranks(_worker, (str(tmp_path),), world_size=2)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        computed = am.fsdp2_state_bytes(SHAPES, 2, rank)
        assert out["shapes"] == SHAPES
        assert out["measured"] == computed
        assert am.formula_matches(out["measured"], computed)
    # the two ranks differ only in AdamW's unpadded last shard (rows 3 and 1 on rank 0, 2 and 0 on rank 1)
    assert computed["optim_bytes"] == 52 + 12 + 4
