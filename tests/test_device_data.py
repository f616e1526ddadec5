"""The device-resident training data path: same batches as the DataLoader path, seeded flips, exact resume."""

from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import CONFIGS
from diffusion.data import DeviceBatches, DiffusionDataModule
from diffusion.errors import ConfigError
from diffusion.module import DiffusionModel
from diffusion.optim import Optimization
from diffusion.unet import UNet

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


def test_each_rank_gets_its_own_share_in_the_dataloaders_order(plain_and_resident):
    cpu = torch.device("cpu")
    shares = []
    try:
        for rank in (0, 1):
            loaders = []
            for dm in plain_and_resident:
                dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, global_step=0, accumulate_grad_batches=1,
                                             strategy=SimpleNamespace(root_device=cpu))
                loaders.append(dm.train_dataloader())
            a, b = loaders
            assert isinstance(b, DeviceBatches) and b.sampler.rank == rank and b.sampler.num_replicas == 2
            assert len(a) == len(b) == 57_000 // 2 // BATCH
            pairs = list(zip(batches(a, 0, 2), batches(b, 0, 2)))
            assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)
            shares.append(pairs[0][1][0])
    finally:
        for dm in plain_and_resident:
            dm.trainer = None
    assert not torch.equal(shares[0], shares[1])


@pytest.mark.parametrize("name", ["mnist.yaml", "mnist_cfg.yaml"])
def test_gpu_configs_leave_it_to_the_device(name):
    args = yaml.safe_load((CONFIGS / name).read_text())["data"]["init_args"]
    assert "device_resident" in args and args["device_resident"] is None
    dm = DiffusionDataModule(**args)
    assert dm.resident_on(torch.device("cuda")) and not dm.resident_on(torch.device("cpu"))


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert isinstance(trainer.train_dataloader, DeviceBatches)
        self.seen[trainer.global_step] = (batch[0].clone(), batch[1].clone())


def short_fit(mnist_dir, root, max_steps, ckpt_path=None):
    """A tiny U-Net on device-resident MNIST with flips, 4-step epochs, a checkpoint every 3 steps."""
    seed_everything(0)
    net = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=[], num_heads=1)
    model = DiffusionModel(net, optim=Optimization(lr=1e-3))
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), batch_size=16, num_workers=0, random_flip=True,
                             device_resident=True)
    record = RecordBatches()
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, limit_train_batches=4, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      callbacks=[record, ckpt])
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return record.seen, model


@pytest.fixture
def one_thread():
    """A model this small runs fastest on one thread, and far slower on two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resumed_mid_epoch_it_trains_on_the_same_batches_as_an_uninterrupted_run(mnist_dir, tmp_path, one_thread):
    straight, straight_model = short_fit(mnist_dir, tmp_path / "straight", 10)  # epochs: steps 0-3, 4-7, 8-9
    assert sorted(straight) == list(range(10))
    assert not torch.equal(straight[0][0], straight[4][0])  # a new order each epoch
    (mid,) = (tmp_path / "straight").glob("*step=6.ckpt")  # two batches into epoch 1
    resumed, resumed_model = short_fit(mnist_dir, tmp_path / "resumed", 10, ckpt_path=mid)
    assert sorted(resumed) == list(range(6, 10))
    for step in resumed:
        assert torch.equal(resumed[step][0], straight[step][0]) and torch.equal(resumed[step][1], straight[step][1])
    for name, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name  # one process, same kernels: exact
