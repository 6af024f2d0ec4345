"""Ensembles: several trained models predicting together, and the folder that keeps them
(README "Ensembling" has the command, the saved folder's layout and measurements).

    ens = EnsemblePredictor([load_predictor("runs/a"), load_predictor("runs/b")], weights=[2, 1])
    probs, targets = ens.probabilities(dataset)          # the same interface as ModelPredictor
    save_ensemble("runs/ab", ens)                        # evaluate, predict and distill accept it

Each member runs its own eval pipeline on the raw images, converted to its channels (`to_channels`).
Weights are normalised to sum to 1. soft vote: sum_k w_k p_k; hard vote: the weighted vote shares,
mixed with HARD_TIE_EPS of the soft mean, so that only ties are decided by it. `fit_weights` is
Breiman's stacking (1996) restricted to the simplex: the soft vote's NLL on held-out predictions is
convex in the weights, so the fit is deterministic; it favours the member whose probabilities are
best, not the most accurate one.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from imgtrain.config import RecipeError
from imgtrain.data import build_splits
from imgtrain.engine.checkpoint import CheckpointError
from imgtrain.evaluation.inference import (
    ENSEMBLE_FILE,
    ModelPredictor,
    TTAArg,
    check_classes,
    evaluation_data,
    is_ensemble_dir,
    metrics_of,
)
from imgtrain.io import check_replaceable
from imgtrain.models.trained import load_trained

VOTES = ("soft", "hard")
HARD_TIE_EPS = 1e-6  # share of the soft mean in a hard vote's probabilities: it only breaks ties
FORMAT = 1           # ensemble.yaml's layout version
LUMA_FIXED = (19595, 38470, 7471)  # ITU-R 601 luma in 16-bit fixed point, exactly as PIL's convert("L")
HEADLINE = ("acc", "top5_acc", "balanced_acc", "loss", "ece")


class EnsembleError(CheckpointError):
    """An ensemble that cannot be built, saved or read (the CLI exits with status 2)."""


# ----------------------------------------------------------------------------- pure functions

def normalize_weights(weights: Sequence[float] | None, count: int, where: str = "weights") -> list[float]:
    """`weights` scaled to sum to 1 (None: all equal); an EnsembleError for a wrong count,
    a negative or non-finite weight, or all zero."""
    if count < 1:
        raise EnsembleError("an ensemble needs at least one member")
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise EnsembleError(f"{where}: {len(values)} weight(s) for {count} member(s); give one per member, "
                            "in the members' order")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise EnsembleError(f"{where}: weights must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise EnsembleError(f"{where}: all weights are 0; at least one member must have a positive weight")
    return [w / total for w in values]


def combine_probabilities(member_probs: Sequence[torch.Tensor], weights: Sequence[float],
                          vote: str = "soft") -> torch.Tensor:
    """(N, C) ensemble probabilities from K members' (N, C) probabilities and K weights summing to 1.

    soft: sum_k w_k p_k. hard: the weighted vote shares, mixed with HARD_TIE_EPS of the soft mean so
    that tied votes go to the class the soft mean prefers (and no probability is exactly 0)."""
    if vote not in VOTES:
        raise EnsembleError(f"vote: {vote!r} is not one of {', '.join(VOTES)}")
    stacked = torch.stack([p.double() for p in member_probs])             # (K, N, C)
    w = torch.tensor(list(weights), dtype=torch.float64).view(-1, 1, 1)
    soft = (w * stacked).sum(dim=0)
    if vote == "soft":
        return soft.float()
    votes = torch.zeros_like(stacked).scatter_(2, stacked.argmax(dim=2, keepdim=True), 1.0)
    shares = (w * votes).sum(dim=0)
    return ((1.0 - HARD_TIE_EPS) * shares + HARD_TIE_EPS * soft).float()


def ensemble_nll(member_probs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor,
                 weights: Sequence[float]) -> float:
    """Mean negative log-likelihood of the soft ensemble with these weights."""
    w = torch.tensor(list(weights), dtype=torch.float64).view(-1, 1)
    mixed = (w * _picked(member_probs, targets)).sum(dim=0)
    return float(-mixed.clamp_min(1e-12).log().mean())


def fit_weights(member_probs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor,
                steps: int = 200) -> list[float]:
    """Weights on the probability simplex that minimise the soft ensemble's NLL on (probs, targets).

    w = softmax(theta), theta starting at 0 (equal weights), SciPy's L-BFGS-B with the analytic
    gradient in float64: deterministic, and a few dozen iterations reach the optimum."""
    count = len(member_probs)
    if count == 1:
        return [1.0]
    picked = _picked(member_probs, targets)
    if picked.shape[1] == 0:
        raise EnsembleError("fit_weights: no images to fit the weights on")
    log_picked = picked.clamp_min(1e-12).log().numpy()
    # SciPy here, not at the top: scipy.optimize adds 0.3 s to every process that imports imgtrain.api
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    def nll_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # log sum_k w_k p_k = logsumexp_k(log w_k + log p_k): stable even when a member is sure and wrong
        log_w = theta - logsumexp(theta)
        joint = log_w[:, None] + log_picked                      # (K, N): log w_k p_kn
        log_mix = logsumexp(joint, axis=0)                       # (N,): log of the ensemble's probability
        responsibility = np.exp(joint - log_mix)                 # w_k p_kn / sum_j w_j p_jn
        return float(-log_mix.mean()), np.exp(log_w) - responsibility.mean(axis=1)  # d/dtheta of the mean NLL

    fitted = minimize(nll_and_gradient, np.zeros(count), jac=True, method="L-BFGS-B",
                      options={"maxiter": steps, "gtol": 1e-10, "ftol": 1e-14})
    return [float(w) for w in np.exp(fitted.x - logsumexp(fitted.x))]


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """A uint8 (C, H, W) image with `channels` channels: grey repeated to RGB, RGB to grey with
    ITU-R 601 luma in PIL's fixed-point arithmetic (the same bytes as load_image(path, 1))."""
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return image.expand(3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        r, g, b = (image[i].to(torch.int64) for i in range(3))
        luma = (r * LUMA_FIXED[0] + g * LUMA_FIXED[1] + b * LUMA_FIXED[2] + 0x8000) >> 16
        return luma.to(torch.uint8).unsqueeze(0)
    raise EnsembleError(f"cannot turn {have}-channel images into {channels}-channel ones")


def _picked(member_probs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """(K, N) float64: each member's probability of each image's true class, all the NLL depends on."""
    stacked = torch.stack([p.double() for p in member_probs])
    return stacked.gather(2, targets.long().view(1, -1, 1).expand(stacked.shape[0], -1, 1)).squeeze(2)


class ChannelView(Dataset):
    """A dataset of raw images seen with `channels` channels; `with_transform` as the datasets have."""

    def __init__(self, dataset: Any, channels: int, transform: Any = None):
        self.raw = dataset.with_transform(None) if hasattr(dataset, "with_transform") else dataset
        self.channels, self.transform = channels, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        image, target = self.raw[index]
        image = to_channels(image, self.channels)
        return (self.transform(image) if self.transform is not None else image), target

    def with_transform(self, transform: Any) -> ChannelView:
        return ChannelView(self.raw, self.channels, transform)


# ----------------------------------------------------------------------------- the predictor

class EnsembleTTA:
    """What `.tta` of an ensemble says: the members' test-time augmentation."""

    def __init__(self, configs: Sequence[Any]):
        self.configs = list(configs)

    def describe(self) -> str:
        texts = [c.describe() if c is not None else "none" for c in self.configs]
        return texts[0] if len(set(texts)) == 1 else "; ".join(f"member {i + 1}: {t}" for i, t in enumerate(texts))


class EnsemblePredictor:
    """Several predictors (ModelPredictor or nested EnsemblePredictor) voting with weights, with
    ModelPredictor's interface. `channels`: 3 when any member takes RGB (what to decode images as);
    `recipe`: the first member's (it names the data an ensemble is evaluated on)."""

    def __init__(self, members: Sequence[Any], weights: Sequence[float] | None = None, vote: str = "soft",
                 source: str = "ensemble"):
        if vote not in VOTES:
            raise EnsembleError(f"vote: {vote!r} is not one of {', '.join(VOTES)}")
        self.members = list(members)
        self.weights = normalize_weights(weights, len(self.members))
        self.vote = vote
        self.source = source
        self.folder: Path | None = None  # the saved folder it was loaded from (load_ensemble sets it)
        self.classes: list[str] = check_members(self.members)
        self.channels = max(m.channels for m in self.members)
        self.recipe = self.members[0].recipe
        configs = [getattr(m, "tta", None) for m in self.members]
        self.tta = EnsembleTTA(configs) if any(c is not None for c in configs) else None

    def describe(self) -> str:
        parts = [f"{w:.3f} x {m.describe()}" for m, w in zip(self.members, self.weights)]
        return f"ensemble of {len(self.members)} ({self.vote} vote): " + "; ".join(parts)

    def without_tta(self) -> EnsemblePredictor:
        plain = EnsemblePredictor([m.without_tta() for m in self.members], self.weights, self.vote, self.source)
        plain.folder = self.folder
        return plain

    def member_probabilities(self, dataset: Any, batch_size: int = 256, device: str | torch.device = "cpu",
                             num_workers: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each member's (N, C) probabilities (its own channels and eval pipeline) and the targets."""
        results = [member.probabilities(ChannelView(dataset, member.channels), batch_size=batch_size,
                                        device=device, num_workers=num_workers) for member in self.members]
        return [probs for probs, _ in results], results[0][1]

    def combine(self, member_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine_probabilities(member_probs, self.weights, self.vote)

    def probabilities(self, dataset: Any, batch_size: int = 256, device: str | torch.device = "cpu",
                      num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) ensemble probabilities on the CPU and the dataset's (N,) targets, in order."""
        probs, targets = self.member_probabilities(dataset, batch_size, device, num_workers)
        return self.combine(probs), targets


def member_name(member: Any) -> str:
    """A short name for a member: its run folder's name, or its file's / ensemble folder's."""
    path = Path(getattr(member, "source", "member"))
    if path.suffix == ".safetensors" and path.parent.name == "checkpoints":
        name = path.parent.parent.name                      # runs/NAME/checkpoints/best.safetensors
    else:
        name = path.stem if path.suffix == ".safetensors" else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "member"


def check_members(members: Sequence[Any], names: Sequence[str] | None = None) -> list[str]:
    """The members' common class list; an EnsembleError naming two members and how they differ."""
    if not members:
        raise EnsembleError("an ensemble needs at least one member")
    names = list(names) if names is not None else [getattr(m, "source", f"member {i + 1}")
                                                    for i, m in enumerate(members)]
    first = list(members[0].classes)
    for name, member in zip(names[1:], members[1:]):
        other = list(member.classes)
        if other == first:
            continue
        only_first = [c for c in first if c not in other]
        only_other = [c for c in other if c not in first]
        if only_first or only_other:
            how = f"only in {names[0]}: {_short(only_first)}; only in {name}: {_short(only_other)}"
        else:
            how = f"the same classes in another order: {_short(first)} against {_short(other)}"
        raise EnsembleError(f"ensemble members predict different classes: {names[0]} ({len(first)} classes) and "
                            f"{name} ({len(other)} classes): {how}. Members must be trained on the same classes, "
                            "in the same order")
    return first


def _short(classes: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(str(c) for c in list(classes)[:limit])
    return "[" + shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "") + "]"


# ----------------------------------------------------------------------------- the saved folder

def tta_setting(tta: TTAArg) -> Any:
    """The TTA argument as ensemble.yaml keeps it: null (off), true (each member's recipe eval.tta),
    a list of views (`--tta hflip,five_crop`), or {views, merge} for a TTAConfig."""
    if tta is None or isinstance(tta, bool):
        return tta or None
    if isinstance(tta, str):
        return [v.strip() for v in tta.split(",") if v.strip()]
    if isinstance(tta, (list, tuple)):
        return [v if isinstance(v, dict) else str(v) for v in tta]
    views = getattr(tta, "views", None)
    if views is not None and hasattr(tta, "merge"):  # a TTAConfig
        return {"views": [_view_spec(v) for v in views], "merge": tta.merge}
    raise EnsembleError(f"cannot save the TTA setting {tta!r}: give true, a list of views or a TTAConfig")


def _view_spec(view: Any) -> Any:
    """A parsed TTAView as the eval.tta entry that gives it back."""
    if view.value is None:
        return view.name
    spec: dict[str, Any] = {view.name: list(view.value) if isinstance(view.value, tuple) else view.value}
    if view.name == "random":
        spec.update(seed=view.seed, area=list(view.area), flip=view.flip)
    return spec


def _tta_argument(setting: Any) -> TTAArg:
    """ensemble.yaml's tta back into what ModelPredictor takes."""
    if isinstance(setting, dict):
        from imgtrain.evaluation.tta import TTAConfig, as_views
        return TTAConfig(views=as_views(setting.get("views") or []), merge=setting.get("merge", "mean_probs"))
    return setting


def save_ensemble(folder: str | Path, ensemble: EnsemblePredictor, overwrite: bool = False,
                  tta: TTAArg = None, weights_info: dict[str, Any] | None = None) -> Path:
    """Write `ensemble` to `folder` (ensemble.yaml + a copy of each member), atomically: built in a
    temporary folder beside it, then renamed into place. A non-empty `folder` is refused unless
    `overwrite` and it is an ensemble folder. Returns the folder."""
    folder = Path(folder)
    check_save_folder(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the folder should look like any other
    try:
        (tmp / "members").mkdir()
        entries = []
        for index, (member, weight) in enumerate(zip(ensemble.members, ensemble.weights), start=1):
            name = f"{index}-{member_name(member)}"
            entries.append(_copy_member(member, tmp / "members", name, weight))
        spec: dict[str, Any] = {
            "format": FORMAT,
            "classes": list(ensemble.classes),
            "vote": ensemble.vote,
            "tta": tta_setting(tta),
            "weights_from": (weights_info or {}).get("how", "uniform"),
        }
        if weights_info and weights_info.get("how") == "fit":
            spec["fit"] = {k: v for k, v in weights_info.items() if k != "how"}
        spec["members"] = entries
        header = ("# imgtrain ensemble (imgtrain ensemble --save): imgtrain evaluate/predict accept this folder,\n"
                  "# and distill.teacher (always a soft vote there). Members are copies: the source runs may go.\n")
        (tmp / ENSEMBLE_FILE).write_text(header + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None),
                                         encoding="utf-8")
        check_save_folder(folder, overwrite)  # again right before the swap: the members were copied meanwhile
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            old.rmdir()
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


_REFUSE = "folder exists and is not empty; pass --overwrite to replace it, or choose another --save folder"
_FOREIGN = f"the folder is not an imgtrain ensemble (no {ENSEMBLE_FILE})"


def check_save_folder(folder: str | Path, overwrite: bool) -> None:
    """Before any work: `folder` may be written (absent, empty, or --overwrite of an ensemble folder)."""
    check_replaceable(Path(folder), overwrite, ours=is_ensemble_dir(folder), refuse=_REFUSE, foreign=_FOREIGN)


def _copy_member(member: Any, into: Path, name: str, weight: float) -> dict[str, Any]:
    if isinstance(member, EnsemblePredictor):
        folder = member.folder
        if folder is None:
            raise EnsembleError("a nested ensemble can be saved only when it was loaded from a saved ensemble folder")
        shutil.copytree(folder, into / name, ignore=shutil.ignore_patterns("evaluation", ".*"))
        return {"file": f"members/{name}", "source": str(folder), "model": "ensemble",
                "channels": member.channels, "weight": weight}
    if not isinstance(member, ModelPredictor):
        raise EnsembleError(f"cannot save a member of type {type(member).__name__}")
    target = into / f"{name}.safetensors"
    shutil.copyfile(member.loaded.path, target)
    return {"file": f"members/{target.name}", "source": str(member.loaded.path),
            "model": member.loaded.recipe.model.name, "img_size": member.loaded.img_size,
            "channels": member.channels, "weight": weight}


@dataclass
class EnsembleSpec:
    """ensemble.yaml, checked: what load_ensemble and distillation read."""
    folder: Path
    classes: list[str]
    vote: str
    tta: Any
    weights: list[float]
    members: list[Path]                      # member files (or nested ensemble folders), in order
    info: dict[str, Any] = field(default_factory=dict)  # everything else in the file


def read_ensemble_spec(folder: str | Path) -> EnsembleSpec:
    """Read and check DIR/ensemble.yaml; an EnsembleError saying what is wrong and where."""
    folder = Path(folder)
    file = folder / ENSEMBLE_FILE
    if not file.is_file():
        raise EnsembleError(f"{folder}: not an ensemble folder (no {ENSEMBLE_FILE}); write one with "
                            "imgtrain ensemble RUN... --save DIR")
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise EnsembleError(f"{file}: not readable YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise EnsembleError(f"{file}: expected a mapping with classes, vote and members")
    missing = [key for key in ("classes", "vote", "members") if key not in spec]
    if missing:
        raise EnsembleError(f"{file}: missing key(s) {', '.join(missing)}; was it written by imgtrain ensemble --save?")
    if spec.get("format", FORMAT) != FORMAT:
        raise EnsembleError(f"{file}: format {spec.get('format')} is not one this imgtrain reads ({FORMAT})")
    members = spec["members"]
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) and "file" in m for m in members):
        raise EnsembleError(f"{file}: members must be a non-empty list of entries with a `file`")
    if spec["vote"] not in VOTES:
        raise EnsembleError(f"{file}: vote: {spec['vote']!r} is not one of {', '.join(VOTES)}")
    if not isinstance(spec["classes"], list):
        raise EnsembleError(f"{file}: classes must be a list of class names")
    paths = []
    for index, entry in enumerate(members, start=1):
        path = folder / str(entry["file"])
        if not path.exists():
            raise EnsembleError(f"{file}: member {index}: {path} does not exist (the folder is incomplete; "
                                "save the ensemble again)")
        paths.append(path)
    try:
        weights = normalize_weights([m.get("weight", 1.0) for m in members], len(members), where=f"{file}: weight")
    except (TypeError, ValueError) as exc:
        raise EnsembleError(f"{file}: weight: {exc}") from None
    info = {k: v for k, v in spec.items() if k not in ("classes", "vote", "tta", "members")}
    info["members"] = members
    return EnsembleSpec(folder=folder, classes=[str(c) for c in spec["classes"]], vote=spec["vote"],
                        tta=spec.get("tta"), weights=weights, members=paths, info=info)


def load_ensemble(folder: str | Path, tta: TTAArg = None,
                  device: str | torch.device = "cpu") -> EnsemblePredictor:
    """The EnsemblePredictor saved in `folder`. `tta`: None uses the setting saved with it,
    False turns it off, True or views (or a TTAConfig) replace it."""
    spec = read_ensemble_spec(folder)
    try:
        setting = _tta_argument(spec.tta) if tta is None else tta
    except ValueError as exc:
        raise EnsembleError(f"{spec.folder / ENSEMBLE_FILE}: tta: {exc}") from None
    members: list[ModelPredictor | EnsemblePredictor] = []
    for index, path in enumerate(spec.members, start=1):
        try:
            if is_ensemble_dir(path):
                # a nested ensemble follows this one's setting, never its own saved one
                members.append(load_ensemble(path, tta=setting if setting is not None else False, device=device))
            else:
                members.append(ModelPredictor(load_trained(path, device=device), tta=setting))
        except (CheckpointError, RecipeError) as exc:  # RecipeError: a bad tta view saved in the file
            raise EnsembleError(f"{spec.folder / ENSEMBLE_FILE}: member {index}: {exc}") from None
    ensemble = EnsemblePredictor(members, spec.weights, spec.vote, source=str(spec.folder))
    if ensemble.classes != spec.classes:
        raise EnsembleError(f"{spec.folder / ENSEMBLE_FILE}: classes {_short(spec.classes)} differ from its members' "
                            f"{_short(ensemble.classes)}")
    ensemble.folder = spec.folder
    return ensemble


def load_predictor(target: str | Path, tta: TTAArg = None, device: str | torch.device = "cpu") -> Any:
    """A run folder or .safetensors file (ModelPredictor), or a folder written by
    `imgtrain ensemble --save` (EnsemblePredictor)."""
    if is_ensemble_dir(target):
        return load_ensemble(target, tta=tta, device=device)
    return ModelPredictor(load_trained(target, device=device), tta=tta)


def flat_members(folder: str | Path) -> tuple[EnsembleSpec, list[tuple[Path, float]]]:
    """(spec, [(checkpoint file, weight)]): nested ensembles expanded, weights multiplied through, so
    that the soft vote of the list is the folder's soft vote (what a distillation teacher uses)."""
    spec = read_ensemble_spec(folder)
    out: list[tuple[Path, float]] = []
    for path, weight in zip(spec.members, spec.weights):
        if is_ensemble_dir(path):
            _, inner = flat_members(path)
            out.extend((p, weight * w) for p, w in inner)
        else:
            out.append((path, weight))
    return spec, out


# ----------------------------------------------------------------------------- imgtrain ensemble

@dataclass
class EnsembleOptions:
    """What `imgtrain ensemble` is asked (one place, so the function keeps few parameters)."""
    weights: Sequence[float] | None = None   # one per member; None: equal, or fitted with fit_weights
    fit_weights: str | None = None           # "val": fit the weights on the first member's val split
    tta: TTAArg = None                          # None: off; True: each member's eval.tta; a list of views
    vote: str = "soft"                          # soft | hard
    split: str = "test"                         # the split the table is measured on
    data: str | Path | None = None     # or this image folder / CSV instead
    save: str | Path | None = None     # write the ensemble folder here
    overwrite: bool = False                     # replace an existing ensemble folder at `save`
    batch_size: int = 256
    device: str = "cpu"


def run_ensemble(targets: Sequence[str | Path], options: EnsembleOptions | None = None) -> dict[str, Any]:
    """`imgtrain ensemble`: load the members, choose the weights, measure every member and the
    ensemble on one split (each member's probabilities computed once), and save it if asked.
    Returns what `format_ensemble` prints; `ensemble` has every metric, as evaluate gives them."""
    opts = options or EnsembleOptions()
    if not targets:
        raise EnsembleError("give at least one member: run folders, .safetensors files or ensemble folders")
    if opts.vote not in VOTES:
        raise EnsembleError(f"--vote {opts.vote}: choose one of {', '.join(VOTES)}")
    if opts.weights is not None and opts.fit_weights is not None:
        raise EnsembleError("--weights and --fit-weights exclude each other: give one")
    if opts.fit_weights not in (None, "val"):
        raise EnsembleError(f"--fit-weights {opts.fit_weights}: only `val` (the first member's validation split)")
    if opts.weights is not None:
        normalize_weights(opts.weights, len(targets), where="--weights")  # before anything is loaded
    if opts.save is not None:
        check_save_folder(opts.save, opts.overwrite)
    # an ensemble member follows this command's --tta, never its own saved setting
    members = [load_predictor(t, tta=opts.tta if (opts.tta is not None or not is_ensemble_dir(t)) else False,
                              device=opts.device) for t in targets]
    names = [str(t) for t in targets]
    classes = check_members(members, names)
    base = EnsemblePredictor(members, None, opts.vote, source="ensemble")
    recipe = members[0].recipe
    weights = normalize_weights(opts.weights, len(members))
    info: dict[str, Any] = {"how": "given" if opts.weights else "uniform"}
    if opts.fit_weights == "val":
        splits = build_splits(recipe.data)
        if splits.val is None:
            raise EnsembleError(f"--fit-weights val: the first member's recipe ({names[0]}) has no val split to fit "
                                "the weights on (data.val_fraction is 0 and the data has no val folder); give "
                                "--weights instead")
        check_classes(classes, splits.classes, f"{recipe.data.root or recipe.data.source} (val)")
        val_probs, val_targets = base.member_probabilities(splits.val.with_transform(None), opts.batch_size,
                                                           opts.device)
        weights = fit_weights(val_probs, val_targets)
        fitted = combine_probabilities(val_probs, weights, "soft")
        info = {"how": "fit", "split": "val", "images": int(val_targets.numel()),
                "nll": ensemble_nll(val_probs, val_targets, weights),
                "nll_uniform": ensemble_nll(val_probs, val_targets, normalize_weights(None, len(members))),
                "acc": float((fitted.argmax(1) == val_targets).double().mean())}
    ensemble = EnsemblePredictor(members, weights, opts.vote, source="ensemble")
    dataset, data_classes, where = evaluation_data(recipe, opts.split, opts.data)
    check_classes(classes, data_classes, where)
    probs, split_targets = ensemble.member_probabilities(dataset.with_transform(None), opts.batch_size, opts.device)
    rows = []
    for name, member, weight, p in zip(names, members, ensemble.weights, probs):
        scores = metrics_of(p, split_targets, classes)
        rows.append({"source": name, "model": member.describe(), "weight": weight,
                     **{k: scores[k] for k in HEADLINE if k in scores}})
    result: dict[str, Any] = {
        "split": opts.split if opts.data is None else str(opts.data), "images": int(split_targets.numel()),
        "classes": classes, "vote": opts.vote, "tta": ensemble.tta.describe() if ensemble.tta else None,
        "weights": list(ensemble.weights), "weights_from": info["how"], "members": rows,
        "ensemble": metrics_of(ensemble.combine(probs), split_targets, classes),
    }
    if info["how"] == "fit":
        result["fit"] = {k: v for k, v in info.items() if k != "how"}
    if opts.save is not None:
        result["saved"] = str(save_ensemble(opts.save, ensemble, overwrite=opts.overwrite, tta=opts.tta,
                                            weights_info=info))
    return result


def format_ensemble(result: dict[str, Any]) -> str:
    """The table `imgtrain ensemble` prints: one row per member, then the ensemble."""
    top5 = any("top5_acc" in row for row in result["members"])
    head = f"{'':<4s}{'member':<44s}{'weight':>8s}{'acc':>9s}" + (f"{'top-5':>9s}" if top5 else "") \
        + f"{'balanced':>10s}{'loss':>9s}{'ECE':>8s}"
    lines = [f"{result['split']}: {result['images']} images, {len(result['classes'])} classes; "
             f"{result['vote']} vote; weights {result['weights_from']}"
             + (f"; TTA {result['tta']}" if result["tta"] else ""), head]

    def row(label: str, name: str, weight: str, m: dict[str, Any]) -> str:
        name = name if len(name) <= 43 else "..." + name[-40:]
        return (f"{label:<4s}{name:<44s}{weight:>8s}{m['acc']:>9.2%}" + (f"{m['top5_acc']:>9.2%}" if top5 else "")
                + f"{m['balanced_acc']:>10.2%}{m['loss']:>9.4f}{m['ece']:>8.4f}")

    for index, member in enumerate(result["members"], start=1):
        lines.append(row(str(index), member["source"], f"{member['weight']:.3f}", member))
    lines.append(row("", f"ensemble ({result['vote']} vote)", "1.000", result["ensemble"]))
    best = max(m["acc"] for m in result["members"])
    lines.append(f"ensemble - best member: {(result['ensemble']['acc'] - best) * 100:+.2f} points of accuracy")
    if "fit" in result:
        fit = result["fit"]
        lines.append(f"weights fitted on {fit['split']} ({fit['images']} images): NLL {fit['nll']:.4f} "
                     f"(equal weights {fit['nll_uniform']:.4f})")
    if "saved" in result:
        lines.append(f"saved to {result['saved']}: imgtrain evaluate {result['saved']}")
    return "\n".join(lines)


__all__ = ["load_predictor", "ChannelView", "EnsembleError", "EnsembleOptions", "EnsemblePredictor", "EnsembleSpec",
           "VOTES", "check_members", "combine_probabilities", "ensemble_nll", "fit_weights", "flat_members",
           "format_ensemble", "load_ensemble", "member_name", "normalize_weights", "read_ensemble_spec",
           "run_ensemble", "save_ensemble", "to_channels"]
