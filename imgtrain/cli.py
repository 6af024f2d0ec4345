"""`imgtrain` command line: subcommands only; each parses its arguments and calls the API.

Bad input (recipe, paths, data, checkpoints) exits with status 2 and one message on
stderr, never a traceback. Ctrl-C exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imgtrain

EXIT_BAD_INPUT = 2
EXIT_CHECKS_FAILED = 1      # imgtrain doctor: a check failed; imgtrain scan: unreadable files
EXIT_TRAINING_STOPPED = 3   # the non-finite loss guard ended the run, or a checkpoint could not be written
EXIT_INTERRUPTED = 130


def _user_errors() -> tuple:
    """The exception types that mean "the user can fix this" (imported lazily: torch is slow)."""
    from imgtrain.config import RecipeError
    from imgtrain.data import BadImageError, DataError
    from imgtrain.engine.checkpoint import CheckpointError
    from imgtrain.io import RunDirError
    from imgtrain.models import ModelError
    return (RecipeError, DataError, BadImageError, CheckpointError, RunDirError, ModelError)


# ----------------------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from imgtrain.api import RESUME_OVERRIDABLE, train
    from imgtrain.config import RecipeError, load_recipe
    from imgtrain.recipe_files import parse_override

    overrides = list(args.overrides)
    recipe_arg: str | Path | None = args.recipe
    if args.budget is not None:  # the same as train.budget=...
        overrides.append(f"train.budget={args.budget}")
    # `imgtrain train RUN --resume` is not a thing, but `imgtrain train a=b --resume DIR` is:
    if args.recipe is not None and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, args.recipe)
        recipe_arg = None
    if args.resume and args.resume != "auto":
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise RecipeError(f"--resume {run}: not a run folder (no config.yaml)")
        for text in overrides:
            key, _ = parse_override(text)
            if key not in RESUME_OVERRIDABLE:
                raise RecipeError(f"{key} cannot change when resuming (the run would no longer be the same run); "
                                  f"allowed: {', '.join(RESUME_OVERRIDABLE)}", file="command line")
        if recipe_arg is not None:
            check_same_recipe(recipe_arg, run, overrides)
        recipe_arg = run / "config.yaml"
    elif recipe_arg is None:
        raise RecipeError("give a recipe (a .yaml file or a built-in name such as quickstart), or --resume RUN_DIR"
                          + (" (--resume auto needs the recipe: it resumes that recipe's run folder)"
                             if args.resume == "auto" else ""))
    recipe = load_recipe(recipe_arg, overrides)
    if args.nproc is not None:
        from imgtrain.api import check_distributed_recipe, check_restartable
        if args.nproc < 1:
            raise RecipeError(f"--nproc {args.nproc}: give 1 or more processes", file="command line")
        if "WORLD_SIZE" in os.environ:
            raise RecipeError("--nproc starts torchrun itself; under torchrun (WORLD_SIZE is set) leave it out",
                              file="command line")
        check_distributed_recipe(recipe, args.nproc)  # refused before any process starts
        check_restartable(recipe, args.resume, args.max_restarts)
        return launch_torchrun(args.nproc, args.argv, args.max_restarts)
    if args.max_restarts:
        raise RecipeError("--max-restarts goes with --nproc (it is torchrun's); under your own torchrun, pass "
                          "--max-restarts to torchrun", file="command line")
    hooks = [load_hook(spec) for spec in args.hook]
    # the real command line (not main([...]) called from Python) counts its budget from its first import
    clock = imgtrain.IMPORTED_AT if args.from_command_line else None
    result = train(recipe, run_dir=args.run_dir, resume=args.resume, overwrite=args.overwrite, hooks=hooks,
                   clock_started=clock)
    if int(os.environ.get("RANK", "0")) == 0:  # several processes: one "done" line, rank 0's
        _print_result(result)
    return 0


def launch_torchrun(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """`imgtrain train ... --nproc N [--max-restarts R]`: the same command under torchrun with N processes
    on this machine (a standalone rendezvous on a free port); when a process fails torchrun stops the
    others and, R times at most, starts them all again (each resumes: check_restartable). Returns
    torchrun's exit status (1 when a worker failed and no restart was left)."""
    import subprocess

    launcher_options = ("--nproc", "--max-restarts")
    rest, skip = [], False
    for word in argv:  # the same arguments without the launcher's own (--nproc N, --max-restarts=R ...)
        if skip:
            skip = False
        elif word in launcher_options:
            skip = True
        elif not word.startswith(tuple(f"{option}=" for option in launcher_options)):
            rest.append(word)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", str(max_restarts), "-m", "imgtrain.cli", *rest]
    print(f"imgtrain: starting {nproc} processes: {' '.join(command[1:])}", file=sys.stderr)
    return subprocess.call(command)


def check_same_recipe(recipe_arg: str | Path, run: Path, overrides: list[str]) -> None:
    """`train RECIPE --resume RUN`: RECIPE must resolve to the run's config.yaml (the same overrides
    applied to both), else resuming would silently train another recipe than the one named."""
    from imgtrain.config import RecipeError, load_recipe

    given = flatten(load_recipe(recipe_arg, overrides).to_dict())
    saved = flatten(load_recipe(run / "config.yaml", overrides).to_dict())
    if given.get("optim.lr") == "find":  # the run's config.yaml records the lr the finder chose
        given["optim.lr"] = saved.get("optim.lr")
    differ = [key for key in sorted(set(given) | set(saved)) if given.get(key) != saved.get(key)]
    if not differ:
        return
    shown = "; ".join(f"{key}: {given.get(key)!r} in {recipe_arg}, {saved.get(key)!r} in the run"
                      for key in differ[:10])
    more = f" (+{len(differ) - 10} more)" if len(differ) > 10 else ""
    raise RecipeError(f"--resume {run}: the recipe {recipe_arg} differs from the run's config.yaml in "
                      f"{len(differ)} key(s): {shown}{more}. A resumed run continues as recorded in "
                      f"{run / 'config.yaml'}: drop the recipe (imgtrain train --resume {run}), or train the "
                      "recipe as a new run (without --resume)")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: dotted recipe keys and their values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def load_hook(spec: str) -> Any:
    """`--hook module.path:ClassName`: an instance of that imgtrain.Hook subclass (the module is
    imported as Python imports any module: from the working folder, PYTHONPATH or an installed package)."""
    import importlib

    from imgtrain.config import RecipeError
    from imgtrain.engine.events import Hook

    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise RecipeError(f"--hook {spec}: expected MODULE:CLASS, e.g. myhooks:WeightNorm")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"--hook {spec}: cannot import {module_name} ({exc}); run from the folder that holds "
                          "it or add that folder to PYTHONPATH") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Hook)):
        raise RecipeError(f"--hook {spec}: {module_name} has no imgtrain.Hook subclass named {class_name}")
    return cls()


def cmd_quickstart(args: argparse.Namespace) -> int:
    from imgtrain.api import train
    from imgtrain.config import load_recipe

    recipe = load_recipe("quickstart", args.overrides)
    _print_result(train(recipe, run_dir=args.run_dir, overwrite=args.overwrite))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from imgtrain.api import train
    from imgtrain.config import load_recipe
    from imgtrain.recipe_files import parse_override

    extra, recipe_arg = list(args.overrides), args.recipe
    if recipe_arg is not None and "=" in recipe_arg and not recipe_arg.endswith((".yaml", ".yml")):
        extra.insert(0, recipe_arg)  # `finetune W key=value`
        recipe_arg = None
    # timm/torchvision checkpoints (.pth, .pt, .bin) go to model.weights_file, the rest to model.weights
    key = "model.weights_file" if Path(args.weights).suffix in (".pth", ".pt", ".bin") else "model.weights"
    overrides = [f"{key}={args.weights}", *extra]
    named = {parse_override(text)[0] for text in extra}
    trained = _checkpoint_recipe(args.weights)
    architecture = trained.get("model", {}).get("name")
    if architecture is not None and "model.name" not in named:
        # the weights know their network: fine-tune that one unless the command line says otherwise
        overrides.insert(0, f"model.name={architecture}")
    run_data = trained.get("data")
    if recipe_arg is None and isinstance(run_data, dict) and not named & {"data.source", "data.root"}:
        # no recipe and no other data named: fine-tune on the data the weights were trained on (the finetune
        # recipe's own data is digits, which would silently replace the head of a model of other classes)
        overrides[:0] = [f"{k}={_override_value(v)}" for k, v in flatten(run_data, "data.").items()]
        print(f"finetune: on the data {args.weights} was trained on (data.source {run_data.get('source')}"
              + (f", data.root {run_data['root']}" if run_data.get("root") else "")
              + "); give a recipe or data.source=/data.root= to fine-tune on other data")
    recipe = load_recipe(recipe_arg or "finetune", overrides)
    _print_result(train(recipe, run_dir=args.run_dir, overwrite=args.overwrite))
    return 0


def _checkpoint_recipe(weights: str) -> dict[str, Any]:
    """The recipe recorded in an imgtrain run folder or checkpoint (model.name, data ...); {} for other weights."""
    from imgtrain.api import resolve_checkpoint
    from imgtrain.engine.checkpoint import CheckpointError, read_metadata

    if weights == "timm" or not Path(weights).exists():
        return {}  # model.weights reports what is wrong with it
    try:
        meta = read_metadata(resolve_checkpoint(weights)) or {}
    except CheckpointError:
        return {}
    recipe = meta.get("recipe")
    recipe = dict(recipe) if isinstance(recipe, dict) else {}
    if isinstance(meta.get("model"), dict):  # the checkpoint's own record of its network wins
        recipe["model"] = {**recipe.get("model", {}), **meta["model"]}
    return recipe


def _print_result(result: Any) -> None:
    summary = result.summary
    labels = {"test_acc": "test accuracy", "test_acc_tta": "with TTA", "best_val_acc": "best val accuracy"}
    parts = [f"{label} {summary[key]:.2%}" for key, label in labels.items() if key in summary]
    parts.append(f"{summary.get('total_seconds', 0):.0f} s")
    print("done: " + ", ".join(parts))
    print(f"run folder: {result.run_dir}")


def tta_argument(value: Any) -> Any:
    """--tta: True (the recipe's eval.tta, else hflip) or a comma-separated list of views."""
    if value is None or value is True:
        return value
    return [view.strip() for view in str(value).split(",") if view.strip()]


SPLIT_NAMES = ("train", "val", "test")


def default_evaluation_dir(target: str, split_name: str, data: str | None = None) -> Path | None:
    """RUN/evaluation/<split> for a run folder (or a checkpoint inside one); None otherwise.

    With `data`, RUN/evaluation/<its name> (`<parent>-<name>` when that is a split's name, so
    `--data DIR/test` never takes the run's own evaluation/test), then -2, -3 ...: a folder holding
    the evaluation of other data is never replaced, one of the same data is."""
    from imgtrain.evaluation.inference import is_ensemble_dir

    path = Path(target)
    run = path if path.is_dir() else path.parent.parent
    if not ((run / "config.yaml").is_file() or is_ensemble_dir(run)):
        return None
    if data is None:
        return run / "evaluation" / split_name
    source = Path(data)
    name = source.stem or "data"
    if name in SPLIT_NAMES:
        name = f"{source.resolve().parent.name or 'data'}-{name}"
    candidate, index = run / "evaluation" / name, 2
    while not _holds_evaluation_of(candidate, source):
        candidate, index = run / "evaluation" / f"{name}-{index}", index + 1
    return candidate


def _holds_evaluation_of(folder: Path, data: Path) -> bool:
    """True when `folder` is free for an evaluation on `data`: absent, empty, or already of that data."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return True
    try:
        measured = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("split")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(measured, str) and measured not in SPLIT_NAMES and Path(measured).resolve() == data.resolve()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgtrain.evaluation import evaluate, format_metrics
    from imgtrain.tracking import json_safe

    output_dir = (Path(args.output_dir) if args.output_dir
                  else default_evaluation_dir(args.target, args.split, args.data))
    result = evaluate(args.target, split=args.split, data=args.data, batch_size=args.batch_size,
                      device=args.device, tta=tta_argument(args.tta), output_dir=output_dir)
    written = (f"written to {output_dir}: metrics.json, per_class.csv, confusion.csv, confusion.png"
               if output_dir is not None else None)
    if args.json:
        print(json.dumps(json_safe(result), indent=2))
        if written:
            print(written, file=sys.stderr)  # stdout stays one JSON document
        return 0
    print(f"{result['model']} on {result['split']}")
    if "without_tta" in result:
        plain = result["without_tta"]
        print(f"TTA {result['tta']}: accuracy {result['acc']:.2%} (without TTA {plain['acc']:.2%}, "
              f"{(result['acc'] - plain['acc']) * 100:+.2f} points)")
    print(format_metrics(result))
    if written:
        print(written)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgtrain.evaluation import format_predictions, predict, write_predictions

    rows = predict(args.checkpoint, args.paths, topk=args.topk, batch_size=args.batch_size, device=args.device,
                   tta=tta_argument(args.tta))
    failed = sum(1 for r in rows if r["error"])
    if args.output:
        write_predictions(rows, Path(args.output), args.topk)
        unread = f" ({failed} could not be read)" if failed else ""
        print(f"{len(rows)} predictions written to {args.output}{unread}")
    else:
        print(format_predictions(rows, args.topk))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from imgtrain.data import DataError
    from imgtrain.evaluation.explain import explain, list_layers

    if args.list_layers:
        print("\n".join(list_layers(args.checkpoint, device=args.device)))
        return 0
    if not args.images:
        raise DataError("explain: give image files, folders or a CSV to explain (or --list-layers)")
    records = explain(args.checkpoint, args.images, method=args.method or ["gradcam"], class_=args.class_,
                      layer=args.layer, output_dir=args.output, device=args.device)
    for r in records:
        print(f"{r.path}: ERROR {r.error}" if r.error else
              f"{r.png}: {r.method} of {r.explained_class} (predicted {r.predicted_class} {r.probability:.1%})")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from imgtrain.evaluation.ensemble import EnsembleError, EnsembleOptions, format_ensemble, run_ensemble
    from imgtrain.tracking import json_safe

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",") if w.strip()]
        except ValueError:
            raise EnsembleError(f"--weights {args.weights}: give numbers separated by commas, e.g. 2,1,1") from None
    options = EnsembleOptions(weights=weights, fit_weights=args.fit_weights, tta=tta_argument(args.tta),
                              vote=args.vote, split=args.split, data=args.data, save=args.save,
                              overwrite=args.overwrite, batch_size=args.batch_size, device=args.device)
    result = run_ensemble(args.members, options)
    print(json.dumps(json_safe(result), indent=2) if args.json else format_ensemble(result))
    if result.get("weights_from") == "fit":
        for line in zero_weight_warnings(result):
            print(line, file=sys.stderr)
    return 0


ZERO_WEIGHT = 0.01  # a fitted weight under this (1% of the vote) leaves the member out in effect


def zero_weight_warnings(result: dict[str, Any]) -> list[str]:
    """`--fit-weights`: a warning for each member whose fitted weight is (near) 0."""
    fit = result.get("fit", {})
    return [f"imgtrain: warning: --fit-weights gave member {index} ({member['source']}) weight "
            f"{member['weight']:.3g}: on the val split ({fit.get('images', '?')} images) the ensemble's "
            "loss is lowest without it, so it takes (almost) no part in the vote. It adds nothing the other "
            "members do not already know, or it is much worse than them (check it was trained on the same "
            "data and classes); drop it, or give --weights to keep it"
            for index, member in enumerate(result["members"], start=1) if member["weight"] < ZERO_WEIGHT]


def add_measurement_arguments(p: argparse.ArgumentParser, tta_help: str) -> None:
    """What evaluate and ensemble measure on, and how: --split/--data, --tta, --batch-size, --device."""
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", help="measure on this image folder (class subfolders) or path,label CSV instead")
    p.add_argument("--tta", nargs="?", const=True, default=None, metavar="VIEWS", help=tta_help)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")


def cmd_report(args: argparse.Namespace) -> int:
    from imgtrain.tracking import rebuild_report

    path = rebuild_report(args.run_dir, device=args.device)
    print(f"report written: {path}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from imgtrain.data import split_folder

    counts = split_folder(args.src, args.dst, val=args.val, test=args.test, seed=args.seed, link=args.link)
    print(json.dumps(counts, indent=2))
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from imgtrain.config import recipe_from_dict
    from imgtrain.data import write_shapes_imagefolder

    shapes = recipe_from_dict({"data": {"source": "shapes", "shapes": dict(
        _parse_pairs(args.set), num_classes=args.classes, image_size=args.size, train_size=args.train,
        val_size=args.val, test_size=args.test, seed=args.seed)}}, file="command line").data.shapes
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        from imgtrain.data import DataError
        raise DataError(f"{out}: folder exists and is not empty; choose an empty or new folder")
    counts = write_shapes_imagefolder(shapes, out, fmt=args.format, layout=args.layout)
    print(f"wrote shapes to {out}: {json.dumps(counts)}")
    return 0


def _parse_pairs(items: list[str]) -> dict[str, Any]:
    import yaml
    return {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items)}


def cmd_datasets(args: argparse.Namespace) -> int:
    from imgtrain.data.sources import FASHION_MNIST_DIR

    fm = Path(FASHION_MNIST_DIR)
    rows = [
        ("digits", "scikit-learn's 8x8 handwritten digits, 1,797 images, 10 classes (bundled)", "available"),
        ("shapes", "synthetic coloured shapes, any size/count/imbalance (generated)", "available"),
        ("fashion-mnist", "60k train / 10k test 28x28 clothing images, 10 classes",
         f"available in {fm}" if fm.is_dir() else "missing: apt-get install -y dataset-fashion-mnist, or data.root"),
        ("imagefolder", "your images: ROOT/[train|val|test]/CLASS/*.jpg or ROOT/CLASS/*.jpg", "data.root"),
        ("csv", "your images listed in a path,label[,split] CSV", "data.root"),
    ]
    for name, what, where in rows:
        print(f"{name:<14s} {what}\n{'':<14s} {where}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from imgtrain.models import OUR_MODELS, list_models

    names = list_models(args.pattern)
    for name in names:
        print(f"{name}  (imgtrain)" if name in OUR_MODELS else name)
    print(f"{len(names)} models", file=sys.stderr)
    return 0


def cmd_show_augment(args: argparse.Namespace) -> int:
    from imgtrain.config import load_recipe
    from imgtrain.tools.preview import show_augment

    preview = show_augment(load_recipe(args.recipe, args.overrides), n=args.n, output=args.output)
    print(f"wrote {len(preview.labels)} augmented training images to {preview.path} "
          f"({preview.size[0]}x{preview.size[1]} px)")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from imgtrain.api import lr_find
    from imgtrain.config import load_recipe

    # --start/--end/--steps are lr_find.* overrides, so a bad range is the same recipe error
    given = {"start": args.start, "end": args.end, "steps": args.steps}
    overrides = [*args.overrides, *(f"lr_find.{key}={_yaml_number(v)}" for key, v in given.items() if v is not None)]
    run = lr_find(load_recipe(args.recipe, overrides), output=args.output, overwrite=args.overwrite)
    for line in run.result.lines():
        print(line)
    chosen = run.suggestion
    print(f"optim.lr: find would use {chosen} (lr_find.suggestion): {run.result.suggestions[chosen]:.3g}")
    print(f"wrote {', '.join(str(path) for path in run.files)}")
    return 0


def _override_value(value: Any) -> str:
    """A value as the right-hand side of key=value (YAML reads JSON, except numbers such as 1e-07)."""
    return _yaml_number(value) if isinstance(value, float) else json.dumps(value)


def _yaml_number(value: float) -> str:
    """A number as YAML reads it back as one: 1e-07 is text to YAML 1.1, 1.0e-07 a float."""
    text = repr(value)
    return text.replace("e", ".0e") if "e" in text and "." not in text else text


def cmd_bench_data(args: argparse.Namespace) -> int:
    from imgtrain.config import load_recipe
    from imgtrain.tools.bench_data import bench_data

    result = bench_data(load_recipe(args.recipe, args.overrides), epochs=args.epochs, max_batches=args.batches)
    print(result.table())
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """List the recipe's image files that cannot be read (path: reason); exit 1 when there are any."""
    from imgtrain.config import load_recipe
    from imgtrain.data import build_splits

    # skip, not error: the bad files are collected instead of stopping at them; every file, not a subset,
    # decoded in full whatever data.verify says (the results fill the scan cache the next run reuses)
    recipe = load_recipe(args.recipe, [*args.overrides, "data.on_bad_image=skip", "data.train_subset=null",
                                       "data.verify=full"])
    data = recipe.data
    splits = build_splits(data)
    read = sum(len(part) for part in (splits.train, splits.val, splits.test) if part is not None)
    where = f"data.source {data.source}" + (f", data.root {data.root}" if data.root else "")
    if data.source not in ("imagefolder", "csv"):
        print(f"{where}: {read} images, decoded in memory, no image files to scan")
        return 0
    for path, reason in splits.skipped:
        print(f"{path}: {reason}")
    total = read + len(splits.skipped)
    if splits.skipped:
        print(f"{len(splits.skipped)} of {total} image files cannot be read ({where}); fix or delete them, or "
              "set data.on_bad_image: skip to train without them", file=sys.stderr)
        return EXIT_CHECKS_FAILED
    print(f"all {total} image files are readable ({where})")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    """Write the shards of an image folder or CSV manifest (data.source: streaming trains on them)."""
    from imgtrain.config import load_recipe
    from imgtrain.data import DataError, build_splits
    from imgtrain.data.images import usable_cpus
    from imgtrain.data.streaming import SPLITS, write_shards

    source = "csv" if Path(args.src).suffix.lower() == ".csv" else "imagefolder"
    # unreadable images are skipped and listed, as `imgtrain scan` lists them; every image, no subset
    recipe = load_recipe(None, [f"data.source={source}", f"data.root={args.src}", *args.overrides,
                                "data.on_bad_image=skip", "data.train_subset=null"])
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:  # before the scan
        raise DataError(f"{dst} exists and is not empty; choose a new folder or pass --overwrite to replace it")
    chosen = SPLITS if not args.split or "all" in args.split else tuple(args.split)
    summary = write_shards(build_splits(recipe.data), dst, workers=args.workers or usable_cpus(), splits=chosen,
                           overwrite=args.overwrite, seed=recipe.data.split_seed)
    for path, reason in summary.skipped:
        print(f"skipped {path}: {reason}")
    counts = ", ".join(f"{split} {n}" for split, n in summary.counts.items())
    print(f"wrote shards of {len(summary.classes)} classes to {summary.dst} ({counts} images"
          + (f"; {len(summary.skipped)} unreadable skipped" if summary.skipped else "") + "); train on them with "
          f"data.source=streaming data.root={summary.dst}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from imgtrain.config import RecipeError, recipe_schema

    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"schema --output {args.output}: cannot write it ({exc.strerror}); "
                          "give a file in an existing, writable folder") from None
    print(f"wrote the recipe JSON Schema to {args.output}; point your editor's YAML support at it "
          f"(first line of a recipe: # yaml-language-server: $schema={args.output})", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from imgtrain.config import load_recipe
    from imgtrain.doctor import run_doctor

    report = run_doctor(load_recipe(args.recipe, args.overrides), output=args.output)
    print(report.table())
    print(f"wrote {report.grid} and {Path(args.output) / 'doctor.json'}")
    return 0 if report.ok else EXIT_CHECKS_FAILED


def cmd_tune(args: argparse.Namespace) -> int:
    from imgtrain.config import RecipeError, load_recipe
    from imgtrain.tuning import RECIPE_FILE, TuneOptions, study_folder, tune

    overrides, recipe_arg = list(args.overrides), args.recipe
    if recipe_arg is not None and "=" in recipe_arg and not recipe_arg.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe_arg)
        recipe_arg = None
    if recipe_arg is None:  # continue a study: its folder keeps the recipe it searches
        if args.study is None:
            raise RecipeError("give a recipe with a search: section (e.g. imgtrain tune my.yaml --trials 20), or "
                              "--study NAME to continue a study", file="command line")
        folder = Path(args.study) if (Path(args.study) / RECIPE_FILE).is_file() else Path("runs") / args.study
        if not (folder / RECIPE_FILE).is_file():
            raise RecipeError(f"--study {args.study}: no study there ({folder / RECIPE_FILE} is missing); give the "
                              "recipe too: imgtrain tune RECIPE --study NAME", file="command line")
        recipe = load_recipe(folder / RECIPE_FILE, overrides)
        args.study = str(folder)
    else:
        recipe = load_recipe(recipe_arg, overrides)
    options = TuneOptions(trials=args.trials, timeout_minutes=args.timeout, study=args.study, storage=args.storage,
                          jobs=args.jobs, worker_index=args.worker_index)
    try:
        result = tune(recipe, options)
    except KeyboardInterrupt:
        folder, _ = study_folder(recipe, args.study)
        print(f"imgtrain: interrupted. Continue the study with: imgtrain tune --study {folder} --trials "
              f"{args.trials}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if options.worker_index is not None or os.environ.get("RANK", "0") != "0":  # the waiting process prints
        return 0
    finished = [row for row in result.rows if row["state"] in ("COMPLETE", "PRUNED")]
    print(f"study {result.study_name}: {len(finished)} finished trial(s) of {len(result.rows)} in {result.study_dir}")
    for row in result.best:
        values = ", ".join(f"{m} {row[m]:.4g}" for m in result.metrics)
        params = ", ".join(f"{k[7:]}={v}" for k, v in row.items() if k.startswith("params."))
        print(f"{'best' if len(result.metrics) == 1 else 'pareto'}: trial {row['trial']}: {values} ({params})")
    print("wrote " + ", ".join(str(path) for path in result.files))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from imgtrain.config import load_recipe
    from imgtrain.tools.profile import profile_recipe

    result = profile_recipe(load_recipe(args.recipe, args.overrides), steps=args.steps, warmup=args.warmup,
                            run_dir=args.run_dir, overwrite=args.overwrite)
    print(result.table())
    if result.steps < args.steps:
        print(f"(an epoch of this recipe has {result.steps + args.warmup} steps: {result.steps} were profiled)")
    print()
    print(result.operators)
    print("wrote " + ", ".join(str(path) for path in result.files))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from imgtrain.io import RunDirError
    from imgtrain.tracking.compare import collect, format_text, lower_is_better, write_comparison

    if args.target is not None and not lower_is_better(args.metric) and not 0 < args.target <= 1:
        raise RunDirError(f"--target {args.target}: give the {args.metric} to reach as a fraction in (0, 1], "
                          "e.g. --target 0.9")
    rows = collect(args.runs, metric=args.metric, all_trials=args.all_trials)
    print(format_text(rows, args.target, args.metric), end="")
    for path in args.output:
        print(f"wrote {write_comparison(rows, path, args.target, args.metric)}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgtrain", description="Train image classifiers from YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str,
                overrides_example: str | None = None) -> argparse.ArgumentParser:
        """A subcommand calling func; with overrides_example, it takes a recipe and its overrides."""
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func, command_parser=p)
        if overrides_example is not None:
            p.add_argument("recipe", help="recipe .yaml or built-in name")
            p.add_argument("overrides", nargs="*", help=f"section.key=value, e.g. {overrides_example}")
        return p

    p = command("quickstart", cmd_quickstart, "train the built-in quickstart recipe (digits, no download)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--run-dir", help="run folder (default: runs/quickstart, -2, -3 ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    p = command("train", cmd_train, "train from a recipe")
    p.add_argument("recipe", nargs="?", help="recipe .yaml or built-in name (quickstart, fashion_mnist, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    p.add_argument("--run-dir", help="run folder (default: output.root/output.name or the recipe's name)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last training state (an epoch end or "
                   "a mid-epoch checkpoint); `--resume auto`: the recipe's run folder if it holds one, else a new run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--hook", action="append", default=[], metavar="MODULE:CLASS",
                   help="your own imgtrain.Hook subclass, built without arguments (repeatable), "
                        "e.g. myhooks:WeightNorm")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (DDP: starts torchrun; data.batch_size is per "
                        "process)")
    p.add_argument("--budget", metavar="DURATION",
                   help="train.budget: end the whole run within this time, e.g. 10m, 90s, 1h30m (the epochs that "
                        "fit, up to train.epochs, are planned from the measured speed)")
    p.add_argument("--max-restarts", type=_non_negative_int, default=0, metavar="R",
                   help="with --nproc: when a process fails, start the group again up to R times, each "
                        "resuming from the last training state (needs --resume auto)")

    p = command("finetune", cmd_finetune, "fine-tune from weights: a run folder, .safetensors file or timm")
    p.add_argument("weights", help="run folder, .safetensors file, a timm/torchvision .pth checkpoint, or 'timm'")
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe .yaml or built-in name (default: finetune, two-phase with layer decay, on the "
                        "data of the run the weights come from)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=DIR")
    p.add_argument("--run-dir", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    tta_help = ("test-time augmentation: alone, the model's recipe eval.tta (hflip when it names none); "
                "or views, e.g. --tta hflip,five_crop")
    p = command("evaluate", cmd_evaluate, "metrics of a run folder, checkpoint or ensemble on a split or any data")
    p.add_argument("target", help="run folder, .safetensors checkpoint or ensemble folder")
    add_measurement_arguments(p, tta_help)
    p.add_argument("--output-dir", help="where metrics.json, per_class.csv and confusion.csv/.png go "
                                        "(default: RUN/evaluation/SPLIT for a run folder)")
    p.add_argument("--json", action="store_true", help="print every metric as JSON")

    p = command("predict", cmd_predict, "predict classes of images, folders or a CSV manifest")
    p.add_argument("checkpoint", help="run folder, .safetensors checkpoint or ensemble folder")
    p.add_argument("paths", nargs="+", help="image files, folders, or a CSV with a path column (and label)")
    p.add_argument("--topk", type=int, default=1, help="how many classes per image, most probable first")
    p.add_argument("--tta", nargs="?", const=True, default=None, metavar="VIEWS", help=tta_help)
    p.add_argument("--output", help="write predictions to this .csv or .json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")

    p = command("explain", cmd_explain, "Grad-CAM heatmaps: where the model looked, as PNG overlays")
    p.add_argument("checkpoint", help="run folder or .safetensors checkpoint")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders, or a CSV with a path column")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="gradcam (default), gradcam++, hirescam, xgradcam, layercam, eigencam, eigengradcam, "
                        "scorecam, ablationcam; repeat or separate by commas for several")
    p.add_argument("--class", dest="class_", metavar="K", help="explain this class (name or index); "
                                                                "default: each image's predicted class")
    p.add_argument("--layer", metavar="NAME", help="module to explain (default: the last convolutional stage; "
                                                   "ViT: blocks[-1].norm1)")
    p.add_argument("--list-layers", action="store_true", help="list the layers --layer accepts, with output shapes")
    p.add_argument("--output", default="explain", help="folder for the PNGs (default: explain)")
    p.add_argument("--device", default="cpu")

    p = command("ensemble", cmd_ensemble, "several models voting: each member's and the ensemble's metrics, --save")
    p.add_argument("members", nargs="+", metavar="RUN_OR_CKPT",
                   help="run folders, .safetensors checkpoints or saved ensemble folders (same classes)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--weights", metavar="W1,W2,...", help="one weight per member (scaled to sum to 1); "
                                                              "default: equal")
    group.add_argument("--fit-weights", choices=["val"],
                       help="fit the weights on the first member's val split (minimum NLL of the soft vote)")
    p.add_argument("--vote", default="soft", choices=["soft", "hard"],
                   help="soft: weighted mean of probabilities; hard: weighted majority of top classes")
    add_measurement_arguments(p, tta_help)
    p.add_argument("--save", metavar="ENSEMBLE_DIR",
                   help="write the ensemble (ensemble.yaml + copies of the members) for evaluate, predict, distill")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ensemble folder at --save")
    p.add_argument("--json", action="store_true", help="print every number as JSON")

    p = command("tune", cmd_tune, "hyperparameter search over the recipe's search: section (Optuna; "
                "pip install 'imgtrain[tune]')")
    p.add_argument("recipe", nargs="?", help="recipe .yaml with a search: section (leave out with --study to "
                                             "continue a study)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. search.sampler=random")
    p.add_argument("--trials", type=_positive_int, required=True, metavar="N",
                   help="finished trials the study aims at (a continued study counts its earlier ones)")
    p.add_argument("--timeout", type=float, metavar="MIN", help="start no new trial after this many minutes")
    p.add_argument("--study", metavar="NAME", help="study name: its folder is output.root/NAME (default: "
                                                   "<recipe name>-tune); an existing study continues")
    p.add_argument("--storage", metavar="URL", help="a database shared by several tune processes, e.g. "
                                                    "postgresql://user@host/db (default: a journal file in "
                                                    "the study folder)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="J", help="worker processes on this machine")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)

    p = command("profile", cmd_profile, "where a training step's time goes: data, copy, forward, backward, "
                "optimizer, hooks (torch.profiler; a Chrome trace in the run folder)",
                overrides_example="data.workers=2")
    p.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps profiled (default 100)")
    p.add_argument("--warmup", type=_non_negative_int, default=10, help="steps run first, not profiled (default 10)")
    p.add_argument("--run-dir", help="run folder (default: output.root/<recipe name>-profile)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    p = command("compare", cmd_compare, "a table of runs side by side: strategy, accuracy, time, time to a target")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_STUDY",
                   help="run folders, `imgtrain tune` study folders (their best trial) or `imgtrain ensemble "
                        "--save` folders")
    p.add_argument("--output", action="append", default=[], metavar="FILE",
                   help="also write the table to FILE: compare.md, compare.html (with the validation curves "
                        "against epochs and wall time) or compare.csv (repeatable)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="add the epochs and seconds until the validation metric first reached ACC, e.g. 0.9")
    p.add_argument("--metric", default="val_acc", help="the per-epoch validation column the table and curves "
                                                      "use (default: val_acc)")
    p.add_argument("--all-trials", action="store_true", help="a study folder gives every trial, not only its best")

    p = command("report", cmd_report, "rebuild a run folder's report.html from its files and best checkpoint")
    p.add_argument("run_dir", help="run folder")
    p.add_argument("--device", default="cpu")

    p = command("split", cmd_split, "stratified train/val/test split of a class-per-folder directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--test", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link", action="store_true", help="symlink instead of copying")

    p = command("make-shapes", cmd_make_shapes, "write the synthetic shapes dataset as an image folder")
    p.add_argument("dir")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="image side, pixels")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=400)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="png", choices=["png", "jpg", "mixed"])
    p.add_argument("--layout", default="split", choices=["split", "flat"],
                   help="split: train/val/test/CLASS; flat: CLASS/ only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any data.shapes key, e.g. --set imbalance=10 --set noise=0.1")

    command("datasets", cmd_datasets, "list the data sources")

    p = command("models", cmd_models, "list models (ours and timm's)")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnet*'")

    p = command("bench-data", cmd_bench_data, "measure how many images/s a recipe's input pipeline delivers",
                overrides_example="data.cache=memory")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the train split (first: start-up)")
    p.add_argument("--batches", type=_positive_int, default=None, help="stop each pass after this many batches")

    command("scan", cmd_scan, "list the recipe's unreadable image files (path: reason); exit 1 when there are any",
            overrides_example="data.root=DIR")

    p = command("shard", cmd_shard, "write an image folder or CSV manifest as LitData shards (data.source: "
                "streaming), in parallel")
    p.add_argument("src", metavar="SRC", help="image folder (class folders, or train/val/test of them) or CSV manifest")
    p.add_argument("dst", metavar="DST", help="new folder for the shards and imgtrain_shards.json")
    p.add_argument("overrides", nargs="*", help="recipe overrides: how val/test are carved, e.g. data.val_fraction=0.2")
    p.add_argument("--workers", type=int, metavar="N", help="processes writing shards (default: the usable CPUs)")
    p.add_argument("--split", action="append", choices=["train", "val", "test", "all"],
                   help="split to write (repeatable; default: all the source has or carves)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = command("schema", cmd_schema, "write the recipe's JSON Schema (editors complete and check recipe keys)")
    p.add_argument("--output", help="file to write (default: stdout), e.g. recipe.schema.json")

    p = command("doctor", cmd_doctor, "check data, initial loss, gradients and that one batch can be overfit",
                overrides_example="optim.lr=0.01")
    p.add_argument("--output", default="doctor", help="folder for batch.png and doctor.json (default: doctor)")

    p = command("show-augment", cmd_show_augment, "write a PNG grid of augmented (and mixed) training images",
                overrides_example="augment.policy=randaugment")
    p.add_argument("--n", type=_positive_int, default=32, help="images in the grid")
    p.add_argument("--output", default="augment.png", help="PNG file to write")

    p = command("lr-find", cmd_lr_find, "LR range test: loss against an exponentially growing lr, suggestions, plot",
                overrides_example="data.batch_size=256")
    p.add_argument("--start", type=float, help="first lr (lr_find.start, default 1e-7)")
    p.add_argument("--end", type=float, help="last lr (lr_find.end, default 10)")
    p.add_argument("--steps", type=int, help="optimizer steps, one lr each (lr_find.steps, default 100)")
    p.add_argument("--output", help="folder for lr_find.csv, lr_find.png and config.yaml "
                                    "(default: output.root/lr_find/<recipe name>, then -2, -3 ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing lr-find folder")
    return parser


OVERRIDE_WORD = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+=")  # section.key=value


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; `section.key=value` overrides may come before or after the options.

    argparse fills a command's positionals from the words before its first option only (and
    parse_intermixed_args refuses subcommands), so the overrides after an option come back as
    leftovers: they join the command's overrides in order. Any other leftover is an error."""
    args, leftovers = parser.parse_known_args(argv)
    if not leftovers:
        return args
    command: argparse.ArgumentParser = args.command_parser
    if not hasattr(args, "overrides"):
        command.error(f"unrecognized arguments: {' '.join(leftovers)}")
    for word in leftovers:
        if word.startswith("-"):
            command.error(f"unrecognized arguments: {word}")
        if not OVERRIDE_WORD.match(word):
            command.error(f"{word}: not an option and not an override (section.key=value, e.g. train.epochs=5); "
                          "overrides may come before or after the options, the recipe comes first")
    args.overrides = [*args.overrides, *leftovers]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # train --nproc starts the same command again
    args.from_command_line = argv is None
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("imgtrain: stopped by Ctrl-C; the last saved training state is kept.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from imgtrain.engine.checkpoint import CheckpointSaveError
        from imgtrain.engine.preemption import TrainingPreempted
        if isinstance(exc, TrainingPreempted):  # SIGTERM (75) or Ctrl-C (130): the state is saved
            return exc.exit_code
        if isinstance(exc, CheckpointSaveError):  # disk full, read-only folder: the previous state is intact
            print(f"imgtrain: training stopped: {exc}", file=sys.stderr)
            return EXIT_TRAINING_STOPPED
        if isinstance(exc, _user_errors()):
            print(f"imgtrain: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        from imgtrain.strategies.diagnostics import NonFiniteLossError
        if isinstance(exc, NonFiniteLossError):  # the run diverged: say where and why, no traceback
            print(f"imgtrain: training stopped: {exc}", file=sys.stderr)
            return EXIT_TRAINING_STOPPED
        raise


if __name__ == "__main__":
    sys.exit(main())
