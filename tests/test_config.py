"""Recipe loading: extends, overrides, and every kind of recipe error, with file/key/line."""

from pathlib import Path

import pytest

from imgtrain.config import RecipeError, load_recipe, recipe_from_dict, recipe_keys
from imgtrain.recipe_files import BUILTIN_RECIPES


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


# ----------------------------------------------------------------------------- composing parts, JSON Schema

def test_extends_a_list_of_builtin_parts(tmp_path):
    recipe_file = write(tmp_path / "r.yaml", "extends: [data/fashion_mnist, model/resnet18_frozen, "
                                             "optim/sgd_onecycle.yaml]\ntrain:\n  epochs: 3\n")
    recipe = load_recipe(recipe_file)
    assert (recipe.data.source, recipe.augment.hflip, recipe.model.name, recipe.model.weights) == \
        ("fashion-mnist", 0.5, "resnet18", "timm")
    assert recipe.transfer.freeze_backbone and recipe.optim.name == "sgd" and recipe.schedule.name == "onecycle"
    assert recipe.train.epochs == 3
    # a later part wins over an earlier one, the recipe over all of them; lines point at the part's file
    recipe = load_recipe(write(tmp_path / "r2.yaml", "extends: [model/cnn_small, model/cnn_tiny]\n"))
    assert (recipe.model.name, recipe.model.drop_rate) == ("imgtrain_cnn_tiny", 0.0)
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r3.yaml", "extends: [data/digits, optim/adamw_cosine]\n"), ["optim.lr=0"])
    assert "optim.lr: 0.0 is out of range" in str(info.value)


def test_a_part_next_to_the_recipe_wins_over_the_builtin_one(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "digits.yaml", "data:\n  source: shapes\n  batch_sise: 8\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", "extends: [data/digits]\n"))
    assert "data.batch_sise: unknown key, did you mean data.batch_size?" in str(info.value)
    assert str(tmp_path / "data" / "digits.yaml") in str(info.value) and "line 3" in str(info.value)
    with pytest.raises(RecipeError, match=r"recipe not found: data/nothing .*parts for extends: data/digits"):
        load_recipe(write(tmp_path / "r2.yaml", "extends: [data/nothing]\n"))


def test_every_builtin_part_loads_on_its_own():
    parts = sorted(p.relative_to(BUILTIN_RECIPES).with_suffix("").as_posix()
                   for p in BUILTIN_RECIPES.glob("*/*.yaml"))
    assert {"data/digits", "data/fashion_mnist", "data/shapes", "data/imagefolder", "model/cnn_small",
            "model/cnn_tiny", "model/resnet18_frozen", "optim/sgd_onecycle", "optim/adamw_cosine"} <= set(parts)
    assert load_recipe("model/cnn_tiny").model.name == "imgtrain_cnn_tiny"
    assert load_recipe("optim/adamw_cosine").schedule.name == "warmup_cosine"
    assert load_recipe("data/shapes").data.source == "shapes"


def test_a_composed_recipe_trains(tmp_path):
    import imgtrain

    recipe_file = write(tmp_path / "composed.yaml", "extends: [data/digits, model/cnn_tiny, optim/sgd_onecycle]\n"
                                                    "train:\n  epochs: 1\n  max_steps_per_epoch: 6\n")
    recipe = load_recipe(recipe_file, ["output.progress=off", "output.plots=false", "output.report=false"])
    result = imgtrain.train(recipe, run_dir=tmp_path / "run")
    assert len(result.history) == 1
    row = result.history[0]
    assert 0.0 < row["train_loss"] < 2.5 and 0.0 <= row["val_acc"] <= 1.0  # 10 classes: chance loss is 2.3
    assert row["lr"] < 0.1  # one-cycle: the lr after the last step is far below the 0.1 peak
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "imgtrain_cnn_tiny" in resolved and "onecycle" in resolved and "extends" not in resolved


def _schema_errors(schema: dict, instance: dict) -> list[str]:
    """jsonschema's complaints when it is installed, else a hand check of the keys (one level of sections)."""
    try:
        import jsonschema
    except ImportError:
        errors = [key for key in instance if key not in schema["properties"]]
        for name, section in instance.items():
            ref = schema["properties"].get(name, {}).get("$ref", "")
            if isinstance(section, dict) and ref:
                props = schema["$defs"][ref.rpartition("/")[2]]["properties"]
                errors += [f"{name}.{key}" for key in section if key not in props]
        return errors
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(instance)]


def test_the_json_schema_describes_and_checks_recipes():
    import yaml

    from imgtrain.config import recipe_schema

    schema = recipe_schema()
    assert schema["additionalProperties"] is False and "extends" in schema["properties"]
    train = schema["$defs"]["TrainConfig"]
    assert train["additionalProperties"] is False
    assert train["properties"]["amp"]["enum"] == ["auto", "off", "fp16", "bf16"]
    assert train["properties"]["epochs"]["minimum"] == 1 and train["properties"]["epochs"]["default"] == 10
    assert train["properties"]["epochs"]["description"] == "passes over the training split"
    assert schema["$defs"]["AugmentConfig"]["properties"]["scale"]["default"] == [0.08, 1.0]
    assert "source_file" not in schema["properties"]
    for path in sorted(BUILTIN_RECIPES.glob("*.yaml")) + sorted(BUILTIN_RECIPES.glob("*/*.yaml")):
        assert _schema_errors(schema, yaml.safe_load(path.read_text())) == [], path
    assert _schema_errors(schema, load_recipe("progressive").to_dict()) == []
    assert _schema_errors(schema, {"extends": ["data/digits", "model/cnn_tiny"], "train": {"epochs": 2}}) == []
    assert _schema_errors(schema, {"train": {"epoch": 5}}) != []      # unknown key
    assert _schema_errors(schema, {"trainer": {"epochs": 5}}) != []   # unknown section
