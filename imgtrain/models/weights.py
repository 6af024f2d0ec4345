"""Starting weights for a new run: `model.weights` (timm, a run folder or a .safetensors file) and
`model.weights_file` (a local checkpoint); the README's "Starting weights" has the table.

The weights are fitted to the model as timm fits its own: a classifier of another class count is
dropped (the new head stays random), a first conv is adapted 3 -> 1 or 1 -> 3 channels
(`adapt_input_conv`). Any other shape mismatch, or a file covering under half of the model's
parameters, is another architecture and stops the run before it starts. `.pth`/`.pt`/`.bin` are
read only with `torch.load(weights_only=True)`: a pickle that would run code is never unpickled.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv, clean_state_dict, get_model_traits

from imgtrain.config import ModelConfig
from imgtrain.engine.checkpoint import CheckpointError, load_weights
from imgtrain.models.create import ModelError, model_kwargs
from imgtrain.models.trained import resolve_checkpoint

TIMM = "timm"  # the model.weights value that means timm's own pretrained weights
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# checkpoint containers, the plain weights first: EMA weights only when there are no others
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "state_dict_ema", "model_ema")
SHOWN = 5  # keys named in reports and errors; the rest are counted


@dataclass
class WeightsReport:
    """What `load_initial_weights` did, for train.log."""
    source: str                                  # where the weights came from
    loaded: int                                  # tensors copied into the model
    total: int                                   # tensors in the model's state dict
    missing: list[str] = field(default_factory=list)     # model keys the source lacks (random init kept)
    unexpected: list[str] = field(default_factory=list)  # source keys the model lacks (ignored)
    head_replaced: list[str] = field(default_factory=list)   # classifier keys dropped for another class count
    input_adapted: list[str] = field(default_factory=list)   # first-conv keys adapted to the channel count
    # (classes of the source (None: its pretrained_cfg does not say), classes of the model)
    head_classes: tuple[int | None, int] | None = None
    input_chans: tuple[int, int] | None = None   # (channels of the source, channels of the model)

    def lines(self) -> list[str]:
        out = [f"weights: loaded {self.loaded} of {self.total} tensors from {self.source}", *self.changes()]
        if self.missing:
            out.append(f"weights: {len(self.missing)} missing from the source, left at random: {_some(self.missing)}")
        if self.unexpected:
            out.append(f"weights: {len(self.unexpected)} in the source unused by the model: {_some(self.unexpected)}")
        return out

    def changes(self) -> list[str]:
        """How the model differs from the weights' own: a new head, an adapted input conv (the console shows these)."""
        out = []
        if self.head_replaced:
            classes = f" ({self.head_classes[0]} classes -> {self.head_classes[1]})" if self.head_classes else ""
            out.append(f"weights: head replaced{classes}: {_some(self.head_replaced)} start from random")
        if self.input_adapted:
            chans = f" ({self.input_chans[0]} channels -> {self.input_chans[1]})" if self.input_chans else ""
            out.append(f"weights: input conv adapted{chans}: {_some(self.input_adapted)}")
        return out


def _some(keys: Sequence[Any]) -> str:
    shown = ", ".join(str(k) for k in keys[:SHOWN])
    return shown + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


# ----------------------------------------------------------------------------- where from

@dataclass
class WeightsSource:
    key: str                 # the recipe key that named it: model.weights or model.weights_file
    kind: str                # timm | checkpoint (run folder or .safetensors) | file
    path: Path | None = None


def resolve_weights_source(cfg: ModelConfig) -> WeightsSource | None:
    """Check what `model.weights`/`model.weights_file` name exists (cheap: called before a run starts);
    relative paths start in the working folder, as `data.root` does."""
    if cfg.weights is not None and cfg.weights_file is not None:  # config.py refuses this too
        raise ModelError("model.weights and model.weights_file both set the starting weights; use one")
    if cfg.weights == TIMM:
        _timm_weights_cfg(cfg.name)
        return WeightsSource("model.weights", TIMM)
    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(f"model.weights: {path} is a {path.suffix} file; set model.weights_file: {path} "
                             "instead (model.weights takes timm, a run folder or a .safetensors file)")
        try:
            return WeightsSource("model.weights", "checkpoint", resolve_checkpoint(path))
        except CheckpointError as exc:
            raise ModelError(f"model.weights: {exc}. Expected timm, a run folder written by imgtrain or a "
                             ".safetensors file (relative paths start in the working folder)") from None
    if cfg.weights_file is not None:
        path = Path(cfg.weights_file).expanduser()
        if not path.is_file():
            raise ModelError(f"model.weights_file: {path}: no such file (relative paths start in the "
                             "working folder)")
        if path.suffix.lower() not in PICKLE_SUFFIXES + (".safetensors",):
            raise ModelError(f"model.weights_file: {path}: expected a .safetensors, .pth, .pt or .bin "
                             "checkpoint (for a run folder, use model.weights)")
        return WeightsSource("model.weights_file", "file", path)
    return None


# ----------------------------------------------------------------------------- loading

def load_initial_weights(model: torch.nn.Module, cfg: ModelConfig, num_classes: int,
                         in_chans: int) -> WeightsReport | None:
    """Load the starting weights `cfg` names into `model` (built for `num_classes`, `in_chans`);
    None when there are none to load (random initialisation)."""
    source = resolve_weights_source(cfg)
    if source is None:
        return None
    if source.kind == TIMM:
        return _load_timm(model, cfg, num_classes, in_chans)
    assert source.path is not None
    state_dict, metadata = read_state_dict(source.path, source.key)
    return load_state_dict_into(model, state_dict, source=str(source.path), model_name=cfg.name,
                                key=source.key, trained_as=(metadata.get("model") or {}).get("name"))


def read_state_dict(path: Path, key: str = "model.weights_file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a checkpoint file (containers unwrapped, DDP/compile prefixes removed) and
    imgtrain's metadata when the file has it."""
    metadata: dict[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        try:
            checkpoint, metadata = load_weights(path)
        except CheckpointError as exc:
            raise ModelError(f"{key}: {exc}") from None
    else:
        checkpoint = _torch_load_weights_only(path, key)
    state_dict = _unwrap(checkpoint)
    tensors = {k: v for k, v in clean_state_dict(state_dict).items() if isinstance(v, torch.Tensor)}
    if not tensors:
        found = (", ".join(map(str, list(checkpoint)[:SHOWN])) if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise ModelError(f"{key}: {path} holds no weights (no tensors under the keys {', '.join(CONTAINER_KEYS)} "
                         f"or at the top level; found: {found})")
    return tensors, metadata


def _torch_load_weights_only(path: Path, key: str) -> Any:
    # weights_only=True: only tensors and plain containers are rebuilt; a pickle that asks for any
    # other object fails here, before anything in it is constructed or run
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # our own words: torch's text suggests weights_only=False, the unsafe way, which we never offer
        needs = re.search(r"GLOBAL (\S+)", str(exc))
        if needs:
            raise ModelError(f"{key}: {path} refused: it holds a Python object ({needs.group(1)}) that only full "
                             "unpickling could rebuild, which could run code, and imgtrain never unpickles: "
                             ".pth/.pt/.bin files are read with torch.load(weights_only=True), tensors and plain "
                             "data only. Save the weights alone (torch.save(model.state_dict(), path)) or as "
                             ".safetensors") from None
        detail = "invalid pickle data"
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ModelError(f"{key}: {path} is not a readable PyTorch checkpoint ({detail}); it was refused and "
                     "never unpickled") from None


def _unwrap(checkpoint: Any) -> Any:
    """{"state_dict": ...}, {"model": ...}, {"model_ema": ...} -> the state dict inside."""
    if not isinstance(checkpoint, dict) or any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint  # not a container, or already a state dict
    return next((checkpoint[name] for name in CONTAINER_KEYS if isinstance(checkpoint.get(name), dict)), checkpoint)


def _layer_names(model: torch.nn.Module, key: str) -> tuple[str, ...]:
    """The model's `first_conv` or `classifier` module names, as timm records them."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    if key == "first_conv":
        names = get_model_traits(model).get("first_conv", pretrained_cfg.get("first_conv"))
    else:
        names = pretrained_cfg.get("classifier")
        # a timm model's method (looked up with getattr: Module's stubs type attributes as Tensor | Module)
        get_classifier = getattr(model, "get_classifier", None)
        if names is None and get_classifier is not None:
            head = get_classifier()
            names = next((n for n, m in model.named_modules() if m is head and n), None)
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _belongs(key: str, modules: Sequence[str]) -> bool:
    return any(key.startswith(name + ".") for name in modules)


def load_state_dict_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                         model_name: str, key: str = "model.weights", trained_as: str | None = None) -> WeightsReport:
    """Fit `state_dict` to `model` (head, input channels) and load it; refuse another architecture."""
    target = model.state_dict()
    classifiers, first_convs = _layer_names(model, "classifier"), _layer_names(model, "first_conv")
    first_conv_weights = {name + ".weight" for name in first_convs}
    fitted: dict[str, torch.Tensor] = {}
    head, adapted, unexpected, mismatched = [], [], [], []
    head_classes = input_chans = None
    order = {name: index for index, name in enumerate(target)}  # report in the model's order, not the file's
    for name, tensor in sorted(state_dict.items(), key=lambda item: order.get(item[0], len(order))):
        if name not in target:
            unexpected.append(name)
            continue
        want = target[name].shape
        if tensor.shape == want:
            fitted[name] = tensor
        elif _belongs(name, classifiers):
            head.append(name)  # another class count: the model keeps its new, random head
            if tensor.ndim >= 1 and len(want) >= 1:
                head_classes = (tensor.shape[0], want[0])
        elif (name in first_conv_weights and tensor.ndim == 4 and len(want) == 4
              and tensor.shape[0] == want[0] and tensor.shape[2:] == want[2:]):
            # 3 -> 1 sums the colour filters, 1 -> 3 repeats them scaled by 1/3 (timm's rule)
            fitted[name] = adapt_input_conv(want[1], tensor, base_chans=tensor.shape[1])
            adapted.append(name)
            input_chans = (tensor.shape[1], want[1])
        else:
            mismatched.append(f"{name} {tuple(tensor.shape)} (model: {tuple(want)})")
    parameters = [n for n, _ in model.named_parameters()]
    matched = sum(1 for n in parameters if n in fitted)
    if mismatched or matched < len(parameters) / 2:
        if mismatched:
            detail = f"shapes differ: {_some(mismatched)}"
        else:
            missing = [n for n in parameters if n not in fitted]
            weights = [n for n in state_dict if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
            detail = (f"only {matched} of the model's {len(parameters)} parameter tensors are in it; "
                      f"the model wants {_some(missing)}; the file has {_some(weights)}")
        was = f" (it was trained as {trained_as})" if trained_as and trained_as != model_name else ""
        raise ModelError(f"{key}: {source} holds weights for another architecture than {model_name}{was}: "
                         f"{detail}. Set model.name to the architecture the weights were trained as, or start "
                         "from weights of this one")
    result = model.load_state_dict(fitted, strict=False)
    missing = [n for n in result.missing_keys if n not in head]
    return WeightsReport(source=source, loaded=len(fitted), total=len(target), missing=missing,
                         unexpected=unexpected + list(result.unexpected_keys), head_replaced=head,
                         input_adapted=adapted, head_classes=head_classes, input_chans=input_chans)


# ----------------------------------------------------------------------------- timm's weights

def _timm_weights_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config for `name`; a ModelError if timm has no weights for it."""
    from imgtrain.models.nets import OUR_MODELS
    if name.split(".")[0] in OUR_MODELS:
        raise ModelError(f"model.weights: timm has no pretrained weights for {name}, one of imgtrain's own nets; "
                         "start from a run folder or a .safetensors file instead (model.weights: RUN_DIR)")
    if not timm.is_model(name):
        return {}  # create_model reports the unknown name
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None or not pretrained_cfg.has_weights:
        with_weights = timm.list_pretrained(name.split(".")[0] + "*")[:SHOWN]
        hint = f" (these have: {', '.join(with_weights)})" if with_weights else ""
        raise ModelError(f"model.weights: timm has no pretrained weights for {name}{hint}; "
                         "use model.weights_file for a checkpoint of your own")
    return pretrained_cfg.to_dict()


def _hub_file(pretrained_cfg: dict[str, Any]) -> tuple[str | None, str | None, list[str]]:
    """(repo id, the cached file or None, the file names timm would look for) of a Hugging Face hub cfg."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id or pretrained_cfg.get("custom_load"):
        return hub_id, None, []
    from huggingface_hub import try_to_load_from_cache
    repo, _, revision = hub_id.partition("@")
    names = [pretrained_cfg["hf_hub_filename"]] if pretrained_cfg.get("hf_hub_filename") else \
        ["model.safetensors", "pytorch_model.bin"]  # timm's safe alternative first
    cached = (try_to_load_from_cache(repo, filename, revision=revision or None) for filename in names)
    return repo, next((path for path in cached if isinstance(path, str)), None), names


def _load_timm(model: torch.nn.Module, cfg: ModelConfig, num_classes: int, in_chans: int) -> WeightsReport:
    """timm's pretrained weights through timm itself: its per-model checkpoint filters (position
    embeddings, renamed stems), head replacement and input-channel adaptation all apply."""
    from huggingface_hub import constants
    _timm_weights_cfg(cfg.name)
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    repo, cached, names = _hub_file(pretrained_cfg)
    kwargs = model_kwargs(cfg)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if cached is not None:
        overlay["file"] = cached  # already in the cache: load it from there, no network call at all
    elif repo is not None and constants.HF_HUB_OFFLINE:
        raise ModelError(_not_cached_message(cfg.name, repo, names, "HF_HUB_OFFLINE is set"))
    try:
        pretrained = timm.create_model(cfg.name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                       pretrained_cfg_overlay=overlay or None, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if cached is not None:  # the file was there: it is what failed
            raise ModelError(f"model.weights: timm could not load its weights for {cfg.name} from {cached} "
                             f"({first}); delete that file to download it again, or use model.weights_file") from None
        if repo is not None:
            raise ModelError(_not_cached_message(cfg.name, repo, names, first)) from None
        raise ModelError(f"model.weights: timm could not load its weights for {cfg.name} ({first}); "
                         f"download {pretrained_cfg.get('url')} and set model.weights_file to it") from None
    source_classes = pretrained_cfg.get("num_classes")
    source_chans = (pretrained_cfg.get("input_size") or (3,))[0]
    classifiers, first_convs = _layer_names(model, "classifier"), _layer_names(model, "first_conv")
    target = model.state_dict()
    head = [k for k in target if _belongs(k, classifiers)] if source_classes != num_classes else []
    adapted = [n + ".weight" for n in first_convs if n + ".weight" in target] if source_chans != in_chans else []
    # the model keeps its own random head when timm dropped the pretrained one
    weights = {k: v for k, v in pretrained.state_dict().items() if k not in head}
    result = model.load_state_dict(weights, strict=False)
    where = f"{cached}" if cached else f"the Hugging Face hub ({repo})" if repo else str(pretrained_cfg.get("url"))
    return WeightsReport(source=f"timm {pretrained_cfg.get('architecture', cfg.name)}"
                                f"{'.' + pretrained_cfg['tag'] if pretrained_cfg.get('tag') else ''} ({where})",
                         loaded=len(weights), total=len(target),
                         missing=[k for k in result.missing_keys if k not in head],
                         unexpected=list(result.unexpected_keys), head_replaced=head, input_adapted=adapted,
                         head_classes=(source_classes, num_classes) if head else None,
                         input_chans=(source_chans, in_chans) if adapted else None)


def _not_cached_message(name: str, repo: str, names: list[str], why: str) -> str:
    from huggingface_hub import constants
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    filename = names[0] if names else "model.safetensors"
    return (f"model.weights: timm's weights for {name} are not in the Hugging Face cache and cannot be "
            f"downloaded ({why}). timm wants {filename} of the hub repo {repo}. Put it in the cache at "
            f"{folder}/snapshots/COMMIT/{filename} with the text COMMIT in {folder}/refs/main (online, "
            f"`hf download {repo} {filename}` does exactly that; the cache folder is HF_HUB_CACHE, "
            "default HF_HOME/hub), or download the file anywhere and set model.weights_file: PATH instead")
