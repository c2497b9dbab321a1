"""The fine-tuning loop: `Finetuner(cfg, checkpoint).run()` trains, tests each epoch, writes.

The run turns the teacher (or student) backbone of a `sere pretrain` checkpoint into a
classifier (`sere.finetune.model`) and trains all of it with AdamW over layer-decay groups
(`sere.finetune.optim`), Mixup / CutMix (`sere.finetune.mixing`), the augmentations of
`sere.finetune.transforms`, optional global gradient-norm clipping (`optim.clip_grad`), and tests
after each epoch (`sere.finetune.evaluate`). What it writes is listed in `sere.finetune.outputs`.
`random_init=True` trains a randomly initialised network of the same shape with the same recipe:
the floor that pretraining should beat.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sere.errors import SereError
from sere.finetune.config import FinetuneConfig, validate_finetune
from sere.finetune.data import build_data, make_loader
from sere.finetune.evaluate import evaluate
from sere.finetune.mixing import build_criterion, build_mixup
from sere.finetune.model import build_classifier
from sere.finetune.optim import LrSchedule, build_optimizer, set_lr
from sere.finetune.outputs import (
    CHECKPOINT_NAME,
    RESULTS_NAME,
    LOG_NAME,
    RunLog,
    refuse_used_folder,
    start_run_folder,
    write_results,
)
from sere.finetune.state import STATE_NAME, cut_log, restore_state, save_state
from sere.io.checkpoint import FINETUNE_KIND, save_checkpoint
from sere.io.weights import load_backbone
from sere.runtime import autocast_context, check_writable, start_compute
from sere.runtime.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a fine-tuning run leaves behind."""

    top1: float  # test top-1 (percent) after the last epoch
    top5: float | None  # None with fewer than 5 classes
    best_top1: float  # the best epoch's test top-1
    best_epoch: int  # 1-based
    epochs: int
    steps: int
    train_images: int
    test_images: int
    num_classes: int
    random_init: bool
    seconds: float
    output_dir: Path
    checkpoint: Path  # finetuned.pt
    results: Path  # result.json
    history: list[dict] = field(default_factory=list)  # the per-epoch records


class Finetuner:
    """Fine-tunes a pretrained backbone (or a random one of its shape) as `cfg` says.

    Args:
        cfg: a validated fine-tuning configuration.
        checkpoint: a `sere pretrain` checkpoint.
        random_init: train a randomly initialised network of the same shape instead.
        which: the checkpoint's "teacher" (default) or "student" backbone.
        resume: continue the run in `train.output_dir` after its last finished epoch
            (`sere.finetune.state`); without it a used folder is refused.
    """

    def __init__(self, cfg: FinetuneConfig, checkpoint: str | Path, random_init: bool = False,
                 which: str = "teacher", resume: bool = False):
        validate_finetune(cfg)
        if not resume:
            refuse_used_folder(Path(cfg.train.output_dir))  # before any work, as pretraining
        self.cfg, self.checkpoint_path, self.random_init = cfg, Path(checkpoint), random_init
        self.resume = resume
        d, o, t = cfg.data, cfg.optim, cfg.train
        compute = start_compute(t.device, t.precision, t.threads)
        self.device, self.precision_choice = compute.device, compute.precision
        self.precision = self.precision_choice.name
        self.pretrained = load_backbone(checkpoint, which)
        pre = self.pretrained.config
        _check_image_size(d.image_size, pre.model.patch_size)
        self.mean, self.std = tuple(pre.data.normalize_mean), tuple(pre.data.normalize_std)
        data = build_data(cfg, pre.model.in_chans, self.mean, self.std)
        self.train_set, self.test_set, self.classes = data.train, data.test, data.classes
        self.num_classes = len(self.classes)
        self.steps_per_epoch = _steps_per_epoch(len(self.train_set), o.batch_size)
        self.schedule = LrSchedule.for_run(o, self.steps_per_epoch)
        self.model = build_classifier(self.pretrained.backbone, self.num_classes, d.image_size,
                                      cfg.model.global_pool, o.drop_path,
                                      pretrained=not random_init, seed=t.seed).to(self.device)
        self.optimizer = build_optimizer(self.model, o)
        self.mixup = build_mixup(o, self.num_classes)
        self.criterion = build_criterion(o, self.mixup)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.output_dir = Path(t.output_dir)
        check_writable(self.output_dir, 8 * sum(p.numel() for p in self.model.parameters()))
        _seed_everything(t.seed)
        self.shuffle = torch.Generator().manual_seed(t.seed)
        self.step = 0

    def lr_at(self, step: int) -> float:
        """The scheduled peak-group lr at `step`: linear warm-up from 0, then cosine."""
        return self.schedule.at(step)

    def prepare_batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Move a batch to the device and mix it: images (B, C, S, S); targets (B,) class ids
        without Mixup / CutMix, else soft (B, classes) rows summing to 1."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            return images, targets
        return images, labels

    def train_step(self, images: Tensor, labels: Tensor) -> float:
        """One optimisation step at the current scheduled lr; returns the loss."""
        set_lr(self.optimizer, self.lr_at(self.step))
        x, targets = self.prepare_batch(images, labels)
        with autocast_context(self.precision, self.device):
            logits = self.model(x)  # (B, classes)
        loss = self.criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise SereError(f"the loss became {float(loss)} at step {self.step}; lower optim.lr, "
                            "set optim.clip_grad (e.g. 1.0) or use train.precision=fp32")
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_and_step(loss)
        self.step += 1
        return loss.item()

    def _backward_and_step(self, loss: Tensor) -> None:
        """Backpropagate `loss`, clip the global gradient norm when asked, and step (through the
        gradient scaler with fp16)."""
        clip = self.cfg.optim.clip_grad
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()

    def run(self) -> FinetuneResult:
        """Train for `optim.epochs`, evaluating after each; write the logs, checkpoint, results."""
        o, workers = self.cfg.optim, self.cfg.train.num_workers
        done, history = self._start_folder()
        log = RunLog(self.output_dir / LOG_NAME)
        what = "random init" if self.random_init else f"{self.checkpoint_path}"
        logger.info(f"fine-tuning {what}: {len(self.train_set)} train / {len(self.test_set)} "
                    f"test images, {self.num_classes} classes, {o.epochs} epochs x "
                    f"{self.steps_per_epoch} steps, peak lr {self.schedule.peak_lr:.2e}, layer "
                    f"decay {o.layer_decay}, {self.device.type}, precision "
                    f"{self.precision_choice}")
        train_loader = make_loader(self.train_set, o.batch_size, True, workers, self.device,
                                   self.shuffle)
        test_loader = make_loader(self.test_set, o.eval_batch_size, False, workers, self.device)
        start = time.perf_counter()
        for epoch in range(done, o.epochs):
            history.append(self._epoch(epoch, train_loader, test_loader, log, start))
            save_state(self.output_dir / STATE_NAME, self._state_parts(), epoch + 1, history)
        seconds = time.perf_counter() - start
        checkpoint = self._save_classifier(history[-1])
        result = self._result(history, seconds, checkpoint)
        write_results(result.results, {**dataclasses.asdict(result),
                                       "source_checkpoint": str(self.checkpoint_path),
                                       "config": self.cfg.to_dict()})
        return result

    def _state_parts(self) -> dict:
        """What `sere.finetune.state` saves and restores."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler,
                "shuffle": self.shuffle, "config": self.cfg.to_dict(),
                "source": "random init" if self.random_init else str(self.checkpoint_path)}

    def _start_folder(self) -> tuple[int, list[dict]]:
        """A fresh folder (0 epochs done), or the resumed run's epochs done and records."""
        if not self.resume:
            start_run_folder(self.output_dir, self.cfg.to_dict())
            return 0, []
        done, history = restore_state(self.output_dir / STATE_NAME, self._state_parts())
        if done >= self.cfg.optim.epochs:
            raise SereError(f"{self.output_dir} has finished all {done} epochs; nothing to "
                            "resume (fine-tune into another train.output_dir for a new run)")
        cut_log(self.output_dir / LOG_NAME, done)
        self.step = done * self.steps_per_epoch
        logger.info(f"resuming {self.output_dir} after epoch {done} (step {self.step})")
        return done, history

    def _epoch(self, epoch: int, train_loader: torch.utils.data.DataLoader,
               test_loader: torch.utils.data.DataLoader, log: RunLog, start: float) -> dict:
        """Train one epoch (a step line every `train.log_every` steps), test, log the epoch."""
        o, log_every = self.cfg.optim, self.cfg.train.log_every
        self.model.train()
        bar = progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{o.epochs}",
                           unit="step", leave=False)
        tick, images, loss_sum, losses = time.perf_counter(), 0, 0.0, 0
        window_tick, window_images = tick, 0
        for x, y in train_loader:
            loss = self.train_step(x, y)
            loss_sum, losses = loss_sum + loss, losses + 1
            images += len(x)
            window_images += len(x)
            now = time.perf_counter()
            rate = window_images / max(now - window_tick, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.1e}",
                            img_s=f"{rate:.0f}")
            if self.step % log_every == 0:
                log.write({"step": self.step, "epoch": epoch + 1, "loss": loss,
                           "lr": self.lr_at(self.step - 1), "images_per_s": rate})
                window_tick, window_images = now, 0
        bar.close()
        train_seconds = time.perf_counter() - tick
        test = evaluate(self.model, test_loader, self.device, self.precision)
        record = {"epoch": epoch + 1, "step": self.step, "train_loss": loss_sum / max(losses, 1),
                  "lr": self.lr_at(self.step - 1), "top1": test.top1, "top5": test.top5,
                  "test_loss": test.loss, "images_per_s": images / max(train_seconds, 1e-9),
                  "elapsed_s": time.perf_counter() - start}
        log.write(record)
        top5 = "" if test.top5 is None else f" (top-5 {test.top5:.1f} %)"
        logger.info(f"epoch {epoch + 1}/{o.epochs}: train loss {record['train_loss']:.3f}, test "
                    f"top-1 {test.top1:.1f} %{top5}, {record['images_per_s']:.0f} img/s")
        return record

    def _save_classifier(self, last: dict) -> Path:
        """Write `finetuned.pt`: the classifier's weights and what is needed to use it."""
        cfg, path = self.cfg, self.output_dir / CHECKPOINT_NAME
        save_checkpoint(path, {
            "kind": FINETUNE_KIND,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "finetune_config": cfg.to_dict(),
            "pretrain_config": self.pretrained.config.to_dict(),
            "source_checkpoint": str(self.checkpoint_path),
            "random_init": self.random_init,
            "classes": list(self.classes),
            "global_pool": cfg.model.global_pool,
            "image_size": cfg.data.image_size,
            "normalize_mean": list(self.mean),
            "normalize_std": list(self.std),
            "epoch": cfg.optim.epochs,
            "step": self.step,
            "top1": last["top1"],
            "top5": last["top5"],
        })
        return path

    def _result(self, history: list[dict], seconds: float, checkpoint: Path) -> FinetuneResult:
        """The run's summary from its per-epoch records."""
        last, best = history[-1], max(history, key=lambda r: r["top1"])
        return FinetuneResult(
            top1=last["top1"], top5=last["top5"], best_top1=best["top1"],
            best_epoch=best["epoch"], epochs=self.cfg.optim.epochs, steps=self.step,
            train_images=len(self.train_set), test_images=len(self.test_set),
            num_classes=self.num_classes, random_init=self.random_init, seconds=seconds,
            output_dir=self.output_dir, checkpoint=checkpoint,
            results=self.output_dir / RESULTS_NAME, history=history)


def _check_image_size(image_size: int, patch: int) -> None:
    """Refuse a `data.image_size` that the checkpoint's patches do not tile."""
    if image_size % patch != 0:
        nearest = max(patch, round(image_size / patch) * patch)
        raise SereError(f"data.image_size = {image_size} is not a multiple of the checkpoint's "
                        f"patch size {patch}; use e.g. data.image_size={nearest}")


def _steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial one is dropped); at least one."""
    steps = train_images // batch_size
    if steps == 0:
        raise SereError(f"{train_images} training images are fewer than "
                        f"optim.batch_size = {batch_size}; lower the batch size or use "
                        "more images (data.max_images)")
    return steps


def _seed_everything(seed: int) -> None:
    """Seed torch, `random` and numpy (RandAugment and Mixup draw from the latter two)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
