"""The command line, as a user types it: outputs, files, exit codes, and no tracebacks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import imgtrain
from imgtrain.cli import main
from imgtrain.tracking import read_summary

TINY = ["model.name=imgtrain_cnn_tiny", "train.epochs=4", "output.progress=log", "output.plots=false"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One small trained digits run shared by the read-only tests below."""
    run_dir = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["quickstart", *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    assert main(["make-shapes", str(out), "--classes", "3", "--size", "20", "--train", "240", "--val", "60",
                 "--test", "60", "--format", "mixed"]) == 0
    return out


def test_quickstart_prints_accuracy_and_run_folder(digits_run, capsys):
    summary = read_summary(digits_run)
    assert summary["test_acc"] > 0.8
    assert (digits_run / "config.yaml").read_text().count("imgtrain_cnn_tiny") == 1
    code = main(["quickstart", *TINY[:1], "train.epochs=1", "output.progress=off", "output.plots=false",
                 "--run-dir", str(digits_run.parent / "again")])
    out = capsys.readouterr().out
    assert code == 0
    assert "test accuracy" in out and f"run folder: {digits_run.parent / 'again'}" in out


def test_python_api_matches_the_cli(tmp_path):
    recipe = imgtrain.load_recipe("quickstart", TINY[:1] + ["train.epochs=2", "output.progress=off"])
    result = imgtrain.train(recipe, run_dir=tmp_path / "api")
    assert len(result.history) == 2 and result.run_dir == tmp_path / "api"
    assert read_summary(result.run_dir)["test_acc"] == result.summary["test_acc"]


def test_evaluate_run_folder_matches_training_summary(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = read_summary(digits_run)
    assert result["acc"] == pytest.approx(summary["test_acc"])
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert result["images"] == 359 and set(result["per_class"]) == {str(i) for i in range(10)}
    assert 0 < result["top5_acc"] <= 1 and result["top5_acc"] >= result["acc"]
    assert sum(row["support"] for row in result["per_class"].values()) == 359
    # the files land in the run folder by default and hold the same numbers
    out = digits_run / "evaluation" / "test"
    assert json.loads((out / "metrics.json").read_text())["acc"] == result["acc"]
    confusion = list(csv.reader((out / "confusion.csv").open()))
    assert sum(int(confusion[i][i]) for i in range(1, 11)) == round(result["acc"] * 359)
    assert Image.open(out / "confusion.png").size[0] > 300
    assert main(["evaluate", str(digits_run / "checkpoints" / "last.safetensors"), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "balanced" in text and "precision" in text and str(digits_run / "evaluation" / "val") in text


def test_imagefolder_train_evaluate_predict(shapes_folder, tmp_path, capsys):
    run = tmp_path / "shapes_run"
    assert main(["train", "imagefolder", f"data.root={shapes_folder}", "augment.img_size=20", *TINY,
                 "data.batch_size=32", "--run-dir", str(run)]) == 0
    assert "run folder" in capsys.readouterr().out
    # evaluate on a folder given with --data (the test split's class folders)
    assert main(["evaluate", str(run), "--data", str(shapes_folder / "test"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 60
    # predict a folder plus one unreadable file: the bad one gets an error row, the others a class
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out_csv = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(shapes_folder / "test"), str(bad), "--topk", "2",
                 "--output", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 61
    broken = [r for r in rows if r["path"] == str(bad)]
    assert broken and broken[0]["error"] and not broken[0]["class_1"]
    good = [r for r in rows if not r["error"]]
    classes = {p.name for p in (shapes_folder / "test").iterdir()}
    assert all(r["class_1"] in classes and r["class_2"] in classes for r in good)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in good)
    correct = sum(Path(r["path"]).parent.name == r["class_1"] for r in good)
    assert correct / len(good) == pytest.approx(result["acc"], abs=1e-9)


def test_predict_prints_topk(digits_run, tmp_path, capsys):
    image = tmp_path / "seven.png"
    Image.new("L", (8, 8), 0).save(image)
    assert main(["predict", str(digits_run), str(image), "--topk", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ") and line.count("%") == 3


def test_split_command(tmp_path, capsys):
    src = tmp_path / "flat"
    for name, count in (("cat", 20), ("dog", 10)):
        (src / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(src / name / f"{i}.png")
    assert main(["split", str(src), str(tmp_path / "out"), "--val", "0.2", "--test", "0.1", "--seed", "3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train"] == {"cat": 14, "dog": 7} and counts["val"] == {"cat": 4, "dog": 2}
    assert counts["test"] == {"cat": 2, "dog": 1}
    assert len(list((tmp_path / "out" / "val" / "cat").iterdir())) == 4


def test_datasets_and_models(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("digits", "shapes", "fashion-mnist", "imagefolder", "csv"))
    assert main(["models", "imgtrain_*"]) == 0
    assert capsys.readouterr().out.split() == ["imgtrain_cnn_tiny", "(imgtrain)", "imgtrain_cnn_small", "(imgtrain)",
                                               "imgtrain_cnn_medium", "(imgtrain)"]
    assert main(["models", "resnet1*"]) == 0
    assert "resnet18" in capsys.readouterr().out.split()


@pytest.mark.parametrize("argv, message", [
    (["train", "quickstart", "train.epoch=3"], "train.epoch: unknown key, did you mean train.epochs?"),
    (["train", "no_such_recipe.yaml"], "recipe not found"),
    (["train", "quickstart", "data.source=imagefolder", "data.root=/nonexistent/images"], "/nonexistent/images"),
    (["train", "quickstart", "data.source=fashion-mnist", "data.root=/nonexistent/fm"], "/nonexistent/fm"),
    (["train", "quickstart", "model.name=resnet_9000"], "unknown model 'resnet_9000'"),
    (["train", "--resume", "/nonexistent/run"], "not a run folder"),
    (["evaluate", "/nonexistent/run"], "no such run folder or checkpoint"),
    (["predict", "/nonexistent/ckpt.safetensors", "x.png"], "no such run folder or checkpoint"),
    (["split", "/nonexistent/src", "/tmp/never"], "/nonexistent/src"),
    (["train", "quickstart", "data.train_subset=1"], "data.train_subset: 1 keeps 1 training image(s), all of class"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgtrain: error:") and message in err
    assert "Traceback" not in err


def test_single_class_folder_exits_2_naming_the_class(tmp_path, capsys):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(folder / f"{i}.png")
    run_dir = tmp_path / "run"
    argv = ["train", "quickstart", "data.source=imagefolder", f"data.root={tmp_path / 'photos'}",
            "--run-dir", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgtrain: error:") and "Traceback" not in err
    assert f"one class folder found: cat ({folder}, 4 images)" in err and "at least 2 classes" in err
    assert not (run_dir / "history.csv").exists()


def test_existing_run_folder_exit_2_and_untouched(digits_run, capsys):
    before = (digits_run / "history.csv").read_text()
    assert main(["quickstart", *TINY, "--run-dir", str(digits_run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (digits_run / "history.csv").read_text() == before


def test_pickle_checkpoint_is_refused(tmp_path, capsys):
    import torch
    fake = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(1)}, fake)
    assert main(["evaluate", str(fake)]) == 2
    assert "expected a run folder or a .safetensors" in capsys.readouterr().err
    not_safetensors = tmp_path / "fake.safetensors"
    not_safetensors.write_bytes(b"\x00" * 64)
    assert main(["predict", str(not_safetensors), str(fake)]) == 2
    assert "not a readable .safetensors" in capsys.readouterr().err


def test_console_script_reports_recipe_error_without_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epochs: 3\n  amp: sometimes\n")
    done = subprocess.run([sys.executable, "-m", "imgtrain.cli", "train", str(recipe)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{recipe}, line 3: train.amp: 'sometimes' is not one of auto, off, fp16, bf16" in done.stderr
    assert "Traceback" not in done.stderr


def test_finetune_starts_from_a_run_and_takes_its_architecture(digits_run, tmp_path, capsys):
    out = tmp_path / "ft"
    # the finetune recipe's default model is imgtrain_cnn_small; the weights say imgtrain_cnn_tiny
    assert main(["finetune", str(digits_run), "train.epochs=3", "output.progress=log", "output.plots=false",
                 "--run-dir", str(out)]) == 0
    assert "run folder: " + str(out) in capsys.readouterr().out
    config = (out / "config.yaml").read_text()
    assert "name: imgtrain_cnn_tiny" in config and f"weights: {digits_run}" in config
    assert "freeze_epochs: 2" in config  # configs/finetune.yaml
    log = (out / "train.log").read_text()
    assert f"loaded 26 of 26 tensors from {digits_run}" in log
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["trainable_groups"] for r in rows] == ["1/5", "1/5", "5/5"]
    # started from trained weights: the first epoch is already far above chance
    assert float(rows[0]["val_acc"]) > 0.8


def test_finetune_from_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgtrain: error:") and "model.weights" in err and "Traceback" not in err
    assert not (tmp_path / "ft").exists()


def test_predict_a_labelled_manifest_with_tta_to_json(digits_run, tmp_path, capsys):
    """A CSV manifest's label column is carried over; --tta changes the probabilities but keeps
    one row per image; the JSON rows agree with the printed ones."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = ["path,label"]
    for i in range(12):
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8"), mode="L").save(folder / f"d{i}.png")
        lines.append(f"imgs/d{i}.png,{digits.target[i]}")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines.append("broken.png,3")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")

    plain, tta = tmp_path / "plain.json", tmp_path / "tta.json"
    assert main(["predict", str(digits_run), str(manifest), "--topk", "3", "--output", str(plain)]) == 0
    printed = capsys.readouterr().out
    assert "13 predictions written" in printed and "(1 could not be read)" in printed
    assert main(["predict", str(digits_run), str(manifest), "--topk", "3", "--tta", "hflip",
                 "--output", str(tta)]) == 0
    rows, tta_rows = json.loads(plain.read_text()), json.loads(tta.read_text())
    assert [r["label"] for r in rows] == [str(t) for t in digits.target[:12]] + ["3"]
    assert rows[-1]["error"] and "class_1" not in rows[-1]
    assert all(r["prob_1"] >= r["prob_2"] >= r["prob_3"] for r in rows[:12])
    assert sum(r["class_1"] == r["label"] for r in rows[:12]) >= 9  # the trained model reads digits
    # a flipped digit is another picture: TTA's merged probabilities differ from the plain ones
    assert [r["path"] for r in tta_rows] == [r["path"] for r in rows]
    assert any(abs(a["prob_1"] - b["prob_1"]) > 1e-4 for a, b in zip(rows[:12], tta_rows[:12]))


def test_evaluate_with_tta_reports_both(digits_run, tmp_path, capsys):
    assert main(["evaluate", str(digits_run), "--tta", "hflip", "--output-dir", str(tmp_path / "ev"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    plain = read_summary(digits_run)
    assert result["without_tta"]["acc"] == pytest.approx(plain["test_acc"])
    assert result["tta"].startswith("hflip") and result["images"] == 359
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["acc"] == result["acc"]


@pytest.mark.parametrize("args, message", [
    (["--output", "preds.txt"], "give a .csv or .json"),
    (["--topk", "0"], "at least 1"),
    (["--tta", "hflip,sideways"], "sideways"),
])
def test_predict_bad_options_exit_2(digits_run, tmp_path, capsys, args, message):
    image = tmp_path / "x.png"
    Image.new("L", (8, 8), 0).save(image)
    assert main(["predict", str(digits_run), str(image), *args]) == 2
    assert message in capsys.readouterr().err


def test_schema_writes_the_recipe_json_schema(tmp_path, capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(["schema", "--output", str(tmp_path / "recipe.schema.json")]) == 0
    written = json.loads((tmp_path / "recipe.schema.json").read_text())
    assert written == printed
    assert written["$defs"]["DataConfig"]["properties"]["batch_size"]["default"] == 128
    assert "yaml-language-server: $schema=" in capsys.readouterr().err
    assert main(["schema", "--output", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert "cannot write it" in capsys.readouterr().err
