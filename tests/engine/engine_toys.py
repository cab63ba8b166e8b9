"""Toy stand-ins for the engine tests: a tiny occupancy model and dataset honouring the real contracts.

``ToyOccupancyModel`` has the parts whose handling the engine must get right (Conv + BatchNorm, a
LayerNorm, embeddings, one of them named like a released no-decay key) and the model interface
(``forward_train(batch) -> named losses``, ``predict(batch) -> int64 labels [B, X, Y, Z]``).
``ToyDataset`` returns sample dicts of ``spotocc.data.batch`` with tiny tensors and draws its
training augmentation from the global Python / NumPy / torch generators, as real datasets do.

Config knobs (on top of ``synthetic_tiny``): ``data.train_split`` / ``data.val_split`` = ``"toy-<N>"``
(N samples), ``image_backbone.drop_path_rate`` = the toy's dropout probability.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from spotocc.config import Config, get_config

TOY_OVERRIDES = (
    "grid.occ_size=(4, 4, 2)",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.train_split=toy-12",
    "data.val_split=toy-5",
    "train.epochs=2",
    "train.lr=0.01",
    "train.lr_steps=(1,)",
    "train.log_interval=1",
    "train.tensorboard=false",
    "train.sync_bn=true",
    "train.grad_clip=0.5",
)


def toy_config(overrides: tuple[str, ...] | list[str] = ()) -> Config:
    return get_config("synthetic_tiny", list(TOY_OVERRIDES) + list(overrides))


class ToyOccupancyModel(nn.Module):
    def __init__(
        self, *, num_classes: int, occ_size: tuple[int, int, int], dropout: float = 0.0, width: int = 8
    ):
        super().__init__()
        self.occ_size = tuple(occ_size)
        self.dropout = dropout
        num_voxels = int(np.prod(occ_size))
        self.image_backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.norm = nn.LayerNorm(width)
        self.voxel_embed = nn.Embedding(num_voxels, width)
        self.query_embed = nn.Embedding(2, width)  # a released no-decay name
        self.classifier = nn.Linear(width, num_classes)

    def _logits(self, batch: dict) -> torch.Tensor:
        img = batch["img"]  # [B, N, 3, H, W]
        b, n = img.shape[:2]
        feat = self.image_backbone(img.flatten(0, 1))  # [B*N, W, H, W]
        feat = feat.mean(dim=(2, 3)).reshape(b, n, -1).mean(dim=1)  # [B, W]
        feat = self.norm(feat)
        if self.training and self.dropout > 0:
            feat = F.dropout(feat, self.dropout)
        voxels = self.voxel_embed.weight[None] * feat[:, None] + self.query_embed.weight.sum(0)  # [B, V, W]
        return self.classifier(voxels)  # [B, V, C]

    def forward_train(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self._logits(batch)  # [B, V, C]
        gt = batch["gt_occ"].reshape(logits.shape[0], -1).long()  # [B, V]
        ce = F.cross_entropy(logits.transpose(1, 2), gt, ignore_index=255, reduction="none")  # [B, V]
        valid = (gt != 255).float()
        per_sample = (ce * valid).sum(1) / valid.sum(1).clamp(min=1)  # [B]
        return {
            "loss_ce": per_sample.mean(),
            "d0.loss_aux": 0.01 * logits.pow(2).mean(dim=(1, 2)).mean(),
            "accuracy": (logits.argmax(-1) == gt).float().mean(),  # not a loss: never summed
        }

    def predict(self, batch: dict) -> torch.Tensor:
        logits = self._logits(batch)
        return logits.argmax(-1).reshape(logits.shape[0], *self.occ_size)  # [B, X, Y, Z] int64


class ToyDataset(Dataset):
    def __init__(
        self,
        length: int,
        *,
        occ_size: tuple[int, int, int],
        train: bool,
        num_labels: int = 5,
        image_size: tuple[int, int] = (8, 8),
        cameras: int = 1,
        with_gt: bool = True,
    ):
        self.length = length
        self.occ_size = tuple(occ_size)
        self.train = train
        self.num_labels = num_labels
        self.image_size = image_size
        self.cameras = cameras
        self.with_gt = with_gt

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(1000 + i)
        n, (h, w) = self.cameras, self.image_size
        img = torch.rand(n, 3, h, w, generator=g)
        # labels follow the image brightness in part, so the model has something to learn
        gt = torch.randint(0, self.num_labels, self.occ_size, generator=g)
        gt[..., -1] = int(img.mean() * 10) % self.num_labels
        gt[torch.rand(self.occ_size, generator=g) < 0.1] = 255
        if self.train:  # augmentation from the global generators (seeded per sample by the engine)
            if random.random() < 0.5:
                img = img.flip(-1)
            scale = float(np.random.uniform(0.8, 1.2))  # noqa: NPY002 (global generator on purpose)
            img = img * scale + 0.05 * torch.randn(img.shape)
        sample = {
            "img": img.float(),
            "rots": torch.eye(3).repeat(n, 1, 1),
            "trans": torch.zeros(n, 3),
            "intrins": torch.eye(4).repeat(n, 1, 1),
            "post_rots": torch.eye(3).repeat(n, 1, 1),
            "post_trans": torch.zeros(n, 3),
            "bda": torch.eye(4),
            "meta": {"sample_id": f"seq{i % 2}/{i:04d}", "dataset": "toy"},
        }
        if self.with_gt:
            sample["gt_occ"] = gt.to(torch.uint8)
        return sample


def toy_model_factory(cfg: Config) -> ToyOccupancyModel:
    return ToyOccupancyModel(
        num_classes=cfg.model.head.num_classes,
        occ_size=cfg.grid.occ_size,
        dropout=cfg.model.image_backbone.drop_path_rate,
    )


def toy_dataset_factory(cfg: Config, split: str, *, train: bool | None = None) -> ToyDataset:
    if not split.startswith("toy-"):
        raise ValueError(f"toy split must be 'toy-<N>', got {split!r}")
    return ToyDataset(int(split[4:]), occ_size=cfg.grid.occ_size, train=bool(train))


def batchnorm_worker(rank: int, world_size: int, init_file: str, payload_path: str, out_dir: str) -> None:
    """One process of the CrossProcessBatchNorm test (spawned): forward/backward on its own inputs."""
    import torch.distributed as dist

    from spotocc.engine.distributed import CrossProcessBatchNorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    payload = torch.load(payload_path)
    results = {}
    for case, inputs in payload["inputs"].items():
        bn = CrossProcessBatchNorm(inputs[0].shape[1], momentum=0.1)
        bn.load_state_dict(payload["state"])
        x = inputs[rank].clone().requires_grad_(True)
        y = bn(x)
        (y * payload["weights"][case][rank]).sum().backward()
        results[case] = {
            "y": y.detach(),
            "x_grad": x.grad,
            "weight_grad": bn.weight.grad,
            "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
