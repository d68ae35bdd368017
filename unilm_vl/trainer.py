"""fairseq's ``Trainer`` plus what our tasks need beyond it: FSDP2 sharding (``--fsdp2``) and fairseq's own fp16 /
AMP paths on machines without CUDA.

SHIM (installation): ``fairseq_cli.train.main`` builds ``Trainer(cfg, task, model, criterion)`` by the module-global
name and offers no hook, so :func:`install` points that name at :class:`UnilmTrainer`. Our tasks call it from their
constructor (fairseq sets the task up inside ``main`` before it builds the trainer), so ``fairseq-train --user-dir
unilm_vl`` and ``python -m unilm_vl.train`` both get it; other user dirs and fairseq's own tasks are untouched.
Without ``--fsdp2`` on a CUDA machine every method below defers to fairseq's.

SHIMs (CPU precision), narrow and only where CUDA is absent, so that the tests run fairseq's real fp16 code:

- ``--fp16`` (``FP16Optimizer``) keys its flat fp32 master copy by ``torch.cuda.current_device()``; on CPU the key is
  ``None``, the ``device.index`` of CPU tensors that the optimizer looks its gradients up by.
- fairseq's overflow handler (``Trainer.train_step``: an fp16 gradient overflow lowers the loss scale and skips the
  update) allocates its zero gradient norm with ``.cuda()``; during ``train_step`` on a machine without CUDA,
  ``Tensor.cuda`` returns the tensor unchanged (any other ``.cuda()`` there would have failed anyway).
- ``--amp`` builds ``torch.cuda.amp.GradScaler``, which disables itself without CUDA, and autocasts with
  ``torch.cuda.amp.autocast``, a no-op on CPU; on CPU the scaler is ``torch.amp.GradScaler("cpu")`` with the same
  settings and :meth:`unilm_vl.tasks._base.StreamTaskBase.train_step` autocasts to fp16 on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from typing import List, Optional

import torch
from fairseq import checkpoint_utils, optim
from fairseq.trainer import Trainer

from . import fsdp2
from .optim.open_clip_adamw import tag_parameter_names
from .safe_load import SAFE_GLOBALS

logger = logging.getLogger(__name__)


def install() -> None:
    """Make ``fairseq_cli.train`` build :class:`UnilmTrainer` (idempotent; nothing happens outside fairseq-train)."""
    module = sys.modules.get("fairseq_cli.train")
    if module is not None and getattr(module, "Trainer", None) is Trainer:
        module.Trainer = UnilmTrainer


def sharding_plan(task_cfg) -> Optional[fsdp2.ShardingPlan]:
    if not getattr(task_cfg, "fsdp2", False):
        return None
    return fsdp2.ShardingPlan(
        precision=str(getattr(task_cfg, "fsdp2_precision", "fp32")),
        reshard_after_forward=not getattr(task_cfg, "fsdp2_no_reshard_after_forward", False),
        full_checkpoint=bool(getattr(task_cfg, "fsdp2_full_checkpoint", False)),
    )


def user_error(message: str) -> SystemExit:
    """One ``error:`` line on stderr and exit status 2 (raise the result)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


@contextlib.contextmanager
def _cuda_is_identity():
    """During fairseq's train step on a CUDA-less machine, ``Tensor.cuda()`` returns the tensor (module docstring)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class UnilmTrainer(Trainer):
    """fairseq's trainer; with ``--fsdp2`` the model (and a criterion with parameters) is sharded by FSDP2 instead
    of being wrapped in DDP, gradient norms are computed from the shards, and checkpoints are sharded (see
    :mod:`unilm_vl.fsdp2`)."""

    def __init__(self, cfg, task, model, criterion, quantizer=None):
        self.sharding = sharding_plan(task.cfg)
        if self.sharding is not None:
            try:
                fsdp2.check_options(cfg, self.sharding)
            except fsdp2.ShardingError as exc:
                raise user_error(str(exc)) from None
        super().__init__(cfg, task, model, criterion, quantizer)
        if self.sharding is not None:
            self._shard()

    # ------------------------------------------------------------------------------------------ FSDP2 set-up
    def _shard(self) -> None:
        fsdp2.ensure_process_group(self.device)
        mesh = fsdp2.device_mesh(self.device)
        plan = self.sharding
        units, self._replicated = fsdp2.shard_module(self._model, mesh, plan.precision, plan.reshard_after_forward)
        if any(True for _ in self._criterion.parameters()):
            more, replicated = fsdp2.shard_module(self._criterion, mesh, plan.precision, plan.reshard_after_forward)
            units += more
            self._replicated += replicated
        # FSDP2 replaced the parameter objects: re-tag the names open_clip_adamw's weight-decay rule reads
        tag_parameter_names(self._model)
        tag_parameter_names(self._criterion, prefix="criterion.")
        logger.info(
            "FSDP2: %d units over %d ranks, compute %s, fp32 master weights and gradient reduction%s",
            units,
            torch.distributed.get_world_size(),
            plan.precision,
            ", reshard after forward" if plan.reshard_after_forward else "",
        )

    @property
    def use_distributed_wrapper(self) -> bool:
        if self.sharding is not None:
            return False  # FSDP2 reduces gradients itself; no DDP wrapper
        return super().use_distributed_wrapper

    # ------------------------------------------------------------------------------------------ optimizer
    def _build_optimizer(self):
        if self.sharding is not None and self.sharding.precision == "fp16":
            self._build_sharded_fp16_optimizer()
        elif not torch.cuda.is_available() and self.cfg.common.fp16 and not self.cfg.common.memory_efficient_fp16:
            original = torch.cuda.current_device
            torch.cuda.current_device = lambda: None  # CPU shim (module docstring): flat master copy keyed None
            try:
                super()._build_optimizer()
            finally:
                torch.cuda.current_device = original
        else:
            super()._build_optimizer()
        if self.cfg.common.amp:
            if not torch.cuda.is_available():
                self._cpu_grad_scaler()
            _step_the_unscaled_optimizer(self._optimizer)
        if self.sharding is not None:
            self._sharded_gradient_hooks()
        else:
            _lean_fp32_optimizer(self._optimizer)

    def _build_sharded_fp16_optimizer(self):
        """fp16 compute on fp32 sharded weights: fairseq's ``MemoryEfficientFP16Optimizer`` gives the dynamic loss
        scaling (scale the loss, unscale the gradients, skip the update and lower the scale on overflow) without
        copying weights, since the weights FSDP2 keeps are already fp32."""
        params = [p for p in list(self.model.parameters()) + list(self.criterion.parameters()) if p.requires_grad]
        self._optimizer = optim.MemoryEfficientFP16Optimizer.build_optimizer(self.cfg, params, allow_unsupported=True)
        from fairseq.optim import lr_scheduler

        self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
        self._lr_scheduler.step_update(0)

    def _cpu_grad_scaler(self):
        scaler = getattr(self._optimizer, "_grad_scaler", None)
        if scaler is None or isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cpu":
            return
        self._optimizer._grad_scaler = torch.amp.GradScaler(
            "cpu", init_scale=self.cfg.common.fp16_init_scale, growth_interval=self.cfg.common.fp16_scale_window or 2000
        )

    def _sharded_gradient_hooks(self):
        """The optimizer's gradient all-reduce (a no-op for a plain module) averages the replicated 0-dim
        parameters' gradients, and the innermost fairseq optimizer's clipping runs :func:`fsdp2.clip_grad_norm_`."""
        inner = getattr(self._optimizer, "wrapped_optimizer", self._optimizer)
        replicated = self._replicated

        def clip_grad_norm(max_norm, aggregate_norm_fn=None):
            return fsdp2.clip_grad_norm_(inner.params, max_norm)

        def all_reduce_grads(module):
            if module is self.model:  # the trainer calls it for the model, then for a criterion with parameters
                fsdp2.all_reduce_replicated_grads(replicated)

        inner.clip_grad_norm = clip_grad_norm
        self._optimizer.all_reduce_grads = all_reduce_grads

    # ------------------------------------------------------------------------------------------ train step
    def train_step(self, samples, raise_oom=False):
        with _cuda_is_identity():
            out = super().train_step(samples, raise_oom)
        if self.sharding is not None and self.sharding.precision == "fp16":
            from fairseq.logging import metrics

            metrics.log_scalar("loss_scale", self.optimizer.scaler.loss_scale, priority=700, round=4, weight=0)
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def _sharded_checkpoints(self) -> bool:
        return self.sharding is not None and not self.sharding.full_checkpoint

    @property
    def always_call_state_dict_during_save_checkpoint(self) -> bool:
        # every rank takes part in writing (sharded) or gathering (full) the state: rank 0 through save_checkpoint,
        # the others through this call of state_dict()
        return self.sharding is not None or super().always_call_state_dict_during_save_checkpoint

    def consolidate_optimizer(self):
        if self.sharding is None:
            super().consolidate_optimizer()

    def state_dict(self):
        if self.sharding is None:
            return super().state_dict()
        from fairseq.logging import metrics
        from omegaconf import OmegaConf

        state = {
            "args": None,
            "cfg": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)
            if OmegaConf.is_config(self.cfg)
            else self.cfg,
            "model": None,
            "criterion": None,
            "optimizer_history": (self._optim_history or [])
            + [
                {
                    "criterion_name": self.get_criterion().__class__.__name__,
                    "optimizer_name": self.optimizer.__class__.__name__,
                    "lr_scheduler_state": self.lr_scheduler.state_dict(),
                    "num_updates": self.get_num_updates(),
                }
            ],
            "task_state": self.task.state_dict() if self.task is not None else {},
            "extra_state": {"metrics": metrics.state_dict(), "previous_training_time": self.cumulative_training_time()},
        }
        with_optimizer = not self.cfg.checkpoint.no_save_optimizer_state
        scaler = getattr(self.optimizer, "scaler", None)
        if self._sharded_checkpoints:
            save_dir = self.cfg.checkpoint.save_dir
            if self.data_parallel_rank == 0:
                os.makedirs(save_dir, exist_ok=True)
                fsdp2.remove_orphan_shard_dirs(save_dir)
            entry = fsdp2.save_sharded(
                save_dir, self.get_num_updates(), self.model, self.criterion, self.optimizer.optimizer, with_optimizer
            )
            if scaler is not None:
                entry["loss_scale"] = scaler.loss_scale
            state[fsdp2.SHARDED_KEY] = entry
        else:  # --fsdp2-full-checkpoint: gather full tensors (collective), rank 0 keeps them
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            container = fsdp2._state_module(self.model, self.criterion)
            tensors = get_model_state_dict(container, options=options)
            state["model"] = fsdp2._split_names(tensors, "model.")
            state["criterion"] = fsdp2._split_names(tensors, "criterion.") or None
            if with_optimizer:
                osd = fsdp2._fairseq_optimizer_state(
                    get_optimizer_state_dict(container, self.optimizer.optimizer, options=options)
                )
                if scaler is not None:
                    osd["loss_scale"] = scaler.loss_scale
                state["last_optimizer_state"] = osd
        return state

    def save_checkpoint(self, filename, extra_state):
        if self.sharding is None:
            return super().save_checkpoint(filename, extra_state)
        if os.path.basename(filename) == "crash.pt":
            # fairseq writes crash.pt from the failing rank alone; a sharded save is collective and would hang
            logger.warning("--fsdp2: no crash.pt (saving sharded state needs every rank)")
            return None
        logger.info(f"Saving checkpoint to {os.path.abspath(filename)}")
        state = self.state_dict()  # collective
        if self.data_parallel_rank != 0:
            return None
        state["extra_state"].update(extra_state)
        checkpoint_utils.torch_persistent_save(state, filename)  # atomic: .tmp then rename
        logger.info(f"Finished saving checkpoint to {os.path.abspath(filename)}")
        return os.path.abspath(filename)

    @property
    def should_save_checkpoint_on_current_rank(self) -> bool:
        if self.sharding is not None:
            return self.is_data_parallel_master  # the others join through state_dict()
        return super().should_save_checkpoint_on_current_rank

    def load_checkpoint(
        self, filename, reset_optimizer=False, reset_lr_scheduler=False, optimizer_overrides=None, reset_meters=False
    ):
        # fairseq reads with torch.load's weights-only default, which refuses the argparse.Namespace that fairseq
        # itself stores for components configured without a dataclass (``cfg.optimizer`` of --optimizer sgd):
        # allow exactly the classes unilm_vl.checkpoint allows, so such runs resume
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            if self.sharding is None:
                return super().load_checkpoint(
                    filename, reset_optimizer, reset_lr_scheduler, optimizer_overrides, reset_meters
                )
            return self._load_sharded_checkpoint(
                filename, reset_optimizer, reset_lr_scheduler, optimizer_overrides, reset_meters
            )

    def _load_sharded_checkpoint(
        self, filename, reset_optimizer, reset_lr_scheduler, optimizer_overrides, reset_meters
    ):
        """Every rank reads the small file; model and optimizer state come from the shards directory (resharded to
        this run's ranks) or, for a regular checkpoint, from its full tensors."""
        from fairseq.file_io import PathManager
        from fairseq.logging import meters, metrics
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        logger.info(f"Preparing to load checkpoint {filename}")
        if not PathManager.isfile(filename):
            logger.info("No existing checkpoint found {}".format(filename))
            return None
        state = checkpoint_utils.load_checkpoint_to_cpu(filename, load_on_all_ranks=True)
        history = state["optimizer_history"]
        if history and "num_updates" in history[-1]:
            self.model.set_num_updates(history[-1]["num_updates"])
        load_optimizer = not reset_optimizer and (
            state.get("last_optimizer_state") is not None or state.get(fsdp2.SHARDED_KEY, {}).get("optimizer", False)
        )
        container = fsdp2._state_module(self.model, self.criterion)
        entry = state.get(fsdp2.SHARDED_KEY)
        if load_optimizer:
            self._build_optimizer()  # fresh optimizer for these (sharded) parameters, as fairseq does
            last = history[-1]
            if (
                last["criterion_name"] != self.get_criterion().__class__.__name__
                or last["optimizer_name"] != self.optimizer.__class__.__name__
            ):
                raise user_error(
                    f"{filename}: saved with {last['criterion_name']} / {last['optimizer_name']}, this "
                    f"run uses {self.get_criterion().__class__.__name__} / "
                    f"{self.optimizer.__class__.__name__}; pass --reset-optimizer to start a new one"
                )
        if entry:
            fsdp2.load_sharded(
                filename,
                entry,
                self.model,
                self.criterion,
                self.optimizer.optimizer if load_optimizer else None,
                load_optimizer,
            )
            loss_scale = entry.get("loss_scale")
        else:
            options = StateDictOptions(full_state_dict=True, strict=True)
            tensors = {f"model.{k}": v for k, v in state["model"].items()}
            if "criterion" in dict(container.named_children()):
                tensors.update({f"criterion.{k}": v for k, v in (state.get("criterion") or {}).items()})
            set_model_state_dict(container, tensors, options=options)
            loss_scale = None
            if load_optimizer:
                osd = state["last_optimizer_state"]
                loss_scale = osd.pop("loss_scale", None)
                set_optimizer_state_dict(
                    container,
                    self.optimizer.optimizer,
                    _named_optimizer_state(osd, container, self.optimizer.optimizer),
                    options=options,
                )
        if load_optimizer:
            if loss_scale is not None and getattr(self.optimizer, "scaler", None) is not None:
                self.optimizer.scaler.loss_scale = loss_scale
            if not reset_lr_scheduler:
                self.lr_scheduler.load_state_dict(history[-1]["lr_scheduler_state"])
            self.set_num_updates(history[-1]["num_updates"])
        self._optim_history = history
        extra_state = state["extra_state"]
        itr_state = extra_state["train_iterator"]
        epoch = itr_state["epoch"]
        if "previous_training_time" in extra_state:
            import time

            self._previous_training_time = extra_state["previous_training_time"]
            self._start_time = time.time()
        self.lr_step(epoch)
        if itr_state.get("version", 1) >= 2 and itr_state["iterations_in_epoch"] == 0:
            reset_meters = True
        if "metrics" in extra_state and not reset_meters:
            metrics.load_state_dict(extra_state["metrics"])
            for meter in metrics.get_meters("default"):
                if isinstance(meter, meters.TimeMeter):
                    meter.reset()
        logger.info("Loaded checkpoint {} (epoch {} @ {} updates)".format(filename, epoch, self.get_num_updates()))
        return extra_state


def _step_the_unscaled_optimizer(amp_optimizer) -> None:
    """FIX of fairseq 0.12's ``AMPOptimizer`` (on GPUs too): its ``clip_grad_norm`` unscales the gradients through
    ``GradScaler.unscale_(torch_optimizer)``, but its ``step`` passes the fairseq wrapper to ``GradScaler.step``,
    which keeps its "already unscaled" mark per optimizer object, finds none for the wrapper and unscales a second
    time: every update used gradients divided by the loss scale (invisible with Adam's scale invariance except
    through epsilon, fatal with SGD). Stepping the same torch optimizer that was unscaled is what fairseq intended
    (the wrapper's own step only forwards to it)."""
    scaler_owner = amp_optimizer

    def step():
        scaler_owner.scaler.step(scaler_owner.optimizer)
        scaler_owner.scaler.update()

    amp_optimizer.step = step


def _lean_fp32_optimizer(optimizer) -> None:
    """SHIM (speed only, same numbers): fairseq's plain fp32 ``adam`` (the ``FairseqAdam`` wrapper around
    ``fairseq.optim.adam.Adam``, no fp16/AMP wrapper) does per-parameter Python work on every update, which on small
    models is a visible share of a step (tiny CLIP on CPU, profiled: ~13% in ``Adam.step``, ~1.5% in the gradient
    norm and the multiplication of every gradient by ``1 / sample_size``). On this optimizer only:

    - ``multiply_grads(c)`` returns at once when ``c`` is the number 1 (contrastive criteria: sample_size 1), since
      ``g * 1.0 == g``;
    - ``clip_grad_norm`` computes the per-gradient norms with one ``torch._foreach_norm`` instead of one
      ``torch.norm`` each (the same kernel per tensor, so the same ``gnorm``; it is still computed and logged with
      ``--clip-norm 0``, and still raises fairseq's "gradients are Nan/Inf");
    - ``Adam.step`` runs :func:`_foreach_adam_step`, fairseq's update written with ``torch._foreach_*`` ops (the same
      element-wise operations in the same order: bit-identical parameters and moments), falling back to fairseq's
      loop for anything it does not cover (amsgrad, half-precision or sparse tensors, parameters at different
      steps).
    """
    from fairseq.optim.adam import Adam as FairseqAdamImpl
    from fairseq.optim.adam import FairseqAdam

    if type(optimizer) is not FairseqAdam or type(optimizer.optimizer) is not FairseqAdamImpl:
        return
    multiply_grads, clip_grad_norm = optimizer.multiply_grads, optimizer.clip_grad_norm

    def lean_multiply_grads(c):
        if not torch.is_tensor(c) and c == 1:
            return
        multiply_grads(c)

    def lean_clip_grad_norm(max_norm, aggregate_norm_fn=None):
        params = [p for p in optimizer.params if p.grad is not None]
        grads = [p.grad.detach() for p in params]
        if (
            len(grads) < 2
            or any(hasattr(p, "expert") for p in params)
            or any(g.dtype != torch.float32 or g.is_sparse or g.device != grads[0].device for g in grads)
        ):
            return clip_grad_norm(max_norm, aggregate_norm_fn)
        total_norm = torch.norm(torch.stack(torch._foreach_norm(grads, 2)))  # fairseq_utils.clip_grad_norm_'s value
        if aggregate_norm_fn is not None:
            total_norm = aggregate_norm_fn(total_norm)
        if max_norm > 0:
            clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
            torch._foreach_mul_(grads, clip_coef)
        return total_norm

    inner = optimizer.optimizer
    loop_step = inner.step

    def foreach_step(closure=None):
        if not _foreach_adam_step(inner):
            return loop_step(closure)
        return closure() if closure is not None else None

    optimizer.multiply_grads, optimizer.clip_grad_norm = lean_multiply_grads, lean_clip_grad_norm
    inner.step = foreach_step


# the smallest eps for which adam_denominators' zero-safe square root is exact (2^-39 ~ 1.8e-12, rounded up)
_ZERO_SAFE_SQRT_MIN_EPS = 1e-11


def adam_denominators(exp_avg_sq: List[torch.Tensor], eps: float) -> List[torch.Tensor]:
    """``sqrt(v) + eps`` for each second-moment tensor ``v``, bitwise as fairseq's ``exp_avg_sq.sqrt().add_(eps)``.

    torch's CPU square root (MKL's vector sqrt) is 4-5x slower on zeros than on normal numbers, and the embedding
    rows that no batch has reached keep ``v = 0`` (87% of CLIP's 49408 x 128 token table in
    benchmarks/clip_step.py: 20.5 vs 5.5 ms per step on its 6.3M entries). ``sqrt(max(v, tiny)) + eps`` is the same
    number: ``sqrt(tiny)`` ~ 1.1e-19 is below half an ulp of any ``eps >= 2^-39``, so adding eps rounds it away
    exactly as it rounds away ``sqrt(0)`` or the root of a denormal ``v``. Smaller eps take the plain root."""
    if eps >= _ZERO_SAFE_SQRT_MIN_EPS:
        denom = torch._foreach_clamp_min(exp_avg_sq, torch.finfo(torch.float32).tiny)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_add_(denom, eps)
    return denom


def _foreach_adam_step(adam) -> bool:
    """fairseq 0.12's ``Adam.step`` (``fairseq/optim/adam.py``) over each parameter group with ``torch._foreach_*``
    ops, for dense fp32 parameters and gradients on one device, without amsgrad, all at the same step. Returns False
    (nothing changed) when a group falls outside that, and the caller runs fairseq's loop instead."""
    groups = []
    for group in adam.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if group.get("amsgrad", False) or any(
            p.dtype != torch.float32
            or p.grad.dtype != torch.float32
            or p.grad.is_sparse
            or p.device != params[0].device
            for p in params
        ):
            return False
        states = [adam.state[p] for p in params]
        steps = {s.get("step", 0) for s in states}
        if len(steps) != 1 or any(
            s and ("exp_avg" not in s or s["exp_avg"].dtype != torch.float32 or s["exp_avg"].device != p.device)
            for s, p in zip(states, params)
        ):
            return False
        groups.append((group, params, states))
    for group, params, states in groups:
        for p, state in zip(params, states):
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p.data)
                state["exp_avg_sq"] = torch.zeros_like(p.data)
            state["step"] += 1
        beta1, beta2 = group["betas"]
        step = states[0]["step"]
        grads = [p.grad.data for p in params]
        data = [p.data for p in params]
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = adam_denominators(exp_avg_sq, group["eps"])
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if group["weight_decay"] != 0:
            torch._foreach_add_(data, data, alpha=-group["weight_decay"] * group["lr"])
        torch._foreach_addcdiv_(data, exp_avg, denom, value=-step_size)
    return True


def _named_optimizer_state(osd, container, optimizer):
    """fairseq's index-keyed optimizer state -> parameter-name keys, by the optimizer's parameter order."""
    names = {id(p): n for n, p in container.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {order[i]: v for i, v in osd["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}
