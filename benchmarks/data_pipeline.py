"""Data pipeline throughput: samples/s of one training pass over the same synthetic shards through

* ours, webdataset: the ``image_text_contrastive`` task's iterator (``task.get_batch_iterator``, as fairseq-train
  uses it) on ``train/wds/part-*.tar``;
* ours, TSV: the same task on ``train/grit/part-*.tsv`` (the same samples in the GRIT TSV layout);
* the peer: open_clip's training pipeline, ``open_clip_train.data.get_wds_dataset``'s stages (shard shuffle, split
  by node/worker, tar expansion, sample shuffle, decode "pilrgb", transform, tokenise, batch, ``wds.WebLoader``)
  rebuilt from open_clip_train's own stage objects (see :func:`open_clip_wds_loader` for the one replaced stage).

The same work on every side: decode the same JPEGs, open_clip's training view (RandomResizedCrop scale 0.9-1,
bicubic, to ``--image-size`` px, normalised), open_clip's BPE tokenizer (77 tokens), batches of ``--batch-size``,
``--workers`` DataLoader worker processes. Ours computes the view with :class:`unilm_vl.data.transforms.ClipTrainView`
(JPEG DCT-scaled decoding where the crop allows it, uint8 until the batch, normalised per batch); the peer, as
shipped, decodes every JPEG at full size. Passes alternate (ours wds, peer, ours tsv, ...); after ``--warmup`` passes
per side, the median of ``--iters`` is reported; ``ratio`` = our samples/s / peer's.

Two worlds: today's synthetic world (64 px images) and the real-size world (JPEGs of 320-640 px on the short side,
quality 90, captions of 10-30 words; :mod:`unilm_vl.data.synthetic.real_size`)::

    .venv/bin/python -m unilm_vl.data.synthetic.real_size --out /tmp/real_world --num 1000 --shards 16
    .venv/bin/python benchmarks/data_pipeline.py --data /tmp/real_world [--batch-size 50] [--workers 2]

``--variants`` adds our pipeline with single steps of the speed-up undone, to measure each step (wds only):
``old`` (the pipeline before them: open_clip's transform on fully decoded images, normalised per sample),
``full_decode`` (``--full-jpeg-decode``: no DCT scaling), ``float_in_worker`` (draft decoding, normalised per
sample in the workers instead of per batch), ``pillow_scales`` (only the DCT scales Pillow's ``draft`` has: 1/2, 1/4,
1/8), ``permuted`` (each view a permuted H x W x 3 array rather than contiguous planes) and ``bytes_in_main``
(the main process reads the tar members' bytes and sends them to the workers in the records, instead of their
positions: :class:`unilm_vl.data.sources.FileSpan`).
``--pixel-bound N`` instead measures how far reduced-scale decoding moves the pixels on N JPEGs (no timing).

open_clip_train 3.3.0 imports pandas at module level for its CSV dataset only; where pandas is not installed an
empty stand-in module is registered before the import (the wds path never touches it).
"""

import argparse
import gc
import importlib.util
import logging
import os
import statistics
import sys
import time
import types

import numpy as np
import torch

from _timing import machine, report, setup_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("benchmarks")


def open_clip_wds_loader(args, shards, image_size, mean, std, num_samples):
    """open_clip_train's ``get_wds_dataset`` training pipeline, stage for stage, with its own stage objects
    (``detshuffle2``, ``filter_no_caption_or_no_image``, ``log_and_continue``, shuffle sizes, ``with_epoch``
    rounding, ``WebLoader``). One stage differs: open_clip_train 3.3.0's ``tarfile_to_samples_nothrow`` reads a
    ``fname`` field that webdataset 1.0.2's ``tar_file_expander`` no longer yields (KeyError), so tar expansion is
    webdataset's ``tarfile_to_samples(handler=log_and_continue)``, the call open_clip's own comment names as what
    it re-implements."""
    if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:  # CSV-only import: docstring
        sys.modules["pandas"] = types.ModuleType("pandas")
    import math

    import open_clip
    import webdataset as wds
    from open_clip_train import data as ocd

    preprocess = open_clip.image_transform(
        image_size, is_train=True, mean=mean, std=std, aug_cfg=open_clip.AugmentationCfg(scale=(0.9, 1.0))
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # open_clip's BPE, 77 tokens (as our default tokenizer)
    num_shards = len(wds.shardlists.expand_urls(shards))
    if num_shards < args.workers:
        raise ValueError(f"open_clip needs at least as many shards ({num_shards}) as workers ({args.workers})")

    def make():
        epoch = ocd.SharedEpoch(epoch=0)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(shards),
            ocd.detshuffle2(bufsize=ocd._SHARD_SHUFFLE_SIZE, initial=ocd._SHARD_SHUFFLE_INITIAL, seed=0, epoch=epoch),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=ocd.log_and_continue),
            wds.shuffle(bufsize=ocd._SAMPLE_SHUFFLE_SIZE, initial=ocd._SAMPLE_SHUFFLE_INITIAL),
            wds.select(ocd.filter_no_caption_or_no_image),
            wds.decode("pilrgb", handler=ocd.log_and_continue),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
            wds.to_tuple("image", "text"),
            wds.batched(args.batch_size, partial=False),
        )
        num_batches = math.ceil(num_samples / args.batch_size)
        worker_batches = math.ceil(num_batches / max(1, args.workers))
        return wds.WebLoader(
            pipeline.with_epoch(worker_batches),
            batch_size=None,
            shuffle=False,
            num_workers=args.workers,
            persistent_workers=False,
        )

    return make


def our_task(args, train_data, variant="default"):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    flags = [
        args.data,
        "--user-dir",
        os.path.join(REPO, "unilm_vl"),
        "--task",
        "image_text_contrastive",
        "--arch",
        "clip_tiny",
        "--criterion",
        "clip",
        "--cpu",
        "--train-data",
        train_data,
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.workers),
        "--log-format",
        "none",
    ] + (["--full-jpeg-decode"] if variant == "full_decode" else [])
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), flags))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    task.context_length = 77  # the text tower has 32 positions; the data side tokenises like open_clip (77)
    task.image_size = args.image_size  # the data side makes the views real towers take (the tiny tower: 32 px)
    if variant == "old":  # the pipeline before the speed-up: open_clip's transform on fully decoded images
        from unilm_vl.data.stages import FramesToImage, ImageTransform, Tokenize

        task.build_stages = lambda split: [
            FramesToImage(),
            ImageTransform(task.image_transform(train=True)),
            Tokenize(task.tokenizer, task.context_length),
        ]
        task.stream_options = lambda split, batch_size: {}
    elif variant == "float_in_worker":  # draft decoding, normalised per sample in the workers
        from unilm_vl.data.transforms import ClipTrainView

        task.train_view = lambda: ClipTrainView(
            task.image_size, scale=(task.cfg.train_crop_scale_min, 1.0), mean=task.image_mean, std=task.image_std
        )
    elif variant in ("pillow_scales", "permuted"):
        from unilm_vl.data import transforms

        eighths = transforms.draft_eighths

        def pillow_eighths(w, h, size):  # only the DCT scales Pillow's draft has: 1/8, 1/4, 1/2 (and 1)
            return next(m for m in (1, 2, 4, 8) if m >= eighths(w, h, size))

        class View(transforms.ClipTrainView):
            if variant == "permuted":  # the per-sample tensor as a permuted view of the H x W x 3 array
                planes = staticmethod(lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            else:

                def __call__(self, img):  # runs in a single-threaded worker: patch the module for this call
                    transforms.draft_eighths = pillow_eighths
                    try:
                        return super().__call__(img)
                    finally:
                        transforms.draft_eighths = eighths

        task.train_view = lambda: View(task.image_size, scale=(task.cfg.train_crop_scale_min, 1.0))
    elif variant not in ("default", "full_decode", "bytes_in_main"):
        raise ValueError(f"unknown variant {variant!r}")
    task.load_dataset("train")

    def loader():
        itr = task.get_batch_iterator(
            task.dataset("train"), max_sentences=args.batch_size, num_workers=args.workers, epoch=1, seed=1
        )
        return itr.next_epoch_itr(shuffle=True)

    if variant == "bytes_in_main":  # the main process reads the members' bytes and sends them in the records
        from unilm_vl.data import sources

        def read_bytes(path, spec, read=sources.READERS["wds"]):
            for record in read(path, spec):
                members = record["members"]
                yield {**record, "members": {ext: sources.record_bytes(v, "?", ext) for ext, v in members.items()}}

        def with_bytes(make=loader):
            read = sources.READERS["wds"]
            sources.READERS["wds"] = read_bytes  # the records are read in this process, during the pass
            try:
                yield from make()
            finally:
                sources.READERS["wds"] = read

        loader = with_bytes

    return loader, model


def consume(make_loader, read=True):
    """One pass: (samples, seconds), loader construction and worker start-up included. With ``read``, each batch's
    images are read once (a sum), as a trainer's first layer or host-to-device copy reads them: a batch that a
    worker handed over in shared memory costs its page mappings when it is first read, and without a reader that
    cost of the peer's float batches would never be paid in the timed pass."""
    start = time.perf_counter()
    n = 0
    for batch in make_loader():
        images = batch["net_input"]["image"] if isinstance(batch, dict) else batch[0]
        n += len(images)
        if read:
            float(images.sum())
    seconds = time.perf_counter() - start
    gc.collect()  # drop the finished loader now, not inside the next loader's forked workers
    return n, seconds


def compare(loaders, warmup, iters, read=True):
    """Interleaved passes over ``loaders`` (name -> loader factory, one of them ``peer``): median samples/s of
    each, and each one's ``ratio`` to the peer's median."""
    for _ in range(warmup):
        for make in loaders.values():
            consume(make, read)
    rates = {name: [] for name in loaders}
    counts = {}
    for _ in range(iters):
        for name, make in loaders.items():
            n, seconds = consume(make, read)
            counts[name] = n
            rates[name].append(n / seconds)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "samples_per_s": medians,
        "ratio": {name: medians[name] / medians["peer"] for name in loaders},
        "samples_per_pass": counts,
        "all_rates": rates,
    }


def pixel_bound(data, count, image_size):
    """Reduced-scale decoding against the full decode on the first ``count`` JPEGs of ``data``'s webdataset shards,
    the same crop box on both sides: mean and largest absolute difference in uint8 levels, and how many images
    each DCT scale M/8 decoded."""
    import collections
    import tarfile

    from torchvision.transforms import RandomResizedCrop

    from unilm_vl.data import transforms
    from unilm_vl.data.decode import decode_image

    wds_dir = os.path.join(data, "train", "wds")
    images = []
    for name in sorted(os.listdir(wds_dir)):
        with tarfile.open(os.path.join(wds_dir, name)) as tar:
            images += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        if len(images) >= count:
            break
    full = transforms.ClipTrainView(image_size, draft=False)
    draft = transforms.ClipTrainView(image_size, draft=True)
    means, worst, scales = [], 0.0, collections.Counter()
    for seed, jpeg in enumerate(images[:count]):
        torch.manual_seed(seed)
        expected = full(decode_image(jpeg)).float()
        torch.manual_seed(seed)
        img = decode_image(jpeg, defer_jpeg=True)
        top, left, h, w = RandomResizedCrop.get_params(img, list(draft.scale), list(draft.ratio))
        scales[f"{transforms.draft_eighths(w, h, image_size)}/8"] += 1
        torch.manual_seed(seed)
        diff = (draft(img).float() - expected).abs()
        means.append(float(diff.mean()))
        worst = max(worst, float(diff.max()))
    return {
        "images": len(means),
        "mean_abs_diff": statistics.mean(means),
        "worst_image_mean_abs_diff": max(means),
        "max_abs_diff": worst,
        "dct_scales": dict(sorted(scales.items())),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        required=True,
        help="synthetic world directory (python -m unilm_vl.data.synthetic "
        "or python -m unilm_vl.data.synthetic.real_size)",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="samples per batch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes on every side")
    parser.add_argument("--image-size", type=int, default=224, help="side of the training views in pixels")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per side")
    parser.add_argument("--iters", type=int, default=3, help="timed passes per side (median reported)")
    parser.add_argument("--no-tsv", action="store_true", help="skip our TSV pipeline")
    parser.add_argument(
        "--variants",
        default="",
        help="comma list of our wds variants to time as well: old, full_decode, float_in_worker, pillow_scales, "
        "permuted, bytes_in_main (see the docstring)",
    )
    parser.add_argument(
        "--no-read",
        action="store_true",
        help="do not read the images of each batch (the numbers before the reader was added; see consume())",
    )
    parser.add_argument(
        "--pixel-bound",
        type=int,
        default=0,
        help="only measure the pixel difference of reduced-scale decoding on this many JPEGs (no timing)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.pixel_bound:
        results = pixel_bound(args.data, args.pixel_bound, args.image_size)
        logger.info("pixel bound %s", results)
        report("data_pixel_bound", results)
        return 0
    wds_dir = os.path.join(args.data, "train", "wds")
    shards = sorted(f for f in os.listdir(wds_dir) if f.endswith(".tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {wds_dir}")
    first, last = os.path.splitext(shards[0])[0].split("-")[-1], os.path.splitext(shards[-1])[0].split("-")[-1]
    brace = os.path.join(wds_dir, f"part-{{{first}..{last}}}.tar")  # open_clip's shard syntax

    ours_wds, model = our_task(args, "train/wds/part-*.tar")
    loaders = {"ours_wds": ours_wds}
    num_samples, _ = consume(
        ours_wds, not args.no_read
    )  # samples in one of our passes: the peer's epoch is set to the same
    loaders["peer"] = open_clip_wds_loader(args, brace, args.image_size, model.image_mean, model.image_std, num_samples)
    if not args.no_tsv:
        loaders["ours_tsv"] = our_task(args, "train/grit/part-*.tsv")[0]
    for variant in filter(None, (v.strip() for v in args.variants.split(","))):
        loaders[f"ours_wds_{variant}"] = our_task(args, "train/wds/part-*.tar", variant)[0]
    results = {
        "config": vars(args),
        "shards": len(shards),
        "passes": compare(loaders, args.warmup, args.iters, not args.no_read),
    }
    r = results["passes"]
    for key, name in (("wds_vs_open_clip", "ours_wds"), ("tsv_vs_open_clip", "ours_tsv")):  # per-pair summaries
        if name in loaders:
            results[key] = {
                "ours_samples_per_s": r["samples_per_s"][name],
                "peer_samples_per_s": r["samples_per_s"]["peer"],
                "ratio": r["ratio"][name],
                "samples_per_pass": {"ours": r["samples_per_pass"][name], "peer": r["samples_per_pass"]["peer"]},
            }
    for name in loaders:
        logger.info(
            "%-26s %.1f samples/s  ratio to open_clip %.3f  (all %s)",
            name,
            r["samples_per_s"][name],
            r["ratio"][name],
            [round(x, 1) for x in r["all_rates"][name]],
        )
    logger.info("samples per pass %s", r["samples_per_pass"])
    report("data_pipeline", results)
    logger.info("machine %s", machine())
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # decode/transform work happens in the loader workers
    sys.exit(main())
