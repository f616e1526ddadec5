"""The device-resident training data path: same batches as the DataLoader path, seeded flips, exact resume."""

import signal

import pytest
import torch

from diffusion.data import DeviceBatches, DiffusionDataModule
from diffusion.errors import ConfigError
from test_faults import assert_same_training_state, config, final_state, fit  # noqa: F401 (fixture)

BATCH = 64


def datamodule(mnist_dir, **kwargs):
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), batch_size=BATCH, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def batches(loader, epoch, count=5):
    loader.sampler.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        if i == count:
            break
        out.append(batch)
    return out


@pytest.fixture(scope="module")
def plain_and_resident(mnist_dir):
    return datamodule(mnist_dir, device_resident=False), datamodule(mnist_dir, device_resident=True)


def test_same_batches_in_the_same_order_as_the_dataloader(plain_and_resident):
    plain, resident = plain_and_resident
    a, b = plain.train_dataloader(), resident.train_dataloader()
    assert isinstance(b, DeviceBatches) and not isinstance(a, DeviceBatches)
    assert len(a) == len(b) == 57_000 // BATCH
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(batches(a, epoch), batches(b, epoch)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(batches(b, 0, 1)[0][0], batches(b, 1, 1)[0][0])  # a new order each epoch


def test_flips_are_seeded_by_epoch_and_image(mnist_dir, plain_and_resident):
    plain = plain_and_resident[0]
    flipped = [datamodule(mnist_dir, device_resident=True, random_flip=True).train_dataloader() for _ in range(2)]
    ref = batches(plain.train_dataloader(), 0)
    one, two = batches(flipped[0], 0), batches(flipped[1], 0)
    same = flips = total = 0
    for (x, _), (x1, _), (x2, _) in zip(ref, one, two):
        assert torch.equal(x1, x2)  # reproducible
        per_image_same = (x1 == x).flatten(1).all(1)
        per_image_flip = (x1 == x.flip(-1)).flatten(1).all(1)
        assert bool((per_image_same | per_image_flip).all())  # each image is itself or its mirror
        same += int(per_image_same.sum()); flips += int(per_image_flip.sum()); total += len(x)
    assert 0.35 < (flips - (same + flips - total)) / total < 0.65  # about half (symmetric images count as both)
    assert not torch.equal(flipped[0].flips(0), flipped[0].flips(1))


def test_skip_after_resume_replays_the_rest_of_the_epoch(mnist_dir):
    loader = datamodule(mnist_dir, device_resident=True, random_flip=True).train_dataloader()
    full = batches(loader, 3, count=6)
    loader.sampler.set_epoch(3)
    loader.sampler.skip = 2 * BATCH  # what the data module sets when a run resumes after two steps of this epoch
    rest = [b for _, b in zip(range(4), loader)]
    for (x, y), (xr, yr) in zip(full[2:], rest):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_default_is_on_only_on_a_gpu_and_a_folder_is_refused(mnist_dir, tmp_path):
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir))
    assert dm.resident_on(torch.device("cuda")) and not dm.resident_on(torch.device("cpu"))
    assert not DiffusionDataModule("folder", data_dir=str(tmp_path)).resident_on(torch.device("cuda"))
    with pytest.raises(ConfigError, match="device_resident.*folder.*false"):
        DiffusionDataModule("folder", data_dir=str(tmp_path), device_resident=True)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(config, mnist_dir, tmp_path):  # noqa: F811
    extra = ["--data.init_args.device_resident", "true", "--data.init_args.random_flip", "true"]
    fit(config, tmp_path / "straight", mnist_dir, *extra)
    killed = fit(config, tmp_path / "killed", mnist_dir, *extra, env={"KILL_AT_STEP": "25"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (last,) = (tmp_path / "killed").rglob("checkpoints/last.ckpt")
    fit(config, tmp_path / "killed", mnist_dir, *extra, "--ckpt_path", last)
    assert_same_training_state(final_state(tmp_path / "killed"), final_state(tmp_path / "straight"))
