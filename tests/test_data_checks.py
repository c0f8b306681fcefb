"""Bad benchmark data stops before anything runs, with one message naming the file, the array and
what was found; good float data is scaled to the same pixels as its uint8 twin."""

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cl_ext import registry
from cl_ext.cli import app
from cl_ext.config import validate_recipe
from cl_ext.context import BuildContext
from cl_ext.errors import DataError, RecipeError


def _arrays(n_classes=4, per_class=6, size=8, channels=None, seed=0):
    rng = np.random.RandomState(seed)
    shape = (size, size) if channels is None else (size, size, channels)
    return {
        "x_train": rng.randint(0, 256, (n_classes * per_class, *shape), dtype=np.uint8),
        "y_train": np.repeat(np.arange(n_classes), per_class),
        "x_test": rng.randint(0, 256, (n_classes * 2, *shape), dtype=np.uint8),
        "y_test": np.repeat(np.arange(n_classes), 2),
    }


def _build(tiny_recipe_data, path, **options):
    ctx = BuildContext(recipe=validate_recipe(tiny_recipe_data), device=torch.device("cpu"))
    return registry.build("benchmark", "npz", ctx, {"path": str(path), "classes_per_exp": 2, **options})


def _spoil(arrays, case):
    """One way each to break the arrays, as a new user's own .npz would."""
    a = dict(arrays)
    if case == "fewer labels":
        a["y_train"] = a["y_train"][:-3]
    elif case == "float labels":
        a["y_train"] = a["y_train"] + 0.7
    elif case == "labels not 0..C-1":
        a["y_train"] = a["y_train"] + 5
        a["y_test"] = a["y_test"] + 5
    elif case == "a class missing in train":
        a["y_train"] = np.where(a["y_train"] == 1, 2, a["y_train"])
    elif case == "test class unseen":
        a["y_test"] = a["y_test"].copy()
        a["y_test"][0] = 7
    elif case == "NaN pixels":
        a["x_train"] = a["x_train"] / 255.0
        a["x_train"][0, 0, 0] = np.nan
    elif case == "float pixels 0..255":
        a["x_train"] = a["x_train"].astype(np.float32)
    elif case == "int16 pixels":
        a["x_train"] = a["x_train"].astype(np.int16)
    elif case == "sizes differ":
        a["x_test"] = a["x_test"][:, :7, :7]
    elif case == "channels first":
        a["x_train"] = np.repeat(a["x_train"][:, None], 3, axis=1)
    elif case == "no images":
        a["x_train"], a["y_train"] = a["x_train"][:0], a["y_train"][:0]
    return a


CASES = {
    "fewer labels": "x_train holds 24 images but y_train has shape (21,)",
    "float labels": "y_train has dtype float64; class labels must be integers",
    "labels not 0..C-1": "y_train's labels must be 0..C-1 with every class present; found 4 distinct labels from 5 to 8",
    "a class missing in train": "found 3 distinct labels from 0 to 3",
    "test class unseen": "y_test has classes that y_train lacks: 7",
    "NaN pixels": "x_train holds 1 NaN or infinite pixels",
    "float pixels 0..255": "float images must lie in [0, 1]",
    "int16 pixels": "x_train has dtype int16; expected uint8",
    "sizes differ": "training images are (8, 8) but test images (7, 7)",
    "channels first": "x_train has shape (24, 3, 8, 8)",
    "no images": "x_train has shape (0, 8, 8)",
}


@pytest.mark.parametrize("case", CASES)
def test_bad_arrays_are_refused_naming_file_array_and_finding(tiny_recipe_data, tmp_path, case):
    path = tmp_path / "mine.npz"
    np.savez(path, **_spoil(_arrays(), case))
    with pytest.raises(DataError) as caught:
        _build(tiny_recipe_data, path)
    message = str(caught.value)
    assert message.startswith(f"benchmark.options.path: {path}:"), message
    assert CASES[case] in message


@pytest.mark.parametrize("content", [b"\x93NUMPY random bytes" * 50, b"not an archive at all", None])
def test_unreadable_files_get_one_plain_message(tiny_recipe_data, tmp_path, content):
    path = tmp_path / "broken.npz"
    if content is None:  # a real archive cut in half, as an interrupted copy leaves it
        np.savez(path, **_arrays())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path} is not a readable .npz archive"):
        _build(tiny_recipe_data, path)


def test_float_images_in_unit_range_give_the_pixels_of_their_uint8_twin(tiny_recipe_data, tmp_path):
    arrays = _arrays(channels=3)
    as_float = dict(arrays, x_train=arrays["x_train"] / 255.0, x_test=arrays["x_test"].astype(np.float32) / 255)
    np.savez(tmp_path / "u8.npz", **arrays)
    np.savez(tmp_path / "f.npz", **as_float)
    for stream in ("train_stream", "test_stream"):
        u8 = getattr(_build(tiny_recipe_data, tmp_path / "u8.npz").benchmark, stream)[0].dataset.eval()
        f = getattr(_build(tiny_recipe_data, tmp_path / "f.npz").benchmark, stream)[0].dataset.eval()
        assert len(u8) == len(f) > 0
        assert all(torch.equal(u8[k][0], f[k][0]) for k in range(len(u8)))


def test_cifar_augmentation_crops_back_to_the_image_size(tiny_recipe_data, tmp_path):
    np.savez(tmp_path / "small.npz", **_arrays(size=12, channels=3))
    bundle = _build(tiny_recipe_data, tmp_path / "small.npz", augment="cifar")
    image = bundle.benchmark.train_stream[0].dataset.train()[0][0]
    assert image.shape == (3, 12, 12)


def test_train_per_class_below_one_is_a_recipe_error(tiny_recipe_data, tmp_path):
    np.savez(tmp_path / "ok.npz", **_arrays())
    tiny_recipe_data["benchmark"] = {
        "name": "npz",
        "options": {"path": str(tmp_path / "ok.npz"), "train_per_class": -2},
    }
    with pytest.raises(
        RecipeError, match="benchmark.options.train_per_class: Input should be greater than or equal to 1"
    ):
        validate_recipe(tiny_recipe_data)


def test_cli_run_on_bad_data_prints_one_message_and_writes_no_run_folder(tiny_recipe_data, tmp_path):
    np.savez(tmp_path / "mine.npz", **_spoil(_arrays(), "fewer labels"))
    tiny_recipe_data["benchmark"] = {"name": "npz", "options": {"path": str(tmp_path / "mine.npz")}}
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_data))
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "y_train has shape (21,)" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()
