"""clip-rocket losses on 2 CPU ranks (gloo) against 1 rank on the same global batch.

Each loss is computed from the outputs of small linear encoders so that gradients can be compared: with the
default ``gradient="full"`` the rank-averaged gradients (what DDP and fairseq apply) equal the 1-rank full-batch
gradients; the reference's detached gathers are ``gradient="query"`` (query-side gradients, equal to one process in
the same mode) and its in-place all-reduce ``own`` (1/W of the full gradient; ``query`` keeps it).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unilm_vl.losses import rocket as fn

from two_ranks import run_ranks

D_IN, D, B, W, A = 6, 4, 3, 2, 2
LOSSES = ["cl2l", "barlip", "siamlip", "swalip"]
GRADIENTS = ["full", "own", "query"]


def weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, D_IN, generator=g) for _ in range(2)] + [torch.randn(D, D, generator=g) for _ in range(2)]


def global_batch():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(W * B, D_IN, generator=g),
        torch.randn(W * B, D_IN, generator=g),
        torch.randn(A, W * B, D_IN, generator=g),
        torch.randn(A, W * B, D_IN, generator=g),
    )


def loss_and_grads(name, x_img, x_txt, x_iv, x_tv, rank=0, world=1, gradient="full"):
    params = [w.clone().requires_grad_(True) for w in weights()]
    wi, wt, pi, pt = params
    scale = torch.tensor(2.0, requires_grad=True)
    img, txt = x_img @ wi.T, x_txt @ wt.T
    iv, tv = x_iv @ wi.T, x_tv @ wt.T  # A x B x D
    if name == "cl2l":
        loss = fn.cl2l_loss(
            F.normalize(img, dim=-1),
            F.normalize(txt, dim=-1),
            scale,
            F.normalize(iv, dim=-1),
            F.normalize(tv, dim=-1),
            2 * scale,
            label_smoothing=0.1,
            reduction="sum",
            rank=rank,
            world_size=world,
            gradient=gradient,
        )["clip_loss"]
    elif name == "barlip":
        loss = fn.barlip_loss(img, txt, iv, tv, world_size=world, gradient=gradient)
    elif name == "siamlip":
        loss = fn.siamlip_loss(img @ pi.T, txt @ pt.T, img, txt, iv @ pi.T, tv @ pt.T, iv, tv)
    else:
        loss = fn.swalip_loss(
            F.normalize(iv, dim=-1), F.normalize(tv, dim=-1), scale, rank=rank, world_size=world, gradient=gradient
        )
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params + [scale]]
    return loss.detach(), grads


def _worker(rank, out_dir):
    x_img, x_txt, x_iv, x_tv = global_batch()
    local = slice(rank * B, (rank + 1) * B)
    results = {}
    for name in LOSSES:
        for gradient in GRADIENTS:
            loss, grads = loss_and_grads(
                name, x_img[local], x_txt[local], x_iv[:, local], x_tv[:, local], rank, W, gradient
            )
            dist.all_reduce(loss)
            for g in grads:  # what DDP does: average the gradients over ranks
                dist.all_reduce(g)
                g /= W
            results[(name, gradient)] = (loss / W, grads)
    scores = torch.randn(W * B, 5, generator=torch.Generator().manual_seed(7))
    q = fn.sinkhorn_knopp(scores[local], world_size=W)
    parts = [torch.empty_like(q) for _ in range(W)]
    dist.all_gather(parts, q)
    results["sinkhorn"] = torch.cat(parts)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "dist.pt"))
    dist.barrier()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_rocket")
    run_ranks(_worker, (str(tmp),), world_size=W)
    return torch.load(tmp / "dist.pt")


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_loss_value_equals_full_batch(two_rank_results, name, gradient):
    full_loss, _ = loss_and_grads(name, *global_batch())
    assert two_rank_results[(name, gradient)][0].item() == pytest.approx(full_loss.item(), abs=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_full_gradient_mode_equals_one_rank_gradients(two_rank_results, name):
    _, full = loss_and_grads(name, *global_batch())
    for g2, g1 in zip(two_rank_results[(name, "full")][1], full):
        torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gradient", ["own", "query"])
def test_in_place_all_reduce_gives_one_over_w_of_the_gradient(two_rank_results, gradient):
    _, full = loss_and_grads("barlip", *global_batch())
    for g2, g1 in zip(two_rank_results[("barlip", gradient)][1][:2], full[:2]):
        torch.testing.assert_close(g2, g1 / W, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["cl2l", "swalip"])
def test_detached_gathers_give_query_side_gradients(two_rank_results, name):
    """``query``: equal to one process on the global batch in the same mode; ``own`` and ``query`` are not
    proportional to the full gradient."""
    _, full = loss_and_grads(name, *global_batch())
    _, query = loss_and_grads(name, *global_batch(), gradient="query")
    for g2, g1 in zip(two_rank_results[(name, "query")][1], query):
        torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
    for gradient in ("own", "query"):
        g2 = two_rank_results[(name, gradient)][1][0].flatten()
        g1 = full[0].flatten()
        assert torch.dot(g2, g1) / (g2.norm() * g1.norm()) < 0.9999, gradient


def test_sinkhorn_with_all_reduced_sums_equals_concatenated_batch(two_rank_results):
    scores = torch.randn(W * B, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(two_rank_results["sinkhorn"], fn.sinkhorn_knopp(scores), atol=1e-6, rtol=1e-5)


def _momentum_worker(rank, out_dir):
    """Two ranks train the BYOLIP tiny model a few steps on different data, with DDP-style gradient averaging."""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    from unilm_vl.criterions.byolip import ByolipCriterion, ByolipCriterionConfig
    from unilm_vl.models.clip_rocket import ClipRocketModel, ClipRocketModelConfig

    torch.manual_seed(0)  # same initial weights on both ranks, as DDP's broadcast gives
    args = Namespace(momentum_tau=0.5)
    ARCH_CONFIG_REGISTRY["clip_rocket_byolip_tiny"](args)
    model = ClipRocketModel(ClipRocketModelConfig(**vars(args))).train()
    criterion = ByolipCriterion(ByolipCriterionConfig(), None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different local batches
    for step in range(2):
        sample = {
            "net_input": {
                "image": torch.randn(4, 3, 64, 64, generator=g),
                "text": torch.randint(1, 4000, (4, 32), generator=g),
                "image_views": torch.randn(2, 4, 3, 64, 64, generator=g),
                "text_views": torch.randint(1, 4000, (2, 4, 32), generator=g),
            },
            "nsentences": 4,
            "ntokens": 128,
        }
        optimizer.zero_grad()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= W
        optimizer.step()
        model.after_optimizer_step(step + 1)
    flat = torch.cat([p.detach().flatten() for p in model.net.momentum_net.parameters()])
    parts = [torch.empty_like(flat) for _ in range(W)]
    dist.all_gather(parts, flat)
    online = torch.cat([p.detach().flatten() for _, p in model.net.online_parameters()])
    if rank == 0:
        torch.save({"momentum": parts, "online": online}, os.path.join(out_dir, "momentum.pt"))
    dist.barrier()


def test_momentum_copies_stay_identical_across_ranks(tmp_path):
    run_ranks(_momentum_worker, (str(tmp_path),), world_size=W)
    result = torch.load(tmp_path / "momentum.pt")
    rank0, rank1 = result["momentum"]
    torch.testing.assert_close(rank1, rank0, atol=0, rtol=0)
    assert not torch.equal(rank0, result["online"])  # the copy lags the online model (tau 0.5, 2 steps)
