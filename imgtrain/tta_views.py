"""The grammar of one test-time augmentation view (eval.tta, `--tta`): its names, values and options.
config.py checks eval.tta with it at load time; evaluation/tta.py builds the views it parses.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import yaml

# eval.tta views: name -> (what its value is, the value when none is given); evaluation/tta.py defines each
TTA_VIEWS: dict[str, tuple] = {
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
    options: dict[str, Any] = {}
    if isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        values = [_yaml_scalar(part) for part in rest.split(":")] if rest else []
        value: Any = None if not values else values[0] if len(values) == 1 else values
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
    if "seed" in options and (not isinstance(options["seed"], int) or isinstance(options["seed"], bool)):
        raise ValueError(f"random: seed must be an integer, got {options['seed']!r}")
    if "area" in options:
        area = options["area"]
        if not (isinstance(area, (list, tuple)) and len(area) == 2 and all(number(a) for a in area)
                and 0 < area[0] <= area[1] <= 1):
            raise ValueError(f"random: area is [low, high], fractions of the image with 0 < low <= high <= 1, "
                             f"got {area!r}")
        options["area"] = (float(area[0]), float(area[1]))
    if "flip" in options and not isinstance(options["flip"], bool):
        raise ValueError(f"random: flip must be true or false, got {options['flip']!r}")
    return TTAView(name=name, value=value, **options)


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text
