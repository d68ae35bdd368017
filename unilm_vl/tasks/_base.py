"""Shared task code: the data options every image-text task has, and a FairseqTask base class that feeds the
trainer from :mod:`unilm_vl.data` (streaming sources, exact resume) instead of indexed fairseq datasets."""

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask
from omegaconf import II

from ..data.iterator import CheckpointableBatchIterator
from ..data.pipeline import StreamPlan
from ..data.sources import SourceSpec, parse_data_spec
from ..distributed_cpu import prepare_cpu_all_gather_list
from ..fault_tolerance import NonFiniteLossGuard, install_atomic_checkpoint_copy, set_collective_timeout
from ..optim.open_clip_adamw import tag_parameter_names
from ..trainer import install as install_trainer

logger = logging.getLogger(__name__)

SPLIT_CHOICES = ChoiceEnum(["auto", "shard", "sample"])
FSDP2_PRECISION_CHOICES = ChoiceEnum(["fp32", "bf16", "fp16"])


@dataclass
class StreamDataConfig(FairseqDataclass):
    data: str = field(
        default=".",
        metadata={
            "help": "root directory that relative data specs resolve against (e.g. the synthetic world's directory)"
        },
    )
    train_data: str = field(
        default="train/wds/part-*.tar",
        metadata={
            "help": "training data spec: '::'-separated shard patterns with brace ranges ({00000..00099}) or globs "
            "(.tar = img2dataset webdataset, .tsv = TSV), a json source config with weights, or a frames "
            "annotation json"
        },
    )
    valid_data: str = field(
        default="val/wds/part-*.tar",
        metadata={"help": "validation data spec (same forms as --train-data); used for the 'valid' subset"},
    )
    tsv_schema: str = field(default="grit", metadata={"help": "column schema of TSV shards (grit | image_text)"})
    caption_key: str = field(
        default="txt",
        metadata={"help": "webdataset caption: 'txt' for the .txt member, or a field name of the .json member"},
    )
    frames_root: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory of <video_id>/ frame folders for frames annotation sources (default: frames/ beside "
            "the annotation json)"
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "records held in each rank's shuffle buffer, per source (0 or 1 disables sample shuffling)"},
    )
    no_shuffle: bool = field(default=False, metadata={"help": "read shards and samples in order (no shuffling)"})
    split_by: SPLIT_CHOICES = field(
        default="auto",
        metadata={
            "help": "how ranks share the data (their loader workers only decode): whole shards, every n-th sample, or "
            "auto (shards when there are at least as many shards as ranks)"
        },
    )
    train_num_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": "samples per epoch (default: the size of the training data from sizes.json or a scan, bad records "
            "included); an epoch is ceil(samples / (batch size x ranks)) batches"
        },
    )
    max_bad_fraction: float = field(
        default=0.1,
        metadata={"help": "stop with an error naming the last bad file once more than this fraction of samples is bad"},
    )
    bad_sample_log_every: int = field(default=100, metadata={"help": "log a bad-sample summary every N skips"})
    seed: int = field(
        default=II("common.seed"),
        metadata={
            "help": "seed of shard order, shuffle buffers, mixing and per-sample augmentation (fairseq's --seed)"
        },
    )
    max_consecutive_nan_steps: int = field(
        default=10,
        metadata={
            "help": "an update whose loss is NaN/Inf on any rank is skipped (no optimizer step, counted as "
            "nan_skipped); stop the run once more than this many updates in a row were skipped (0: stop at the "
            "first)"
        },
    )
    bf16_autocast: bool = field(
        default=False,
        metadata={
            "help": "run forward passes under torch.autocast(bfloat16) on the model's device (CPU or GPU) with fp32 "
            "weights and optimizer state, no loss scaling; losses still compute in fp32. fairseq 0.12's own "
            "--bf16 needs torch_xla and --amp is fp16 only"
        },
    )
    fsdp2: bool = field(
        default=False,
        metadata={
            "help": "shard weights, gradients and optimizer state over the data-parallel ranks with PyTorch FSDP2 "
            "(fully_shard per transformer block, then the root) instead of DDP; checkpoints are sharded "
            "(torch.distributed.checkpoint; python -m unilm_vl.consolidate makes one file). Works on CPU (gloo) "
            "and GPUs (NCCL), also on one rank"
        },
    )
    fsdp2_precision: FSDP2_PRECISION_CHOICES = field(
        default="fp32",
        metadata={
            "help": "--fsdp2 compute precision: bf16 or fp16 weights are gathered for forward/backward while the "
            "sharded master weights, optimizer state and gradient reduction stay fp32 (fp16 adds fairseq's "
            "dynamic loss scaling, --fp16-init-scale / --fp16-scale-window); use it instead of --fp16/--amp"
        },
    )
    fsdp2_keep_unsharded: bool = field(
        default=False,
        metadata={
            "help": "--fsdp2: keep each block's gathered weights from its forward to its backward (one all-gather "
            "less per block, more memory; the default reshards after forward)"
        },
    )
    fsdp2_full_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "--fsdp2: gather full weights and optimizer state to rank 0 and write one regular checkpoint "
            "file instead of per-rank shards"
        },
    )
    collective_timeout: int = field(
        default=0,
        metadata={
            "help": "seconds a collective (all-reduce, all-gather) waits for the other ranks before failing, so a hung "
            "rank stops the job instead of blocking it; 0 keeps torch's default (30 min gloo, 10 min NCCL)"
        },
    )


@dataclass(frozen=True)
class ModelGeometry:
    """What a task's data transforms need from the model they feed, read once by
    :meth:`StreamTaskBase.build_model` (:meth:`of`). Every model of this package exposes it as attributes:
    ``image_size`` (side of the square input of its image tower), ``image_mean`` / ``image_std`` (per-channel
    normalisation of RGB values in [0, 1]) and, where it has them, ``context_length`` (positions of a CLIP-style
    text tower) and ``num_image_tokens`` (image slots of a sequence model such as Kosmos-2)."""

    image_size: int
    image_mean: Tuple[float, ...]
    image_std: Tuple[float, ...]
    context_length: Optional[int] = None
    num_image_tokens: Optional[int] = None

    @classmethod
    def of(cls, model) -> "ModelGeometry":
        """The geometry of ``model``; ``TypeError`` naming the model class when it lacks an image attribute."""
        missing = [name for name in ("image_size", "image_mean", "image_std") if not hasattr(model, name)]
        if missing:
            raise TypeError(
                f"{type(model).__name__} does not expose {', '.join(missing)}: the image-text tasks "
                "build their transforms from the model's image geometry"
            )
        optional = {name: getattr(model, name, None) for name in ("context_length", "num_image_tokens")}
        return cls(
            int(model.image_size),
            tuple(model.image_mean),
            tuple(model.image_std),
            **{name: None if value is None else int(value) for name, value in optional.items()},
        )


class StreamTaskBase(FairseqTask):
    """Base class: ``load_dataset`` resolves a data spec into sources; ``get_batch_iterator`` returns a
    :class:`~unilm_vl.data.iterator.CheckpointableBatchIterator`. Subclasses define ``build_stages(split)`` and
    ``build_collater(split)``.

    Geometry handshake: transforms depend on the model (image size, normalisation), so :meth:`build_model` reads
    the built model's :class:`ModelGeometry` and hands it to :meth:`set_geometry`, which stores ``image_size``,
    ``image_mean`` and ``image_std`` for ``build_stages``; subclasses extend :meth:`set_geometry` to check or
    adopt further fields (context length, image slots)."""

    cfg: StreamDataConfig

    def __init__(self, cfg: StreamDataConfig):
        super().__init__(cfg)
        self._sizes: Dict[str, Dict[str, int]] = {}
        self.image_size: Optional[int] = None  # set from the model by set_geometry
        self.image_mean: Optional[Tuple[float, ...]] = None
        self.image_std: Optional[Tuple[float, ...]] = None
        prepare_cpu_all_gather_list()  # non-summable logging outputs (kosmos2_lm) on gloo without CUDA
        install_atomic_checkpoint_copy()  # checkpoint_last.pt is never left half-written (see fault_tolerance.py)
        set_collective_timeout(getattr(cfg, "collective_timeout", 0))  # tasks are set up after distributed init
        self.nan_guard = NonFiniteLossGuard(getattr(cfg, "max_consecutive_nan_steps", 10))
        install_trainer()  # fairseq-train builds UnilmTrainer (--fsdp2, fp16/AMP on CPU); see unilm_vl/trainer.py

    # ---- model and criterion; the geometry handshake
    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        tag_parameter_names(model)  # names for open_clip_adamw's weight-decay exclusion
        self.set_geometry(ModelGeometry.of(model))
        return model

    def set_geometry(self, geometry: ModelGeometry) -> None:
        """Store the image geometry the data transforms are built with (called by :meth:`build_model`)."""
        self.image_size, self.image_mean, self.image_std = geometry.image_size, geometry.image_mean, geometry.image_std

    def require_geometry(self, before: str = "loading data") -> None:
        """``RuntimeError`` unless :meth:`set_geometry` ran (transforms need the model's image size)."""
        if self.image_size is None:
            raise RuntimeError(f"build the model before {before}: the image size comes from the model")

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        tag_parameter_names(criterion, prefix="criterion.")
        return criterion

    # ---- data
    def data_spec(self, split: str) -> str:
        if split == "train":
            return self.cfg.train_data
        if split == "valid":
            return self.cfg.valid_data
        spec = getattr(self.cfg, f"{split}_data", None)
        if spec is None:
            raise KeyError(f"no data spec for split {split!r}; splits are 'train' and 'valid'")
        return spec

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        spec = self.data_spec(split)
        try:
            sources = parse_data_spec(
                spec,
                root=self.cfg.data,
                schema=self.cfg.tsv_schema,
                caption_key=self.cfg.caption_key,
                frames_root=self.cfg.frames_root,
            )
        except FileNotFoundError as exc:  # one error line from the CLIs (unilm_vl.cli), naming the flag to fix
            raise FileNotFoundError(
                f"--{split.replace('_', '-')}-data {spec!r}: {exc}; relative paths resolve against "
                f"the data directory {self.cfg.data!r} (the first positional argument)"
            ) from exc
        self.datasets[split] = sources
        logger.info(
            "%s: %s",
            split,
            ", ".join(f"{s.name} ({s.kind}, {len(s.shards)} shards, weight {s.weight})" for s in sources),
        )

    def dataset(self, split: str) -> List[SourceSpec]:
        if split not in self.datasets:
            raise KeyError(f"Dataset not loaded: {split}")
        return self.datasets[split]

    def build_stages(self, split: str) -> list:
        raise NotImplementedError

    def build_collater(self, split: str):
        raise NotImplementedError

    def stream_options(self, split: str, batch_size: int) -> dict:
        """Extra :class:`~unilm_vl.data.pipeline.StreamPlan` fields of ``split`` (e.g. ``mix_block``)."""
        return {}

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ):
        if not max_sentences:
            raise ValueError("image-text tasks batch by samples: pass --batch-size (and --batch-size-valid)")
        split = next((name for name, value in self.datasets.items() if value is dataset), "train")
        train = split == "train"
        plan = StreamPlan(
            sources=dataset,
            stages=self.build_stages(split),
            collate=self.build_collater(split),
            batch_size=max_sentences,
            seed=self.cfg.seed,
            rank=shard_id,
            world_size=num_shards,
            # validation is one small ordered pass in the main process
            num_workers=max(1, num_workers) if train else 1,
            shuffle=train and not self.cfg.no_shuffle,
            shuffle_buffer=self.cfg.shuffle_buffer,
            split=self.cfg.split_by if train else "sample",
            train=train,
            max_bad_fraction=self.cfg.max_bad_fraction,
            log_every=self.cfg.bad_sample_log_every,
            name=split,
            sizes=self._sizes.setdefault(split, {}),
            **self.stream_options(split, max_sentences),
        )
        if train:
            total = self.cfg.train_num_samples or plan.count()
            num_batches = math.ceil(total / (max_sentences * num_shards))  # no sample of a pass left out
        else:
            total = plan.count()
            num_batches = math.ceil(math.ceil(total / num_shards) / max_sentences)
        logger.info(
            "%s: %d samples -> %d batches of %d per rank (%d ranks, %d loader workers)",
            split,
            total,
            num_batches,
            max_sentences,
            num_shards,
            num_workers if train else 0,
        )
        return CheckpointableBatchIterator(plan, num_batches, epoch=epoch, loader_workers=num_workers if train else 0)

    # ---- training hooks
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        """fairseq's forward/backward, then the NaN/Inf loss check. Overridden (not to pass a loss name) because
        the check must run between backward and the trainer's gradient-norm check, which raises on NaN
        gradients before ``optimizer_step`` could skip the update; see :mod:`unilm_vl.fault_tolerance`."""
        if getattr(self.cfg, "bf16_autocast", False) or isinstance(optimizer, AMPOptimizer):
            # fairseq's train_step opens torch.cuda.amp.autocast around the forward, which would switch a
            # surrounding bf16 autocast off on GPU and does nothing on CPU (--amp), so its four steps are spelled
            # out here with an autocast on the model's own device.
            model.train()
            model.set_num_updates(update_num)
            with self.autocast(model, optimizer):
                loss, sample_size, logging_output = criterion(model, sample)
            if ignore_grad:
                loss *= 0
            optimizer.backward(loss)  # outside autocast: backward ops follow the dtypes of their forward ops
        else:
            loss, sample_size, logging_output = super().train_step(
                sample, model, criterion, optimizer, update_num, ignore_grad=ignore_grad, **kwargs
            )
        sample_size, logging_output = self.nan_guard.after_backward(
            loss, sample_size, logging_output, optimizer, update_num, ignore_grad
        )
        return loss, sample_size, logging_output

    def autocast(self, model, optimizer=None):
        """Autocast on the model's device: bf16 with ``--bf16-autocast``, fp16 with ``--amp`` (fairseq's AMP
        optimizer; on GPU what fairseq's own train step does, on CPU what it would do if its autocast were not
        CUDA-only); a no-op context otherwise."""
        device = next(model.parameters()).device.type
        if isinstance(optimizer, AMPOptimizer):
            return torch.autocast(device, dtype=torch.float16)
        return torch.autocast(device, dtype=torch.bfloat16, enabled=bool(getattr(self.cfg, "bf16_autocast", False)))

    def valid_step(self, sample, model, criterion):
        model.eval()
        with torch.no_grad(), self.autocast(model):
            return criterion(model, sample)

    def optimizer_step(self, optimizer, model, update_num):
        if not self.nan_guard.should_step(optimizer, update_num):
            return  # a NaN/Inf loss on some rank: no optimizer or teacher step (fault_tolerance.py)
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        if hasattr(inner, "before_optimizer_step"):  # after backward and gradient clipping (COSMOS's teacher EMA)
            inner.before_optimizer_step(update_num)
        super().optimizer_step(optimizer, model, update_num)
        if hasattr(inner, "after_optimizer_step"):
            inner.after_optimizer_step(update_num)

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
