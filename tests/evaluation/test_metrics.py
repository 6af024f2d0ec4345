"""Every metric against a hand computation on a small fixed prediction set, and against
scikit-learn on a larger random one."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from imgtrain.evaluation.metrics import (
    MetricSuite,
    compute_metrics,
    format_metrics,
    read_confusion_csv,
    save_confusion_png,
    write_confusion_csv,
)

CLASSES = ["cat", "dog", "fox"]
# six images; the predicted class is the argmax: right, wrong (dog), right, wrong (fox), right, wrong (dog)
PROBS = torch.tensor([[0.70, 0.20, 0.10],
                      [0.10, 0.60, 0.30],
                      [0.20, 0.50, 0.30],
                      [0.30, 0.30, 0.40],
                      [0.10, 0.10, 0.80],
                      [0.05, 0.90, 0.05]])
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_metrics_match_a_hand_computation():
    m = compute_metrics(PROBS, TARGETS, CLASSES)
    assert m["images"] == 6
    assert m["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 1, 1]]  # rows: true class
    assert m["acc"] == pytest.approx(3 / 6)
    # precision: predicted cat 1x (right), dog 3x (1 right), fox 2x (1 right); recall 1/2 each
    assert [m["per_class"][c]["precision"] for c in CLASSES] == pytest.approx([1.0, 1 / 3, 1 / 2])
    assert [m["per_class"][c]["recall"] for c in CLASSES] == pytest.approx([0.5, 0.5, 0.5])
    f1 = [2 * 1 * 0.5 / 1.5, 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), 0.5]
    assert [m["per_class"][c]["f1"] for c in CLASSES] == pytest.approx(f1)
    assert [m["per_class"][c]["support"] for c in CLASSES] == [2, 2, 2]
    assert m["balanced_acc"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    picked = [0.70, 0.10, 0.50, 0.30, 0.80, 0.05]
    assert m["loss"] == pytest.approx(-sum(math.log(p) for p in picked) / 6, rel=1e-6)
    # each confidence (0.7, 0.6, 0.5, 0.4, 0.8, 0.9) falls in its own of the 15 bins, so ECE is
    # the mean |confidence - correct|
    assert m["ece"] == pytest.approx((0.3 + 0.6 + 0.5 + 0.4 + 0.2 + 0.9) / 6, rel=1e-5)
    assert "top5_acc" not in m  # three classes: top-5 would always be 100%


def test_top5_by_hand():
    classes = [str(i) for i in range(7)]
    logits = torch.arange(7, dtype=torch.float).repeat(3, 1)  # ranking 6 > 5 > 4 > 3 > 2 > 1 > 0
    probs = logits.softmax(dim=1)
    m = compute_metrics(probs, torch.tensor([6, 2, 1]), classes)  # top-5 is {6,5,4,3,2}
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["top5_acc"] == pytest.approx(2 / 3)


def test_balanced_accuracy_leaves_out_classes_without_images():
    # "fox" never occurs in the targets but is predicted once: its recall is undefined, not 0
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    targets = torch.tensor([0, 0, 1, 1])
    m = compute_metrics(probs, targets, CLASSES)
    assert m["balanced_acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["per_class"]["fox"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.warns(UserWarning):  # scikit-learn agrees, and warns about the absent class
        assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(targets, probs.argmax(1)))


def test_batched_updates_agree_with_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    n, k = 500, 12
    logits = torch.randn(n, k, generator=generator) * 2
    targets = torch.randint(0, k, (n,), generator=generator)
    probs = logits.softmax(dim=1)
    suite = MetricSuite(k)
    for start in range(0, n, 64):  # as a loader would feed it
        suite.update(probs[start:start + 64], targets[start:start + 64])
    classes = [f"c{i}" for i in range(k)]
    m = suite.compute(classes)
    preds = probs.argmax(1).numpy()
    assert m["confusion"] == confusion_matrix(targets, preds, labels=list(range(k))).tolist()
    precision, recall, f1, _support = precision_recall_fscore_support(targets, preds, labels=list(range(k)),
                                                                     zero_division=0)
    assert [m["per_class"][c]["precision"] for c in classes] == pytest.approx(precision)
    assert [m["per_class"][c]["recall"] for c in classes] == pytest.approx(recall)
    assert [m["per_class"][c]["f1"] for c in classes] == pytest.approx(f1)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(targets, preds))
    top5 = (probs.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean()
    assert m["top5_acc"] == pytest.approx(float(top5))
    # ECE by its definition: 15 equal-width bins of the confidence, weighted by the bin's share
    conf, hit = probs.max(1).values.numpy(), (probs.argmax(1) == targets).numpy()
    bins = np.clip(np.ceil(conf * 15) - 1, 0, 14)
    ece = sum((bins == b).mean() * abs(conf[bins == b].mean() - hit[bins == b].mean())
              for b in range(15) if (bins == b).any())
    assert m["ece"] == pytest.approx(ece, abs=1e-5)


def test_confusion_files_round_trip(tmp_path):
    m = compute_metrics(PROBS, TARGETS, CLASSES)
    path = write_confusion_csv(tmp_path / "confusion.csv", m["confusion"], CLASSES)
    assert read_confusion_csv(path) == (CLASSES, m["confusion"])
    png = save_confusion_png(tmp_path / "confusion.png", m["confusion"], CLASSES)
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 200 and image.std() > 10  # a drawn figure, not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.csv", "confusion.png"]  # no temp files left


def test_format_metrics_lists_every_class():
    text = format_metrics(compute_metrics(PROBS, TARGETS, CLASSES))
    assert "acc 50.00%" in text and "balanced 50.00%" in text
    assert [line.split()[0] for line in text.splitlines()[2:]] == CLASSES


def test_bad_shapes_are_refused():
    suite = MetricSuite(3)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        suite.update(torch.ones(4, 2) / 2, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="no predictions"):
        suite.compute(CLASSES)


def _shard_metrics(rank: int, world: int, port: int, probs, targets, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        suite = MetricSuite(probs.shape[1])
        # each process sees every other image, as a DistributedSampler would deal them
        suite.update(probs[rank::world], targets[rank::world])
        out[rank] = suite.compute([f"c{i}" for i in range(probs.shape[1])])
    finally:
        dist.destroy_process_group()


def test_metrics_of_shards_under_ddp_equal_the_whole_split():
    """Two gloo processes, half the images each: torchmetrics all-reduces its states, so both
    report the numbers of the whole split (not of their own half)."""
    import socket

    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(1)
    probs = (torch.randn(301, 8, generator=generator) * 2).softmax(dim=1)
    targets = torch.randint(0, 8, (301,), generator=generator)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_shard_metrics, args=(2, port, probs, targets, out), nprocs=2, join=True)
    whole = compute_metrics(probs, targets, [f"c{i}" for i in range(8)])
    for rank in (0, 1):
        shard = out[rank]
        assert shard["images"] == 301 and shard["confusion"] == whole["confusion"]
        for key in ("acc", "top5_acc", "balanced_acc", "macro_f1", "ece", "loss"):
            assert shard[key] == pytest.approx(whole[key], rel=1e-5), key
