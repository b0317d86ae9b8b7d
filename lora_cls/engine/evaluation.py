"""Evaluation on the merged view of a model: loss and class probabilities over a loader or a whole split
(sharded over processes), test-time augmentation, and BatchNorm statistics recomputed for the current weights."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from lora_cls.adapters.inject import merged_view
from lora_cls.data.loaders import eval_loader
from lora_cls.engine import distributed
from lora_cls.engine.device import Precision, Runtime, autocast, prepare_batch
from lora_cls.engine.loss import plain_logits
from lora_cls.errors import UserError


@dataclass
class EvalOutput:
    loss: float
    y_true: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, K) float32 (divided by `temperature` before the softmax when one is given)
    seconds: float
    logits: np.ndarray | None = None  # (N, K) float32, the model's own (tta: log of the views' mean probability)

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


TTA_MODES = ("none", "flip")


def tta_views(x: torch.Tensor, tta: str) -> torch.Tensor:
    """The batch the model sees for test-time augmentation `tta`: x itself, or (flip) x followed by its mirror."""
    return torch.cat([x, x.flip(-1)]) if tta == "flip" else x


def merge_views(probs: torch.Tensor, tta: str) -> torch.Tensor:
    """Class probabilities of `tta_views` (V·N, K) → (N, K): their mean over the V views."""
    return probs.view(2, -1, probs.shape[-1]).mean(0) if tta == "flip" else probs


def evaluate(model: nn.Module, loader: Iterable, preprocess: nn.Module, device: torch.device,
             precision: Precision, channels_last: bool = True, desc: str = "eval",
             progress: bool = True, tta: str = "none", temperature: float = 1.0) -> EvalOutput:
    """Loss and class probabilities over a loader, on `merged_view(model)`: the adapters merged into plain layers.
    With `tta` (flip) the probabilities are the mean over the image and its mirror, and the loss is the negative
    log of that mean's probability of the true class. A `temperature` T divides the logits before the softmax
    (probabilities and loss; the prediction is the same); `logits` are kept unscaled."""
    model = merged_view(model)
    was_training = model.training
    model.eval()
    preprocess.eval()
    losses, labels, probs, raw = [], [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            x = preprocess(prepare_batch(x, device, channels_last))
            y = y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = plain_logits(model(tta_views(x, tta)))
            logits = logits.float()
            if tta == "none":
                losses.append(F.cross_entropy(logits / temperature, y, reduction="sum"))
                p = (logits / temperature).softmax(dim=1)
                raw.append(logits)
            else:
                p = merge_views((logits / temperature).softmax(dim=1), tta)
                losses.append(F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum"))
                raw.append(merge_views(logits.softmax(dim=1), tta).clamp_min(1e-30).log())
            labels.append(y)
            probs.append(p)
    model.train(was_training)
    if not labels:
        raise UserError(f"the {desc} split is empty")
    y_true = torch.cat(labels).cpu().numpy()
    loss = float(torch.stack(losses).sum().item() / len(y_true))
    if not math.isfinite(loss):  # never a NaN loss reported as a result: the weights themselves are broken
        raise UserError(f"evaluation on the {desc} split gave a non-finite loss (NaN/inf): the model's weights "
                        "hold non-finite values (a damaged checkpoint or a diverged run)")
    return EvalOutput(loss=loss, y_true=y_true, probs=torch.cat(probs).cpu().numpy(),
                      seconds=time.perf_counter() - start, logits=torch.cat(raw).cpu().numpy())


def evaluate_split(model: nn.Module, dataset: Dataset, preprocess: nn.Module, runtime: Runtime, batch_size: int,
                   desc: str, num_classes: int) -> EvalOutput:
    """`evaluate` over a whole dataset; with several processes each evaluates its unpadded shard and the shards
    are gathered, so every sample is counted exactly once."""
    info = runtime.dist
    args = (preprocess, runtime.device, runtime.precision, runtime.channels_last)
    if not info.enabled:
        return evaluate(model, eval_loader(dataset, batch_size), *args, desc=desc, progress=runtime.progress)
    indices = distributed.shard(len(dataset), info)
    if len(indices):
        out = evaluate(model, eval_loader(Subset(dataset, indices), batch_size), *args, desc=desc,
                       progress=runtime.progress)
    else:
        empty = np.zeros((0, num_classes), np.float32)
        out = EvalOutput(0.0, np.zeros(0, dtype=np.int64), empty, 0.0, empty)
    loss_sum = np.array([out.loss * len(out.y_true)])
    y_true, probs, logits, losses = distributed.gather_arrays([out.y_true, out.probs, out.logits, loss_sum], info)
    return EvalOutput(loss=float(losses.sum() / len(y_true)), y_true=y_true, probs=probs, seconds=out.seconds,
                      logits=logits)


def recalibrate_batchnorm(model: nn.Module, loader: Iterable, preprocess: nn.Module, device: torch.device,
                          precision: Precision, channels_last: bool = True) -> None:
    """Recompute BatchNorm running statistics as the cumulative average over `loader`, at the model's current d.

    The weights change every step (and under a decay schedule so does d), so the exponential running averages
    mix the activations of many different networks and need not describe the one being evaluated. On the demo
    (random init) they held val accuracy at 0.50-0.61 while train accuracy was 0.94; recomputed: 0.96.
    Only BN layers run in training mode here; adapters run merged, without noise or dropout.
    """
    model = merged_view(model)  # shares its BatchNorm layers with the model: their statistics are the model's
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
            if x.shape[0] == 1 and len(loader) > 1:
                # A last batch of one image: BatchNorm cannot take statistics of one value per channel (1x1
                # maps), and the cumulative average over the other batches barely moves without it.
                continue
            with autocast(device, precision):
                model(preprocess(prepare_batch(x, device, channels_last)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
