"""The geometry handshake of the task base class: ``build_model`` reads the model's image size, normalisation,
text context length and image slots once (:class:`ModelGeometry`) and every task builds its transforms from it."""

from argparse import Namespace

import open_clip
import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY
from PIL import Image

from unilm_vl.data import build_vocab
from unilm_vl.tasks._base import ModelGeometry
from unilm_vl.tasks.image_text_contrastive import ImageTextContrastiveConfig, ImageTextContrastiveTask
from unilm_vl.tasks.kosmos2 import Kosmos2Config, Kosmos2Task

OPENAI_MEAN, OPENAI_STD = tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


def arch_args(arch, model, **overrides):
    args = Namespace(arch=arch, _name=model, **overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def test_model_geometry_reads_what_the_model_exposes():
    model = Namespace(image_size=96, image_mean=[0.5, 0.25, 0.125], image_std=(1.0, 2.0, 4.0), context_length=77)
    assert ModelGeometry.of(model) == ModelGeometry(96, (0.5, 0.25, 0.125), (1.0, 2.0, 4.0), 77, None)
    model = Namespace(image_size=64, image_mean=(0.0,) * 3, image_std=(1.0,) * 3, num_image_tokens=16)
    assert ModelGeometry.of(model) == ModelGeometry(64, (0.0,) * 3, (1.0,) * 3, None, 16)


def test_model_geometry_names_what_is_missing():
    class TextOnly:
        image_size = 64

    with pytest.raises(TypeError, match="TextOnly does not expose image_mean, image_std"):
        ModelGeometry.of(TextOnly())


def test_contrastive_task_takes_geometry_and_context_length_from_the_model():
    task = ImageTextContrastiveTask(ImageTextContrastiveConfig(seed=1))
    with pytest.raises(RuntimeError, match="build the model before loading data"):
        task.build_stages("train")
    torch.manual_seed(0)
    task.build_model(arch_args("clip_tiny", "clip"))
    # clip_tiny: 64 px open_clip towers with OpenAI CLIP's normalisation and 32 text positions
    assert (task.image_size, task.image_mean, task.image_std, task.context_length) == (64, OPENAI_MEAN, OPENAI_STD, 32)
    image = task.image_transform(train=False)(Image.new("RGB", (80, 40), (255, 0, 0)))
    assert image.shape == (3, 64, 64)
    torch.testing.assert_close(
        image[:, 32, 32],
        torch.tensor(
            [(1 - OPENAI_MEAN[0]) / OPENAI_STD[0], -OPENAI_MEAN[1] / OPENAI_STD[1], -OPENAI_MEAN[2] / OPENAI_STD[2]]
        ),
    )

    shorter = ImageTextContrastiveTask(ImageTextContrastiveConfig(seed=1, context_length=16))
    shorter.set_geometry(ModelGeometry(64, OPENAI_MEAN, OPENAI_STD, context_length=32))
    assert shorter.context_length == 16  # --context-length below the tower's positions is kept
    longer = ImageTextContrastiveTask(ImageTextContrastiveConfig(seed=1, context_length=40))
    with pytest.raises(ValueError, match="--context-length 40 exceeds the text tower's 32 positions"):
        longer.set_geometry(ModelGeometry(64, OPENAI_MEAN, OPENAI_STD, context_length=32))


@pytest.fixture
def kosmos2_task(tmp_path_factory):
    out = tmp_path_factory.mktemp("k2vocab")
    build_vocab.train_vocab(
        [f"a {c} {s} left of a {s}" for c in ("red", "green", "blue") for s in ("cat", "box")], str(out), vocab_size=60
    )
    return Kosmos2Task(
        Kosmos2Config(
            spm_model=str(out / "sentencepiece.bpe.model"),
            dict_path=str(out / "dict.txt"),
            location_bin_size=4,
            image_token_length=4,
            seed=1,
        )
    )


def test_kosmos2_task_checks_image_slots_and_takes_geometry(kosmos2_task):
    task = kosmos2_task
    with pytest.raises(RuntimeError, match="build the model before loading prompts"):
        task.generation_image_transform()
    with pytest.raises(ValueError, match="--image-token-length 4 must equal the model's 8 latent queries"):
        task.set_geometry(ModelGeometry(64, OPENAI_MEAN, OPENAI_STD, num_image_tokens=8))
    assert task.image_size is None  # nothing stored from a refused model
    torch.manual_seed(0)
    task.build_model(arch_args("kosmos2_tiny", "kosmos2", latent_query_num=4))
    assert (task.image_size, task.image_mean, task.image_std) == (64, OPENAI_MEAN, OPENAI_STD)
    assert task.image_transform()(Image.new("RGB", (50, 30))).shape == (3, 64, 64)
