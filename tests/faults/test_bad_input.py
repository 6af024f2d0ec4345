"""Hostile input: a CSV manifest whose paths escape its folder, a symlink loop in an image folder, a
recipe `extends:` cycle and a YAML bomb. Each is a clear error (exit 2, the message names the problem)
and never a hang (every process has a timeout)."""

from __future__ import annotations

import csv
import os
import subprocess
import time

import pytest
from PIL import Image

from .conftest import ENV, TIMEOUT, TRACEBACK, cli

EXIT_BAD_INPUT = 2
RECIPE_TIMEOUT = 30  # seconds: a hang costs this much CPU, so no more
TINY = ("model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=1", "train.max_steps_per_epoch=1",
        "output.plots=false", "output.report=false", "output.progress=off", "train.threads=1")


def _images(folder, classes=("a", "b"), per_class=6):
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * i, 100 if c == "a" else 0, 0)).save(folder / c / f"{i}.png")


def _manifest(folder, extra_rows):
    rows = [("path", "label")] + [(f"{c}/{i}.png", c) for c in "ab" for i in range(6)] + extra_rows
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder / "manifest.csv"


def _billion_laughs(path, levels=10):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    lines.append(f"model: *a{levels - 1}")  # 9^10 strings once expanded
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case at once: {case: (completed process, what its message must name, run folder)}."""
    base = tmp_path_factory.mktemp("bad_input")
    cases = {}
    root = base / "escape" / "data" / "imgs"
    _images(root)
    cases["CSV path escaping its root (../../etc/passwd)"] = (
        ["data.source=csv", f"data.root={_manifest(root, [('../../../../../../../../etc/passwd', 'a')])}"],
        "/etc/passwd")
    outside = base / "escape2"
    _images(outside / "data" / "imgs")
    _images(outside / "secret", classes=("b",), per_class=1)
    cases["CSV path escaping its root to a readable image"] = (
        ["data.source=csv", f"data.root={_manifest(outside / 'data' / 'imgs', [('../../secret/b/0.png', 'b')])}"],
        "secret")
    loop = base / "loop" / "imgs"
    _images(loop)
    os.symlink("..", loop / "a" / "up")  # a/up/a/up/... : a folder loop
    cases["symlink loop in an image folder"] = (["data.source=imagefolder", f"data.root={loop}"], "up")
    (base / "a.yaml").write_text("extends: b.yaml\ntrain: {epochs: 1}\n")
    (base / "b.yaml").write_text("extends: a.yaml\n")
    cases["recipe extends: cycle"] = ("cycle", "cycle")
    cases["YAML bomb (billion laughs)"] = ("bomb", "model")
    cmds = []
    for i, (args, _) in enumerate(cases.values()):
        run_dir = str(base / f"run{i}")
        if args == "cycle":
            cmds.append(cli("train", str(base / "a.yaml"), "--run-dir", run_dir))
        elif args == "bomb":
            cmds.append(cli("train", str(_billion_laughs(base / "bomb.yaml")), "--run-dir", run_dir))
        else:
            cmds.append(cli("train", "quickstart", *TINY, *args, "--run-dir", run_dir))
    # all at once, each with its own timeout: a hang fails its own case, not the module
    procs = {name: subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cmd in zip(cases, cmds)}
    results = {}
    started = time.monotonic()
    for name, proc in procs.items():
        # a recipe is read in well under a second once imgtrain is imported (~6 s of CPU)
        limit = RECIPE_TIMEOUT if name in ("recipe extends: cycle", "YAML bomb (billion laughs)") else TIMEOUT
        try:
            _, err = proc.communicate(timeout=max(limit - (time.monotonic() - started), 1))
            results[name] = (proc.returncode, err, cases[name][1])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results[name] = (None, f"still running after {limit} s", cases[name][1])
    return results


def _check(name, outcomes, faults, names_problem: str | None = None, known: str = ""):
    code, err, named = outcomes[name]
    clear = code == EXIT_BAD_INPUT and TRACEBACK not in err and (names_problem or named) in err
    seen = f"hung, killed after {RECIPE_TIMEOUT} s" if code is None else f"exit {code}"
    faults.add(name, survived=clear, lost=False, note="" if clear else f"{seen}{': ' + known if known else ''}")
    assert code is not None, f"hang: {err}"
    assert code == EXIT_BAD_INPUT, err[-3000:]
    assert TRACEBACK not in err
    assert (names_problem or named) in err, err[-3000:]


def test_manifest_path_escaping_its_root(outcomes, faults):
    _check("CSV path escaping its root (../../etc/passwd)", outcomes, faults)


def test_manifest_path_escaping_to_a_readable_image(outcomes, faults):
    _check("CSV path escaping its root to a readable image", outcomes, faults, names_problem="leave")


def test_symlink_loop_in_an_image_folder(outcomes, faults):
    _check("symlink loop in an image folder", outcomes, faults, names_problem="a link loop")


def test_extends_cycle(outcomes, faults):
    _check("recipe extends: cycle", outcomes, faults, names_problem="makes a cycle")


def test_yaml_bomb(outcomes, faults):
    _check("YAML bomb (billion laughs)", outcomes, faults)
