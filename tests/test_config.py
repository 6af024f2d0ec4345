"""Recipe loading: extends, overrides, and every kind of recipe error, with file/key/line."""

from pathlib import Path

import pytest

from imgtrain.config import RecipeError, load_recipe, recipe_from_dict, recipe_keys, BUILTIN_RECIPES


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    recipe_file = write(tmp_path / "r.yaml", "train:\n  epochs: 3\noptim:\n  lr: 0.05\n")
    recipe = load_recipe(recipe_file, ["train.epochs=7", "augment.scale=[0.5, 1.0]", "data.source=shapes"])
    assert recipe.train.epochs == 7
    assert recipe.optim.lr == 0.05
    assert recipe.augment.scale == [0.5, 1.0]
    assert recipe.data.source == "shapes"
    assert recipe.model.name == "imgtrain_cnn_small"  # untouched default


def test_int_accepted_for_float_and_nested_section(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", "optim:\n  lr: 1\ndata:\n  shapes:\n    noise: 0\n"))
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.data.shapes.noise == 0.0


def test_extends_chain_merges_deeply(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochs: 3\n  seed: 5\ndata:\n  batch_size: 32\n")
    write(tmp_path / "mid.yaml", "extends: base.yaml\ntrain:\n  epochs: 4\n")
    child = write(tmp_path / "child.yaml", "extends: mid.yaml\ndata:\n  source: shapes\n")
    recipe = load_recipe(child)
    assert (recipe.train.epochs, recipe.train.seed, recipe.data.batch_size, recipe.data.source) == (4, 5, 32, "shapes")


def test_extends_builtin_by_name(tmp_path):
    child = write(tmp_path / "c.yaml", "extends: quickstart\ntrain:\n  epochs: 2\n")
    recipe = load_recipe(child)
    assert recipe.data.source == "digits" and recipe.train.epochs == 2


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_unknown_key_suggests_closest_with_file_and_line(tmp_path):
    recipe_file = write(tmp_path / "r.yaml", "data:\n  source: digits\ntrain:\n  seed: 1\n  epoch: 5\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file)
    message = str(info.value)
    assert "train.epoch: unknown key, did you mean train.epochs?" in message
    assert str(recipe_file) in message and "line 5" in message


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match="did you mean optim"):
        load_recipe(write(tmp_path / "r.yaml", "optimizer:\n  lr: 0.1\n"))


@pytest.mark.parametrize("text, key, expected", [
    ("train:\n  epochs: five\n", "train.epochs", "expected an integer, got 'five'"),
    ("train:\n  epochs: 2.5\n", "train.epochs", "expected an integer"),
    ("train:\n  epochs: 0\n", "train.epochs", "expected a value >= 1"),
    ("optim:\n  lr: 0\n", "optim.lr", "expected a value > 0"),
    ("optim:\n  lr: -0.1\n", "optim.lr", "out of range"),
    ("train:\n  amp: fp8\n", "train.amp", "not one of auto, off, fp16, bf16"),
    ("optim:\n  name: adam\n", "optim.name", "did you mean adamw?"),
    ("train:\n  channels_last: yes please\n", "train.channels_last", "expected true or false"),
    ("augment:\n  hflip: 1.5\n", "augment.hflip", "expected a value <= 1.0"),
    ("augment:\n  scale: [0.9, 0.2]\n", "augment.scale", "0 < low <= high"),
    ("data:\n  workers: many\n", "data.workers", "'auto'"),
    ("data:\n  source: imagefolder\n", "data.root", "needs data.root"),
    ("schedule:\n  milestones: [30, 10]\n", "schedule.milestones", "increasing"),
    ("schedule:\n  name: warmup_cosine\n", "schedule.warmup_epochs", "warmup_epochs > 0"),
    ("augment:\n  normalize: given\n  mean: [0.5]\n", "augment.normalize", "augment.std"),
    ("train:\n  device: gpu\n", "train.device", "cuda:N"),
    ("train: 5\n", "train", "expected a mapping"),
])
def test_bad_values_name_key_and_expectation(tmp_path, text, key, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", text))
    assert f"{key}:" in str(info.value)
    assert expected in str(info.value)


def test_invalid_yaml_reports_line(tmp_path):
    with pytest.raises(RecipeError, match="line 3"):
        load_recipe(write(tmp_path / "r.yaml", "train:\n  epochs: 3\n  seed: [1, 2\n"))


def test_override_errors_name_command_line(tmp_path):
    with pytest.raises(RecipeError, match="command line.*train.epochz: unknown key, did you mean train.epochs"):
        load_recipe(None, ["train.epochz=3"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(None, ["epochs"])


def test_missing_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="recipe not found.*quickstart"):
        load_recipe("no_such_recipe")


def test_builtin_recipes_all_load():
    names = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    assert {"quickstart", "fashion_mnist", "imagefolder"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.train.epochs >= 1


def test_resolved_recipe_round_trips():
    recipe = load_recipe("quickstart", ["train.epochs=2"])
    again = recipe_from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert "train.epochs" in recipe_keys() and "data.shapes.noise" in recipe_keys()
