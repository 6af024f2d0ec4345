"""Typed recipe: one dataclass per section, YAML loading, `extends:`, dotted overrides.

A recipe is a YAML mapping with the sections below. Every key is declared here with its
type, default, allowed range and unit, so a typo or a wrong value is caught before any
work starts, with the file, the dotted key, the line and the closest valid key.

    recipe = load_recipe("configs/fashion_mnist.yaml", ["train.epochs=3"])
    recipe.train.epochs  # 3

`extends: other.yaml` (a path relative to the recipe, or the bare name of a built-in
recipe such as `quickstart`) loads that recipe first and deep-merges this one over it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

BUILTIN_RECIPES = Path(__file__).parent / "configs"


class RecipeError(ValueError):
    """A recipe problem the user can fix: says where (file, key, line) and what to do."""

    def __init__(self, message: str, file: Optional[str] = None, key: Optional[str] = None,
                 line: Optional[int] = None):
        self.file, self.key, self.line = file, key, line
        where = ""
        if file:
            where = f"{file}" + (f", line {line}" if line else "") + ": "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


def param(default: Any = dataclasses.MISSING, *, min: Optional[float] = None,
          max: Optional[float] = None, choices: Optional[tuple] = None,
          min_exclusive: bool = False, default_factory: Any = dataclasses.MISSING):
    """A recipe field with its allowed range or choices (checked by `validate`)."""
    meta = {"min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- sections

@dataclass
class ShapesConfig:
    """The synthetic `shapes` source: coloured shapes on a noisy background."""
    num_classes: int = param(4, min=2, max=8)        # circle, square, triangle, cross, star, ...
    image_size: int = param(32, min=8, max=512)      # pixels, square
    train_size: int = param(2000, min=1)             # images in the train split
    val_size: int = param(400, min=0)                # images in the val split
    test_size: int = param(400, min=0)               # images in the test split
    min_scale: float = param(0.35, min=0.05, max=1.0)  # shape size, fraction of the image side
    max_scale: float = param(0.8, min=0.05, max=1.0)  # largest shape size, fraction of the side
    rotation: float = param(180.0, min=0.0, max=360.0)  # max rotation, degrees either way
    noise: float = param(0.05, min=0.0, max=1.0)     # std of Gaussian pixel noise, fraction of 255
    imbalance: float = param(1.0, min=1.0)           # train: largest class count / smallest
    seed: int = 0                                    # generator seed: same seed, same images


@dataclass
class DataConfig:
    source: str = param("digits", choices=("imagefolder", "csv", "fashion-mnist", "digits", "shapes"))  # where images come from
    root: Optional[str] = None            # imagefolder: the folder; csv: the manifest; fashion-mnist: the IDX folder
    image_root: Optional[str] = None      # csv: folder the paths are relative to (default: the csv's)
    val_fraction: float = param(0.1, min=0.0, max=0.9)   # carved from train when no val split exists
    test_fraction: float = param(0.0, min=0.0, max=0.9)  # carved from train when no test split exists
    split_seed: int = 0                   # seed of the automatic stratified split
    train_subset: Optional[int] = param(None, min=1)  # keep N training images (stratified), for quick runs
    batch_size: int = param(128, min=1)   # images per step, per device
    eval_batch_size: Optional[int] = param(None, min=1)  # default: 2 x batch_size
    workers: Union[int, str] = 0          # loader processes, or "auto"
    pin_memory: Union[bool, str] = "auto"  # auto: on when training on CUDA
    on_bad_image: str = param("error", choices=("error", "skip"))  # unreadable files: stop, or skip and list them
    cache: str = param("off", choices=("off", "memory", "disk"))  # decoded uint8 cache of file images
    cache_dir: str = ".imgtrain_cache"    # disk cache folder (memory-mapped files), keyed by the file list
    prefetch_factor: int = param(2, min=1)  # batches each worker prepares ahead (workers > 0)
    persistent_workers: bool = True       # keep workers between epochs (off in deterministic mode)
    sampler: str = param("random", choices=("random", "balanced", "per_class"))  # balanced: classes drawn equally
    images_per_class: int = param(4, min=1)  # sampler per_class: a batch holds batch_size/this classes
    shapes: ShapesConfig = field(default_factory=ShapesConfig)  # the shapes generator's knobs


@dataclass
class AugmentConfig:
    """Per-image transforms (torchvision v2). Probabilities are in [0, 1]."""
    img_size: Optional[int] = param(None, min=4)   # train/eval resolution, pixels; default: native
    random_resized_crop: bool = False      # Inception-style crop of scale x ratio, resized to img_size
    scale: List[float] = param(default_factory=lambda: [0.08, 1.0])      # crop area range, fraction
    ratio: List[float] = param(default_factory=lambda: [0.75, 4 / 3])    # crop aspect range
    pad_crop: int = param(0, min=0)        # pad by N pixels then random crop back (CIFAR style)
    hflip: float = param(0.0, min=0.0, max=1.0)    # probability of a horizontal flip
    vflip: float = param(0.0, min=0.0, max=1.0)    # probability of a vertical flip
    color_jitter: float = param(0.0, min=0.0, max=1.0)  # brightness, contrast, saturation strength
    hue: float = param(0.0, min=0.0, max=0.5)      # hue jitter (3-channel images only)
    grayscale: float = param(0.0, min=0.0, max=1.0)  # probability of turning an image grey
    rotation: float = param(0.0, min=0.0, max=180.0)  # random rotation, max degrees either way
    translate: List[float] = param(default_factory=lambda: [0.0, 0.0])  # random affine max shift [dx, dy], fractions
    affine_scale: List[float] = param(default_factory=lambda: [1.0, 1.0])  # random affine zoom range
    shear: float = param(0.0, min=0.0, max=45.0)     # random affine shear, max degrees
    perspective: float = param(0.0, min=0.0, max=1.0)  # probability of a random perspective warp
    policy: str = param("none", choices=("none", "randaugment", "autoaugment", "trivialaugment", "augmix"))
    num_ops: int = param(2, min=1, max=10)            # randaugment: operations per image
    magnitude: int = param(9, min=0, max=30)          # randaugment: strength (of 31 bins)
    autoaugment_policy: str = param("imagenet", choices=("imagenet", "cifar10", "svhn"))
    augmix_severity: int = param(3, min=1, max=10)
    erasing: float = param(0.0, min=0.0, max=1.0)     # probability of random erasing (cutout)
    erasing_scale: List[float] = param(default_factory=lambda: [0.02, 0.33])  # erased area, fraction
    erasing_value: str = param("zero", choices=("zero", "random"))  # fill of the erased box
    device_transforms: str = param("auto", choices=("auto", "on", "off"))  # batch augmentation on the device
    normalize: str = param("compute", choices=("compute", "imagenet", "none", "given"))  # compute: from train images
    mean: Optional[List[float]] = None     # with normalize: given, one value per channel (0..1 scale)
    std: Optional[List[float]] = None      # with normalize: given, one value per channel (0..1 scale)
    crop_pct: float = param(1.0, min=0.1, max=1.0)  # eval: resize to img_size/crop_pct, centre crop


@dataclass
class ModelConfig:
    name: str = "imgtrain_cnn_small"      # any timm model name or one of ours (`imgtrain models`)
    weights: Optional[str] = None         # starting weights: null (random), timm, a run folder or a .safetensors file
    weights_file: Optional[str] = None    # a local timm/torchvision checkpoint: .safetensors, .pth, .pt, .bin
    drop_rate: float = param(0.0, min=0.0, max=1.0)  # dropout before the classifier
    drop_path_rate: float = param(0.0, min=0.0, max=1.0)  # stochastic depth (timm models that have it)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


@dataclass
class SamConfig:
    """optim.sam: sharpness-aware minimisation (strategies/sam.py); two forward/backward passes per step."""
    # radius of the weight perturbation (L2 norm, weight units); SAM: 0.01 to 0.2. ASAM measures it
    # relative to |w| and usually wants a larger one: 0.5 to 2
    rho: float = param(0.05, min=0.0, min_exclusive=True)
    adaptive: bool = False                # true: ASAM, the perturbation scaled elementwise by |w| (Kwon et al. 2021)


@dataclass
class OptimConfig:
    name: str = param("sgd", choices=("sgd", "adamw"))   # optimizer
    lr: Union[float, str] = param(0.1, min=0.0, min_exclusive=True)  # peak learning rate, for the effective batch; or find: the LR finder picks it
    momentum: float = param(0.9, min=0.0, max=1.0)       # sgd
    nesterov: bool = True                                 # sgd
    betas: List[float] = param(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = param(1e-8, min=0.0, min_exclusive=True)              # adamw
    weight_decay: float = param(5e-4, min=0.0)
    decay_norm_and_bias: bool = False     # false: no weight decay on norm and bias parameters
    sam: Optional[SamConfig] = None       # sharpness-aware minimisation: {rho, adaptive}; null: off


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step."""
    name: str = param("onecycle", choices=("constant", "step", "multistep", "cosine",  # lr schedule
                                           "warmup_cosine", "onecycle"))
    warmup_epochs: float = param(0.0, min=0.0)      # linear warmup, epochs (cosine, constant, step)
    warmup_start_factor: float = param(0.01, min=0.0, max=1.0)  # lr at step 0, fraction of peak
    min_lr: float = param(0.0, min=0.0)             # cosine floor, absolute
    step_epochs: float = param(30.0, min=0.0, min_exclusive=True)  # step: decay every N epochs
    milestones: List[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])  # multistep: epochs
    gamma: float = param(0.1, min=0.0, max=1.0)     # step/multistep decay factor
    pct_start: float = param(0.25, min=0.0, max=1.0)   # onecycle: fraction of steps going up
    div_factor: float = param(25.0, min=1.0)        # onecycle: start lr = lr / div_factor
    final_div_factor: float = param(1e4, min=1.0)   # onecycle: final lr = start lr / this
    cycle_momentum: bool = True                     # onecycle: momentum (or beta1) cycles inversely
    base_momentum: float = param(0.85, min=0.0, max=1.0)  # onecycle: momentum at the lr peak
    max_momentum: float = param(0.95, min=0.0, max=1.0)   # onecycle: momentum at the start and end


@dataclass
class MixConfig:
    """Mixup / CutMix on training batches (soft targets; strategies/mixing.py)."""
    mixup_alpha: Optional[float] = None              # Beta(alpha, alpha) for mixup; null: off
    cutmix_alpha: Optional[float] = None             # Beta(alpha, alpha) for cutmix; null: off
    switch_prob: float = param(0.5, min=0.0, max=1.0)  # with both on: probability of cutmix
    prob: float = param(1.0, min=0.0, max=1.0)       # probability a batch is mixed at all
    off_epoch: Optional[int] = param(None, min=0)    # no mixing from this epoch on (0-based)


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm's ModelEmaV3)."""
    enabled: bool = False
    decay: float = param(0.9998, min=0.0, max=1.0)   # per optimizer step
    warmup: bool = True                              # smaller decay early (timm's warmup)
    validate: bool = True                            # validate (and pick the best) on the EMA weights


@dataclass
class SwaConfig:
    """Stochastic weight averaging (strategies/swa.py): an equal average of the end-of-epoch weights."""
    start_epoch: Optional[int] = param(None, min=0)  # 0-based epoch SWA starts (averaged at its end); null: off
    lr: Optional[float] = param(None, min=0.0, min_exclusive=True)  # constant lr after annealing, for the effective batch; null: keep the schedule's lr
    anneal_epochs: float = param(1.0, min=0.0)       # epochs of annealing from the current lr to swa.lr
    anneal_strategy: str = param("cos", choices=("cos", "linear"))  # shape of that annealing


@dataclass
class ImbalanceConfig:
    """Class-imbalance tools (losses.py, data/samplers.py)."""
    class_weights: Union[str, List[float]] = "none"  # none | inverse | effective | one weight per class
    effective_beta: float = param(0.999, min=0.0, max=1.0)  # effective number of samples: (1-b^n)/(1-b)
    loss: str = param("ce", choices=("ce", "focal", "logit_adjusted"))
    focal_gamma: float = param(2.0, min=0.0)
    focal_alpha: Optional[float] = param(None, min=0.0, max=1.0)
    tau: float = param(1.0, min=0.0)                 # logit adjustment strength
    posthoc_adjust: bool = False                     # subtract tau*log(prior) from logits at evaluation


@dataclass
class TransferConfig:
    """Which layer groups train when (strategies/transfer.py). Groups come from timm's group matcher:
    stem, then stages (or blocks), then the head; they are numbered from the stem."""
    groups: str = param("stage", choices=("stage", "block"))  # group granularity: timm's coarse or fine matcher
    freeze_backbone: bool = False            # train only the head (feature extraction)
    freeze_layers: int = param(0, min=0)     # keep the first N groups (stem = 1) frozen all run
    freeze_epochs: int = param(0, min=0)     # head only for N epochs, then everything (fastai fine_tune)
    unfreeze_epochs: List[int] = field(default_factory=list)  # gradual: one more group from the top at each epoch (0-based)
    layer_decay: Optional[float] = param(None, min=0.0, max=1.0, min_exclusive=True)  # group lr = lr x decay^(groups above it)
    group_lrs: Optional[List[float]] = None  # explicit lr per group, stem first, head last (instead of layer_decay)
    bn_frozen_eval: bool = True              # BatchNorm of frozen groups stays in eval mode (running stats fixed)


@dataclass
class EarlyStopConfig:
    """End the run when a metric stops improving (strategies/early_stopping.py)."""
    monitor: Optional[str] = None            # a history.csv column (val_loss, val_acc ...); null: off
    mode: str = param("auto", choices=("auto", "min", "max"))  # auto: min for losses, max otherwise
    patience: int = param(5, min=1)          # epochs without improvement before stopping
    min_delta: float = param(0.0, min=0.0)   # an improvement must beat the best by more than this
    restore_best: bool = False               # put the best epoch's weights back at the end


@dataclass
class CurriculumConfig:
    """Curriculum learning: easiest images first, the pool grows to all of them (strategies/curriculum.py)."""
    difficulty: Optional[str] = None          # what ranks the images: none | reference | self_paced | csv; null: off
    reference: Optional[str] = None           # difficulty reference: a run folder or .safetensors; its per-image loss
    csv: Optional[str] = None                 # difficulty csv: a CSV with one row per training image
    column: str = "difficulty"                # csv: the column with the difficulty (higher = harder)
    id_column: Optional[str] = None           # csv: the column naming the image; default: path (file sources) or index
    pacing: str = param("linear", choices=("linear", "root", "step"))  # how the pool grows from start_fraction to 1
    start_fraction: float = param(0.3, min=0.0, max=1.0, min_exclusive=True)  # pool at epoch 0, fraction of the images
    end_point: float = param(0.5, min=0.0, max=1.0, min_exclusive=True)  # fraction of train.epochs when the pool is all
    step_count: int = param(3, min=1)         # pacing step: equal steps from start_fraction to 1
    momentum: float = param(0.7, min=0.0, max=0.999)  # self_paced: weight of an image's old score in its running loss


@dataclass
class ProgressiveConfig:
    """Progressive resizing: train at small images first (strategies/progressive.py)."""
    stages: List[Dict[str, Any]] = field(default_factory=list)  # [{img_size, epochs, batch_size?, lr?}], sizes increasing
    min_size: Optional[int] = param(None, min=4)   # ramp instead of stages: first size, pixels; null: off
    max_size: Optional[int] = param(None, min=4)   # ramp: last size, pixels; default: augment.img_size
    ramp_start: float = param(0.0, min=0.0, max=1.0)  # ramp: fraction of the epochs at min_size
    ramp_end: float = param(0.75, min=0.0, max=1.0)   # ramp: fraction of the epochs where max_size is reached
    size_multiple: int = param(4, min=1)           # ramp sizes are rounded to a multiple of this
    lr_scaling: str = param("linear", choices=("linear", "sqrt", "none"))  # lr of a stage with another batch_size and no lr
    schedule: str = param("continuous", choices=("continuous", "restart"))  # one lr schedule over the run, or one per stage
    eval_size: Optional[int] = param(None, min=4)  # validation/test size, pixels; default: the last training size


@dataclass
class DistillConfig:
    """Knowledge distillation from frozen teacher(s) (strategies/distillation.py)."""
    teacher: Optional[Union[str, List[str]]] = None  # RUN_DIR, a .safetensors file, an ensemble folder or a timm name (or a list: averaged); null: off
    alpha: float = param(0.5, min=0.0, max=1.0)      # weight of the label loss; 1 - alpha goes to the teacher term
    temperature: float = param(4.0, min=0.0, min_exclusive=True)  # softens both distributions (T; the KD term is scaled by T^2)
    teacher_img_size: Optional[int] = param(None, min=4)  # pixels the teacher(s) see; default: each teacher's own
    teacher_tta: bool = False                        # each teacher predicts with test-time augmentation: its run's eval.tta (default: hflip)


@dataclass
class LrFindConfig:
    """The LR range test of `optim.lr: find` and `imgtrain lr-find` (strategies/lr_finder.py)."""
    start: float = param(1e-7, min=0.0, min_exclusive=True)  # first lr tried
    end: float = param(10.0, min=0.0, min_exclusive=True)    # last lr tried (the test stops earlier if the loss diverges)
    steps: int = param(100, min=2)                           # optimizer steps, one lr each, spaced evenly in log lr
    suggestion: str = param("min10", choices=("valley", "steep", "min10"))  # the suggestion optim.lr: find uses
    smoothing: float = param(0.98, min=0.0, max=0.999)       # beta of the loss's moving average (bias-corrected); 0: raw loss
    diverge: float = param(4.0, min=1.0, min_exclusive=True)  # stop when the smoothed loss passes this x its best


@dataclass
class DiagnosticsConfig:
    """Training diagnostics (strategies/diagnostics.py) and the checks of `imgtrain doctor` (doctor.py)."""
    grad_monitor_every: Optional[int] = param(None, min=0)  # optimizer steps between per-layer gradient norm readings; null or 0: off
    vanishing_below: float = param(1e-7, min=0.0)  # a layer whose gradient norm is below this is vanishing
    exploding_above: float = param(100.0, min=0.0, min_exclusive=True)  # a layer whose gradient norm is above this is exploding
    nonfinite: str = param("stop", choices=("stop", "skip", "off"))  # a nan/inf batch loss: stop the run, skip the step, or no check
    nonfinite_check_every: int = param(1, min=1)  # batches between loss checks (each waits for the device); stop mode only
    max_skipped_steps: int = param(10, min=0)     # skip: optimizer steps skipped in the run before it stops anyway
    doctor_batch_size: int = param(32, min=1)     # doctor: images in the batch it tries to overfit
    doctor_steps: int = param(100, min=1)         # doctor: optimizer steps on that one batch
    doctor_loss_below: float = param(0.05, min=0.0, min_exclusive=True)  # doctor: the batch's loss must end below this
    doctor_init_tolerance: float = param(0.5, min=0.0, min_exclusive=True)  # doctor: initial loss within this fraction of log(classes)
    doctor_learn_steps: int = param(50, min=0)    # doctor: steps over different batches before the val check; 0: skip it


@dataclass
class EvalConfig:
    """Test-time augmentation (evaluation/tta.py): evaluate/predict/ensemble --tta, teachers, the test split."""
    tta: List[Union[str, Dict[str, Any]]] = field(default_factory=list)  # views, e.g. [hflip, five_crop: 0.875]; empty: off
    tta_merge: str = param("mean_probs", choices=("mean_probs", "mean_logits", "max"))  # how the views' predictions combine


@dataclass
class TrainConfig:
    epochs: int = param(10, min=1)                  # passes over the training split
    grad_accum_steps: int = param(1, min=1)         # effective batch = batch_size x this
    clip_grad_norm: Optional[float] = param(None, min=0.0, min_exclusive=True)  # max global grad norm
    label_smoothing: float = param(0.0, min=0.0, max=1.0)  # probability mass spread over all classes
    amp: str = param("auto", choices=("auto", "off", "fp16", "bf16"))  # mixed precision (see README)
    channels_last: bool = False                     # NHWC memory format (faster convs on CPU and tensor cores)
    compile: bool = False                           # torch.compile the model
    device: str = "auto"                            # auto | cpu | cuda | cuda:N
    seed: int = 0                                   # seeds Python, NumPy, torch and the shuffle
    deterministic: bool = False                     # deterministic kernels (slower on CUDA)
    threads: Optional[int] = param(None, min=1)     # torch CPU threads; default: torch's choice
    max_steps_per_epoch: Optional[int] = param(None, min=1)  # cut epochs short (smoke runs)


@dataclass
class OutputConfig:
    root: str = "runs"                  # run folders go under this folder
    name: Optional[str] = None          # run folder name; default: recipe name + timestamp
    best_metric: str = "val_acc"        # column of history.csv that picks the best checkpoint
    best_mode: str = param("auto", choices=("auto", "max", "min"))  # auto: min for *loss, else max
    save_best: bool = True              # checkpoints/best.safetensors
    save_last: bool = True              # checkpoints/last.safetensors + last.state.pt (for --resume)
    plots: bool = True                  # redraw plots/*.png every epoch
    report: bool = True                 # redraw report.html every epoch (on a time budget; the last always)
    progress: str = param("auto", choices=("auto", "bar", "log", "off"))  # auto: bar on a terminal


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    swa: SwaConfig = field(default_factory=SwaConfig)
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # where the recipe came from (not a recipe key; set by load_recipe)
    source_file: Optional[str] = field(default=None, metadata={"internal": True})

    def to_dict(self) -> Dict[str, Any]:
        """The resolved recipe as plain data (what config.yaml in the run folder holds)."""
        out = dataclasses.asdict(self)
        out.pop("source_file", None)
        return out


# ----------------------------------------------------------------------------- loading

class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every key, for error messages."""


def _load_yaml_with_lines(text: str, file: str) -> tuple[Dict[str, Any], Dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        # the context mark is where the broken construct starts (an unclosed bracket, say),
        # which is the line to fix; the problem mark can be the end of the file
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        context = getattr(exc, "context", None)
        what = f"{context}: {exc.problem}" if context else getattr(exc, "problem", str(exc))
        raise RecipeError(f"not valid YAML ({what})", file=file, line=line) from None
    lines: Dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    if node is not None:
        walk(node, "")
    data = yaml.load(text, Loader=yaml.SafeLoader) if node is not None else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of sections (data:, model:, train: ...)", file=file)
    return data, lines


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_recipe_path(name: str, relative_to: Optional[Path] = None) -> Path:
    """A recipe path, or the bare name of a built-in recipe (`quickstart`, `fashion_mnist`)."""
    candidates = []
    path = Path(name)
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    candidates.append(path)
    if "/" not in name and "\\" not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        candidates.append(BUILTIN_RECIPES / f"{stem}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    builtins = ", ".join(sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml")))
    raise RecipeError(f"recipe not found: {name} (built-in recipes: {builtins})")


def _read_recipe_file(path: Path, chain: tuple = ()) -> tuple[Dict[str, Any], Dict[str, tuple]]:
    """Read a recipe and everything it extends; returns merged data and key -> (file, line)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise RecipeError(f"`extends:` makes a cycle: {cycle}", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe ({exc.strerror})", file=str(path)) from None
    data, lines = _load_yaml_with_lines(text, str(path))
    origins = {key: (str(path), line) for key, line in lines.items()}
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    parents = parent if isinstance(parent, list) else [parent]
    merged: Dict[str, Any] = {}
    merged_origins: Dict[str, tuple] = {}
    for p in parents:
        if not isinstance(p, str):
            raise RecipeError("`extends:` takes a recipe path or name (or a list of them)",
                              file=str(path), key="extends", line=lines.get("extends"))
        try:
            parent_path = resolve_recipe_path(p, relative_to=path.parent)
        except RecipeError as exc:
            raise RecipeError(str(exc), file=str(path), key="extends", line=lines.get("extends")) from None
        parent_data, parent_origins = _read_recipe_file(parent_path, chain + (resolved,))
        merged = _deep_merge(merged, parent_data)
        merged_origins.update(parent_origins)
    merged_origins.update(origins)
    return _deep_merge(merged, data), merged_origins


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise RecipeError(f"override `{text}` must look like section.key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise RecipeError(f"override `{text}` must name a section and a key, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_recipe(path: Union[str, Path, None] = None, overrides: Optional[List[str]] = None) -> Recipe:
    """Load a recipe file (or the defaults when path is None), apply overrides, validate."""
    if path is None:
        data, origins, file = {}, {}, None
    else:
        recipe_path = resolve_recipe_path(str(path))
        data, origins = _read_recipe_file(recipe_path)
        file = str(recipe_path)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        origins[key] = ("command line", None)
    recipe = recipe_from_dict(data, file=file, origins=origins)
    recipe.source_file = file
    return recipe


def key_origin(recipe: Recipe, key: str) -> Dict[str, Any]:
    """Where a loaded recipe's dotted `key` was written, as RecipeError's file/key/line: for the
    cross-section checks strategies make after loading (the Recipe keeps no lines). The file and line
    come from the recipe's file, or a file it extends, when that file sets the value the recipe
    holds; a value it does not hold came from an override: "command line", as load_recipe says."""
    where: Dict[str, Any] = {"file": recipe.source_file, "key": key, "line": None}
    if recipe.source_file is None:
        return where
    where["file"] = "command line"
    data, origins = _read_recipe_file(Path(recipe.source_file))
    written: Any = data
    for part in key.split("."):
        written = written.get(part) if isinstance(written, dict) else None
    actual: Any = recipe
    for part in key.split("."):
        actual = getattr(actual, part)
    if key in origins and written == actual:  # 2 == 2.0: YAML's int where a float goes still matches
        where["file"], where["line"] = origins[key]
    return where


def recipe_from_dict(data: Dict[str, Any], file: Optional[str] = None,
                     origins: Optional[Dict[str, tuple]] = None) -> Recipe:
    """Build and validate a Recipe from plain data (e.g. a run folder's config.yaml)."""
    return _build(Recipe, _upgrade_legacy_keys(data), prefix="", file=file, origins=origins or {})


def _upgrade_legacy_keys(data: Any) -> Any:
    """Recipes and run folders written before model.weights existed say `model.pretrained: true|false`:
    read it as `model.weights: timm` (true) or nothing (false), so old run folders still load."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("pretrained"), bool):
        return data
    model = dict(model)
    if model.pop("pretrained") and model.get("weights") is None and model.get("weights_file") is None:
        model["weights"] = "timm"
    return {**data, "model": model}


# ----------------------------------------------------------------------------- validation

def _where(key: str, file: Optional[str], origins: Dict[str, tuple]) -> Dict[str, Any]:
    origin_file, line = origins.get(key, (file, None))
    return {"file": origin_file, "key": key, "line": line}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return names + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check a YAML value against a field type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Union:
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return True, None
                continue
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_type,) = typing.get_args(tp)
        out = []
        for item in value:
            ok, item = _coerce(item, item_type)
            if not ok:
                return False, value
            out.append(item)
        return True, out
    if origin in (dict, Dict):
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads `off`/`on` as booleans: `amp: off` and `progress: off` mean the words
            return True, "on" if value else "off"
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _check_range(value: Any, meta: Dict[str, Any], where: Dict[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f", did you mean {close[0]}?" if close else ""
        raise RecipeError(f"{value!r} is not one of {', '.join(map(str, choices))}{hint}", **where)
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (v < lo or (meta.get("min_exclusive") and v == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise RecipeError(f"{v} is out of range: expected a value {op} {lo}", **where)
        if hi is not None and v > hi:
            raise RecipeError(f"{v} is out of range: expected a value <= {hi}", **where)


def _optional_section(tp: Any) -> Optional[type]:
    """The section class of an optional section (`Optional[SamConfig]`: null is off, a mapping turns it on)."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _build(cls: type, data: Any, prefix: str, file: Optional[str], origins: Dict[str, tuple]) -> Any:
    section = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping of keys, got {type(data).__name__}",
                          **_where(section, file, origins))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f", did you mean {close[0]}?" if close else f" (valid keys: {', '.join(fields)})"
            raise RecipeError(f"unknown key{hint}", **_where(dotted, file, origins))
        tp = hints[key]
        section_type = _optional_section(tp)
        if section_type is not None and value is not None and not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(section_type))
            raise RecipeError(f"expected a mapping of its keys ({keys}), e.g. {{}} for the defaults, or null (off); "
                              f"got {value!r}", **_where(dotted, file, origins))
        if dataclasses.is_dataclass(tp) or (section_type is not None and value is not None):
            kwargs[key] = _build(section_type or tp, value, dotted + ".", file, origins)
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            raise RecipeError(f"expected {_type_name(tp)}, got {value!r}", **_where(dotted, file, origins))
        _check_range(coerced, dict(fields[key].metadata), _where(dotted, file, origins))
        kwargs[key] = coerced
    obj = cls(**kwargs)
    _check_section(obj, prefix, file, origins)
    return obj


# eval.tta views: name -> (what its value is, the value when none is given); evaluation/tta.py defines each
TTA_VIEWS: Dict[str, tuple] = {
    "identity": (None, None), "hflip": (None, None), "vflip": (None, None),
    "five_crop": ("fraction", 0.875), "ten_crop": ("fraction", 0.875),
    "scale": ("factors", (0.9, 1.1)), "translate": ("shift", 0.1), "random": ("count", 4),
}
TTA_RANDOM_OPTIONS = ("seed", "area", "flip")  # the options of a `random` view (see TTAView)


@dataclass(frozen=True)
class TTAView:
    """One entry of eval.tta, parsed and checked (evaluation/tta.py says what each view does)."""
    name: str                        # a key of TTA_VIEWS
    value: Any = None                # fraction (n-crops), factors (scale), shift (translate), count (random)
    seed: int = 0                    # random: generator seed
    area: tuple = (0.6, 1.0)         # random: crop area range, fraction of the image
    flip: bool = True                # random: each view is also flipped (hflip) with probability 0.5

    def label(self) -> str:
        """Short text: hflip, five_crop(0.875), scale(0.9, 1.1), translate(2 px), random(4, seed 0)."""
        if self.value is None:
            return self.name
        if self.name == "scale":
            return f"scale({', '.join(f'{f:g}' for f in self.value)})"
        if self.name == "translate" and isinstance(self.value, int):
            return f"translate({self.value} px)"
        if self.name == "random":
            return f"random({self.value}, seed {self.seed})"
        return f"{self.name}({self.value:g})"


def parse_tta_view(spec: Any) -> TTAView:
    """One eval.tta entry: a name (`hflip`), a name and values (`five_crop:0.8`, `scale:0.9:1.1`:
    the form `--tta` takes) or a mapping (`{five_crop: 0.8}`, `{random: 8, seed: 1}`).
    Raises ValueError saying what is wrong."""
    options: Dict[str, Any] = {}
    if isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        values = [_yaml_scalar(part) for part in rest.split(":")] if rest else []
        value = None if not values else values[0] if len(values) == 1 else values
    elif isinstance(spec, dict):
        names = [key for key in spec if key in TTA_VIEWS]
        if len(names) != 1:
            raise ValueError(f"a view written as a mapping names one view ({', '.join(TTA_VIEWS)}) with its value, "
                             f"e.g. {{five_crop: 0.875}}; got {spec!r}")
        name, value = names[0], spec[names[0]]
        options = {key: v for key, v in spec.items() if key != name}
    else:
        raise ValueError(f"expected a view such as hflip or five_crop:0.875 (or a mapping such as "
                         f"{{five_crop: 0.875}}), got {spec!r}")
    if name not in TTA_VIEWS:
        close = difflib.get_close_matches(str(name), list(TTA_VIEWS), n=1)
        raise ValueError(f"{name!r} is not a view; views: {', '.join(TTA_VIEWS)}"
                         + (f", did you mean {close[0]}?" if close else ""))
    kind, default = TTA_VIEWS[name]
    value = default if value is None else value

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if kind is None and value is not None:
        raise ValueError(f"{name} takes no value, got {value!r}")
    if kind == "fraction" and not (number(value) and 0 < value < 1):
        raise ValueError(f"{name}: the crop side is a fraction of the image's: expected a number in (0, 1), "
                         f"got {value!r}")
    if kind == "factors":
        factors = value if isinstance(value, (list, tuple)) else [value]
        if not factors or not all(number(f) and 0.25 <= f <= 4 for f in factors):
            raise ValueError(f"scale: expected zoom factors in [0.25, 4] (1: as is), e.g. [0.9, 1.1], got {value!r}")
        value = tuple(float(f) for f in factors)
    if kind == "shift" and not ((isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64)
                                or (isinstance(value, float) and 0 <= value < 0.5)):
        raise ValueError(f"translate: expected a shift in pixels (an integer, 0..64) or a fraction of the side "
                         f"(a number with a point, in [0, 0.5)), got {value!r}")
    if kind == "count" and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
        raise ValueError(f"random: expected a number of views, an integer in 1..64, got {value!r}")
    if options and name != "random":
        raise ValueError(f"{name} takes no options, got {', '.join(map(str, options))}")
    unknown = [key for key in options if key not in TTA_RANDOM_OPTIONS]
    if unknown:
        raise ValueError(f"random: unknown option {unknown[0]!r}; its options are {', '.join(TTA_RANDOM_OPTIONS)}")
    view = TTAView(name=name, value=value)
    if "seed" in options:
        if not isinstance(options["seed"], int) or isinstance(options["seed"], bool):
            raise ValueError(f"random: seed must be an integer, got {options['seed']!r}")
        view = dataclasses.replace(view, seed=options["seed"])
    if "area" in options:
        area = options["area"]
        if not (isinstance(area, (list, tuple)) and len(area) == 2 and all(number(a) for a in area)
                and 0 < area[0] <= area[1] <= 1):
            raise ValueError(f"random: area is [low, high], fractions of the image with 0 < low <= high <= 1, "
                             f"got {area!r}")
        view = dataclasses.replace(view, area=(float(area[0]), float(area[1])))
    if "flip" in options:
        if not isinstance(options["flip"], bool):
            raise ValueError(f"random: flip must be true or false, got {options['flip']!r}")
        view = dataclasses.replace(view, flip=options["flip"])
    return view


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


STAGE_KEYS = {"img_size": (int, 4), "epochs": (int, 1), "batch_size": (int, 1), "lr": (float, 0.0)}


def _check_progressive(obj: "ProgressiveConfig", fail: Any) -> None:
    """Each stage a mapping of img_size, epochs (required), batch_size, lr; sizes increasing."""
    if obj.stages and obj.min_size is not None:
        fail("min_size", "progressive.stages and a ramp (min_size) both set the sizes; use one")
    sizes = []
    for index, stage in enumerate(obj.stages):
        where = f"stages[{index}]"
        if not isinstance(stage, dict):
            fail("stages", f"{where}: expected a mapping like {{img_size: 64, epochs: 3}}, got {stage!r}")
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            fail("stages", f"{where}: unknown key {unknown[0]!r}; a stage has img_size, epochs, batch_size, lr")
        for key in ("img_size", "epochs"):
            if key not in stage:
                fail("stages", f"{where}: {key} is missing")
        for key, value in stage.items():
            kind, low = STAGE_KEYS[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (kind is int and not isinstance(value, int)):
                fail("stages", f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
            if value < low or (key == "lr" and value <= 0):
                fail("stages", f"{where}.{key}: {value} is out of range: expected a value "
                               f"{'>' if key == 'lr' else '>='} {low}")
        sizes.append(stage["img_size"])
    if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        fail("stages", f"stage sizes must increase from stage to stage, got {sizes}")
    if obj.min_size is not None and obj.ramp_end < obj.ramp_start:
        fail("ramp_end", f"ramp_end ({obj.ramp_end}) is before ramp_start ({obj.ramp_start})")
    if obj.min_size is None and obj.max_size is not None:
        fail("max_size", "max_size is the end of a ramp: set min_size too (or use stages)")


def _check_section(obj: Any, prefix: str, file: Optional[str], origins: Dict[str, tuple]) -> None:
    """Checks that involve more than one key of a section."""
    def fail(key: str, message: str) -> None:
        raise RecipeError(message, **_where(prefix + key, file, origins))

    if isinstance(obj, ShapesConfig) and obj.min_scale > obj.max_scale:
        fail("min_scale", f"{obj.min_scale} is larger than max_scale ({obj.max_scale})")
    if isinstance(obj, DataConfig):
        if isinstance(obj.workers, str) and obj.workers != "auto":
            fail("workers", f"expected an integer >= 0 or 'auto', got {obj.workers!r}")
        if isinstance(obj.workers, int) and obj.workers < 0:
            fail("workers", f"{obj.workers} is out of range: expected a value >= 0")
        if isinstance(obj.pin_memory, str) and obj.pin_memory != "auto":
            fail("pin_memory", f"expected true, false or 'auto', got {obj.pin_memory!r}")
        if obj.val_fraction + obj.test_fraction >= 1.0:
            fail("test_fraction", "val_fraction + test_fraction must leave some training images (< 1)")
        if obj.source in ("imagefolder", "csv") and not obj.root:
            fail("root", f"data.source {obj.source} needs data.root (the {'folder' if obj.source == 'imagefolder' else 'manifest CSV'})")
    if isinstance(obj, AugmentConfig):
        for key in ("scale", "ratio"):
            pair = getattr(obj, key)
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] <= 0:
                fail(key, f"expected [low, high] with 0 < low <= high, got {pair}")
        if obj.scale[1] > 1.0:
            fail("scale", f"the crop area is a fraction of the image: high must be <= 1, got {obj.scale[1]}")
        if obj.normalize == "given":
            if obj.mean is None or obj.std is None:
                fail("normalize", "normalize: given needs augment.mean and augment.std (one value per channel)")
            if len(obj.mean) != len(obj.std):
                fail("std", f"mean has {len(obj.mean)} values and std {len(obj.std)}; give one per channel")
            if any(s <= 0 for s in obj.std):
                fail("std", f"every std must be > 0, got {obj.std}")
        elif obj.mean is not None or obj.std is not None:
            fail("mean", "augment.mean/std are used only with augment.normalize: given")
    if isinstance(obj, AugmentConfig):
        for key, low in (("affine_scale", 0.01), ("erasing_scale", 0.0)):
            pair = getattr(obj, key)
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] < low:
                fail(key, f"expected [low, high] with {low} <= low <= high, got {pair}")
        if obj.erasing_scale[1] > 1.0:
            fail("erasing_scale", f"the erased area is a fraction of the image: high must be <= 1, got {obj.erasing_scale}")
        if len(obj.translate) != 2 or not all(0.0 <= t <= 1.0 for t in obj.translate):
            fail("translate", f"expected [max_dx, max_dy], fractions of the width and height in [0, 1], got {obj.translate}")
    if isinstance(obj, ModelConfig):
        if obj.weights is not None and obj.weights_file is not None:
            fail("weights_file", "model.weights and model.weights_file both set the starting weights; use one "
                                 "(weights: timm, a run folder or a .safetensors file; weights_file: a local "
                                 ".pth/.pt/.bin/.safetensors checkpoint)")
        for key in ("weights", "weights_file"):
            if getattr(obj, key) == "":
                fail(key, "empty; leave it out (or null) to start from random weights")
    if isinstance(obj, MixConfig):
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(obj, key)
            if value is not None and value <= 0:
                fail(key, f"alpha must be > 0 (it shapes Beta(alpha, alpha)), got {value}; "
                          "leave the key out (or null) to turn it off")
    if isinstance(obj, TransferConfig):
        epochs = obj.unfreeze_epochs
        if any(e < 1 for e in epochs) or epochs != sorted(set(epochs)):
            fail("unfreeze_epochs", f"expected increasing epochs >= 1 (0-based: the epoch the group starts "
                                    f"training), got {epochs}")
        modes = [name for name, on in (("freeze_backbone", obj.freeze_backbone), ("freeze_epochs", obj.freeze_epochs > 0),
                                       ("unfreeze_epochs", bool(epochs))) if on]
        if len(modes) > 1:
            fail(modes[1], f"{' and '.join('transfer.' + m for m in modes)} each decide when the backbone "
                           "trains; use one")
        if obj.layer_decay is not None and obj.group_lrs is not None:
            fail("group_lrs", "transfer.layer_decay and transfer.group_lrs both set the group learning rates; use one")
        if obj.group_lrs is not None and (not obj.group_lrs or any(lr < 0 for lr in obj.group_lrs)):
            fail("group_lrs", f"expected one learning rate >= 0 per layer group, got {obj.group_lrs}")
    if isinstance(obj, ProgressiveConfig):
        _check_progressive(obj, fail)
    if isinstance(obj, EvalConfig):
        for index, spec in enumerate(obj.tta):
            try:
                parse_tta_view(spec)
            except ValueError as exc:
                fail("tta", f"tta[{index}]: {exc}")
    if isinstance(obj, ImbalanceConfig):
        weights = obj.class_weights
        if isinstance(weights, str) and weights not in ("none", "inverse", "effective"):
            fail("class_weights", f"expected none, inverse, effective or a list of weights, got {weights!r}")
        if isinstance(weights, list) and any(w < 0 for w in weights):
            fail("class_weights", f"weights must be >= 0, got {weights}")
    if isinstance(obj, OptimConfig) and (len(obj.betas) != 2 or not all(0 <= b < 1 for b in obj.betas)):
        fail("betas", f"expected two values in [0, 1), got {obj.betas}")
    if isinstance(obj, OptimConfig) and isinstance(obj.lr, str) and obj.lr != "find":
        hint = ""
        try:  # YAML 1.1 reads 1e-3 (no dot) as text
            hint = f" (YAML reads it as text: write {float(obj.lr):.1e})"
        except ValueError:
            pass
        fail("lr", f"expected a number > 0 or find (run the LR finder first), got {obj.lr!r}{hint}")
    if isinstance(obj, LrFindConfig) and obj.start >= obj.end:
        fail("start", f"the range test goes up from start to end: start ({obj.start:g}) must be below "
                      f"end ({obj.end:g})")
    if isinstance(obj, ScheduleConfig):
        if obj.milestones != sorted(obj.milestones) or any(m <= 0 for m in obj.milestones):
            fail("milestones", f"expected increasing epochs > 0, got {obj.milestones}")
        if obj.base_momentum > obj.max_momentum:
            fail("base_momentum", f"{obj.base_momentum} is larger than max_momentum ({obj.max_momentum})")
        if obj.name == "warmup_cosine" and obj.warmup_epochs <= 0:
            fail("warmup_epochs", "schedule warmup_cosine needs warmup_epochs > 0 (epochs of linear warmup)")
    if isinstance(obj, DistillConfig):
        teachers = obj.teacher if isinstance(obj.teacher, list) else [obj.teacher]
        if obj.teacher is not None and (not teachers or any(not t or not t.strip() for t in teachers)):
            fail("teacher", f"expected a run folder, a .safetensors file or a timm model name (or a list of "
                            f"them), got {obj.teacher!r}; leave it out (or null) to train without a teacher")
    if isinstance(obj, CurriculumConfig):
        modes = ("none", "reference", "self_paced", "csv")
        if obj.difficulty is not None and obj.difficulty not in modes:
            close = difflib.get_close_matches(obj.difficulty, modes, n=1)
            fail("difficulty", f"{obj.difficulty!r} is not one of {', '.join(modes)} (or null: off)"
                               + (f", did you mean {close[0]}?" if close else ""))
        for mode in ("reference", "csv"):
            if obj.difficulty == mode and not getattr(obj, mode):
                what = "a run folder or .safetensors file" if mode == "reference" else "the path of a CSV file"
                fail(mode, f"curriculum.difficulty {mode} needs this key: {what}")
    if isinstance(obj, SwaConfig) and obj.start_epoch is None and obj.lr is not None:
        fail("lr", "swa.lr is the lr of the SWA epochs, and SWA is off (swa.start_epoch is null); set "
                   "swa.start_epoch (0-based) to turn it on, or leave swa.lr out")
    if isinstance(obj, TrainConfig):
        device = obj.device
        if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
            fail("device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    if isinstance(obj, OutputConfig) and obj.name is not None and ("/" in obj.name or obj.name in (".", "..")):
        fail("name", f"a run name is one folder name, got {obj.name!r}; use output.root for the parent")


def recipe_keys() -> List[str]:
    """Every dotted recipe key (for help texts and suggestions)."""
    keys: List[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                keys.append(f"{prefix}{f.name}")

    walk(Recipe, "")
    return keys


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML (the run folder's config.yaml)."""
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
    path.write_text(text, encoding="utf-8")
