"""The training loop and evaluation: steps under the decay schedule, BN recalibration, EMA, early stopping
(the optimizer and LR schedule are in optim.py).

Knows tensors and modules, not files. `Trainer` is built from one `TrainerSettings`; `Trainer.step(x, y)` is the
one training step (lora-train's epochs and scripts/bench.py both run it); `Trainer.fit(callback)` validates after
every epoch itself and reports each epoch to the callback object, which writes the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lora_cls.adapters.inject import get_decay_state, merged_view
from lora_cls.adapters.schedule import DecaySchedule
from lora_cls.data.loaders import eval_loader
from lora_cls.data.prefetch import prefetched
from lora_cls.engine import distributed
from lora_cls.engine.device import Runtime
from lora_cls.engine.ema import WeightEMA
from lora_cls.engine.evaluation import evaluate_split, recalibrate_batchnorm
from lora_cls.engine.loss import loss_and_logits
from lora_cls.engine.timing import Stopwatch, synchronize
from lora_cls.errors import UserError
from lora_cls.metrics.classification import classification_metrics
from lora_cls.models.finetune import set_train_mode, trainable_state

log = logging.getLogger(__name__)


# -- evaluation -------------------------------------------------------------------------------------------


# -- training ---------------------------------------------------------------------------------------------

@dataclass
class FitState:
    """Where training stands; the best epoch's metric, number and weights are kept together here."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter tensors of the best epoch
    epochs_without_improvement: int = 0
    stopped_early: bool = False  # ended by early stopping before the last epoch
    train_seconds: float = 0.0
    train_images: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def best_d(self) -> float:
        """The decay factor the best epoch was validated, saved and evaluated at (1.0 without a decay schedule)."""
        return next((float(row["d"]) for row in self.history if row["epoch"] == self.best_epoch), 1.0)


def is_better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


@dataclass(frozen=True)
class TrainerSettings:
    """Everything about how `Trainer` runs, apart from the model, its optimizer and the data.

    lr_factor: the LR multiplier of global step t (e.g. `warmup_cosine`); schedule: d(t) of the adapters.
    classes, positive_class: what validation metrics are computed over. bn: "train" recomputes BatchNorm
    statistics at each epoch's end (see `recalibrate_batchnorm`), "frozen" keeps the pretrained ones.
    label_smoothing, class_weight (one loss weight per class, or None): the training loss's (validation loss
    stays the plain cross-entropy). ema: the decay of a `WeightEMA` of the trainable weights (0: none).
    """

    runtime: Runtime
    epochs: int
    steps_per_epoch: int
    lr_factor: Callable[[int], float] = lambda step: 1.0
    schedule: DecaySchedule = field(default_factory=DecaySchedule)
    classes: Sequence[str] = ()
    positive_class: str | None = None
    eval_batch_size: int = 64
    bn: str = "train"
    monitor: str = "val_accuracy"
    patience: int = 5
    label_smoothing: float = 0.0
    class_weight: tuple[float, ...] | None = None
    ema: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class EpochCallback(Protocol):
    def on_epoch_end(self, trainer: Trainer, row: dict, improved: bool) -> None: ...


class Trainer:
    """Epochs of optimizer steps with the decay schedule stepped by the global step, validated after each epoch.

    `model` may be wrapped (DistributedDataParallel, torch.compile): steps go through it, everything else uses
    `base_model`. `train_loader` and `val_set` are needed by `fit` only: `step` runs on any batch. `timing` is
    the stopwatch the phases of `fit` are timed on (lora-train's covers the whole run); a new one by default.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, preprocess: nn.Module,
                 settings: TrainerSettings, train_loader: Iterable | None = None, val_set: Dataset | None = None,
                 timing: Stopwatch | None = None):
        self.model, self.optimizer, self.preprocess, self.settings = model, optimizer, preprocess, settings
        self.train_loader, self.val_set = train_loader, val_set
        # The module itself, under DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers.
        unwrapped = getattr(model, "module", model)
        self.base_model: nn.Module = getattr(unwrapped, "_orig_mod", unwrapped)
        self._graphs = unwrapped is not self.base_model and settings.runtime.device.type == "cuda"
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.lr_factor)
        self.scaler = torch.amp.GradScaler(settings.runtime.device.type, enabled=settings.runtime.precision.use_scaler)
        self.decay = get_decay_state(self.base_model)
        self.ema = WeightEMA(self.base_model, settings.ema) if settings.ema else None
        self._class_weight = (None if settings.class_weight is None else
                              torch.tensor(settings.class_weight, dtype=torch.float32, device=settings.runtime.device))
        self.state = FitState()
        self.timing = timing if timing is not None else Stopwatch(settings.runtime.device)
        self.first_step_started: float | None = None  # perf_counter() when this process's first step began
        self._waiting_for_d_min = False

    @property
    def d(self) -> float:
        return 1.0 if self.decay is None else self.decay.value

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a loader's batch (uint8 or float images (B, 3, S, S), labels (B,)) at the d of
        the current global step; returns the detached loss (a scalar on the device) and logits (B, K)."""
        rt = self.settings.runtime
        if self.decay is not None:
            self.decay.set(self.settings.schedule.factor(self.state.global_step, self.settings.total_steps))
        x = self.preprocess(rt.batch(x))
        y = y.to(rt.device, non_blocking=True)
        mix = getattr(self.preprocess, "mix", None)  # MixUp/CutMix (data.augment.TrainAugment): soft targets
        x, target = mix(x, y) if mix is not None and self.preprocess.training else (x, y)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: CUDA-graph outputs may be overwritten
        with rt.autocast():
            outputs = self.model(x)
        # GoogLeNet/Inception with aux heads: (logits, aux...)
        loss, logits = loss_and_logits(outputs, target, self._class_weight, self.settings.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.state.global_step += 1
        return loss.detach(), logits.detach()

    def train_epoch(self) -> dict:
        s, rt = self.settings, self.settings.runtime
        set_train_mode(self.base_model, True, s.bn)
        self.preprocess.train()
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), device=rt.device, dtype=torch.long)
        seen = 0
        epoch = self.state.epoch + 1
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(total=s.steps_per_epoch, desc=f"epoch {epoch}/{s.epochs}", leave=False,
                   disable=not rt.progress, dynamic_ncols=True)
        start = time.perf_counter()
        first_seconds, first_images = 0.0, 0
        batches = self._batches()
        try:
            for i, (x, y) in enumerate(batches):
                if i >= s.steps_per_epoch:
                    break
                y = y.to(rt.device, non_blocking=True)
                n = y.shape[0]
                if self.first_step_started is None:
                    loss, logits, first_seconds, first_images = (*self._first_step(x, y), n)
                else:
                    loss, logits = self.step(x, y)
                loss_sum += loss * n
                correct += (logits.argmax(1) == y).sum()
                seen += n
                if i % 10 == 0 or i + 1 == s.steps_per_epoch:
                    self._check_and_show(bar, i + 1, loss_sum.item() / seen, correct.item() / seen, seen, start)
                bar.update(1)
        finally:
            if hasattr(batches, "close"):
                batches.close()  # a prefetching thread stops here
        synchronize(rt.device)
        seconds = time.perf_counter() - start
        bar.close()
        if rt.dist.enabled:
            totals = distributed.all_reduce_sum(torch.stack([
                loss_sum.double(), correct.double(), torch.tensor(float(seen), device=rt.device, dtype=torch.double)]),
                rt.dist)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        mean_loss = loss_sum.item() / max(1, seen)
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(self.state.global_step)
        first_images *= rt.dist.world_size  # every process took its first step in this epoch
        if seen > first_images:  # the first step (compilation, autotuning) is timed apart, out of images/s
            seconds, timed_images = seconds - first_seconds, seen - first_images
        else:
            timed_images = seen
        self.state.train_seconds += seconds
        self.state.train_images += timed_images
        return {"epoch": epoch, "step": self.state.global_step, "lr": lr, "d": self.d, "train_loss": mean_loss,
                "train_accuracy": correct.item() / max(1, seen), "images_per_second": timed_images / seconds,
                "seconds": seconds}

    def _check_and_show(self, bar: tqdm, steps: int, mean_loss: float, accuracy: float, seen: int,
                        start: float) -> None:
        """Every few steps (one host sync, not one per step): stop a diverged loss early, update the bar."""
        if not math.isfinite(mean_loss) and not self.settings.runtime.dist.enabled:
            raise NonFiniteLoss(self.state.global_step)  # (several processes decide together, at epoch end)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{accuracy:.3f}", img_s=f"{seen / elapsed:.1f}",
                        d=f"{self.d:.3f}", run_left=self._run_eta(elapsed, steps))

    def _batches(self) -> Iterator:
        """The epoch's batches: the train loader's, passes after passes (each reshuffled) until steps_per_epoch
        (trainer.epochs=auto on a small set); on CUDA, from a loader in this process (the decoded-image cache),
        gathered and pinned one step ahead in a thread (data/prefetch.py) so the copies overlap the GPU's work."""
        loader = self.train_loader
        batches = _passes(loader, self.settings.steps_per_epoch)
        if self.settings.runtime.device.type == "cuda" and getattr(loader, "num_workers", 1) == 0:
            return prefetched(batches)
        return batches

    def _first_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This process's first step, timed to its end: it pays torch.compile's compilation and cuDNN's
        autotuning, which the log reports and images/s leaves out."""
        self.first_step_started = time.perf_counter()
        loss, logits = self.step(x, y)
        synchronize(self.settings.runtime.device)
        seconds = time.perf_counter() - self.first_step_started
        self.timing.add("first_step", seconds)
        log.info("first step: %.2f s (compilation and autotuning happen here; not counted in images/s)", seconds)
        return loss, logits, seconds

    def _run_eta(self, epoch_seconds: float, epoch_steps: int) -> str:
        """Time left for the whole run's training steps, at this epoch's pace (validation not counted)."""
        left = max(0, self.settings.total_steps - self.state.global_step) * epoch_seconds / max(1, epoch_steps)
        minutes, seconds = divmod(int(left + 0.5), 60)
        return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"

    def averaged_weights(self) -> contextlib.AbstractContextManager:
        """With trainer.ema: the model holds the averaged weights inside this context; else it changes nothing."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def validate(self) -> dict:
        """Validation metrics of the model as it is now (BN statistics recomputed first under bn=train)."""
        s = self.settings
        view = merged_view(self.base_model)  # merged once for both passes: recalibration leaves the weights alone
        if s.bn == "train":
            with self.timing.phase("bn_recalibration"):
                recalibrate_batchnorm(view, eval_loader(self.train_loader.dataset, s.eval_batch_size),
                                      self.preprocess, s.runtime.device, s.runtime.precision, s.runtime.channels_last)
        out = evaluate_split(view, self.val_set, self.preprocess, s.runtime, s.eval_batch_size, "val",
                             len(s.classes))
        return classification_metrics(out.y_true, out.probs, list(s.classes), s.positive_class, loss=out.loss)

    def fit(self, callback: EpochCallback | None = None) -> FitState:
        """Train until `epochs` or early stopping; `callback.on_epoch_end(trainer, row, improved)` after each
        validation, once this epoch's row is in the history and an improvement is in `state.best_state`."""
        s, state = self.settings, self.state
        while state.epoch < s.epochs and not self._stops_early():
            row = self.train_epoch()
            with self.averaged_weights(), self.timing.phase("validation"):  # the EMA weights, when on
                metrics = self.validate()
                row.update({f"val_{k}": metrics.get(k) for k in ("loss", "accuracy", "balanced_accuracy",
                                                                   "macro_f1")})
                value = row[s.monitor]
                improved = value is not None and is_better(value, state.best_metric, s.monitor)
                if improved:
                    state.best_state = trainable_state(self.base_model, s.bn)
            state.epoch = row["epoch"]
            if improved:
                state.best_metric, state.best_epoch = value, row["epoch"]
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            state.history.append(row)
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.2e  d %.3f  %.1f img/s%s",
                     row["epoch"], s.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
                     row["val_accuracy"], row["lr"], row["d"], row["images_per_second"], "  *" if improved else "")
            if callback is not None:
                with self.timing.phase("writing"):
                    callback.on_epoch_end(self, row, improved)
        state.stopped_early = state.epoch < s.epochs
        if state.stopped_early:
            log.info("early stopping at epoch %d of %d: %s has not improved for %d epochs", state.epoch, s.epochs,
                     s.monitor, state.epochs_without_improvement)
        return state

    def _stops_early(self) -> bool:
        """Patience ran out, and a decay schedule (if any) has reached d_min: stopping earlier would end the
        hand-over from W to the adapter half-way and save an epoch that still leans on the frozen weight."""
        s, state = self.settings, self.state
        if state.epochs_without_improvement < s.patience:
            return False
        if s.schedule.reached_end(state.global_step, s.total_steps):
            return True
        if not self._waiting_for_d_min:
            self._waiting_for_d_min = True
            log.info("%s has not improved for %d epochs, but d (%.3g) has not reached d_min=%g yet: training goes "
                     "on until it does", s.monitor, state.epochs_without_improvement, self.d, s.schedule.d_min)
        return False


def _passes(loader: Iterable, steps: int) -> Iterator:
    """Up to `steps` batches of `loader`, starting it again (a new shuffle) each time it ends."""
    taken = 0
    while taken < steps:
        before = taken
        for batch in loader:
            yield batch
            taken += 1
            if taken >= steps:
                return
        if taken == before:  # an empty loader
            return


class NonFiniteLoss(UserError):
    def __init__(self, step: int) -> None:
        super().__init__(f"the training loss became non-finite (NaN/inf) by step {step}; lower optimizer.lr or use "
                         "trainer.precision=32; the last good checkpoint is kept")
        self.step = step
