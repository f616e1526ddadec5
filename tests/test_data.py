import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data import DiffusionDataModule
from diffusion.errors import ConfigError, DataError


def test_mnist_from_the_offline_copy(mnist_dir):
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), num_workers=0, batch_size=16)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (57_000, 3_000, 10_000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is black: exactly -1
    assert dm.classes == [str(i) for i in range(10)]
    # The split is fixed by the seed: no image is in both.
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)


def test_fashion_mnist_resized_to_rgb_32(mnist_dir):
    dm = DiffusionDataModule("fashion_mnist", data_dir=str(mnist_dir), image_size=32, channels=3, num_workers=0)
    dm.setup()
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1])


def test_data_dir_default_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_DATA_DIR", str(tmp_path))
    assert DiffusionDataModule().data_dir == tmp_path


def test_missing_mnist_names_the_folder_and_the_fix(tmp_path):
    dm = DiffusionDataModule("mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"MNIST not found.*MNIST/raw.*--data.download true"):
        dm.setup()


def test_corrupt_idx_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*corrupt"):
        DiffusionDataModule("mnist", data_dir=str(tmp_path)).setup()


def write_cifar(root, n_per_batch=4):
    """Small files in CIFAR-10's python format: dicts with uint8 'data' [N, 3072] (RRR..GGG..BBB) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        data[0, :1024] = 255  # first image: red channel saturated
        data[0, 1024:] = 0
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(range(n_per_batch)), "batch_label": name}, f)
    return folder


def test_cifar10_loader_reads_its_format(tmp_path):
    write_cifar(tmp_path)
    dm = DiffusionDataModule("cifar10", data_dir=str(tmp_path), image_size=32, channels=3, val_fraction=0.1, num_workers=0)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 20 and len(dm.test_set) == 4
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 32) and int(y) == 0
    assert torch.all(x[0] == 1) and torch.all(x[1:] == -1)  # red is channel 0, mapped 255 -> 1, 0 -> -1
    assert dm.classes[0] == "airplane"


def test_cifar10_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found.*data_batch_1"):
        DiffusionDataModule("cifar10", data_dir=str(tmp_path), image_size=32, channels=3).setup()
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        DiffusionDataModule("cifar10", data_dir=str(tmp_path), image_size=32, channels=3).setup()


def make_folder(root):
    for cls, color in (("cats", (200, 10, 10)), ("dogs", (10, 200, 10))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 10 * i, 30), color).save(root / cls / f"{i}.png")
    return root


def test_folder_of_images_is_resized_cropped_and_labelled(tmp_path):
    make_folder(tmp_path)
    dm = DiffusionDataModule("folder", data_dir=str(tmp_path), image_size=16, channels=3, val_fraction=0.0, num_workers=0)
    dm.setup()
    assert dm.classes == ["cats", "dogs"]
    xs, ys = zip(*(dm.train_set[i] for i in range(len(dm.train_set))))
    assert all(x.shape == (3, 16, 16) for x in xs) and sorted(int(y) for y in ys) == [0, 0, 0, 1, 1, 1]


def test_colour_images_under_a_one_channel_config_are_refused_in_one_line(tmp_path):
    """Colour under `channels: 1` would be trained in grey without a word; grey images saved as RGB are grey."""
    make_folder(tmp_path / "colour")
    gray = DiffusionDataModule("folder", data_dir=str(tmp_path / "colour"), image_size=8, channels=1, val_fraction=0.0,
                               num_workers=0)
    with pytest.raises(ConfigError, match=r"in colour \(.*\.png is RGB\), but data.channels is 1.*--data.init_args.channels 3"):
        gray.setup()
    (tmp_path / "grey").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (90 + i, 90 + i, 90 + i)).save(tmp_path / "grey" / f"{i}.png")
    Image.new("L", (20, 20), 30).save(tmp_path / "grey" / "3.png")
    grey = DiffusionDataModule("folder", data_dir=str(tmp_path / "grey"), image_size=8, channels=1, val_fraction=0.0,
                               num_workers=0)
    grey.setup()
    assert grey.train_set[0][0].shape == (1, 8, 8)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DiffusionDataModule("folder", data_dir=str(tmp_path / "nope")).setup()
    with pytest.raises(DataError, match="No images found"):
        DiffusionDataModule("folder", data_dir=str(tmp_path)).setup()
    make_folder(tmp_path)
    # A truncated JPEG passes the check at setup (its structure is only read when decoding): the loader names it.
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "cats" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 4])
    dm = DiffusionDataModule("folder", data_dir=str(tmp_path), image_size=16, channels=3, val_fraction=0.0)
    dm.setup()
    index = [p.name for p in dm.train_set.dataset.files].index("cut.jpg")
    with pytest.raises(DataError, match=r"cut.jpg.*Remove or replace"):
        dm.train_set.dataset[index]


def write_bad_images(root):
    """Three files PIL cannot read: not an image at all, a PNG cut off mid-file (its header is fine), a text file."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(png, "PNG")
    (root / "cats" / "garbage.png").write_bytes(b"\x89PNG but not really")
    (root / "dogs" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "dogs" / "notes.jpg").write_text("not a JPEG")
    return ["garbage.png", "truncated.png", "notes.jpg"]


def test_bad_images_are_all_reported_when_the_data_is_set_up(tmp_path):
    bad = write_bad_images(make_folder(tmp_path))
    dm = DiffusionDataModule("folder", data_dir=str(tmp_path), image_size=16, channels=3, val_fraction=0.0)
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert message.startswith(f"3 of 9 images under {tmp_path} cannot be read:")
    for name in bad:
        assert name in message
    assert "skip_bad_images: true" in message


def test_skip_bad_images_leaves_them_out_with_one_warning(tmp_path):
    bad = write_bad_images(make_folder(tmp_path))
    dm = DiffusionDataModule("folder", data_dir=str(tmp_path), image_size=16, channels=3, val_fraction=0.0,
                             random_flip=True, num_workers=0, skip_bad_images=True)
    with pytest.warns(UserWarning, match="3 of 9 images .* cannot be read") as warned:
        dm.setup()
        dm.reference_set("train")  # the check runs once, whichever split asks first
    assert len([w for w in warned if "cannot be read" in str(w.message)]) == 1
    assert all(name in str(warned[0].message) for name in bad)
    files = [p.name for p in dm.train_set.dataset.files]
    assert len(files) == 6 and not set(bad) & set(files)
    assert dm.classes == ["cats", "dogs"] and sorted(int(dm.train_set[i][1]) for i in range(6)) == [0, 0, 0, 1, 1, 1]


def test_bad_image_listing_stops_at_twenty_and_counts_the_rest(tmp_path):
    make_folder(tmp_path)
    for i in range(25):
        (tmp_path / "cats" / f"bad{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        DiffusionDataModule("folder", data_dir=str(tmp_path)).setup()
    lines = str(info.value).splitlines()
    assert lines[0].startswith("25 of 31 images") and sum(".png: " in line for line in lines) == 20
    assert lines[21] == "  ... and 5 more"


def test_a_folder_of_only_bad_images_is_refused_even_when_skipping(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"(?s)1 of 1 images .*a.png.*None is readable: check that --data.data_dir"):
        DiffusionDataModule("folder", data_dir=str(tmp_path), skip_bad_images=True).setup()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="imagenet"), "Unknown dataset"),
        (dict(channels=2), "channels must be 1"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(batch_size=0), "batch_size"),
        (dict(image_size=0), "image_size"),
    ],
)
def test_bad_data_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionDataModule(**kwargs)


def test_download_is_skipped_when_the_files_are_there(mnist_dir, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download although the data is there")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    DiffusionDataModule("mnist", data_dir=str(mnist_dir), download=True).prepare_data()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="Downloading mnist into .* failed.*--data.data_dir"):
        DiffusionDataModule("mnist", data_dir=str(tmp_path), download=True).prepare_data()
