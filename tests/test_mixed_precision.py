"""Mixed precision on CPU (issue 7, deliverable 2): under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the
model runs in bf16 but the loss-critical tensors (contrastive logits, log-softmax / cross-entropy inputs, the
Barlow Twins covariance, Sinkhorn's exponentials, the LM log-probabilities) are float32 (float64 for Sinkhorn).

Autocast recasts every matmul to bf16 even when its inputs are float32, so a loss that merely upcasts its inputs
still builds bf16 logits; :func:`unilm_vl.losses.precision.full_precision` turns autocast off inside the loss
functions. The dtypes are recorded with a ``TorchFunctionMode`` on the Python-level calls the losses make.

Tolerances: a loss computed under autocast on given features equals the loss computed without autocast on the same
features to 1e-5 (float32 rounding only; bf16 logits at scale 100 were off by ~5e-3). Whole tiny models run in
bf16 differ from their fp32 forward by the bf16 rounding of the activations: within 3% relative for the CLIP loss
and 2% for the Kosmos-2 token NLL (measured: about 0.5% and 0.2%).

fairseq's own switches do not give mixed precision on CPU: ``--bf16`` implies ``--tpu`` (needs torch_xla),
``--fp16`` allocates CUDA buffers, ``--amp`` uses ``torch.cuda.amp`` and is a no-op on CPU (see benchmarks/README.md).
"""

import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from unilm_vl.criterions.clip import ClipCriterion, ClipCriterionConfig
from unilm_vl.criterions.kosmos2_lm import Kosmos2LmCriterion, Kosmos2LmCriterionConfig
from unilm_vl.losses import rocket
from unilm_vl.losses.clip import clip_loss
from unilm_vl.losses.cosa import itc_loss
from unilm_vl.losses.kosmos2 import masked_token_nll
from unilm_vl.losses.negatives import negclip_loss
from unilm_vl.models.clip import ClipConfig, ClipModel
from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

LOW = (torch.bfloat16, torch.float16)
# calls whose OUTPUT is a loss-critical matrix, and calls whose first INPUT is (logits into a softmax)
PRODUCERS = {"__matmul__", "matmul", "mm", "bmm", "__mul__", "__rmul__", "exp", "log_softmax"}
CONSUMERS = {"cross_entropy", "log_softmax", "softmax"}


class DtypeRecorder(TorchFunctionMode):
    """Records ``(name, dtype)`` of producer outputs and consumer inputs of every torch call in its scope."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in CONSUMERS and args and isinstance(args[0], torch.Tensor):
            self.seen.append((f"{name}(input)", args[0].dtype))
        if name in PRODUCERS and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.seen.append((name, out.dtype))
        return out

    def low_precision(self):
        return [(name, dtype) for name, dtype in self.seen if dtype in LOW]


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def features(*shape, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(*shape, generator=g), dim=-1)
    b = F.normalize(a + noise * torch.randn(*shape, generator=g), dim=-1)
    return a, b


def loss_cases():
    img, txt = features(32, 64)
    views_i, views_t = features(2, 32, 64, seed=1)
    scale = torch.tensor(100.0)  # CLIP's maximum: bf16 logits would step by 0.5 near it
    return (
        {
            "clip": lambda i, t: clip_loss(i, t, scale, label_smoothing=0.1)["clip_loss"],
            "cl2l": lambda i, t: rocket.cl2l_loss(
                i, t, scale, views_i.to(i.dtype), views_t.to(i.dtype), scale, label_smoothing=0.1
            )["clip_loss"],
            "swalip": lambda i, t: rocket.swalip_loss(views_i.to(i.dtype), views_t.to(i.dtype), torch.tensor(10.0)),
            "barlow_twins": lambda i, t: rocket.barlow_twins_loss(4 * i, 4 * t),
            "cosa_itc": lambda i, t: itc_loss(i, t, torch.tensor(0.07)),  # 1/0.07: like CLIP's scale
            "negclip": lambda i, t: negclip_loss(i, t, scale, t.roll(1, 0))["clip_loss"],
        },
        img,
        txt,
    )


@pytest.mark.parametrize("name", ["clip", "cl2l", "swalip", "barlow_twins", "cosa_itc", "negclip"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_contrastive_losses_compute_in_fp32_under_bf16_autocast(name, input_dtype):
    cases, img, txt = loss_cases()
    loss_fn = cases[name]
    img, txt = img.to(input_dtype), txt.to(input_dtype)  # bf16: what a bf16 model hands the criterion
    reference = loss_fn(img, txt)  # no autocast: float32 maths on the same inputs
    with bf16_autocast(), DtypeRecorder() as rec:
        loss = loss_fn(img, txt)
    assert loss.dtype == torch.float32
    assert rec.seen, "the recorder saw no matmul/softmax: the check would be vacuous"
    assert rec.low_precision() == []
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)


def test_sinkhorn_exponentials_in_float64_under_autocast():
    scores = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    reference = rocket.sinkhorn_knopp(scores)
    with bf16_autocast(), DtypeRecorder() as rec:
        q = rocket.sinkhorn_knopp(scores)
    assert ("exp", torch.float64) in rec.seen and rec.low_precision() == []
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, reference, atol=0, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(16), atol=1e-5, rtol=0)


def test_masked_token_nll_log_softmax_in_fp32_for_bf16_logits():
    g = torch.Generator().manual_seed(4)
    logits = (8 * torch.randn(2, 5, 50, generator=g)).bfloat16()  # B x T x V, as a bf16 output projection gives
    target = torch.randint(0, 50, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    with bf16_autocast(), DtypeRecorder() as rec:
        nll = masked_token_nll(logits, target, mask)
    assert nll.dtype == torch.float32 and ("log_softmax", torch.float32) in rec.seen
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, target[..., None])[..., 0] * mask
    torch.testing.assert_close(nll.double(), expected, atol=1e-5, rtol=0)


def test_clip_criterion_under_bf16_autocast():
    """The criterion as fairseq's ``--amp`` runs it: model forward and loss under autocast."""
    torch.manual_seed(0)
    model = ClipModel(ClipConfig()).train()
    with torch.no_grad():
        model.towers.clip.logit_scale.fill_(torch.log(torch.tensor(50.0)))
    g = torch.Generator().manual_seed(1)
    sample = {
        "net_input": {
            "image": torch.randn(8, 3, 64, 64, generator=g),
            "text": torch.randint(1, 4000, (8, 32), generator=g),
        },
        "nsentences": 8,
        "ntokens": 128,
    }
    criterion = ClipCriterion(ClipCriterionConfig(), task=None)
    fp32_loss, _, _ = criterion(model, sample)
    with bf16_autocast(), DtypeRecorder() as rec:
        out = model(**sample["net_input"])
        loss, sample_size, log = criterion(model, sample)
    assert out["image_features"].dtype == torch.bfloat16  # the towers really ran in bf16
    assert loss.dtype == torch.float32 and sample_size == 1
    ce_inputs = [dtype for name, dtype in rec.seen if name == "cross_entropy(input)"]
    assert ce_inputs == [torch.float32, torch.float32]
    same_features = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])["clip_loss"]
    assert loss.item() == pytest.approx(same_features.item(), abs=1e-5)
    assert loss.item() == pytest.approx(fp32_loss.item(), rel=3e-2)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)


def test_kosmos2_lm_loss_under_bf16_autocast():
    torch.manual_seed(0)
    model = Kosmos2Module(kosmos2_tiny_config()).train()
    L, V, pad = model.num_image_tokens, model.cfg.decoder.vocab_size, model.cfg.decoder.pad_idx
    g = torch.Generator().manual_seed(2)
    text = torch.randint(10, V, (2, 7), generator=g)
    tokens = torch.cat(
        [torch.tensor([[0, 5]] * 2), torch.arange(6, 6 + L).repeat(2, 1), torch.tensor([[4]] * 2), text], dim=1
    )  # B x T: <s> <image> [L slots] </image> text
    tokens[1, -2:] = pad  # right padding on the second row
    image_mask = torch.zeros_like(tokens, dtype=torch.bool)
    image_mask[:, 2 : 2 + L] = True
    target = torch.cat([tokens[:, 1:], torch.full((2, 1), pad)], dim=1)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 2 + L :] = True  # caption tokens only
    sample = {
        "net_input": {"src_tokens": tokens, "image": torch.randn(2, 3, 32, 32, generator=g), "image_mask": image_mask},
        "target": target,
        "loss_mask": loss_mask,
        "ntokens": int(tokens.ne(pad).sum()),
        "nsentences": 2,
    }
    task = types.SimpleNamespace(target_dictionary=types.SimpleNamespace(pad=lambda: pad))
    criterion = Kosmos2LmCriterion(Kosmos2LmCriterionConfig(), task)
    fp32_loss, fp32_size, _ = criterion(model, sample)
    with bf16_autocast(), DtypeRecorder() as rec:
        logits = model(**sample["net_input"])["lm_logits"]
        loss, sample_size, _ = criterion(model, sample)
    assert logits.dtype == torch.bfloat16  # the output projection ran in bf16 ...
    assert ("log_softmax", torch.float32) in rec.seen  # ... and the log-softmax over V in fp32
    assert loss.dtype == torch.float32 and sample_size == fp32_size == int((loss_mask & target.ne(pad)).sum())
    assert loss.item() / sample_size == pytest.approx(fp32_loss.item() / fp32_size, rel=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_bf16_autocast_training_through_fairseq(tmp_path):
    """``--bf16-autocast``: the first update's loss (same weights) is within 1% of fp32, later ones within 6% (Adam
    at lr 1e-3 amplifies the bf16 forward's differences), none bit-identical (autocast really ran), and the saved
    weights stay fp32."""
    from test_train_e2e import model_state, run, train_args

    from conftest import BIN, write_wds

    write_wds(str(tmp_path / "train" / "part"), 24, 24)
    common = ["--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8", "--num-workers", "0", "--max-update", "3"]
    losses = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16-autocast"])):
        out = run([f"{BIN}/fairseq-train", *train_args(tmp_path, tmp_path / name, *common, *extra)])
        losses[name] = [float(v) for v in re.findall(r"\bloss=([0-9.]+)", out)]  # one per update
    assert len(losses["fp32"]) == len(losses["bf16"]) == 3
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.01)  # same weights: precision only
    assert losses["bf16"][1:] == pytest.approx(losses["fp32"][1:], rel=0.06)  # Adam steps amplify differences
    assert losses["bf16"] != losses["fp32"]
    state = model_state(tmp_path / "bf16" / "checkpoint_last.pt")
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
