"""``--gather-gradient``: one vocabulary for every criterion (table in :mod:`unilm_vl.losses.distributed`).

Every criterion takes each value and hands it to its loss; the deprecated spellings (``--gather-with-grad``,
``--gather-gradient reference``, ``--itc-gather-gradient``) resolve to the value that reproduces them, warn once per
process, and give bit-identical losses and gradients to the new spelling; contradicting spellings are refused. One
process: ``full`` and ``own`` are the same maths there (the own slot is the whole batch), ``query`` detaches the
gathered columns, so it keeps the loss value and changes the gradient. The distributed meaning of each value is
tested on 2 ranks in test_distributed_loss.py, test_distributed_rocket.py, test_cosmos_losses.py,
test_negatives_losses.py and test_cosa_losses.py.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unilm_vl.criterions import _gathering
from unilm_vl.criterions.barlip import BarlipCriterion, BarlipCriterionConfig
from unilm_vl.criterions.byolip import ByolipCriterion, ByolipCriterionConfig
from unilm_vl.criterions.clip import ClipCriterion, ClipCriterionConfig
from unilm_vl.criterions.clip_rocket import ClipRocketCriterion, ClipRocketCriterionConfig
from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig
from unilm_vl.criterions.cosmos import CosmosCriterion, CosmosCriterionConfig
from unilm_vl.criterions.fsc_clip import FscClipCriterion, FscClipCriterionConfig
from unilm_vl.criterions.negclip import NegclipCriterion, NegclipCriterionConfig
from unilm_vl.criterions.siamlip import SiamlipCriterion, SiamlipCriterionConfig
from unilm_vl.criterions.swalip import SwalipCriterion, SwalipCriterionConfig
from unilm_vl.losses.distributed import GATHER_GRADIENTS

B, D_IN, D = 4, 6, 5


class FakeTowers(nn.Module):
    """Linear 'encoders' with every output key the contrastive criteria read (COSMOS: V = 2 image views, K = 2
    caption views, the teacher a detached copy; COSA: the ``origin`` pass of ``ret``)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wi = nn.Parameter(torch.randn(D, D_IN, generator=g))
        self.wt = nn.Parameter(torch.randn(D, D_IN, generator=g))
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image, text, **unused):
        img, txt = F.normalize(image @ self.wi.T, dim=-1), F.normalize(text @ self.wt.T, dim=-1)  # B x D
        views_i, views_t = torch.stack([img, img.flip(0)]), torch.stack([txt, txt.roll(1, 0)])  # 2 x B x D
        scale = self.log_scale.exp()
        return {
            "image_features": img,
            "text_features": txt,
            "logit_scale": scale,
            # cosmos
            "image_cross": views_i,
            "text_cross": views_t,
            "teacher_image_features": views_i.detach(),
            "teacher_text_features": views_t.detach(),
            "distill_logit_scale": scale,
            "num_global_crops": 1,
            # cosa
            "origin": {
                "video_features": img,
                "text_features": txt,
                "itm_logits": img[:, :2] * 3,
                "itm_labels": torch.tensor([1, 0, 0, 1]),
            },
            "contra_temp": 1 / scale,
            "rank": 0,
            "world_size": 1,
        }


def cosmos_forward_views(out):
    """The cosmos criterion reads V x B x D student features."""
    return {**out, "image_features": out["image_cross"], "text_features": out["text_cross"]}


class FakeCosmos(FakeTowers):
    def forward(self, image, text, **unused):
        return cosmos_forward_views(super().forward(image, text))


def sample():
    g = torch.Generator().manual_seed(1)
    return {
        "net_input": {"image": torch.randn(B, D_IN, generator=g), "text": torch.randn(B, D_IN, generator=g)},
        "nsentences": B,
        "ntokens": B,
    }


CRITERIA = {  # name: (criterion, config, model with the outputs it reads)
    "clip": (ClipCriterion, ClipCriterionConfig, FakeTowers),
    "cosmos": (CosmosCriterion, CosmosCriterionConfig, FakeCosmos),
    "negclip": (NegclipCriterion, NegclipCriterionConfig, FakeTowers),
    "fsc_clip": (FscClipCriterion, FscClipCriterionConfig, FakeTowers),
    "clip_rocket": (ClipRocketCriterion, ClipRocketCriterionConfig, FakeTowers),
    "cosa": (CosaCriterion, lambda **kw: CosaCriterionConfig(cosa_tasks="ret", **kw), FakeTowers),
}
CONFIG_ONLY = {
    "siamlip": (SiamlipCriterion, SiamlipCriterionConfig),
    "byolip": (ByolipCriterion, ByolipCriterionConfig),
    "barlip": (BarlipCriterion, BarlipCriterionConfig),
    "swalip": (SwalipCriterion, SwalipCriterionConfig),
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_gathering, "_warned", set())


def loss_and_grads(name, **cfg):
    criterion_cls, config_cls, model_cls = CRITERIA[name]
    model = model_cls().train()
    loss, sample_size, log = criterion_cls(config_cls(**cfg), None)(model, sample())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", [*CRITERIA, *CONFIG_ONLY])
@pytest.mark.parametrize("value", GATHER_GRADIENTS)
def test_every_criterion_takes_every_value(name, value):
    criterion_cls, config_cls = (CRITERIA[name] if name in CRITERIA else CONFIG_ONLY[name])[:2]
    assert criterion_cls(config_cls(gather_gradient=value), None).gather_gradient == value


@pytest.mark.parametrize("name", CRITERIA)
def test_one_process_full_and_own_are_equal_and_query_detaches_the_columns(name):
    full_loss, full_grads = loss_and_grads(name, gather_gradient="full")
    own_loss, own_grads = loss_and_grads(name, gather_gradient="own")
    query_loss, query_grads = loss_and_grads(name, gather_gradient="query")
    assert torch.equal(own_loss, full_loss) and all(torch.equal(a, b) for a, b in zip(own_grads, full_grads))
    assert query_loss.item() == pytest.approx(full_loss.item(), abs=1e-6)  # the value never depends on the mode
    assert not torch.allclose(query_grads[0], full_grads[0], atol=1e-6)  # the key side lost its gradient


OLD_SPELLINGS = [  # (criterion, old config fields, the new value they mean, the spelling warned about)
    ("clip", {"gather_with_grad": False}, "own", "--gather-with-grad"),
    ("clip", {"gather_with_grad": False, "local_loss": True}, "query", "--gather-with-grad"),
    ("cosmos", {"gather_with_grad": False}, "own", "--gather-with-grad"),
    ("negclip", {"gather_with_grad": False}, "own", "--gather-with-grad"),
    ("fsc_clip", {"gather_with_grad": False, "local_loss": True}, "query", "--gather-with-grad"),
    ("clip_rocket", {"gather_gradient": "reference"}, "query", "--gather-gradient reference"),
    ("cosa", {"itc_gather_gradient": "reference"}, "query", "--itc-gather-gradient"),
    ("cosa", {"itc_gather_gradient": "full"}, "full", "--itc-gather-gradient"),
]


@pytest.mark.parametrize("name,old,new,spelling", OLD_SPELLINGS)
def test_deprecated_spellings_equal_the_new_flag_and_warn_once(name, old, new, spelling, caplog):
    criterion_cls, config_cls, _ = CRITERIA[name]
    with caplog.at_level(logging.WARNING, logger=_gathering.__name__):
        for _ in range(2):
            assert criterion_cls(config_cls(**old), None).gather_gradient == new
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{spelling} is deprecated: use --gather-gradient")
    local = {"local_loss": True} if old.get("local_loss") else {}
    old_loss, old_grads = loss_and_grads(name, **old)
    new_loss, new_grads = loss_and_grads(name, gather_gradient=new, **local)
    assert torch.equal(old_loss, new_loss) and all(torch.equal(a, b) for a, b in zip(old_grads, new_grads))


def test_contradicting_spellings_are_refused():
    with pytest.raises(
        ValueError, match="--gather-with-grad means --gather-gradient own, which contradicts --gather-gradient query"
    ):
        ClipCriterion(ClipCriterionConfig(gather_with_grad=False, gather_gradient="query"), None)
    with pytest.raises(ValueError, match="--itc-gather-gradient reference means --gather-gradient query"):
        CosaCriterion(CosaCriterionConfig(itc_gather_gradient="reference", gather_gradient="own"), None)
    # agreeing spellings are accepted
    assert (
        ClipCriterion(ClipCriterionConfig(gather_with_grad=False, gather_gradient="own"), None).gather_gradient == "own"
    )
