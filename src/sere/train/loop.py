"""The pretraining loop: student, teacher, losses, schedules, checkpoints, logs."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from sere.config import Config, save_config
from sere.data.datasets import MOSTLY_BAD_MIN_READS
from sere.data.loader import (EpochBatchSampler, build_dataset, build_loader, collate,
                              loader_batches)
from sere.errors import SereError
from sere.io.checkpoint import refuse_earlier_run
from sere.io.pretrained import UntrustedPickle, load_pretrained_weights
from sere.losses.objective import LossTerms
from sere.models.backbone import ViTBackbone, fused_attention_pays
from sere.models.network import NetworkOutputs, build_networks
from sere.runtime import autocast_context, check_writable, start_compute
from sere.runtime import distributed as dist_utils
from sere.runtime.files import remove_leftover_temporaries
from sere.runtime.memory import HEAP_TRIM_EVERY, release_free_heap
from sere.runtime.stop import StopRequest
from sere.runtime.progress import progress_bar
from sere.train.metrics import MetricsWriter, plot_losses
from sere.train.monitor import CollapseStats, collapse_stats
from sere.train.drift import DRIFT_KEYS, DriftMonitor
from sere.train.optim import (build_optimizer, cancel_backbone_gradients,
                              cancel_last_layer_gradients, clip_per_parameter, set_rates)
from sere.train.pretraining import SEREPretraining
from sere.train.sharding import (clip_sharded_per_parameter, load_optimizer_state_by_name,
                                 optimizer_state_by_name, shard_pretraining)
from sere.train.hyperparameters import Schedules
from sere.train.summary import RunPlan, describe_run
from sere.train.sharded_checkpoint import load_sharded_networks, save_sharded_run
from sere.train.state import (RunState, checkpoint_size, checkpoint_state, resume_run,
                              run_record, save_run)

logger = logging.getLogger(__name__)


# A periodic evaluation of the teacher's backbone (`eval.knn_every`), run on rank 0: it gets the
# backbone, the device and the step, prints what it wants and returns metrics to log. The
# command builds it (sere.eval.knn_accuracy.periodic_knn): training never imports evaluation.
PeriodicEval = Callable[[ViTBackbone, torch.device, int], dict[str, float]]


@dataclass
class StepOutput:
    """What one optimisation step gives back."""

    terms: LossTerms  # the loss terms of the last micro-batch
    teacher: NetworkOutputs  # the teacher's outputs of the last micro-batch


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    output_dir: Path
    step: int  # optimisation steps done
    checkpoint: Path  # the final checkpoint
    last_losses: dict[str, float]
    preempted: bool = False  # stopped early by SIGTERM / SIGUSR1


class Pretrainer:
    """Runs SERE pretraining as the configuration says.

    Args:
        cfg: a validated configuration.
        resume: None for a fresh run, a checkpoint path, or "auto" for the newest valid
            checkpoint in `cfg.train.output_dir` (a fresh run when there is none).
    """

    def __init__(self, cfg: Config, resume: str | None = None,
                 evaluate: PeriodicEval | None = None):
        self.cfg = cfg
        if cfg.eval.knn_every is not None and evaluate is None:
            raise SereError("eval.knn_every needs a k-NN evaluation: run `sere pretrain`, or pass "
                            "evaluate=sere.eval.knn_accuracy.periodic_knn(cfg) to Pretrainer")
        self.evaluate = evaluate
        self.drift = (DriftMonitor(cfg.eval.drift_margin)
                      if evaluate is not None and cfg.eval.knn_every is not None
                      and cfg.eval.drift_margin is not None else None)
        self._start_runtime()
        if resume is None:  # a fresh run never overwrites another one
            refuse_earlier_run(self.output_dir)
        self._build_data()
        self._build_networks()
        self._build_optimisation()
        self.step = 0
        self.skipped_images: list[str] = []
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.images_read = 0  # files read by this process, decodable or not
        resumed_from = self._resume(resume) if resume else None
        if resumed_from is None and cfg.init.from_:
            self._init_from(cfg.init.from_)
        self._wrap_networks()
        if resumed_from is not None and resumed_from.is_dir():  # sharded: each its part
            load_sharded_networks(resumed_from, self.run_state)
        self.metrics = None
        if self.dist.is_main:
            remove_leftover_temporaries(self.output_dir)  # of a process killed mid-write
            save_config(cfg, self.output_dir / "config.yaml")
            self.metrics = MetricsWriter(self.output_dir,
                                         resume_step=self.step if resumed_from else None)
            for line in describe_run(self.plan()):
                logger.info(line)

    def plan(self) -> RunPlan:
        """What this run is about to do (its first lines)."""
        return RunPlan(
            images=len(self.dataset), source_images=len(self.dataset.source),
            skipped=len(set(self.skipped_images)), classes=self.dataset.source.classes,
            steps_per_epoch=self.steps_per_epoch, planned_steps=self.schedules.total_steps,
            max_steps=self.cfg.train.max_steps, start_step=self.step, device=str(self.device),
            precision=self.precision_choice, threads=torch.get_num_threads(),
            workers=self.cfg.data.num_workers, world_size=self.dist.world_size)

    def _start_runtime(self) -> None:
        """Device, precision and the process group."""
        cfg = self.cfg
        compute = start_compute(cfg.train.device, cfg.train.precision, cfg.train.threads)
        self.device, self.precision_choice = compute.device, compute.precision
        self.precision = self.precision_choice.name
        self.dist = dist_utils.init_distributed(self.device.type)
        if cfg.train.parallel == "fsdp":
            self._check_can_shard()
        if self.dist.world_size > 1:
            self._check_same_config()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.output_dir = Path(cfg.train.output_dir)

    def _build_data(self) -> None:
        """The multi-crop data set, its sampler and the schedules that follow from its size."""
        cfg = self.cfg
        where = cfg.data.photometric_on
        self.dataset = build_dataset(cfg, defer_photometric=where == "device" or (
            where == "auto" and self.device.type == "cuda"))
        self.sampler = EpochBatchSampler(len(self.dataset), cfg.optim.batch_size, self.dist.rank,
                                         self.dist.world_size, cfg.train.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.optim.accum_steps
        if self.steps_per_epoch == 0:
            raise SereError("fewer batches per epoch than optim.accum_steps; lower accum_steps")
        self.schedules = Schedules(cfg, self.steps_per_epoch, self.dist.world_size)
        self.total_steps = self.schedules.total_steps
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def _build_networks(self) -> None:
        """The pretraining object (student and teacher on the device, the same initial weights
        on every rank), then the per-rank random state (drop path)."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        nets = build_networks(cfg)
        seed = cfg.train.seed + self.dist.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if self.dist.is_main:
            check_writable(self.output_dir, checkpoint_size(nets.student, nets.teacher))
        self.pretraining = SEREPretraining(cfg, nets, self.device)
        self.student, self.teacher = self.pretraining.student, self.pretraining.teacher
        self.loss_fn = self.pretraining.loss
        fused = fused_attention_pays(self.device, self.precision)
        self.student.backbone.set_fused_attention(fused)
        self.teacher.backbone.set_fused_attention(fused)

    def _build_optimisation(self) -> None:
        """Optimizer and gradient scaler."""
        self.optimizer = build_optimizer(self.student, layer_decay=self.cfg.optim.layer_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.run_state = RunState(self.cfg, self.pretraining, self.optimizer, self.scaler)

    def _wrap_networks(self) -> None:
        """torch.compile and DistributedDataParallel, or FSDP2's sharding, as configured."""
        if self.cfg.train.parallel == "fsdp":
            resumed = optimizer_state_by_name(self.student, self.optimizer) if (
                self.optimizer.state) else None
            shard_pretraining(self.pretraining, self.precision)
            self._build_optimisation()  # over the sharded parameters
            if resumed is not None:
                load_optimizer_state_by_name(self.student, self.optimizer, resumed)
            self.model = self.student
            return
        if self.cfg.train.compile:
            self.student.compile()
            self.teacher.compile()
        self.model = (DistributedDataParallel(self.student, device_ids=[self.dist.local_rank]
                                              if self.device.type == "cuda" else None)
                      if self.dist.world_size > 1 else self.student)
        self.pretraining.wrap_student(self.model)

    def _check_can_shard(self) -> None:
        """`train.parallel=fsdp` needs several processes, and no fp16 gradient scaler (its
        overflow check would see one shard per process; docs/many-gpus.md#sharded-training)."""
        if self.dist.world_size == 1:
            raise SereError("train.parallel=fsdp shards the networks over several processes, "
                            "and this is one; start it with torchrun --nproc-per-node N (N >= 2) "
                            "or use train.parallel=ddp")
        if self.precision == "fp16":
            raise SereError("train.parallel=fsdp does not run in fp16 (a gradient scaler per "
                            "shard); use train.precision=bf16 or fp32")

    # -----------------------------------------------------------------------------------------

    def _check_same_config(self) -> None:
        configs = dist_utils.all_gather_objects(self.cfg.to_dict())
        if any(c != configs[0] for c in configs):
            raise SereError("processes were started with different configurations; start every "
                            "rank with the same files and overrides")

    def _resume(self, resume: str) -> Path | None:
        resumed = resume_run(resume, self.output_dir, self.run_state, self.dist.rank,
                             self.dist.world_size)
        if resumed is None:
            return None
        self.step = resumed.step
        self.skipped_images = resumed.skipped_images
        return resumed.path

    def _init_from(self, path: str) -> None:
        """Load published or earlier weights into the student; the teacher starts as a copy.
        With `init.head` the projection and relation heads load too; what the file lacks stays
        freshly initialised and is listed as missing in the report."""
        init = self.cfg.init
        try:
            report = load_pretrained_weights(path, self.student.backbone,
                                             self.student.head if init.head else None,
                                             which=init.which, trust_pickle=init.trust_pickle,
                                             relation=self.student.relation if init.head else None)
        except UntrustedPickle as err:
            raise err.advice("pass init.trust_pickle=true") from None
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)
        if self.dist.is_main:
            logger.info(f"initialised from {path}:\n{report.table()}")

    def checkpoint_state(self) -> dict:
        """Everything the run depends on (RNG states of every rank included)."""
        return checkpoint_state(self.run_state, self.step, self.steps_per_epoch,
                                self.skipped_images)

    @property
    def writes_sharded_checkpoints(self) -> bool:
        """Whether this run writes sharded checkpoints (`train.checkpoint`; auto: with fsdp)."""
        kind = self.cfg.train.checkpoint
        return kind == "sharded" or (kind == "auto" and self.cfg.train.parallel == "fsdp")

    def save(self) -> Path:
        """Write `checkpoint-<step>.pt` and `last.pt` (rank 0), or every process its part of
        `checkpoint-<step>.dcp`; prune old ones. Returns the newest checkpoint."""
        train = self.cfg.train
        if self.writes_sharded_checkpoints:
            record = run_record(self.run_state, self.step, self.steps_per_epoch,
                                self.skipped_images)
            return save_sharded_run(self.output_dir, self.run_state, record, train.keep_last,
                                    train.keep_every, self.dist.is_main)
        return save_run(self.output_dir, self.checkpoint_state(), train.keep_last,
                        train.keep_every, self.dist.is_main)

    # -----------------------------------------------------------------------------------------

    def _loader(self, epoch: int, start_batch: int) -> torch.utils.data.DataLoader:
        """The loader of `epoch` from its batch `start_batch` on. Its iterator draws one number
        (the workers' base seed) when it starts: from torch's global generator at an epoch's
        start, as in a run never interrupted; resumed mid-epoch, from a generator of its own,
        so that the global one (drop path) goes on as the checkpoint left it."""
        self.sampler.set_epoch(epoch, start_batch)
        own = torch.Generator().manual_seed(self.cfg.train.seed + epoch) if start_batch else None
        return build_loader(self.dataset, workers=self.cfg.data.num_workers,
                            batch_sampler=self.sampler, collate_fn=collate,
                            pin_memory=self.device.type == "cuda", generator=own)

    def _batches(self):
        """Micro-batches from the current step on, across epochs, forever."""
        accum = self.cfg.optim.accum_steps
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        start_batch = in_epoch * accum
        while True:
            yield from loader_batches(self._loader(epoch, start_batch))
            epoch, start_batch = epoch + 1, 0

    def train_step(self, micro_batches: list) -> StepOutput:
        """One optimisation step over `accum_steps` micro-batches.

        A non-finite loss on any rank stops the run (`train.on_nonfinite=stop`) or skips the
        whole step on every rank (`skip`): no update, no EMA, no center change.
        """
        cfg = self.cfg
        values = self.schedules.at(self.step)
        set_rates(self.optimizer, values.lr, values.weight_decay)
        teacher_outs = []
        for i, batch in enumerate(micro_batches):
            batch = self.dataset.finish_batch(batch.to(self.device))
            with autocast_context(self.precision, self.device):
                out = self.pretraining.forward_backward(
                    batch, values.teacher_temp, values.teacher_patch_temp, len(micro_batches),
                    sync=i == len(micro_batches) - 1, scaler=self.scaler)
            if not out.finite:
                return StepOutput(self._nonfinite(out.terms), out.teacher)
            teacher_outs.append(out.teacher)
            terms = out.terms
        self.pretraining.update_centers(*teacher_outs)
        self.nonfinite_in_a_row = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.clip_grad > 0:
            clip = (clip_sharded_per_parameter if cfg.train.parallel == "fsdp"
                    else clip_per_parameter)
            clip(self.trainable, cfg.optim.clip_grad)
        if self.step // self.steps_per_epoch < cfg.optim.freeze_last_layer:
            cancel_last_layer_gradients(self.student)
        if self.step < cfg.optim.freeze_backbone_steps:
            cancel_backbone_gradients(self.student)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pretraining.update_teacher(values.momentum)
        self.step += 1
        return StepOutput(terms, teacher_outs[-1])

    def _nonfinite(self, terms: LossTerms) -> LossTerms:
        """Skip this step, or stop the run with a note, as `train.on_nonfinite` says."""
        self.optimizer.zero_grad(set_to_none=True)
        bad = {k: v for k, v in terms.as_floats().items() if not math.isfinite(v)}
        self.nonfinite_in_a_row += 1
        self.nonfinite_steps += 1
        limit = self.cfg.train.max_nonfinite
        if self.cfg.train.on_nonfinite == "skip" and self.nonfinite_in_a_row < limit:
            logger.warning(f"warning: non-finite loss at step {self.step} {bad}; step skipped")
            self.step += 1
            return terms
        why = ("" if self.cfg.train.on_nonfinite == "stop"
               else f" ({self.nonfinite_in_a_row} steps in a row, train.max_nonfinite={limit})")
        message = (f"non-finite loss at step {self.step}{why}: {bad}. The last checkpoint is "
                   "untouched; lower optim.lr, raise optim.warmup_epochs, or use fp32/bf16, "
                   "then resume with --resume auto")
        if self.dist.is_main:
            (self.output_dir / "STOPPED_NONFINITE.txt").write_text(message + "\n")
        raise SereError(message)

    def run(self) -> RunResult:
        """Train to the end (or `train.max_steps`), checkpointing and logging on the way.

        SIGTERM or SIGUSR1 end the run early, after the current step, with a checkpoint.
        """
        cfg = self.cfg
        images_per_step = cfg.optim.batch_size * self.dist.world_size * cfg.optim.accum_steps
        self._start_drift()
        batches = self._batches()
        bar = progress_bar(total=self.total_steps, initial=self.step, disable=not self.dist.is_main,
                   unit="step", dynamic_ncols=True, desc="pretrain")
        last_losses: dict[str, float] = {}
        stop = StopRequest().install()
        tick, tick_step = time.perf_counter(), self.step
        try:
            preempted = self._loop(batches, bar, stop, images_per_step, tick, tick_step,
                                   last_losses)
        finally:
            stop.uninstall()
            bar.close()
            batches.close()  # DataLoader workers stop now, whatever ended the loop
        last_checkpoint = self.save()
        if preempted:
            if self.dist.is_main:
                logger.info(f"stopped by {stop.signal_name or 'a signal'} at step {self.step}; "
                            f"checkpoint {last_checkpoint}. Continue with the same command and "
                      "--resume auto")
            if self.metrics is not None:
                self.metrics.close()
        else:
            self._finish()
        return RunResult(self.output_dir, self.step, last_checkpoint, last_losses, preempted)

    def _loop(self, batches, bar, stop: StopRequest, images_per_step: int, tick: float,
              tick_step: int, last_losses: dict[str, float]) -> bool:
        """Steps until the end or a stop signal; returns True when stopped by a signal."""
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        while self.step < self.total_steps:
            micro = [next(batches) for _ in range(accum)]
            for b in micro:
                self.skipped_images.extend(b.skipped)
                self.images_read += b.size + len(b.skipped)
            self._check_mostly_bad()
            out = self.train_step(micro)
            bar.update(1)
            if self.step % HEAP_TRIM_EVERY == 0:
                release_free_heap()  # RSS stays flat over long runs (sere.runtime.memory)
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - tick
                rate = images_per_step * (self.step - tick_step) / max(elapsed, 1e-9)
                tick, tick_step = time.perf_counter(), self.step
                last_losses.update(dist_utils.mean_over_processes(out.terms.as_floats()))
                stats = self._collapse_stats(out.teacher)
                self._log({**last_losses, **stats.as_metrics()}, rate)
                postfix = dict(loss=f"{last_losses['loss']:.3f}", img_s=f"{rate:.0f}")
                warnings = stats.warnings()
                if warnings:
                    postfix["warn"] = "collapse?"
                    if self.dist.is_main:
                        logger.warning(f"warning at step {self.step}: {'; '.join(warnings)}")
                bar.set_postfix(**postfix)
            if self._eval_due():
                self._periodic_eval()
            if stop.agreed(self.device):
                return self.step < self.total_steps
            if self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save()
        return False

    def _eval_due(self) -> bool:
        every = self.cfg.eval.knn_every
        return every is not None and (self.step % every == 0 or self.step == self.total_steps)

    def _periodic_eval(self) -> None:
        """The periodic evaluation of the teacher (rank 0; the others wait), logged, with its
        drift from the starting weights when the drift monitor is on."""
        if self.dist.is_main:
            values = self.evaluate(self.teacher.backbone, self.device, self.step)
            if self.drift is not None and self.drift.start:
                report = self.drift.check(self.step, values)
                values = {**values, **report.as_metrics()}
                logger.info(report.line())
                for warning in report.warnings():
                    logger.warning(f"warning at step {self.step}: {warning}")
            self.metrics.write({"step": self.step, **values})
        dist_utils.barrier()

    def _start_drift(self) -> None:
        """The drift monitor's reference (rank 0; the others wait): the evaluation of the
        starting weights at step 0 (logged as step 0), or a resumed run's step-0 record."""
        if self.drift is None:
            if self.cfg.eval.drift_margin is not None and self.dist.is_main:
                logger.info("drift monitor off: it runs with the periodic k-NN; set "
                            "eval.knn_every (and, for an image folder, eval.knn_train_path and "
                            "eval.knn_test_path)")
            return
        if self.dist.is_main:
            self._drift_reference()
        dist_utils.barrier()

    def _drift_reference(self) -> None:
        if self.step == 0:
            values = self.evaluate(self.teacher.backbone, self.device, 0)
            self.metrics.write({"step": 0, **values})
            self.drift.set_start(values)
        elif not self.drift.start_from_metrics(self.output_dir / "metrics.jsonl"):
            logger.warning("warning: metrics.jsonl holds no step-0 evaluation, so the drift "
                           "monitor has nothing to compare with and stays off")
            return
        logger.info("drift monitor: starting " + ", ".join(
            f"{DRIFT_KEYS[k]} {v:.1f}" for k, v in self.drift.start.items()))

    def _check_mostly_bad(self) -> None:
        """Stop when more than half of the files read so far could not be decoded (judged after
        64 reads, or after one pass over a smaller folder)."""
        bad = len(self.skipped_images)
        enough = min(MOSTLY_BAD_MIN_READS, len(self.dataset))
        if self.images_read >= enough and bad > 0.5 * self.images_read:
            listing = self.output_dir / "skipped_images.txt"
            if self.dist.is_main:
                listing.write_text("\n".join(sorted(set(self.skipped_images))) + "\n")
            raise SereError(f"{bad} of the first {self.images_read} image files could not be "
                            f"decoded (listed in {listing}); the data folder looks mostly bad. "
                            "Fix or remove them and start again")

    def _collapse_stats(self, teacher: NetworkOutputs) -> CollapseStats:
        glob = teacher.globals
        return collapse_stats(glob.cls_logits, self.loss_fn.distillation.center,
                              self.schedules.at(self.step - 1).teacher_temp, glob.backbone.cls,
                              glob.spatial_map, self.student.backbone.num_heads,
                              self.cfg.loss.tau_spatial)

    def _log(self, losses: dict[str, float], rate: float) -> None:
        if self.metrics is None:
            return
        values = self.schedules.at(self.step - 1)
        self.metrics.write({
            "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, **losses,
            "lr": values.lr, "weight_decay": values.weight_decay, "momentum": values.momentum,
            "teacher_temp": values.teacher_temp, "teacher_patch_temp": values.teacher_patch_temp,
            "images_per_second": rate, "skipped_images": len(set(self.skipped_images)),
            "nonfinite_steps": self.nonfinite_steps,
        })

    def _finish(self) -> None:
        skipped = [p for rank in dist_utils.all_gather_objects(self.skipped_images) for p in rank]
        if self.metrics is not None:
            self.metrics.close()
            plot_losses(self.output_dir / "metrics.jsonl", self.output_dir / "losses.png")
            if skipped:
                unique = sorted(set(skipped))
                (self.output_dir / "skipped_images.txt").write_text("\n".join(unique) + "\n")
                logger.info(f"skipped {len(unique)} unreadable images; listed in "
                            f"{self.output_dir / 'skipped_images.txt'}")
