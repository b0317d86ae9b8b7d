"""The training loop and evaluation: device, mixed precision, optimizer, LR schedule, decay schedule, early stopping.

Knows tensors and modules, not files: the pipeline passes an `on_epoch_end` callback that writes history and
checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lora_cls.errors import UserError
from lora_cls.lora import get_decay_state
from lora_cls.models import set_train_mode
from lora_cls.schedule import DecaySchedule

log = logging.getLogger(__name__)


# -- device and precision ---------------------------------------------------------------------------------

def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """`key` is the config key the value came from (lora-eval and lora-predict call it `device`)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={spec} but no CUDA device is available; use {key}=cpu or auto")
    return torch.device(spec)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX-512 BF16 / AMX), where bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    name: str  # "32" | "bf16" | "16"
    dtype: torch.dtype | None  # autocast dtype, None for float32
    use_scaler: bool  # fp16 needs loss scaling against gradient underflow; bf16 has float32's range


def resolve_precision(spec: str, device: torch.device) -> Precision:
    spec = str(spec)
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if torch.cuda.is_bf16_supported() else "16"
        else:
            spec = "bf16" if cpu_supports_bf16() else "32"
    if spec == "32":
        return Precision("32", None, False)
    if spec == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("trainer.precision=bf16 but this GPU has no bf16; use trainer.precision=16 or 32")
        if device.type == "cpu" and not cpu_supports_bf16():
            # Valid (lora-eval reuses a bf16 run's precision to reproduce its metrics), but oneDNN has no fast
            # bf16 kernels here: on an AVX2-only CPU a ResNet34 LoRA training step took 26x, an evaluation
            # 9x as long as in fp32 (docs/BENCHMARKS.md).
            log.warning("precision bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX) is emulated: "
                        "about 10-30x slower than fp32 here; precision 32 (or auto) is faster on this machine")
        return Precision("bf16", torch.bfloat16, False)
    if spec == "16":
        if device.type != "cuda":
            raise UserError("trainer.precision=16 (fp16 + GradScaler) needs a CUDA device; on CPU use bf16 or 32")
        return Precision("16", torch.float16, True)
    raise UserError(f"trainer.precision must be auto, 32, bf16 or 16; got {spec!r}")


def autocast(device: torch.device, precision: Precision):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def prepare_batch(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- optimizer and LR schedule ----------------------------------------------------------------------------

def build_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9, nesterov: bool = True,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    # Fused kernels (CUDA, and CPU on torch >= 2.4: an AdamW step over ResNet34's 21.8M parameters drops from
    # 73 to 13 ms, docs/BENCHMARKS.md); foreach (one multi-tensor op per step) where fusing is unsupported.
    fuse = device is not None and device.type in ("cuda", "cpu")
    if name == "adamw":
        make = lambda **kind: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,  # noqa: E731
                                                betas=tuple(betas), **kind)
    elif name == "sgd":
        make = lambda **kind: torch.optim.SGD(params, lr=lr, momentum=momentum,  # noqa: E731
                                              nesterov=nesterov and momentum > 0, weight_decay=weight_decay, **kind)
    else:
        raise UserError(f"optimizer.name must be adamw or sgd; got {name!r}")
    if fuse:
        try:
            return make(fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return make(foreach=True)


def warmup_cosine(total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over round(warmup_fraction·T) steps, then cosine down to min_lr_ratio."""
    warmup = round(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- evaluation -------------------------------------------------------------------------------------------

@dataclass
class EvalOutput:
    loss: float
    y_true: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, K) float32
    seconds: float

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def evaluate(model: nn.Module, loader: Iterable, preprocess: nn.Module, device: torch.device,
             precision: Precision, channels_last: bool = True, desc: str = "eval",
             progress: bool = True) -> EvalOutput:
    """Loss and class probabilities over a loader; adapters run merged (LoRALayer evaluates on W')."""
    was_training = model.training
    model.eval()
    preprocess.eval()
    losses, labels, probs = [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            x = preprocess(prepare_batch(x, device, channels_last))
            y = y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            labels.append(y)
            probs.append(logits.softmax(dim=1))
    model.train(was_training)
    if not labels:
        raise UserError(f"the {desc} split is empty")
    y_true = torch.cat(labels).cpu().numpy()
    return EvalOutput(loss=float(torch.stack(losses).sum().item() / len(y_true)), y_true=y_true,
                      probs=torch.cat(probs).cpu().numpy(), seconds=time.perf_counter() - start)


def recalibrate_batchnorm(model: nn.Module, loader: Iterable, preprocess: nn.Module, device: torch.device,
                          precision: Precision, channels_last: bool = True) -> None:
    """Recompute BatchNorm running statistics as the cumulative average over `loader`, at the model's current d.

    The weights change every step (and under a decay schedule so does d), so the exponential running averages
    mix the activations of many different networks and need not describe the one being evaluated. On the demo
    (random init) they held val accuracy at 0.50-0.61 while train accuracy was 0.94; recomputed: 0.96.
    Only BN layers run in training mode here; adapters run merged, without noise or dropout.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    preprocess.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    with torch.no_grad():
        for x, _ in loader:
            with autocast(device, precision):
                model(preprocess(prepare_batch(x, device, channels_last)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


# -- training ---------------------------------------------------------------------------------------------

@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    train_seconds: float = 0.0
    train_images: int = 0
    history: list[dict] = field(default_factory=list)


def is_better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


class Trainer:
    """Runs epochs of optimizer steps with the decay schedule stepped by the global step, validating each epoch."""

    def __init__(self, model: nn.Module, train_loader, val_loader, preprocess: nn.Module,
                 optimizer: torch.optim.Optimizer, lr_factor: Callable[[int], float], schedule: DecaySchedule,
                 device: torch.device, precision: Precision, epochs: int, steps_per_epoch: int,
                 bn: str = "train", channels_last: bool = True, monitor: str = "val_accuracy",
                 patience: int = 5, progress: bool = True, metrics_fn: Callable[[EvalOutput], dict] | None = None,
                 bn_loader: Iterable | None = None, validate_fn: Callable[[], EvalOutput] | None = None,
                 reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        # `model` may be a DistributedDataParallel wrapper: steps go through it, everything else uses the module.
        self.base_model: nn.Module = getattr(model, "module", model)
        self.validate_fn = validate_fn  # None: evaluate val_loader here; a distributed run shards and gathers
        self.reduce_fn = reduce_fn  # sums a tensor over processes (identity for one process)
        self.preprocess, self.optimizer, self.schedule = preprocess, optimizer, schedule
        self.device, self.precision, self.epochs = device, precision, epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.bn, self.channels_last, self.monitor, self.patience = bn, channels_last, monitor, patience
        self.progress = progress
        self.metrics_fn = metrics_fn
        # With training BN statistics, recompute them for the weights at each epoch's end (see
        # recalibrate_batchnorm); None = keep the running averages as they are.
        self.bn_loader = bn_loader if bn == "train" else None
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        self.decay = get_decay_state(self.base_model)
        self.state = FitState()

    @property
    def d(self) -> float:
        return 1.0 if self.decay is None else self.decay.value

    def _set_decay(self) -> None:
        if self.decay is not None:
            self.decay.set(self.schedule.factor(self.state.global_step, self.total_steps))

    def train_epoch(self) -> dict:
        model = self.model
        set_train_mode(self.base_model, True, self.bn)
        self.preprocess.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        epoch = self.state.epoch + 1
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        start = time.perf_counter()
        for step, (x, y) in enumerate(self.train_loader):
            if step >= self.steps_per_epoch:
                break
            self._set_decay()
            x = self.preprocess(prepare_batch(x, self.device, self.channels_last))
            y = y.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr_scheduler.step()
            self.state.global_step += 1
            n = y.shape[0]
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            if step % 10 == 0 or step + 1 == self.steps_per_epoch:
                # one host sync every few steps: catches a diverged loss early without stalling the GPU queue
                mean_loss = loss_sum.item() / seen
                if not math.isfinite(mean_loss) and self.reduce_fn is None:
                    raise NonFiniteLoss(self.state.global_step)  # (processes decide together, at epoch end)
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.1f}", d=f"{self.d:.3f}")
            bar.update(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        if self.reduce_fn is not None:
            totals = self.reduce_fn(torch.stack([loss_sum.double(), correct.double(),
                                                 torch.tensor(float(seen), device=self.device, dtype=torch.double)]))
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        mean_loss = loss_sum.item() / max(1, seen)
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(self.state.global_step)
        self.state.train_seconds += seconds
        self.state.train_images += seen
        return {"epoch": epoch, "step": self.state.global_step, "lr": lr, "d": self.d, "train_loss": mean_loss,
                "train_accuracy": correct.item() / max(1, seen), "images_per_second": seen / seconds,
                "seconds": seconds}

    def fit(self, on_epoch_end: Callable[[dict, bool], None] | None = None) -> FitState:
        """Train until `epochs` or early stopping; `on_epoch_end(row, improved)` after each validation."""
        while self.state.epoch < self.epochs and self.state.epochs_without_improvement < self.patience:
            row = self.train_epoch()
            if self.bn_loader is not None:
                recalibrate_batchnorm(self.base_model, self.bn_loader, self.preprocess, self.device, self.precision,
                                      self.channels_last)
            val = self.validate_fn() if self.validate_fn is not None else evaluate(
                self.base_model, self.val_loader, self.preprocess, self.device, self.precision,
                self.channels_last, desc="val", progress=self.progress)
            metrics = self.metrics_fn(val) if self.metrics_fn else {"loss": val.loss,
                                                                     "accuracy": float((val.y_pred == val.y_true).mean())}
            row.update({f"val_{k}": metrics.get(k) for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1")})
            self.state.epoch = row["epoch"]
            value = row[self.monitor]
            improved = value is not None and is_better(value, self.state.best_metric, self.monitor)
            if improved:
                self.state.best_metric, self.state.best_epoch = value, row["epoch"]
                self.state.epochs_without_improvement = 0
            else:
                self.state.epochs_without_improvement += 1
            self.state.history.append(row)
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.2e  d %.3f  %.1f img/s%s",
                     row["epoch"], self.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
                     row["val_accuracy"], row["lr"], row["d"], row["images_per_second"], "  *" if improved else "")
            if on_epoch_end is not None:
                on_epoch_end(row, improved)
        if self.state.epochs_without_improvement >= self.patience:
            log.info("early stopping: %s has not improved for %d epochs", self.monitor, self.patience)
        return self.state


class NonFiniteLoss(UserError):
    def __init__(self, step: int) -> None:
        super().__init__(f"the training loss became non-finite (NaN/inf) by step {step}; lower optimizer.lr or use "
                         "trainer.precision=32; the last good checkpoint is kept")
        self.step = step
