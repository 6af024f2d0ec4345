"""The recipe schema: one pydantic dataclass per section, loading (files, `extends:`, overrides), JSON Schema.
Every key has its type, default, range or choices and meaning, so a mistake is caught before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from pydantic_core.core_schema import ValidationInfo

from imgtrain.recipe_errors import RecipeError, fail, leaves, number_hint, recipe_error, where
from imgtrain.recipe_files import builtin_recipes, read_recipe
from imgtrain.search_space import SearchSpaceError, parse_search_param
from imgtrain.tta_views import parse_tta_view

# YAML gives exact types: "3" for an integer or `true` for a number is a mistake, not something
# to convert. A strict float still takes an integer (`lr: 1` is 1.0).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

# every section: unknown keys are errors (with a did-you-mean), not silently ignored
SECTION = ConfigDict(extra="forbid")


@dataclass(config=SECTION)
class _Section:
    """What every section does to a value before pydantic checks it."""

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_words(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.__pydantic_fields__[info.field_name].annotation
        if value is None and dataclasses.is_dataclass(annotation):
            return {}  # `data:` with nothing under it: all defaults
        accepted = leaves(annotation)
        if isinstance(value, bool) and str in accepted and bool not in accepted:
            return "on" if value else "off"  # YAML 1.1 reads `amp: off` as false: the user meant the word
        return value

    @model_validator(mode="after")
    def _checks_between_keys(self) -> Any:
        self._check()
        return self

    def _check(self) -> None:
        """Checks that involve more than one key of the section: call fail(key, message)."""


@dataclass(config=SECTION)
class ShapesConfig(_Section):
    """The synthetic `shapes` source: coloured shapes on a noisy background."""
    num_classes: Int = Field(4, ge=2, le=8, description="circle, square, triangle, cross, star, ...")
    image_size: Int = Field(32, ge=8, le=512, description="pixels, square")
    train_size: Int = Field(2000, ge=1, description="images in the train split")
    val_size: Int = Field(400, ge=0, description="images in the val split")
    test_size: Int = Field(400, ge=0, description="images in the test split")
    min_scale: Float = Field(0.35, ge=0.05, le=1.0, description="shape size, fraction of the image side")
    max_scale: Float = Field(0.8, ge=0.05, le=1.0, description="largest shape size, fraction of the side")
    rotation: Float = Field(180.0, ge=0.0, le=360.0, description="max rotation, degrees either way")
    noise: Float = Field(0.05, ge=0.0, le=1.0, description="std of Gaussian pixel noise, fraction of 255")
    imbalance: Float = Field(1.0, ge=1.0, description="train: largest class count / smallest")
    seed: Int = Field(0, description="generator seed: same seed, same images")

    def _check(self) -> None:
        if self.min_scale > self.max_scale:
            fail("min_scale", f"{self.min_scale} is larger than max_scale ({self.max_scale})")


@dataclass(config=SECTION)
class DataConfig(_Section):
    """Where the images come from, how they are split, cached and batched (data/)."""
    source: Literal["imagefolder", "csv", "fashion-mnist", "digits", "shapes", "streaming"] = Field("digits", description="where images come from")
    root: Str | None = Field(None, description="imagefolder: the folder; csv: the manifest; fashion-mnist: the IDX folder; streaming: the shard folder or s3://bucket/prefix")
    image_root: Str | None = Field(None, description="csv: folder the paths are relative to (default: the csv's)")
    val_fraction: Float = Field(0.1, ge=0.0, le=0.9, description="carved from train when no val split exists")
    test_fraction: Float = Field(0.0, ge=0.0, le=0.9, description="carved from train when no test split exists")
    split_seed: Int = Field(0, description="seed of the automatic stratified split")
    train_subset: Int | None = Field(None, ge=1, description="keep N training images (stratified), for quick runs")
    val_subset: Int | None = Field(None, ge=1, description="keep N validation images (stratified, seeded by split_seed)")
    test_subset: Int | None = Field(None, ge=1, description="keep N test images (stratified, seeded by split_seed)")
    batch_size: Int = Field(128, ge=1, description="images per step, per device")
    eval_batch_size: Int | None = Field(None, ge=1, description="default: 2 x batch_size")
    workers: Annotated[Int, Ge(0)] | Literal["auto"] = Field(0, description="loader processes, or auto")
    pin_memory: Bool | Literal["auto"] = Field("auto", description="auto: on when training on CUDA")
    on_bad_image: Literal["error", "skip"] = Field("error", description="unreadable files: stop, or skip and list them")
    verify: Literal["full", "header", "off"] = Field("full", description="start-up check of new/changed files: decode, "
                                                     "header only, or trust the list (results cached in cache_dir)")
    # Pillow's default Image.MAX_IMAGE_PIXELS (1024**3 // 4 // 3); data/images.py applies it in every process
    max_image_pixels: Int | None = Field(89_478_485, ge=1, description="pixels (width x height) above which an image "
                                         "is refused as a decompression bomb; null: no limit")
    cache: Literal["off", "memory", "disk"] = Field("off", description="decoded uint8 cache of file images")
    cache_dir: Str = Field(".imgtrain_cache", description="disk cache folder (memory-mapped files), keyed by the file list")
    prefetch_factor: Int = Field(2, ge=1, description="batches each worker prepares ahead (workers > 0)")
    persistent_workers: Bool = Field(True, description="keep workers between epochs (off in deterministic mode)")
    sampler: Literal["random", "balanced", "per_class"] = Field("random", description="balanced: classes drawn equally")
    images_per_class: Int = Field(4, ge=1, description="sampler per_class: a batch holds batch_size/this classes")
    shapes: ShapesConfig = Field(default_factory=ShapesConfig, description="the shapes generator's knobs")

    def _check(self) -> None:
        if self.val_fraction + self.test_fraction >= 1.0:
            fail("test_fraction", "val_fraction + test_fraction must leave some training images (< 1)")
        if self.source in ("imagefolder", "csv") and not self.root:
            what = "folder" if self.source == "imagefolder" else "manifest CSV"
            fail("root", f"data.source {self.source} needs data.root (the {what})")
        if self.source == "streaming":
            self._check_streaming()

    def _check_streaming(self) -> None:
        """What needs random access to the train split does not combine with streaming it."""
        if not self.root:
            fail("root", "data.source streaming needs data.root: a folder written by `imgtrain shard SRC DST` "
                 "or s3://bucket/prefix")
        if self.sampler != "random":
            fail("sampler", f"data.sampler {self.sampler} draws images by index; data.source streaming reads the "
                 "train shards in order (shuffled by chunk): use data.sampler: random")
        if self.train_subset is not None:
            fail("train_subset", "data.train_subset picks images by index; with data.source streaming write "
                 "shards of the subset instead (`imgtrain shard`)")
        if self.cache != "off":
            fail("cache", "data.cache keeps decoded image files; with data.source streaming LitData reads and "
                 "caches chunks itself: set data.cache: off")


def _pair(key: str, pair: list[float], low: float, above: bool = False) -> None:
    """A [low, high] range key: two values in order, low at least (or, with above, more than) `low`."""
    if len(pair) != 2 or pair[0] > pair[1] or pair[0] < low or (above and pair[0] == low):
        fail(key, f"expected [low, high] with {f'{low:g} <' if above else f'{low} <='} low <= high, got {pair}")


@dataclass(config=SECTION)
class AugmentConfig(_Section):
    """Per-image transforms (torchvision v2). Probabilities are in [0, 1]."""
    img_size: Int | None = Field(None, ge=4, description="train/eval resolution, pixels; default: native")
    random_resized_crop: Bool = Field(False, description="Inception-style crop of scale x ratio, resized to img_size")
    scale: list[Float] = Field(default_factory=lambda: [0.08, 1.0], description="crop area range, fraction")
    ratio: list[Float] = Field(default_factory=lambda: [0.75, 4 / 3], description="crop aspect range")
    pad_crop: Int = Field(0, ge=0, description="pad by N pixels then random crop back (CIFAR style)")
    hflip: Float = Field(0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")
    vflip: Float = Field(0.0, ge=0.0, le=1.0, description="probability of a vertical flip")
    color_jitter: Float = Field(0.0, ge=0.0, le=1.0, description="brightness, contrast, saturation strength")
    hue: Float = Field(0.0, ge=0.0, le=0.5, description="hue jitter (3-channel images only)")
    grayscale: Float = Field(0.0, ge=0.0, le=1.0, description="probability of turning an image grey")
    rotation: Float = Field(0.0, ge=0.0, le=180.0, description="random rotation, max degrees either way")
    translate: list[Float] = Field(default_factory=lambda: [0.0, 0.0], description="random affine max shift [dx, dy], fractions")
    affine_scale: list[Float] = Field(default_factory=lambda: [1.0, 1.0], description="random affine zoom range")
    shear: Float = Field(0.0, ge=0.0, le=45.0, description="random affine shear, max degrees")
    perspective: Float = Field(0.0, ge=0.0, le=1.0, description="probability of a random perspective warp")
    policy: Literal["none", "randaugment", "autoaugment", "trivialaugment", "augmix"] = Field("none", description="automatic augmentation policy")
    num_ops: Int = Field(2, ge=1, le=10, description="randaugment: operations per image")
    magnitude: Int = Field(9, ge=0, le=30, description="randaugment: strength (of 31 bins)")
    autoaugment_policy: Literal["imagenet", "cifar10", "svhn"] = Field("imagenet", description="autoaugment: policy")
    augmix_severity: Int = Field(3, ge=1, le=10, description="augmix: strength of its operations")
    erasing: Float = Field(0.0, ge=0.0, le=1.0, description="probability of random erasing (cutout)")
    erasing_scale: list[Float] = Field(default_factory=lambda: [0.02, 0.33], description="erased area, fraction")
    erasing_value: Literal["zero", "random"] = Field("zero", description="fill of the erased box")
    device_transforms: Literal["auto", "on", "off"] = Field("auto", description="batch augmentation on the device")
    normalize: Literal["compute", "imagenet", "none", "given"] = Field("compute", description="compute: from train images")
    mean: list[Float] | None = Field(None, description="with normalize: given, one value per channel (0..1 scale)")
    std: list[Float] | None = Field(None, description="with normalize: given, one value per channel (0..1 scale)")
    crop_pct: Float = Field(1.0, ge=0.1, le=1.0, description="eval: resize to img_size/crop_pct, centre crop")

    def _check(self) -> None:
        _pair("scale", self.scale, 0.0, above=True)
        _pair("ratio", self.ratio, 0.0, above=True)
        if self.scale[1] > 1.0:
            fail("scale", f"the crop area is a fraction of the image: high must be <= 1, got {self.scale[1]}")
        if self.normalize == "given":
            if self.mean is None or self.std is None:
                fail("normalize", "normalize: given needs augment.mean and augment.std (one value per channel)")
            if len(self.mean) != len(self.std):
                fail("std", f"mean has {len(self.mean)} values and std {len(self.std)}; give one per channel")
            if any(s <= 0 for s in self.std):
                fail("std", f"every std must be > 0, got {self.std}")
        elif self.mean is not None or self.std is not None:
            fail("mean", "augment.mean/std are used only with augment.normalize: given")
        _pair("affine_scale", self.affine_scale, 0.01)
        _pair("erasing_scale", self.erasing_scale, 0.0)
        if self.erasing_scale[1] > 1.0:
            fail("erasing_scale", "the erased area is a fraction of the image: high must be <= 1, "
                                   f"got {self.erasing_scale}")
        if len(self.translate) != 2 or not all(0.0 <= t <= 1.0 for t in self.translate):
            fail("translate", "expected [max_dx, max_dy], fractions of the width and height in [0, 1], "
                               f"got {self.translate}")


@dataclass(config=SECTION)
class ModelConfig(_Section):
    """The network and its starting weights (models/)."""
    name: Str = Field("imgtrain_cnn_small", description="any timm model name or one of ours (`imgtrain models`)")
    weights: Str | None = Field(None, description="starting weights: null (random), timm, a run folder or a .safetensors file")
    weights_file: Str | None = Field(None, description="a local timm/torchvision checkpoint: .safetensors, .pth, .pt, .bin")
    drop_rate: Float = Field(0.0, ge=0.0, le=1.0, description="dropout before the classifier")
    drop_path_rate: Float = Field(0.0, ge=0.0, le=1.0, description="stochastic depth (timm models that have it)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model")

    def _check(self) -> None:
        if self.weights is not None and self.weights_file is not None:
            fail("weights_file", "model.weights and model.weights_file both set the starting weights; use one "
                                  "(weights: timm, a run folder or a .safetensors file; weights_file: a local "
                                  ".pth/.pt/.bin/.safetensors checkpoint)")
        for key in ("weights", "weights_file"):
            if getattr(self, key) == "":
                fail(key, "empty; leave it out (or null) to start from random weights")


@dataclass(config=SECTION)
class SamConfig(_Section):
    """optim.sam: sharpness-aware minimisation (strategies/sam.py); two forward/backward passes per step."""
    rho: Float = Field(0.05, gt=0.0, description="perturbation radius (L2, weight units): SAM 0.01 to 0.2; ASAM, relative to |w|, usually 0.5 to 2")
    adaptive: Bool = Field(False, description="true: ASAM, the perturbation scaled elementwise by |w| (Kwon et al. 2021)")


@dataclass(config=SECTION)
class OptimConfig(_Section):
    """The optimizer (engine/optim.py)."""
    name: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    lr: Annotated[Float, Gt(0.0)] | Literal["find"] = Field(0.1, description="peak learning rate, for the effective batch; or find: the LR finder picks it")
    momentum: Float = Field(0.9, ge=0.0, le=1.0, description="sgd")
    nesterov: Bool = Field(True, description="sgd")
    betas: list[Float] = Field(default_factory=lambda: [0.9, 0.999], description="adamw")
    eps: Float = Field(1e-8, gt=0.0, description="adamw")
    weight_decay: Float = Field(5e-4, ge=0.0, description="L2 penalty (decoupled for adamw)")
    decay_norm_and_bias: Bool = Field(False, description="false: no weight decay on norm and bias parameters")
    sam: SamConfig | None = Field(None, description="sharpness-aware minimisation: {rho, adaptive}; null: off")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field("none", description="scale lr by the global batch (data.batch_size x processes x train.grad_accum_steps) / reference_batch (linear) or its square root (sqrt); none: lr as written")
    reference_batch: Int | None = Field(None, ge=1, description="global batch lr was tuned for (lr_scaling); default: data.batch_size x train.grad_accum_steps, one process")

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_text(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "find":
            message = f"expected a number > 0 or find (run the LR finder first), got {value!r}{number_hint(value)}"
            raise PydanticCustomError("recipe", "{message}", {"message": message})
        return value

    def _check(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail("betas", f"expected two values in [0, 1), got {self.betas}")


@dataclass(config=SECTION)
class ScheduleConfig(_Section):
    """Learning-rate schedule, stepped once per optimizer step."""
    name: Literal["constant", "step", "multistep", "cosine", "warmup_cosine", "linear", "onecycle"] = Field("onecycle", description="lr schedule")
    warmup_epochs: Float = Field(0.0, ge=0.0, description="linear warmup, epochs (cosine, constant, step)")
    warmup_start_factor: Float = Field(0.01, ge=0.0, le=1.0, description="lr at step 0, fraction of peak")
    min_lr: Float = Field(0.0, ge=0.0, description="cosine floor, absolute")
    step_epochs: Float = Field(30.0, gt=0.0, description="step: decay every N epochs")
    milestones: list[Float] = Field(default_factory=lambda: [30.0, 60.0, 90.0], description="multistep: epochs")
    gamma: Float = Field(0.1, ge=0.0, le=1.0, description="step/multistep decay factor")
    pct_start: Float = Field(0.25, ge=0.0, le=1.0, description="onecycle: fraction of steps going up")
    div_factor: Float = Field(25.0, ge=1.0, description="onecycle: start lr = lr / div_factor")
    final_div_factor: Float = Field(1e4, ge=1.0, description="onecycle: final lr = start lr / this")
    cycle_momentum: Bool = Field(True, description="onecycle: momentum (or beta1) cycles inversely")
    base_momentum: Float = Field(0.85, ge=0.0, le=1.0, description="onecycle: momentum at the lr peak")
    max_momentum: Float = Field(0.95, ge=0.0, le=1.0, description="onecycle: momentum at the start and end")

    def _check(self) -> None:
        if self.milestones != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            fail("milestones", f"expected increasing epochs > 0, got {self.milestones}")
        if self.base_momentum > self.max_momentum:
            fail("base_momentum", f"{self.base_momentum} is larger than max_momentum ({self.max_momentum})")
        if self.name == "warmup_cosine" and self.warmup_epochs <= 0:
            fail("warmup_epochs", "schedule warmup_cosine needs warmup_epochs > 0 (epochs of linear warmup)")


@dataclass(config=SECTION)
class MixConfig(_Section):
    """Mixup / CutMix on training batches (soft targets; strategies/mixing.py)."""
    mixup_alpha: Float | None = Field(None, description="Beta(alpha, alpha) for mixup, > 0; null: off")
    cutmix_alpha: Float | None = Field(None, description="Beta(alpha, alpha) for cutmix, > 0; null: off")
    switch_prob: Float = Field(0.5, ge=0.0, le=1.0, description="with both on: probability of cutmix")
    prob: Float = Field(1.0, ge=0.0, le=1.0, description="probability a batch is mixed at all")
    off_epoch: Int | None = Field(None, ge=0, description="no mixing from this epoch on (0-based)")

    def _check(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, key)
            if value is not None and value <= 0:  # checked here to say why, not only the range
                fail(key, f"alpha must be > 0 (it shapes Beta(alpha, alpha)), got {value}; "
                          "leave the key out (or null) to turn it off")


@dataclass(config=SECTION)
class EmaConfig(_Section):
    """Exponential moving average of the weights (timm's ModelEmaV3)."""
    enabled: Bool = Field(False, description="keep an EMA of the weights")
    decay: Float = Field(0.9998, ge=0.0, le=1.0, description="per optimizer step")
    warmup: Bool = Field(True, description="smaller decay early (timm's warmup)")
    validate: Bool = Field(True, description="validate (and pick the best) on the EMA weights")


@dataclass(config=SECTION)
class SwaConfig(_Section):
    """Stochastic weight averaging (strategies/swa.py): an equal average of the end-of-epoch weights."""
    start_epoch: Int | None = Field(None, ge=0, description="0-based epoch SWA starts (averaged at its end); null: off")
    lr: Float | None = Field(None, gt=0.0, description="constant lr after annealing, for the effective batch; null: keep the schedule's lr")
    anneal_epochs: Float = Field(1.0, ge=0.0, description="epochs of annealing from the current lr to swa.lr")
    anneal_strategy: Literal["cos", "linear"] = Field("cos", description="shape of that annealing")

    def _check(self) -> None:
        if self.start_epoch is None and self.lr is not None:
            fail("lr", "swa.lr is the lr of the SWA epochs, and SWA is off (swa.start_epoch is null); set "
                       "swa.start_epoch (0-based) to turn it on, or leave swa.lr out")


@dataclass(config=SECTION)
class ImbalanceConfig(_Section):
    """Class-imbalance tools (losses.py, data/samplers.py)."""
    class_weights: Literal["none", "inverse", "effective"] | list[Annotated[Float, Ge(0.0)]] = Field("none", description="none | inverse | effective | one weight per class")
    effective_beta: Float = Field(0.999, ge=0.0, le=1.0, description="effective number of samples: (1-b^n)/(1-b)")
    loss: Literal["ce", "focal", "logit_adjusted"] = Field("ce", description="training loss")
    focal_gamma: Float = Field(2.0, ge=0.0, description="focal: focusing strength")
    focal_alpha: Float | None = Field(None, ge=0.0, le=1.0, description="focal: weight of the positive class")
    tau: Float = Field(1.0, ge=0.0, description="logit adjustment strength")
    posthoc_adjust: Bool = Field(False, description="subtract tau*log(prior) from logits at evaluation")


@dataclass(config=SECTION)
class TransferConfig(_Section):
    """Which layer groups train when (strategies/transfer.py): timm's groups, numbered from the stem to the head."""
    groups: Literal["stage", "block"] = Field("stage", description="group granularity: timm's coarse or fine matcher")
    freeze_backbone: Bool = Field(False, description="train only the head (feature extraction)")
    freeze_layers: Int = Field(0, ge=0, description="keep the first N groups (stem = 1) frozen all run")
    freeze_epochs: Int = Field(0, ge=0, description="head only for N epochs, then everything (fastai fine_tune)")
    unfreeze_epochs: list[Int] = Field(default_factory=list, description="gradual: one more group from the top at each epoch (0-based)")
    layer_decay: Float | None = Field(None, gt=0.0, le=1.0, description="group lr = lr x decay^(groups above it)")
    group_lrs: list[Float] | None = Field(None, description="explicit lr per group, stem first, head last (instead of layer_decay)")
    bn_frozen_eval: Bool = Field(True, description="BatchNorm of frozen groups stays in eval mode (running stats fixed)")

    def _check(self) -> None:
        epochs = self.unfreeze_epochs
        if any(e < 1 for e in epochs) or epochs != sorted(set(epochs)):
            fail("unfreeze_epochs", "expected increasing epochs >= 1 (0-based: the epoch the group starts "
                                     f"training), got {epochs}")
        modes = [name for name, on in (("freeze_backbone", self.freeze_backbone),
                                       ("freeze_epochs", self.freeze_epochs > 0), ("unfreeze_epochs", bool(epochs))) if on]
        if len(modes) > 1:
            fail(modes[1], f"{' and '.join('transfer.' + m for m in modes)} each decide when the backbone trains; use one")
        if self.layer_decay is not None and self.group_lrs is not None:
            fail("group_lrs", "transfer.layer_decay and transfer.group_lrs both set the group learning rates; use one")
        if self.group_lrs is not None and (not self.group_lrs or any(lr < 0 for lr in self.group_lrs)):
            fail("group_lrs", f"expected one learning rate >= 0 per layer group, got {self.group_lrs}")


@dataclass(config=SECTION)
class EarlyStopConfig(_Section):
    """End the run when a metric stops improving (strategies/early_stopping.py)."""
    monitor: Str | None = Field(None, description="a history.csv column (val_loss, val_acc ...); null: off")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for losses, max otherwise")
    patience: Int = Field(5, ge=1, description="epochs without improvement before stopping")
    min_delta: Float = Field(0.0, ge=0.0, description="an improvement must beat the best by more than this")
    restore_best: Bool = Field(False, description="put the best epoch's weights back at the end")


@dataclass(config=SECTION)
class CurriculumConfig(_Section):
    """Curriculum learning: easiest images first, the pool grows to all of them (strategies/curriculum.py)."""
    difficulty: Literal["none", "reference", "self_paced", "csv"] | None = Field(None, description="what ranks the images; null: off")
    reference: Str | None = Field(None, description="difficulty reference: a run folder or .safetensors; its per-image loss")
    csv: Str | None = Field(None, description="difficulty csv: a CSV with one row per training image")
    column: Str = Field("difficulty", description="csv: the column with the difficulty (higher = harder)")
    id_column: Str | None = Field(None, description="csv: the column naming the image; default: path (file sources) or index")
    pacing: Literal["linear", "root", "step"] = Field("linear", description="how the pool grows from start_fraction to 1")
    start_fraction: Float = Field(0.3, gt=0.0, le=1.0, description="pool at epoch 0, fraction of the images")
    end_point: Float = Field(0.5, gt=0.0, le=1.0, description="fraction of train.epochs when the pool is all")
    step_count: Int = Field(3, ge=1, description="pacing step: equal steps from start_fraction to 1")
    momentum: Float = Field(0.7, ge=0.0, le=0.999, description="self_paced: weight of an image's old score in its running loss")

    def _check(self) -> None:
        for mode in ("reference", "csv"):
            if self.difficulty == mode and not getattr(self, mode):
                what = "a run folder or .safetensors file" if mode == "reference" else "the path of a CSV file"
                fail(mode, f"curriculum.difficulty {mode} needs this key: {what}")


STAGE_KEYS = {"img_size": (int, 4), "epochs": (int, 1), "batch_size": (int, 1), "lr": (float, 0.0)}


@dataclass(config=SECTION)
class ProgressiveConfig(_Section):
    """Progressive resizing: train at small images first (strategies/progressive.py)."""
    stages: list[dict[str, Any]] = Field(default_factory=list, description="[{img_size, epochs, batch_size?, lr?}], sizes increasing")
    min_size: Int | None = Field(None, ge=4, description="ramp instead of stages: first size, pixels; null: off")
    max_size: Int | None = Field(None, ge=4, description="ramp: last size, pixels; default: augment.img_size")
    ramp_start: Float = Field(0.0, ge=0.0, le=1.0, description="ramp: fraction of the epochs at min_size")
    ramp_end: Float = Field(0.75, ge=0.0, le=1.0, description="ramp: fraction of the epochs where max_size is reached")
    size_multiple: Int = Field(4, ge=1, description="ramp sizes are rounded to a multiple of this")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field("linear", description="lr of a stage with another batch_size and no lr")
    schedule: Literal["continuous", "restart"] = Field("continuous", description="one lr schedule over the run, or one per stage")
    eval_size: Int | None = Field(None, ge=4, description="validation/test size, pixels; default: the last training size")

    def _check(self) -> None:
        if self.stages and self.min_size is not None:
            fail("min_size", "progressive.stages and a ramp (min_size) both set the sizes; use one")
        for index, stage in enumerate(self.stages):
            where = f"stages[{index}]"
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
        sizes = [stage["img_size"] for stage in self.stages]
        if any(later <= earlier for earlier, later in itertools.pairwise(sizes)):
            fail("stages", f"stage sizes must increase from stage to stage, got {sizes}")
        if self.min_size is not None and self.ramp_end < self.ramp_start:
            fail("ramp_end", f"ramp_end ({self.ramp_end}) is before ramp_start ({self.ramp_start})")
        if self.min_size is None and self.max_size is not None:
            fail("max_size", "max_size is the end of a ramp: set min_size too (or use stages)")


@dataclass(config=SECTION)
class DistillConfig(_Section):
    """Knowledge distillation from frozen teacher(s) (strategies/distillation.py)."""
    teacher: Str | list[Str] | None = Field(None, description="RUN_DIR, a .safetensors file, an ensemble folder or a timm name (or a list: averaged); null: off")
    alpha: Float = Field(0.5, ge=0.0, le=1.0, description="weight of the label loss; 1 - alpha goes to the teacher term")
    temperature: Float = Field(4.0, gt=0.0, description="softens both distributions (T; the KD term is scaled by T^2)")
    teacher_img_size: Int | None = Field(None, ge=4, description="pixels the teacher(s) see; default: each teacher's own")
    teacher_tta: Bool = Field(False, description="each teacher predicts with test-time augmentation: its run's eval.tta (default: hflip)")

    def _check(self) -> None:
        teachers = self.teacher if isinstance(self.teacher, list) else [self.teacher]
        if self.teacher is not None and (not teachers or any(not t or not t.strip() for t in teachers)):
            fail("teacher", "expected a run folder, a .safetensors file or a timm model name (or a list of them), "
                             f"got {self.teacher!r}; leave it out (or null) to train without a teacher")


@dataclass(config=SECTION)
class LrFindConfig(_Section):
    """The LR range test of `optim.lr: find` and `imgtrain lr-find` (strategies/lr_finder.py)."""
    start: Float = Field(1e-7, gt=0.0, description="first lr tried")
    end: Float = Field(10.0, gt=0.0, description="last lr tried (the test stops earlier if the loss diverges)")
    steps: Int = Field(100, ge=2, description="optimizer steps, one lr each, spaced evenly in log lr")
    suggestion: Literal["valley", "steep", "min10"] = Field("min10", description="the suggestion optim.lr: find uses")
    smoothing: Float = Field(0.98, ge=0.0, le=0.999, description="beta of the loss's moving average (bias-corrected); 0: raw loss")
    diverge: Float = Field(4.0, gt=1.0, description="stop when the smoothed loss passes this x its best")

    def _check(self) -> None:
        if self.start >= self.end:
            fail("start", f"the range test goes up from start to end: start ({self.start:g}) must be below "
                           f"end ({self.end:g})")


@dataclass(config=SECTION)
class DiagnosticsConfig(_Section):
    """Training diagnostics (strategies/diagnostics.py) and the checks of `imgtrain doctor` (doctor.py)."""
    grad_monitor_every: Int | None = Field(None, ge=0, description="optimizer steps between per-layer gradient norm readings; null or 0: off")
    vanishing_below: Float = Field(1e-7, ge=0.0, description="a layer whose gradient norm is below this is vanishing")
    exploding_above: Float = Field(100.0, gt=0.0, description="a layer whose gradient norm is above this is exploding")
    nonfinite: Literal["stop", "skip", "off"] = Field("stop", description="a nan/inf batch loss: stop the run, skip the step, or no check")
    nonfinite_check_every: Int = Field(1, ge=1, description="batches between loss checks (each waits for the device); stop mode only")
    max_skipped_steps: Int = Field(10, ge=0, description="skip: optimizer steps skipped in the run before it stops")
    doctor_batch_size: Int = Field(32, ge=1, description="doctor: images in the batch it tries to overfit")
    doctor_steps: Int = Field(100, ge=1, description="doctor: optimizer steps on that one batch")
    doctor_loss_below: Float = Field(0.05, gt=0.0, description="doctor: the batch's loss must end below this")
    doctor_init_tolerance: Float = Field(0.5, gt=0.0, description="doctor: initial loss within this fraction of log(classes)")
    doctor_learn_steps: Int = Field(50, ge=0, description="doctor: steps over different batches before the val check; 0: skip it")


@dataclass(config=SECTION)
class EvalConfig(_Section):
    """Test-time augmentation (evaluation/tta.py): evaluate/predict/ensemble --tta, teachers, the test split."""
    tta: list[Str | dict[str, Any]] = Field(default_factory=list, description="views, e.g. [hflip, five_crop: 0.875]; empty: off")
    tta_merge: Literal["mean_probs", "mean_logits", "max"] = Field("mean_probs", description="how the views' predictions combine")

    def _check(self) -> None:
        for index, spec in enumerate(self.tta):
            try:
                parse_tta_view(spec)
            except ValueError as exc:
                fail("tta", f"tta[{index}]: {exc}")


@dataclass(config=SECTION)
class CheckpointEveryConfig(_Section):
    """Mid-epoch training states, for `--resume` from the exact batch (engine/loop.py); epoch ends always save."""
    steps: Int | None = Field(None, ge=1, description="save every N optimizer steps; null: not by steps")
    minutes: Float | None = Field(30.0, gt=0.0, description="save when this long has passed since the last save; null: not by time")


@dataclass(config=SECTION)
class TrainConfig(_Section):
    """The training loop (engine/loop.py)."""
    epochs: Int = Field(10, ge=1, description="passes over the training split")
    grad_accum_steps: Int = Field(1, ge=1, description="effective batch = batch_size x this")
    clip_grad_norm: Float | None = Field(None, gt=0.0, description="max global grad norm")
    label_smoothing: Float = Field(0.0, ge=0.0, le=1.0, description="probability mass spread over all classes")
    amp: Literal["auto", "off", "fp16", "bf16"] = Field("auto", description="mixed precision (see README)")
    channels_last: Bool = Field(False, description="NHWC memory format (faster convs on CPU and tensor cores)")
    compile: Bool = Field(False, description="torch.compile the model")
    device: Str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    seed: Int = Field(0, description="seeds Python, NumPy, torch and the shuffle")
    deterministic: Bool = Field(False, description="deterministic kernels (slower on CUDA)")
    threads: Int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    max_steps_per_epoch: Int | None = Field(None, ge=1, description="cut epochs short (smoke runs)")
    checkpoint_every: CheckpointEveryConfig = Field(default_factory=CheckpointEveryConfig, description="mid-epoch training states")
    auto_resume: Bool = Field(False, description="the run folder holds a training state: continue it (as --resume auto)")
    sync_bn: Bool = Field(False, description="several processes on CUDA: BatchNorm -> SyncBatchNorm (statistics over the global batch); else averaged per epoch")
    data_parallel: Bool = Field(False, description="one process on all of this machine's CUDA GPUs (torch.nn.DataParallel); DDP (--nproc) is faster")
    budget: Str | None = Field(None, description="the whole run's time, e.g. 90s, 10m, 1.5h, 1h30m: the epochs (up to train.epochs) and progressive stages are planned to fit, the lr schedule ends with them")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_number(cls, value: Any) -> Any:
        # a plain number is seconds: YAML reads `budget: 600` as an int
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    def _check(self) -> None:
        if self.budget is not None:
            try:
                duration_seconds(self.budget)
            except ValueError as exc:
                fail("budget", str(exc))
        device = self.device
        if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
            fail("device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")


DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def duration_seconds(text: str) -> float:
    """`90s`, `10m`, `1.5h`, `1h30m`, or a plain number of seconds, as seconds (> 0)."""
    compact = str(text).strip().lower().replace(" ", "")
    try:
        seconds = float(compact)
    except ValueError:
        parts = DURATION_PART.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise ValueError(f"expected a duration such as 90s, 10m, 1.5h or 1h30m, got {text!r}") from None
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not seconds > 0:
        raise ValueError(f"expected a duration > 0, such as 10m, got {text!r}")
    return seconds


@dataclass(config=SECTION)
class OutputConfig(_Section):
    """The run folder and what goes in it (tracking/)."""
    root: Str = Field("runs", description="run folders go under this folder")
    name: Str | None = Field(None, description="run folder name; default: the recipe's name (runs/<name>), then <name>-2, <name>-3 ... when it exists")
    best_metric: Str = Field("val_acc", description="column of history.csv that picks the best checkpoint")
    best_mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for *loss, else max")
    save_best: Bool = Field(True, description="checkpoints/best.safetensors")
    save_last: Bool = Field(True, description="checkpoints/last.safetensors + last.state.pt (for --resume)")
    plots: Bool = Field(True, description="redraw plots/*.png every epoch")
    report: Bool = Field(True, description="redraw report.html every epoch (on a time budget; the last always)")
    redraw: Literal["budget", "every_epoch"] = Field("budget", description="plots and report: budget: skip redraws costing over ~1% of the time (the last epoch always draws); every_epoch: always")
    progress: Literal["auto", "bar", "log", "off"] = Field("auto", description="auto: bar on a terminal")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list, description="experiment trackers beside the CSV/JSONL files (pip install \"imgtrain[trackers]\"): tensorboard | mlflow | wandb")
    mlflow_uri: Str | None = Field(None, description="MLflow tracking URI (a server: http://host:5000); default: sqlite:///.../mlflow.db in the folder holding the run folder (output.root)")
    log_images_every: Int = Field(5, ge=0, description="trackers: confusion matrix and worst images every N epochs (and the last epoch); 0: never")

    def _check(self) -> None:
        if self.name is not None and ("/" in self.name or self.name in (".", "..")):
            fail("name", f"a run name is one folder name, got {self.name!r}; use output.root for the parent")
        repeated = sorted({t for t in self.trackers if self.trackers.count(t) > 1})
        if repeated:
            fail("trackers", f"{', '.join(repeated)} listed more than once; name each tracker once")


@dataclass(config=SECTION)
class SearchConfig(_Section):
    """`imgtrain tune`: the hyperparameter search over this recipe (tuning.py, Optuna); `train` ignores it."""
    params: dict[Str, Str] = Field(default_factory=dict, description="dotted recipe key -> choice(...), interval(low, high), int(interval(...)), tag(log, interval(...)) or range(start, stop, step)")
    sampler: Literal["tpe", "random", "grid", "cmaes", "gp"] = Field("tpe", description="how the next trial's values are chosen")
    pruner: Literal["none", "median", "hyperband", "asha"] = Field("none", description="stop unpromising trials early, on the metric of each epoch")
    metric: Str | list[Str] = Field("val_acc", description="history.csv column the search optimises (its best epoch); a list: multi-objective (also images_per_second, parameters)")
    direction: Literal["auto", "maximize", "minimize"] | list[Literal["maximize", "minimize"]] = Field("auto", description="auto: minimize for *loss, else maximize; a list: one per metric")
    budget: Int | None = Field(None, ge=1, description="epochs per trial; null: train.epochs")
    reduction_factor: Int = Field(2, ge=2, description="asha and hyperband: a trial goes on past 1, r, r^2 ... epochs only when in the best 1/r of the trials there")

    def _check(self) -> None:
        known = recipe_keys() if self.params else []  # (a default Recipe has no params: no recursion)
        for key, text in self.params.items():
            if key.startswith("search.") or not (key in known or key.startswith("model.kwargs.")):
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                fail(f"params.{key}", "unknown recipe key" + (f", did you mean {close[0]}?" if close else
                                                              " (imgtrain schema lists every key)"))
            try:
                parse_search_param(text)
            except SearchSpaceError as exc:
                fail(f"params.{key}", str(exc))
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if not metrics:
            fail("metric", "name at least one history.csv column, e.g. val_acc")
        if isinstance(self.direction, list) != isinstance(self.metric, list) or (
                isinstance(self.direction, list) and len(self.direction) != len(metrics)):
            fail("direction", f"give one direction per metric ({len(metrics)}), or auto for one metric")
        if len(metrics) > 1 and self.pruner != "none":
            fail("pruner", "pruning needs one metric: Optuna cannot prune a multi-objective study; set pruner: none")
        if len(metrics) > 1 and self.sampler == "cmaes":
            fail("sampler", "cmaes optimises one metric; for several use tpe, random, grid or gp")
        if self.sampler == "grid":
            for key, text in self.params.items():
                if parse_search_param(text).grid() is None:
                    fail(f"params.{key}", f"sampler grid needs a finite space: {text} is continuous; use choice, "
                                          "range or int(interval(...))")


@dataclass(config=SECTION)
class Recipe(_Section):
    """An imgtrain recipe: every section has defaults; write only what you change."""
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    swa: SwaConfig = Field(default_factory=SwaConfig)
    imbalance: ImbalanceConfig = Field(default_factory=ImbalanceConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    lr_find: LrFindConfig = Field(default_factory=LrFindConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    progressive: ProgressiveConfig = Field(default_factory=ProgressiveConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    # where the recipe came from (not a recipe key: recipe_from_dict refuses it; set by load_recipe)
    source_file: str | None = dataclasses.field(default=None, metadata={"internal": True})

    def _check(self) -> None:
        if self.data.source == "streaming" and self.curriculum.difficulty is not None:
            fail("curriculum.difficulty", "curriculum learning picks training images by difficulty, which needs "
                 "random access; data.source streaming reads the train shards in order: remove "
                 "curriculum.difficulty or train from the image folder")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what config.yaml in the run folder holds)."""
        out = dataclasses.asdict(self)
        out.pop("source_file", None)
        return out


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when path is None), apply overrides, validate."""
    data, origins, file = read_recipe(path, overrides or [])
    recipe = recipe_from_dict(data, file=file, origins=origins)
    recipe.source_file = file
    return recipe


def recipe_from_dict(data: dict[str, Any], file: str | None = None, origins: dict[str, tuple] | None = None) -> Recipe:
    """Build and validate a Recipe from plain data (e.g. a run folder's config.yaml)."""
    origins = origins or {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping of keys, got {type(data).__name__}", **where("recipe", file, origins))
    data = _upgrade_legacy_keys(data)
    if "source_file" in data:  # a field of Recipe, but set by the loader, not a recipe key
        raise RecipeError("unknown key (the loader sets it)", **where("source_file", file, origins))
    try:
        return _RECIPE.validate_python(data)
    except ValidationError as exc:
        raise recipe_error(exc, Recipe, data, file, origins) from None


def _upgrade_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Old recipes and run folders say `model.pretrained: true|false`: read as `model.weights: timm` or nothing."""
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("pretrained"), bool):
        return data
    model = dict(model)
    if model.pop("pretrained") and model.get("weights") is None and model.get("weights_file") is None:
        model["weights"] = "timm"
    return {**data, "model": model}


_RECIPE = TypeAdapter(Recipe)


def _defaults(section: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default of every recipe key in a section (of a default Recipe: all of them)."""
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            defaults.update(_defaults(value, f"{prefix}{f.name}."))
        elif not f.metadata.get("internal"):
            defaults[prefix + f.name] = value
    return defaults


def recipe_keys() -> list[str]:
    """Every dotted recipe key (for help texts and suggestions)."""
    return list(_defaults(Recipe()))


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file (`imgtrain schema`), for editors; unknown keys are refused."""
    schema = _RECIPE.json_schema()
    schema["properties"].pop("source_file")
    schema["properties"]["extends"] = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        "description": "recipe(s) this one starts from, merged in order: a path relative to this file or a "
                       "built-in name (" + ", ".join(builtin_recipes()) + ")"}
    # pydantic leaves out defaults made by a factory (lists, sections): take them from a default recipe
    for key, value in _defaults(Recipe()).items():
        *sections, name = key.split(".")
        node = schema
        for section in sections:
            node = schema["$defs"][node["properties"][section]["$ref"].rpartition("/")[2]]
        node["properties"][name].setdefault("default", value)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML (the run folder's config.yaml)."""
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
    path.write_text(text, encoding="utf-8")
