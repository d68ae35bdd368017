"""One tiny training set-up per model family, for the tests that run every family through the trainer (FSDP2,
mixed precision): the data each needs, written once under a root, and its ``fairseq-train`` arguments."""

import os
from typing import Dict, List

import torch

from unilm_vl.data.formats import WdsShardWriter

from conftest import COLOURS, jpeg_bytes, write_wds

FAMILIES = ["clip", "byolip", "fsc_clip_lora", "cosmos", "kosmos2", "cosa"]


def _long_caption_wds(prefix: str, n: int, per_shard: int) -> None:
    names = list(COLOURS)
    with WdsShardWriter(prefix, samples_per_shard=per_shard) as writer:
        for i in range(n):
            colour = names[i % len(names)]
            other = names[(i + 1) % len(names)]
            long_caption = (
                f"There is one {colour} picture. The {colour} colour fills the frame. "
                f"Nothing {other} is in the {colour} picture."
            )
            writer.write(
                f"{i:06d}",
                jpeg_bytes(COLOURS[colour]),
                "jpg",
                f"a {colour} square above a {other} circle",
                {"key": f"{i:06d}", "long_caption": long_caption},
            )


def write_family_data(root: str) -> None:
    """Everything the families read, under ``root`` (about 2 s)."""
    import open_clip

    from unilm_vl.data import build_vocab
    from unilm_vl.data.cosa_vocab import build_wordpiece_vocab, write_vocab
    from unilm_vl.data.synthetic import generate_world

    write_wds(os.path.join(root, "wds", "part"), 48, 12)
    _long_caption_wds(os.path.join(root, "long", "part"), 48, 12)
    colours = list(COLOURS)
    write_vocab(build_wordpiece_vocab([f"a {c} picture" for c in colours]), os.path.join(root, "vocab.txt"))
    torch.manual_seed(0)
    torch.save(
        open_clip.create_model("unilm-vl-clip-tiny", pretrained=None).state_dict(), os.path.join(root, "pretrained.pt")
    )
    world = os.path.join(root, "world")
    generate_world(world, seed=2, num_train=64, num_val=8, num_test=8, num_videos=0, workers=1)
    build_vocab.main(
        [
            "--data",
            "train/grit/part-*.tsv",
            "--root",
            world,
            "--out",
            os.path.join(world, "vocab"),
            "--vocab-size",
            "300",
        ]
    )


def family_args(family: str, root: str, save_dir: str, *extra: str, batch_size: int = 8) -> List[str]:
    """``fairseq-train`` arguments (no ``--user-dir``) of ``family`` on the data of :func:`write_family_data`:
    SGD (Adam's normalisation turns float noise in near-zero gradients into visible weight differences; BYOLIP,
    whose --momentum clashes with SGD's, takes Adam with a large epsilon), no
    shuffling and per-sample splitting, so that 2 ranks x B and 1 rank x 2B see the same samples."""
    common = [
        "--cpu",
        "--seed",
        "3",
        "--save-dir",
        save_dir,
        "--log-format",
        "simple",
        "--log-interval",
        "1",
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--batch-size",
        str(batch_size),
        "--num-workers",
        "0",
        "--no-shuffle",
        "--split-by",
        "sample",
        "--clip-norm",
        "0",
    ]
    wds = [root, "--train-data", "wds/part-*.tar", "--valid-data", "wds/part-00000.tar"]
    specs: Dict[str, List[str]] = {
        "clip": [*wds, "--task", "image_text_contrastive", "--arch", "clip_tiny", "--criterion", "clip"],
        "byolip": [
            *wds,
            "--task",
            "image_text_contrastive",
            "--num-augs",
            "2",
            "--arch",
            "clip_rocket_byolip_tiny",
            "--criterion",
            "byolip",
        ],
        "fsc_clip_lora": [
            root,
            "--train-data",
            "long/part-*.tar",
            "--valid-data",
            "long/part-00000.tar",
            "--task",
            "image_text_contrastive",
            "--arch",
            "clip_tiny",
            "--pretrained",
            os.path.join(root, "pretrained.pt"),
            "--lora-rank",
            "4",
            "--criterion",
            "fsc_clip",
            "--hard-negatives",
            "fsc-clip",
            "--apply-global-neg-loss",
            "--apply-local-neg-loss",
            "--return-dense-tokens",
        ],
        "cosmos": [
            root,
            "--train-data",
            "long/part-*.tar",
            "--valid-data",
            "long/part-00000.tar",
            "--task",
            "image_text_contrastive",
            "--arch",
            "cosmos_tiny",
            "--criterion",
            "cosmos",
            "--use-imagecrop-aug",
            "--local-crops-number",
            "2",
            "--local-crop-size",
            "32",
            "--crop-scale",
            "0.4",
            "--caption-sampling-mode",
            "textcrop",
            "--num-sampled-captions",
            "4",
        ],
        "kosmos2": [
            os.path.join(root, "world"),
            "--task",
            "kosmos2",
            "--train-data",
            "train/grit/part-*.tsv",
            "--valid-data",
            "val/grit/part-*.tsv",
            "--spm-model",
            os.path.join(root, "world", "vocab", "sentencepiece.bpe.model"),
            "--dict-path",
            os.path.join(root, "world", "vocab", "dict.txt"),
            "--location-bin-size",
            "16",
            "--image-token-length",
            "16",
            "--arch",
            "kosmos2_tiny",
            "--criterion",
            "kosmos2_lm",
        ],
        "cosa": [
            *wds,
            "--task",
            "cosa_pretrain",
            "--vocab-file",
            os.path.join(root, "vocab.txt"),
            "--max-text-tokens",
            "8",
            "--arch",
            "cosa_tiny",
            "--criterion",
            "cosa",
            "--cosa-tasks",
            "ret_cret_ccap_cmlm",
        ],
    }
    if family == "byolip":  # its --momentum (the EMA copy) is also SGD's option name: Adam, well-conditioned
        common += ["--optimizer", "adam", "--adam-eps", "0.01", "--lr", "1e-3"]
    return [*specs[family], *common, *extra]
