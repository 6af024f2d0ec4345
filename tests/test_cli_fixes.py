"""What a new user tripped over (issue 13, point 5), as real commands: scan, overrides after options,
a recipe given with --resume, finetune's data, evaluate --data's folder, fitted ensemble weights of 0."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from PIL import Image

from imgtrain.cli import build_parser, main
from imgtrain.tracking import read_summary

TINY = ["model.name=imgtrain_cnn_tiny", "train.epochs=2", "output.progress=log", "output.plots=false",
        "output.report=false"]
SHAPES = ["data.source=shapes", "data.shapes.num_classes=3", "data.shapes.image_size=16",
          "data.shapes.train_size=120", "data.shapes.val_size=30", "data.shapes.test_size=30"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fixes") / "digits"
    assert main(["quickstart", *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def _digits_folder(root, count=40):
    """Digits as PNGs in root/<digit>/, the classes of a digits run."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i in range(count):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8"), mode="L").save(folder / f"{i}.png")
    for d in range(10):
        (root / str(d)).mkdir(parents=True, exist_ok=True)
    return root


# ----------------------------------------------------------------------------- 1. scan

def test_scan_lists_unreadable_files_and_exits_1(tmp_path, capsys):
    data = tmp_path / "shapes"
    assert main(["make-shapes", str(data), "--classes", "2", "--size", "12", "--train", "20", "--val", "4",
                 "--test", "4"]) == 0
    capsys.readouterr()
    assert main(["scan", "imagefolder", f"data.root={data}"]) == 0
    assert "all 28 image files are readable" in capsys.readouterr().out
    (data / "train" / "circle" / "junk.png").write_bytes(b"not an image at all")
    (data / "test" / "square" / "empty.jpg").write_bytes(b"")
    assert main(["scan", "imagefolder", f"data.root={data}"]) == 1
    out, err = capsys.readouterr()
    assert f"{data / 'train' / 'circle' / 'junk.png'}: not an image" in out
    assert f"{data / 'test' / 'square' / 'empty.jpg'}: empty file (0 bytes)" in out
    assert "2 of 30 image files cannot be read" in err
    # training on the same data stops and points to the command that lists them
    assert main(["train", "imagefolder", f"data.root={data}", *TINY, "--run-dir", str(tmp_path / "r")]) == 2
    assert "imgtrain scan" in capsys.readouterr().err
    assert main(["scan", "quickstart"]) == 0
    assert "no image files to scan" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 2. overrides after options

def _override_commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(name for name, p in sub.choices.items() if any(a.dest == "overrides" for a in p._actions))


@pytest.mark.parametrize("command", _override_commands())
def test_every_command_takes_overrides_before_and_after_options(command):
    from imgtrain.cli import parse_arguments
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    # an option of this command that takes a value (a number works for all of them), or a flag
    takes_value = [a.option_strings[-1] for a in sub._actions if a.option_strings and a.nargs is None
                   and a.dest != "help" and a.choices is None]
    flags = [a.option_strings[-1] for a in sub._actions if a.option_strings and a.nargs == 0 and a.dest != "help"]
    option = [takes_value[0], "3"] if takes_value else flags[:1]
    lead = {"quickstart": [], "finetune": ["runs/x"], "shard": ["SRC", "DST"]}.get(command, ["quickstart"])
    args = parse_arguments(parser, [command, *lead, "train.epochs=3", *option, "train.seed=4", "data.batch_size=8"])
    # finetune WEIGHTS key=value: the optional recipe takes the first override, cmd_finetune moves it back
    moved = [args.recipe] if command == "finetune" and "=" in (args.recipe or "") else []
    assert moved + args.overrides == ["train.epochs=3", "train.seed=4", "data.batch_size=8"]


def test_overrides_after_options_train_for_real(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart", "--run-dir", str(run), *TINY[:1], "train.epochs=1", "output.progress=off",
                 "output.plots=false", "output.report=false"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["name"] == "imgtrain_cnn_tiny" and config["train"]["epochs"] == 1
    assert len(read_summary(run)) and "run folder" in capsys.readouterr().out


def test_a_stray_word_after_an_option_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "quickstart", "--run-dir", str(tmp_path / "r"), "epochs5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "epochs5: not an option and not an override (section.key=value" in err
    with pytest.raises(SystemExit):
        main(["doctor", "quickstart", "--output", str(tmp_path / "d"), "--nonsense"])
    assert "unrecognized arguments: --nonsense" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- 3. a recipe with --resume

def test_resume_refuses_another_recipe_and_accepts_the_same(tmp_path, capsys, monkeypatch):
    (tmp_path / "stop_hooks.py").write_text(textwrap.dedent("""
        import imgtrain

        class StopAfterOneEpoch(imgtrain.Hook):
            name = "stop_after_one_epoch"

            def epoch_start(self, state):
                if state.epoch >= 1:  # epoch 1 is finished and saved
                    raise KeyboardInterrupt
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # where --hook imports the module from, as PYTHONPATH would
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: quickstart\n" + yaml.safe_dump(
        {"model": {"name": "imgtrain_cnn_tiny"}, "train": {"epochs": 2},
         "output": {"progress": "log", "plots": False, "report": False}}))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--hook", "stop_hooks:StopAfterOneEpoch"]) == 130
    capsys.readouterr()
    # quickstart is not the recipe this run was made from: refused, naming the keys and both values
    assert main(["train", "quickstart", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's config.yaml" in err
    assert "model.name: 'imgtrain_cnn_small' in quickstart, 'imgtrain_cnn_tiny' in the run" in err
    assert "train.epochs: 15 in quickstart, 2 in the run" in err
    assert "data.source" not in err  # only the keys that differ
    # the run's own recipe (and an override resume allows) is accepted and the run continues
    assert main(["train", str(recipe), "--resume", str(run), "output.progress=off"]) == 0
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs


# ----------------------------------------------------------------------------- 4. finetune's data

def test_finetune_without_a_recipe_uses_the_runs_data_and_says_so(tmp_path, capsys):
    base = tmp_path / "shapes_run"
    assert main(["train", "quickstart", *SHAPES, *TINY, "--run-dir", str(base)]) == 0
    capsys.readouterr()
    ft = tmp_path / "ft"
    assert main(["finetune", str(base), "--run-dir", str(ft), "train.epochs=1", "output.progress=log",
                 "output.plots=false", "output.report=false"]) == 0
    out, err = capsys.readouterr()
    assert f"finetune: on the data {base} was trained on (data.source shapes)" in out
    config = yaml.safe_load((ft / "config.yaml").read_text())
    assert config["data"] == yaml.safe_load((base / "config.yaml").read_text())["data"]
    assert "head replaced" not in err and "head replaced" not in (ft / "train.log").read_text()
    # other data named on the command line: its head and input change, and the console says so
    ft2 = tmp_path / "ft2"
    assert main(["finetune", str(base), "data.source=digits", "--run-dir", str(ft2), "train.epochs=1",
                 "output.progress=off", "output.plots=false", "output.report=false"]) == 0
    out, err = capsys.readouterr()
    assert "finetune: on the data" not in out
    assert "imgtrain: weights: head replaced (3 classes -> 10)" in err
    assert "imgtrain: weights: input conv adapted (3 channels -> 1)" in err
    assert yaml.safe_load((ft2 / "config.yaml").read_text())["data"]["source"] == "digits"


# ----------------------------------------------------------------------------- 5. evaluate --data's folder

def test_evaluate_on_other_data_never_replaces_the_runs_evaluation(digits_run, tmp_path, capsys):
    assert main(["evaluate", str(digits_run)]) == 0
    own = digits_run / "evaluation" / "test" / "metrics.json"
    before = own.read_text()
    assert json.loads(before)["split"] == "test"
    capsys.readouterr()
    first = _digits_folder(tmp_path / "set_a" / "test", 30)
    assert main(["evaluate", str(digits_run), "--data", str(first)]) == 0
    out_a = digits_run / "evaluation" / "set_a-test"
    assert f"written to {out_a}" in capsys.readouterr().out
    assert own.read_text() == before
    assert json.loads((out_a / "metrics.json").read_text())["images"] == 30
    # again on the same data: the same folder; other data of the same name: a folder of its own
    assert main(["evaluate", str(digits_run), "--data", str(first), "--json"]) == 0
    assert f"written to {out_a}" in capsys.readouterr().err
    other = _digits_folder(tmp_path / "elsewhere" / "set_a" / "test", 20)
    assert main(["evaluate", str(digits_run), "--data", str(other)]) == 0
    assert f"written to {out_a}-2" in capsys.readouterr().out
    assert json.loads((out_a / "metrics.json").read_text())["images"] == 30
    assert json.loads((digits_run / "evaluation" / "set_a-test-2" / "metrics.json").read_text())["images"] == 20
    assert own.read_text() == before


# ----------------------------------------------------------------------------- 6. fitted weight 0

def test_fit_weights_warns_about_a_member_it_leaves_out(digits_run, tmp_path, capsys):
    untrained = tmp_path / "untrained"
    assert main(["quickstart", *TINY, "train.epochs=1", "optim.lr=0.000001", "--run-dir", str(untrained)]) == 0
    capsys.readouterr()
    assert main(["ensemble", str(digits_run), str(untrained), "--fit-weights", "val", "--json"]) == 0
    out, err = capsys.readouterr()
    weights = json.loads(out)["weights"]
    assert weights[1] < 0.01 < weights[0]
    assert f"--fit-weights gave member 2 ({untrained}) weight" in err and "member 1" not in err
    # equal weights: no warning
    assert main(["ensemble", str(digits_run), str(untrained)]) == 0
    assert "warning" not in capsys.readouterr().err
