"""Every config field of every registered unilm_vl task, model, criterion and optimizer has a help string
(STYLE.md 2)."""

import dataclasses

import pytest
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.models import MODEL_DATACLASS_REGISTRY
from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY

import unilm_vl  # noqa: F401


def ours():
    for kind, registry in (
        ("task", TASK_DATACLASS_REGISTRY),
        ("model", MODEL_DATACLASS_REGISTRY),
        ("criterion", CRITERION_DATACLASS_REGISTRY),
        ("optimizer", OPTIMIZER_DATACLASS_REGISTRY),
    ):
        for key, dc in registry.items():
            if dc.__module__.startswith("unilm_vl."):
                yield f"{kind}:{key}", dc


def test_the_foundation_is_registered():
    keys = {name for name, _ in ours()}
    assert {"task:image_text_contrastive", "model:clip", "criterion:clip", "optimizer:open_clip_adamw"} <= keys


@pytest.mark.parametrize("name, dc", list(ours()), ids=[n for n, _ in ours()])
def test_every_field_has_help(name, dc):
    missing = [
        f.name
        for f in dataclasses.fields(dc)
        if not f.name.startswith("_") and not str(f.metadata.get("help", "")).strip()
    ]
    assert not missing, f"{name}: fields without help: {missing}"
