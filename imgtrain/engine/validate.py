"""One pass of a model over evaluation batches: the numbers every validation and test pass reports.

Loss is plain cross-entropy (no smoothing, whatever the training loss is), so runs with different
losses compare; everything is summed on the device and read once at the end (no host sync per batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

WORST_KEPT = 16  # validation images of highest loss kept per evaluation (the report's gallery)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     classes: list[str], device: torch.device, autocast: Callable[[], Any],
                     logit_offset: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean cross-entropy, top-1 and balanced accuracy, per-class recall, the confusion matrix (rows: true
    class) and the WORST_KEPT images of highest loss (by index in the batches' order). `batches` are on the
    device; `autocast()` gives the precision context; `logit_offset` is added to the logits (logit adjustment)."""
    model.eval()
    started = time.perf_counter()
    count = len(classes)
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(count * count, device=device, dtype=torch.long)
    worst_loss = torch.zeros(0, device=device)
    worst_index = torch.zeros(0, device=device, dtype=torch.long)
    offset = 0
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


__all__ = ["WORST_KEPT", "evaluate_batches"]
