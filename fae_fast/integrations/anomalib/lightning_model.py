"""``Fae``: the Filtering Autoencoder as an anomalib 2.x ``AnomalibModule``.

Training (one-class, normal images only) is fae_fast's: each batch is corrupted by
:class:`fae_fast.corruption.Corruptor`, the same eps is added to input and target
(:func:`fae_fast.ops.corrupt_and_noise`, :func:`fae_fast.ops.noisy_target_loss`), AdamW with fae_fast's linear
warmup + cosine schedule (:func:`fae_fast.train.lr_factor`) over the trainer's steps, gradients clipped by norm.
The pre-processor only resizes: the network reconstructs images in [0, 1], so it must not get anomalib's
default ImageNet normalisation. The anomaly map is the FAE's smoothed squared error, the score its maximum.

Example:
    >>> from anomalib.data import Folder                                            # doctest: +SKIP
    >>> from anomalib.engine import Engine                                          # doctest: +SKIP
    >>> model = Fae(preset="tiny")                                                  # doctest: +SKIP
    >>> Engine(max_steps=2000).fit(model=model, datamodule=Folder(...))             # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize, Resize

from fae_fast.config import FAEConfig, check_image_size, preset as fae_preset, smoothing_for_size
from fae_fast.train import _param_groups, lr_factor

from .loss import FaeLoss
from .torch_model import FaeModel

__all__ = ["Fae"]


def _transforms(transform) -> list:
    return list(transform.transforms) if isinstance(transform, Compose) else [transform]


class Fae(AnomalibModule):
    """The Filtering Autoencoder (fae_fast) for anomalib's ``Engine``.

    Args:
        preset: a fae_fast preset ("default", "fast", "tiny", "cpu"; :func:`fae_fast.config.preset`).
        config: a full :class:`fae_fast.config.FAEConfig`, or a dict of sections layered on the preset
            (``{"noise": {"sigma_max": 0.05}}``).
        image_size: (H, W) the pre-processor resizes to; default the config's ``train.image_size``.
        pre_processor, post_processor, evaluator, visualizer: anomalib's components (True: the defaults; the
            default pre-processor resizes only).

    The trainer decides the batch size (the datamodule's ``train_batch_size``) and the number of steps
    (``Engine(max_steps=...)``); the cosine schedule spans the trainer's steps.
    """

    def __init__(self, preset: str = "tiny", config: FAEConfig | dict | None = None,
                 image_size: tuple[int, int] | None = None, pre_processor: PreProcessor | bool = True,
                 post_processor: PostProcessor | bool = True, evaluator: Evaluator | bool = True,
                 visualizer: Visualizer | bool = True) -> None:
        if isinstance(config, FAEConfig):
            cfg = copy.deepcopy(config)  # the caller's config stays as it is
        elif config is None or isinstance(config, dict):
            cfg = FAEConfig.from_dict(config or {}, base=fae_preset(preset))
        else:
            raise TypeError(f"Fae: config must be a FAEConfig, a dict or None, got {type(config).__name__}")
        if image_size is not None:
            cfg.train.image_size = check_image_size(image_size, "image_size")
        if isinstance(cfg.train.image_size, str):
            raise ValueError(f"Fae: train.image_size is {cfg.train.image_size!r} (sized from the data); pass "
                             "image_size=(H, W)")
        cfg.validate()
        size = (int(cfg.train.image_size[0]), int(cfg.train.image_size[1]))
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(size)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.cfg, self.image_size = cfg, size
        n, k = smoothing_for_size(cfg.map, *size)
        self.model = FaeModel(cfg.model, n=n, k=k, error=cfg.map.error)
        self.loss = FaeLoss(cfg, size)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """A pre-processor that only resizes (to ``image_size``, default 256 x 256): no ImageNet normalisation."""
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True)]))

    def on_train_start(self) -> None:
        """Refuses a pre-processor that normalises: the FAE reconstructs images in [0, 1]."""
        transform = getattr(self.pre_processor, "transform", None)
        if transform is not None and any(isinstance(t, Normalize) for t in _transforms(transform)):
            raise ValueError("Fae: the pre-processor normalises the images; the FAE needs them in [0, 1] "
                             "(use Fae.configure_pre_processor(image_size))")

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """The FAE loss of the batch's (normal) images: corruption, then the same-eps noisy-target MSE."""
        del args, kwargs
        loss = self.loss(self.model.net, batch.image, step=self.global_step)
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, logger=True,
                 batch_size=len(batch.image))
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores and maps of the validation batch (the post-processor learns its thresholds from them)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping by norm (``train.grad_clip``) and no sanity validation."""
        return {"gradient_clip_val": float(self.cfg.train.grad_clip), "gradient_clip_algorithm": "norm",
                "num_sanity_val_steps": 0}

    def _total_steps(self) -> int:
        trainer = self._trainer
        total = float(trainer.estimated_stepping_batches) if trainer is not None else float("inf")
        return int(total) if math.isfinite(total) and total > 0 else int(self.cfg.train.steps)

    def configure_optimizers(self):
        """AdamW (weight decay on conv weights only) with fae_fast's warmup + cosine factor, stepped per step."""
        tc = self.cfg.train
        opt = torch.optim.AdamW(_param_groups(self.model.net, float(tc.weight_decay)), lr=float(tc.lr))
        warmup, total = int(tc.warmup_steps), self._total_steps()

        def schedule(i: int) -> float:
            return lr_factor(i, warmup, total)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def to_onnx(self, export_root, model_file_name: str = "model", input_size: tuple[int, int] | None = None,
                **kwargs):
        """anomalib's ONNX export at opset 18 by default: the exporter's lowest (anomalib's default 14 makes it try a
        down-conversion that fails on this graph and logs a traceback)."""
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name=model_file_name, input_size=input_size, **kwargs)

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
