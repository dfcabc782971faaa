"""When to validate, and the validation itself: mIoU of the segmentation head and of CAM + PAR labels.

``Validator`` owns the validation config and its policy: every ``validation.every_epochs`` epochs
(at the epoch's end) and after the last step, when ``validation.data`` names a dataset.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from system.cam import predict_probs
from system.data.stream import eval_loader
from system.metrics import ConfusionMatrix
from system.training import ScheduleConfig, ValidationConfig, cam_labels


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Validator:
    """Validates a DeepSpeed engine's module on every rank; the confusion matrices are merged over ranks."""

    def __init__(
        self,
        cfg: ValidationConfig,
        schedule: ScheduleConfig,
        num_classes: int,
        device: torch.device,
        dtype: torch.dtype,
        rank: int,
        world: int,
    ):
        self.cfg, self.schedule, self.num_classes = cfg, schedule, num_classes
        self.device, self.dtype, self.rank, self.world = device, dtype, rank, world

    def due(self, epoch: int, epoch_end: bool, finished: bool) -> bool:
        """``epoch`` is the epoch of the step just taken."""
        if not self.cfg.data:
            return False
        return finished or (epoch_end and (epoch + 1) % self.cfg.every_epochs == 0)

    def run(self, engine) -> dict:
        """The validation metrics; ``engine`` is back in training mode afterwards."""
        metrics = self._validate(engine.module)
        engine.train()
        return metrics

    @torch.no_grad()
    def _validate(self, model: torch.nn.Module) -> dict:
        """mIoU of the segmentation head and of CAM + PAR labels (``cam_labels``), merged over all ranks.

        Ranks may hold different numbers of validation batches; a rank that has run out keeps making
        dummy forwards until every rank is done, because ZeRO-3 forwards are collective.
        """
        val, device, dtype = self.cfg, self.device, self.dtype
        was_training = model.training
        model.eval()
        seg_cm, cam_cm = ConfusionMatrix(self.num_classes + 1), ConfusionMatrix(self.num_classes + 1)
        batches = iter(eval_loader(val.data, val.batch_size, val.image_size, self.rank, self.world))
        done = 0
        while True:
            batch = None if val.max_batches and done >= val.max_batches else next(batches, None)
            if not _any_rank(batch is not None):
                break
            if batch is None:
                dummy = torch.zeros(1, 3, val.image_size, val.image_size, device=device, dtype=dtype)
                predict_probs(model, dummy, val.scales)
                cam_labels(model, dummy, torch.ones(1, self.num_classes, device=device), self.schedule)
                continue
            images = batch["images"].to(device, dtype)
            labels = batch["labels"].to(device)
            pred = predict_probs(model, images, val.scales).argmax(dim=1)
            seg_cm.add(batch["masks"], pred)
            cam_cm.add(batch["masks"], cam_labels(model, images, labels, self.schedule))
            done += 1
        model.train(was_training)
        states = torch.stack([seg_cm.state(), cam_cm.state()])
        if dist.is_initialized():
            dist.all_reduce(states)
        seg_cm, cam_cm = ConfusionMatrix.from_state(states[0]), ConfusionMatrix.from_state(states[1])
        return {"val_seg_miou": seg_cm.miou(), "val_cam_miou": cam_cm.miou()}
