"""The contrastive loss on 2 CPU ranks (gloo) against 1 rank on the same global batch, in every
``--gather-gradient`` mode (the table of :mod:`unilm_vl.losses.distributed`), and the data-parallel rank helper
against fairseq's."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unilm_vl.losses.clip import clip_loss
from unilm_vl.losses.distributed import data_parallel_rank_world

from two_ranks import run_ranks

D_IN, D, B, W = 6, 4, 3, 2
MODES = [(False, "full"), (True, "full"), (False, "own"), (True, "own"), (True, "query")]  # (local_loss, gradient)


def encoders():
    g = torch.Generator().manual_seed(0)
    return torch.randn(D, D_IN, generator=g), torch.randn(D, D_IN, generator=g)


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(W * B, D_IN, generator=g), torch.randn(W * B, D_IN, generator=g)


def loss_and_grads(x_img, x_txt, rank=0, world=1, local_loss=False, gradient="full"):
    wi, wt = (w.clone().requires_grad_(True) for w in encoders())
    scale = torch.tensor(2.0, requires_grad=True)
    img = F.normalize(x_img @ wi.T, dim=-1)
    txt = F.normalize(x_txt @ wt.T, dim=-1)
    loss = clip_loss(img, txt, scale, rank, world, local_loss, gradient)["clip_loss"]
    loss.backward()
    return loss.detach(), [wi.grad, wt.grad, scale.grad]


def _worker(rank, out_dir):
    x_img, x_txt = global_batch()
    local = slice(rank * B, (rank + 1) * B)
    results = {}
    for local_loss, gradient in MODES:
        loss, grads = loss_and_grads(x_img[local], x_txt[local], rank, W, local_loss, gradient)
        dist.all_reduce(loss)
        for g in grads:  # what DDP does: average the gradients over ranks
            dist.all_reduce(g)
            g /= W
        results[(local_loss, gradient)] = (loss / W, grads)
    from fairseq.distributed import utils as fairseq_dist

    both = torch.tensor(
        [
            *data_parallel_rank_world(),
            fairseq_dist.get_data_parallel_rank(),
            fairseq_dist.get_data_parallel_world_size(),
        ]
    )  # ours, then fairseq's
    parts = [torch.empty_like(both) for _ in range(W)]
    dist.all_gather(parts, both)
    results["rank_world"] = [p.tolist() for p in parts]
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "dist.pt"))
    dist.barrier()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    run_ranks(_worker, (str(tmp),), world_size=W)
    return torch.load(tmp / "dist.pt")


@pytest.mark.parametrize("mode", MODES)
def test_loss_value_equals_full_batch(two_rank_results, mode):
    full_loss, _ = loss_and_grads(*global_batch())
    assert two_rank_results[mode][0].item() == pytest.approx(full_loss.item(), abs=1e-6)


def test_gradient_semantics_of_each_mode(two_rank_results):
    _, full = loss_and_grads(*global_batch())
    for mode in [(False, "full"), (True, "full")]:  # with-grad gathers: equal to 1-rank gradients
        for g2, g1 in zip(two_rank_results[mode][1], full):
            torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5)
    for g2, g1 in zip(two_rank_results[(False, "own")][1][:2], full[:2]):  # open_clip default: exactly 1/W
        torch.testing.assert_close(g2, g1 / W, atol=1e-6, rtol=1e-5)
    for mode in [(True, "own"), (True, "query")]:  # local rows without the gathered gradient: not proportional
        g2 = two_rank_results[mode][1][0].flatten()
        g1 = full[0].flatten()
        assert torch.dot(g2, g1) / (g2.norm() * g1.norm()) < 0.9999, mode
    _, query = loss_and_grads(*global_batch(), gradient="query")  # query side only, at every world size
    for g2, g1 in zip(two_rank_results[(True, "query")][1], query):
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5)


def test_rank_helper_equals_fairseqs(two_rank_results):
    """The torch.distributed rank / world size the criteria and models use are fairseq's data-parallel ones."""
    assert two_rank_results["rank_world"] == [[0, 2, 0, 2], [1, 2, 1, 2]]
