"""fairseq's mixed-precision paths through the real trainer on CPU, every family (unilm_vl.trainer's CPU shims make
the code that runs on GPUs run here): ``--fp16`` (``FP16Optimizer``: fp16 weights, fp32 master copy),
``--memory-efficient-fp16`` (``MemoryEfficientFP16Optimizer``), ``--amp`` (fp16 autocast, ``GradScaler``),
``--bf16-autocast`` and FSDP2's bf16 policy. Each trains K updates with finite losses within the half-precision
rounding of the fp32 run; an fp16 gradient overflow skips the update (weights and update count unchanged) and
halves the loss scale, as fairseq's ``DynamicLossScaler`` specifies."""

import math

import pytest
import torch

from families import FAMILIES, family_args, write_family_data
from trainer_harness import build_trainer, end_process_group, parameters, train_updates

UPDATES = 2
# Adam (every fp16 wrapper supports it) with a large epsilon: its first steps are then ~ lr * g, linear in the
# gradient like SGD, instead of ~ lr * sign(g), which flips with the rounding of near-zero gradients
ADAM = ("--optimizer", "adam", "--lr", "1e-2", "--adam-eps", "1.0")
VARIANTS = {  # fp16 starts its loss scale at 16, where no family's gradients overflow (at fairseq's 128 BYOLIP's do)
    "fp16": ("--fp16", "--fp16-init-scale", "16"),
    "memory_efficient_fp16": ("--memory-efficient-fp16", "--fp16-init-scale", "16"),
    "amp": ("--amp",),
    "bf16_autocast": ("--bf16-autocast",),
    "fsdp2_bf16": ("--fsdp2", "--fsdp2-precision", "bf16"),
}
# relative tolerance of the first loss (the forward pass) against fp32: bf16 keeps 8 mantissa bits (2^-8 = 0.4% per
# rounding, compounding over the layers), fp16 keeps 11. After updates the runs drift apart by more than that on
# these 4-sample batches (BYOLIP's BatchNorm and its momentum copy amplify rounding most): later losses within
# LATER, and the weight updates of fp32-weight variants within UPDATE of the fp32 updates (relative L2)
TOLERANCE = {"fp16": 0.01, "memory_efficient_fp16": 0.01, "amp": 0.01, "bf16_autocast": 0.03, "fsdp2_bf16": 0.03}
LATER = 0.1
UPDATE = {"amp": 0.05, "bf16_autocast": 0.15, "fsdp2_bf16": 0.15}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision")
    write_family_data(str(path))
    return path


@pytest.fixture(scope="module")
def fp32_run(root, tmp_path_factory):
    """``family -> (losses, initial weights, weights after the updates)`` of the fp32 run."""
    cache = {}

    def get(family):
        if family not in cache:
            trainer, itr = build_trainer(
                family_args(family, str(root), str(tmp_path_factory.mktemp(family)), *ADAM, batch_size=4)
            )
            start = parameters(trainer)
            losses = [o["loss"] for o in train_updates(trainer, itr, UPDATES)]
            cache[family] = (losses, start, parameters(trainer))
        return cache[family]

    return get


def update_error(start, ref, got):
    """||delta_got - delta_ref|| / ||delta_ref|| over all trained tensors (delta = weights after - before)."""
    num = den = 0.0
    for key, s in start.items():
        d_ref = ref[key].double() - s.double()
        if not s.is_floating_point() or not bool(d_ref.abs().sum() > 0):
            continue
        num += float(((got[key].double() - s.double()) - d_ref).pow(2).sum())
        den += float(d_ref.pow(2).sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_trains_close_to_fp32(root, tmp_path, fp32_run, family, variant):
    reference, start, ref_weights = fp32_run(family)
    try:
        trainer, itr = build_trainer(
            family_args(family, str(root), str(tmp_path), *ADAM, *VARIANTS[variant], batch_size=4)
        )
        outputs = train_updates(trainer, itr, UPDATES)
        assert all(o is not None for o in outputs), "an update overflowed at the default loss scale"
        losses = [o["loss"] for o in outputs]
        assert all(math.isfinite(v) for v in losses), losses
        assert losses[0] == pytest.approx(reference[0], rel=TOLERANCE[variant]), (losses, reference)
        assert losses == pytest.approx(reference, rel=LATER), (losses, reference)
        assert trainer.get_num_updates() == UPDATES
        if variant not in ("fp16", "memory_efficient_fp16"):  # fp32 weights: the updates themselves are close
            assert update_error(start, ref_weights, parameters(trainer)) < UPDATE[variant]
        if variant in ("fp16", "memory_efficient_fp16"):
            assert {p.dtype for p in trainer.get_model().parameters()} == {torch.float16}
            assert trainer.optimizer.scaler.loss_scale == 16  # no overflow
        else:
            assert {p.dtype for p in trainer.get_model().parameters()} == {torch.float32}
    finally:
        end_process_group()


@pytest.mark.parametrize("flag", ["--fp16", "--memory-efficient-fp16"])
def test_fp16_overflow_skips_the_update_and_halves_the_scale(root, tmp_path, flag):
    """A loss scale of 2^30 overflows fp16 gradients: the update is skipped (weights and update count unchanged,
    nothing logged) and the scale halves; at 2^13 the next batch's update goes through."""
    trainer, itr = build_trainer(
        family_args("clip", str(root), str(tmp_path), *ADAM, flag, "--fp16-init-scale", str(2**30), batch_size=4)
    )
    before = parameters(trainer)
    epoch = itr.next_epoch_itr(shuffle=True)
    assert trainer.train_step([next(epoch)]) is None
    assert trainer.optimizer.scaler.loss_scale == 2**29 and trainer.get_num_updates() == 0
    after = parameters(trainer)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    trainer.optimizer.scaler.loss_scale = 2**13
    out = trainer.train_step([next(epoch)])
    assert out is not None and math.isfinite(out["loss"]) and trainer.get_num_updates() == 1
    assert trainer.optimizer.scaler.loss_scale == 2**13
    assert any(not torch.equal(before[k], v) for k, v in parameters(trainer).items())


def test_amp_overflow_skips_the_step_and_lowers_the_scale(root, tmp_path):
    """``--amp`` on CPU: torch's GradScaler finds the inf gradients, skips the optimizer step and halves its scale
    (fairseq then retries the batch, ``--amp-batch-retries``)."""
    trainer, itr = build_trainer(
        family_args(
            "clip",
            str(root),
            str(tmp_path),
            *ADAM,
            "--amp",
            "--fp16-init-scale",
            str(2**30),
            "--amp-batch-retries",
            "0",
            batch_size=4,
        )
    )
    scaler = trainer.optimizer._grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    before = parameters(trainer)
    epoch = itr.next_epoch_itr(shuffle=True)
    trainer.train_step([next(epoch)])
    assert scaler.get_scale() < 2**30
    assert trainer.get_num_updates() == 0
    for key, value in parameters(trainer).items():
        assert torch.equal(before[key], value), key
