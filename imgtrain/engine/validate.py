"""One pass of a model over evaluation batches: the numbers every validation and test pass reports.

Loss is plain cross-entropy (no smoothing, whatever the training loss is), so runs with different
losses compare; everything is summed on the device and read once at the end (no host sync per batch).

Under a process group (several ranks, each evaluating its own shard: engine/distributed.py
ShardedEvalSampler) the loss sum and the confusion counts are summed across ranks and the worst images
merged before any number is computed, so every rank returns the numbers of the whole evaluation set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from imgtrain.engine.distributed import is_distributed

WORST_KEPT = 16  # validation images of highest loss kept per evaluation (the report's gallery)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     classes: list[str], device: torch.device, autocast: Callable[[], Any],
                     logit_offset: torch.Tensor | None = None, index_offset: int = 0) -> dict[str, Any]:
    """Mean cross-entropy, top-1 and balanced accuracy, per-class recall, the confusion matrix (rows: true
    class) and the WORST_KEPT images of highest loss (by index in the batches' order, plus `index_offset`).
    `batches` are on the device; `autocast()` gives the precision context; `logit_offset` is added to the
    logits (logit adjustment).

    With a process group of several ranks every rank must call this (it runs collectives), each on its own
    contiguous shard with `index_offset` the dataset index of the shard's first image
    (`ShardedEvalSampler.offset`); all ranks then return the numbers of all the shards together."""
    model.eval()
    started = time.perf_counter()
    count = len(classes)
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(count * count, device=device, dtype=torch.long)
    worst_loss = torch.zeros(0, device=device)
    worst_index = torch.zeros(0, device=device, dtype=torch.long)
    offset = index_offset
    for inputs, targets in batches:
        with autocast():
            outputs = model(inputs)
        if logit_offset is not None:
            outputs = outputs.float() + logit_offset
        losses = F.cross_entropy(outputs.float(), targets, reduction="none")
        loss_sum += losses.sum()
        confusion += torch.bincount(targets * count + outputs.argmax(1), minlength=count * count)
        # a running top-k on the device: no host sync per batch
        worst_loss, keep = torch.cat([worst_loss, losses]).topk(min(WORST_KEPT, len(worst_loss) + len(losses)))
        worst_index = torch.cat([worst_index, offset + torch.arange(len(losses), device=device)])[keep]
        offset += len(losses)
    if is_distributed():
        loss_sum, confusion, worst_loss, worst_index = _merge_ranks(loss_sum, confusion, worst_loss, worst_index)
    matrix = confusion.view(count, count).cpu()
    total, correct = matrix.sum(dim=1), matrix.diagonal()
    seen = max(int(total.sum()), 1)
    present = total > 0
    recall = torch.where(present, correct.double() / total.clamp_min(1), torch.zeros(()))
    return {"loss": loss_sum.item() / seen, "acc": int(correct.sum()) / seen,
            "balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
            "per_class_recall": {c: (float(r) if p else None) for c, r, p in zip(classes, recall, present)},
            "confusion": matrix.tolist(),
            "worst": [{"index": int(i), "loss": float(v)} for i, v in zip(worst_index.cpu(), worst_loss.cpu())],
            "seconds": time.perf_counter() - started}


def _merge_ranks(loss_sum: torch.Tensor, confusion: torch.Tensor, worst_loss: torch.Tensor,
                 worst_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's sums added up and its worst images merged: the whole evaluation set's, on every rank.

    The shards do not overlap and are not padded, so plain sums count each image once. The loss is summed
    in float64 so that splitting the set into shards changes the mean by rounding only."""
    loss_total = loss_sum.double()
    dist.all_reduce(loss_total)
    confusion = confusion.clone()
    dist.all_reduce(confusion)
    # all_gather needs one shape on every rank, and a rank may hold fewer than WORST_KEPT (or no) images:
    # pad to WORST_KEPT with index -1, dropped after the gather
    kept = len(worst_loss)
    padded_loss = torch.full((WORST_KEPT,), float("-inf"), device=worst_loss.device, dtype=worst_loss.dtype)
    padded_index = torch.full((WORST_KEPT,), -1, device=worst_index.device, dtype=worst_index.dtype)
    padded_loss[:kept], padded_index[:kept] = worst_loss, worst_index
    world = dist.get_world_size()
    losses = [torch.empty_like(padded_loss) for _ in range(world)]
    indices = [torch.empty_like(padded_index) for _ in range(world)]
    dist.all_gather(losses, padded_loss)
    dist.all_gather(indices, padded_index)
    all_loss, all_index = torch.cat(losses), torch.cat(indices)
    real = all_index >= 0
    all_loss, all_index = all_loss[real], all_index[real]
    worst_loss, keep = all_loss.topk(min(WORST_KEPT, len(all_loss)))
    return loss_total, confusion, worst_loss, all_index[keep]


__all__ = ["WORST_KEPT", "evaluate_batches"]
