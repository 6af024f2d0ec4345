"""`imgtrain bench-data` and `bench_data`: the train loader timed as the trainer feeds it."""

import statistics

import pytest

from imgtrain.cli import main
from imgtrain.config import ShapesConfig, load_recipe
from imgtrain.data import write_shapes_imagefolder
from imgtrain.tools.bench_data import bench_data


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "data"
    write_shapes_imagefolder(ShapesConfig(num_classes=3, image_size=20, train_size=150, val_size=30, test_size=30),
                             out, fmt="jpg")
    return out


def test_bench_data_counts_every_image_of_every_epoch(shapes_folder, tmp_path):
    recipe = load_recipe("imagefolder", [f"data.root={shapes_folder}", "data.cache=memory", "data.batch_size=32",
                                         "augment.device_transforms=on", "augment.img_size=16", "train.threads=1"])
    result = bench_data(recipe, epochs=3)
    assert result.epoch_images == [150, 150, 150]
    assert all(rate > 0 for rate in result.images_per_second)
    assert result.steady_images_per_second == pytest.approx(statistics.median(result.images_per_second[1:]))
    assert result.cache.startswith("decoded cache (memory): 210 images at 18 px")  # 16 / 0.875, every split
    table = result.table()
    assert "augmentation per batch on cpu" in table and "steady state:" in table and "median of epochs 2..3" in table
    short = bench_data(recipe, epochs=1, max_batches=2)
    assert short.epoch_images == [64] and "median of epoch 1" in short.table()
    plain = bench_data(load_recipe("imagefolder", [f"data.root={shapes_folder}", "train.threads=1"]), epochs=1)
    assert plain.cache is None and "per image in the loader" in plain.description and plain.epoch_images == [150]


def test_bench_data_command(shapes_folder, capsys):
    assert main(["bench-data", "imagefolder", f"data.root={shapes_folder}", "data.cache=memory",
                 "augment.device_transforms=on", "train.threads=1", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "imagefolder: 150 train images" in out and "decoded cache (memory)" in out
    assert out.count("\n") == 7  # description, setup, cache, header, 2 epochs, steady state
    assert main(["bench-data", "quickstart", "data.cache=disk", "--batches", "1"]) == 0
    assert "cache off" in capsys.readouterr().out  # digits: nothing to cache


@pytest.mark.parametrize("argv,message", [
    (["bench-data", "quickstart", "data.cache=ram"], "data.cache: 'ram' is not one of off, memory, disk"),
    (["bench-data", "imagefolder", "data.root=/nonexistent/folder"], "data.root /nonexistent/folder is not a folder"),
])
def test_bench_data_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_data_epochs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-data", "quickstart", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "expected a whole number >= 1, got 0" in capsys.readouterr().err


def test_unusable_cache_dir_exits_2_and_says_which_key(shapes_folder, tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["bench-data", "imagefolder", f"data.root={shapes_folder}", "data.cache=disk",
                 f"data.cache_dir={not_a_folder}"]) == 2
    err = capsys.readouterr().err
    # the scan cache, in the same folder, only warns that it cannot be written: the decoded cache stops
    assert f"imgtrain: warning: cannot write the scan cache {not_a_folder}/scan-" in err
    assert f"\nimgtrain: error: data.cache_dir {not_a_folder}: cannot create the folder" in err
    assert "set data.cache_dir to a writable folder" in err and "Traceback" not in err
