"""The start-up scan (`data.verify`) and its scan cache (data/scan.py): a warm start decodes nothing, a
changed file is checked again, a damaged cache is rebuilt, each level catches what it promises on real
damaged files, and two processes scanning at once leave a whole cache."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
from PIL import Image

from imgtrain.config import load_recipe
from imgtrain.data import build_splits
from imgtrain.data.errors import DataError
from imgtrain.data.scan import scan_cache_file, scan_files


def _jpeg(path, seed=0, side=48):
    """A noisy JPEG: its body is long, so cutting it leaves the header whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def _truncate(path, keep=0.7):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def folder(tmp_path):
    """An image folder of 2 classes x 6 JPEGs."""
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog")):
        for i in range(6):
            _jpeg(root / name / f"{i}.jpg", seed=10 * c + i)
    return root


def _data(root, cache_dir, *overrides):
    recipe = load_recipe(None, ["data.source=imagefolder", f"data.root={root}", f"data.cache_dir={cache_dir}",
                                *overrides])
    return recipe.data


def test_a_warm_start_takes_every_result_from_the_cache_and_decodes_nothing(folder, tmp_path):
    cfg = _data(folder, tmp_path / "cache")
    cold = build_splits(cfg)
    assert (cold.scan.decoded, cold.scan.reused) == (12, 0)
    cache = scan_cache_file(cfg.cache_dir, cfg.source, cfg.root)
    assert cold.scan.cache_file == cache and cache.is_file()
    written = cache.stat().st_mtime_ns
    warm = build_splits(cfg)
    assert (warm.scan.decoded, warm.scan.headers_read, warm.scan.reused) == (0, 0, 12)
    assert cache.stat().st_mtime_ns == written  # nothing new: not even rewritten
    assert (warm.channels, warm.native_size) == (cold.channels, cold.native_size) == (3, 48)
    assert sorted(warm.train.paths) == sorted(cold.train.paths)
    # a decoded result serves a shallower check too
    assert build_splits(_data(folder, tmp_path / "cache", "data.verify=header")).scan.reused == 12


def test_a_changed_file_is_checked_again_and_its_new_state_counts(folder, tmp_path):
    cfg = _data(folder, tmp_path / "cache", "data.on_bad_image=skip")
    build_splits(cfg)
    _jpeg(folder / "cat" / "0.jpg", seed=99, side=40)          # replaced by another image
    _truncate(folder / "dog" / "5.jpg")                         # damaged since the last run
    splits = build_splits(cfg)
    assert (splits.scan.decoded, splits.scan.reused) == (2, 10)
    assert [path for path, _ in splits.skipped] == [str(folder / "dog" / "5.jpg")]
    assert "truncated" in splits.skipped[0][1]
    with pytest.raises(DataError, match="dog/5.jpg: truncated"):  # the cached bad result stops an error run
        build_splits(_data(folder, tmp_path / "cache"))


def test_a_damaged_scan_cache_is_ignored_with_a_warning_and_rebuilt(folder, tmp_path, capsys):
    cfg = _data(folder, tmp_path / "cache")
    build_splits(cfg)
    cache = scan_cache_file(cfg.cache_dir, cfg.source, cfg.root)
    text = cache.read_text()
    for damage in (text[: len(text) // 2].encode(), json.dumps({**json.loads(text), "size": [1, 2]}).encode(),
                   b"\xff\xfe\x00 binary garbage"):
        cache.write_bytes(damage)
        splits = build_splits(cfg)
        assert (splits.scan.decoded, splits.scan.reused) == (12, 0)
        assert "is damaged" in capsys.readouterr().err
        assert build_splits(cfg).scan.reused == 12  # rebuilt whole


def test_entries_that_do_not_match_the_file_are_never_trusted(folder, tmp_path):
    cfg = _data(folder, tmp_path / "cache")
    build_splits(cfg)
    cache = scan_cache_file(cfg.cache_dir, cfg.source, cfg.root)
    data = json.loads(cache.read_text())
    data["mtime_ns"] = [m + 1 for m in data["mtime_ns"]]      # as if every file had changed
    cache.write_text(json.dumps(data))
    assert build_splits(cfg).scan.decoded == 12


def test_max_image_pixels_applies_to_cached_results_without_decoding(folder, tmp_path):
    _jpeg(folder / "cat" / "0.jpg", seed=5, side=40)
    _jpeg(folder / "dog" / "0.jpg", seed=6, side=40)
    assert build_splits(_data(folder, tmp_path / "cache")).scan.decoded == 12
    # 48 x 48 = 2304 pixels > 2000 >= 40 x 40: the limit is applied to the stored sizes
    small = build_splits(_data(folder, tmp_path / "cache", "data.max_image_pixels=2000", "data.on_bad_image=skip",
                               "data.val_fraction=0"))
    assert (small.scan.decoded, small.scan.headers_read) == (0, 0)
    assert sorted(small.train.paths) == [str(folder / "cat" / "0.jpg"), str(folder / "dog" / "0.jpg")]
    assert len(small.skipped) == 10 and all("too large: 48 x 48" in reason for _, reason in small.skipped)
    back = build_splits(_data(folder, tmp_path / "cache"))  # the default limit again: nothing decoded
    assert (back.scan.decoded, back.skipped) == (0, [])


@pytest.fixture
def damaged(tmp_path):
    """Good JPEGs and one each of: a truncated JPEG body, an empty file, a text file named .png."""
    good = [_jpeg(tmp_path / f"good{i}.jpg", seed=i) for i in range(3)]
    truncated = _truncate(_jpeg(tmp_path / "truncated.jpg", seed=7))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("path,label\nnot an image\n")
    return good, {"truncated": str(truncated), "empty": str(empty), "text": str(text)}


@pytest.mark.parametrize("verify, caught, opened", [
    ("full", {"truncated", "empty", "text"}, "decoded"),
    ("header", {"empty", "text"}, "headers_read"),     # a truncated body needs decoding: the loader meets it
    ("off", {"empty", "text"}, "headers_read"),        # stat, and the headers of its sample (here every file)
])
def test_each_verify_level_catches_what_it_promises(damaged, verify, caught, opened):
    good, bad = damaged
    result = scan_files([*good, *bad.values()], verify)
    assert {name for name, path in bad.items() if path in dict(result.bad)} == caught
    assert getattr(result, opened) == len(good) + len(bad) - 1  # every file but the empty one was opened
    assert "empty file" in dict(result.bad)[bad["empty"]]
    assert "not an image" in dict(result.bad)[bad["text"]]


def test_verify_off_trusts_the_list_beyond_its_sample(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(1003)]
    for i, path in enumerate(files):
        Image.new("L", (4, 4), i % 256).save(path)
    files[0].write_text("not an image")                  # outside the sample or inside it: both are fine
    (tmp_path / "empty.png").write_bytes(b"")
    result = scan_files([*files, tmp_path / "empty.png"], "off")
    # 1000 of the 1004 files are sampled; the empty one is caught by its stat, opened or not
    assert result.decoded == 0 and result.headers_read in (999, 1000)
    assert [path for path, _ in result.bad][-1] == str(tmp_path / "empty.png")
    trusted = [path for path, found in result.info.items() if found is None]
    assert len(trusted) == 1004 - 1000 - (result.headers_read == 1000)  # outside the sample, but not empty
    assert str(files[0]) in dict(result.bad) or str(files[0]) in trusted  # the text file: caught if sampled
    assert {found for found in result.info.values() if found is not None} == {(1, 4)}
    again = scan_files([*files, tmp_path / "empty.png"], "off")
    assert (again.bad, again.info) == (result.bad, result.info)  # the same seeded sample every time


def _scan_into(args):
    paths, cache = args
    return scan_files(paths, "full", cache_file=cache).decoded


def test_two_processes_scanning_at_once_leave_a_whole_cache(folder, tmp_path):
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    cache = tmp_path / "cache" / "scan.json"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_scan_into, [(paths, cache)] * 2) == [12, 12]
    assert not list(cache.parent.glob("*.tmp-*"))      # no partial file left behind
    assert scan_files(paths, "full", cache_file=cache).reused == 12
