"""imgtrain: train image classifiers with the strategies practitioners use.

    import imgtrain
    result = imgtrain.train(imgtrain.load_recipe("quickstart"))
    result.run_dir, result.summary["test_acc"]

`import imgtrain` imports no torch, so that recipe checks and the CLI's help start fast.
"""

from __future__ import annotations

import time
from typing import Any

from imgtrain.config import Recipe, RecipeError, load_recipe
from imgtrain.engine.events import Hook  # torch-free: the base class of your own hooks

__version__ = "0.1.0"

# when this process first imported imgtrain: the command line's time budget counts from here, so its own
# imports (torch, timm: a few seconds) are inside `--budget`
IMPORTED_AT = time.perf_counter()


def train(recipe: Recipe, **kwargs: Any) -> Any:
    """Train from a recipe; see `imgtrain.api.train` for the keyword arguments (run_dir, resume,
    overwrite, hooks=[your Hook subclasses])."""
    from imgtrain.api import train as api_train
    return api_train(recipe, **kwargs)


def load_trained(target: Any, **kwargs: Any) -> Any:
    """A trained model from a run folder or checkpoint; see `imgtrain.api.load_trained`."""
    from imgtrain.api import load_trained as api_load_trained
    return api_load_trained(target, **kwargs)


__all__ = ["Hook", "Recipe", "RecipeError", "load_recipe", "train", "load_trained", "__version__"]
