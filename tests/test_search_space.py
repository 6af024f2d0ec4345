"""The search grammar of `search.params` (Hydra's Optuna sweeper words) and its errors in the recipe:
what each expression means, and a mistake named with its file and line."""

from __future__ import annotations

import pytest

from imgtrain.config import RecipeError, load_recipe
from imgtrain.search_space import SearchParam, SearchSpaceError, parse_search_param


@pytest.mark.parametrize(("text", "expected"), [
    ("interval(0, 0.5)", SearchParam("float", low=0, high=0.5)),
    ("tag(log, interval(1e-4, 1e-1))", SearchParam("float", low=1e-4, high=0.1, log=True)),
    ("int(interval(5, 15))", SearchParam("int", low=5, high=15)),
    ("int(tag(log, interval(8, 256)))", SearchParam("int", low=8, high=256, log=True)),
    ("tag(log, int(interval(8, 256)))", SearchParam("int", low=8, high=256, log=True)),
    ("range(2, 10, 2)", SearchParam("int", low=2, high=8, step=2)),      # Python's range: 10 left out
    ("range(0, 0.5, 0.1)", SearchParam("float", low=0, high=0.4, step=0.1)),
    ("choice(64, 128, 256)", SearchParam("choice", choices=(64, 128, 256))),
    ("choice(sgd, 'adamw', true, null, -1)", SearchParam("choice", choices=("sgd", "adamw", True, None, -1))),
])
def test_expressions_mean_what_hydra_means(text, expected):
    param = parse_search_param(text)
    assert param.kind == expected.kind and param.choices == expected.choices and param.log == expected.log
    assert param.low == pytest.approx(expected.low) and param.high == pytest.approx(expected.high)
    assert param.step == (pytest.approx(expected.step) if expected.step else None)


def test_grid_and_contains():
    assert parse_search_param("range(2, 10, 2)").grid() == [2, 4, 6, 8]
    assert parse_search_param("int(interval(1, 3))").grid() == [1, 2, 3]
    assert parse_search_param("choice(a, b)").grid() == ["a", "b"]
    assert parse_search_param("interval(0, 1)").grid() is None
    lr = parse_search_param("tag(log, interval(1e-3, 0.5))")
    assert lr.contains(0.1) and not lr.contains(0.9) and not lr.contains("0.1")
    assert parse_search_param("range(2, 10, 2)").contains(6) and not parse_search_param("range(2, 10, 2)").contains(5)
    assert not parse_search_param("choice(64, 128)").contains(64.0)  # an int key's value is an int
    assert not parse_search_param("int(interval(1, 3))").contains(True)


@pytest.mark.parametrize(("text", "says"), [
    ("interval(0.1", "is not a search expression"),
    ("tag(lin, interval(1, 2))", "tag takes the tag `log`"),
    ("tag(log, interval(0, 1))", "a log scale needs low > 0"),
    ("interval(0.5, 0.1)", "low (0.5) is above high (0.1)"),
    ("int(interval(0.5, 3))", "needs whole numbers"),
    ("choice()", "at least one value"),
    ("choice(1, 1)", "appears twice"),
    ("range(5, 2)", "the range is empty"),
    ("range(0, 4, 0)", "the step must be > 0"),
    ("uniform(0, 1)", "unknown word 'uniform'"),
    ("interval(low=0, high=1)", "expected one of choice"),
    ("interval(0, x)", "expected a number, got 'x'"),
    ("choice(1 + 2)", "is not a plain value"),
    ("__import__('os').system('true')", "expected one of choice"),  # parsed, never evaluated
])
def test_grammar_errors_say_what_is_wrong(text, says):
    with pytest.raises(SearchSpaceError, match=None) as caught:
        parse_search_param(text)
    assert says in str(caught.value)


def write_recipe(tmp_path, search: str):
    path = tmp_path / "search.yaml"
    path.write_text("extends: quickstart\nmodel:\n  name: imgtrain_cnn_tiny\nsearch:\n  sampler: random\n"
                    "  params:\n" + search, encoding="utf-8")
    return path


def test_bad_grammar_is_a_recipe_error_with_file_and_line(tmp_path):
    path = write_recipe(tmp_path, "    optim.lr: tag(log, interval(1e-4, 1e-1))\n"
                                  "    model.drop_rate: interval(0, 0.5\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    error = caught.value
    assert (error.file, error.line, error.key) == (str(path), 8, "search.params.model.drop_rate")
    assert "is not a search expression" in str(error) and "interval(low, high)" in str(error)


def test_unknown_key_is_a_recipe_error_with_a_suggestion(tmp_path):
    path = write_recipe(tmp_path, "    optim.lr: tag(log, interval(1e-4, 1e-1))\n"
                                  "    optim.wieght_decay: interval(0, 0.01)\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert (caught.value.line, caught.value.key) == (8, "search.params.optim.wieght_decay")
    assert "did you mean optim.weight_decay?" in str(caught.value)


@pytest.mark.parametrize(("override", "key", "says"), [
    ("search.sampler=grid", "search.params.optim.lr", "sampler grid needs a finite space"),
    ("search.pruner=bandit", "search.pruner", "is not one of none, median, hyperband, asha"),
    ("search.metric=[val_acc, parameters]", "search.direction", "one direction per metric"),
])
def test_search_settings_are_checked(tmp_path, override, key, says):
    path = write_recipe(tmp_path, "    optim.lr: tag(log, interval(1e-4, 1e-1))\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, [override])
    assert caught.value.key == key and says in str(caught.value)


def test_pruning_needs_one_metric(tmp_path):
    path = write_recipe(tmp_path, "    optim.lr: tag(log, interval(1e-4, 1e-1))\n")
    with pytest.raises(RecipeError, match="pruning needs one metric"):
        load_recipe(path, ["search.metric=[val_acc, parameters]", "search.direction=[maximize, minimize]",
                           "search.pruner=asha"])
    recipe = load_recipe(path, ["search.metric=[val_acc, parameters]", "search.direction=[maximize, minimize]"])
    assert recipe.search.metric == ["val_acc", "parameters"]
