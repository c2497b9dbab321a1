"""What `sere import-check` does: a dry run that loads a weights file into the network a
configuration describes and reports what fits, without training anything.

    check = check_import(ImportCheckSettings("dino_deitsmall16_pretrain.pth",
                                             [resolve_config_path("vit_small_ibot_sere")]))
    check.report.table(mapped=True), check.report.backbone_complete
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sere.config import load_config
from sere.errors import SereError
from sere.io.pretrained import LoadReport, load_pretrained_weights
from sere.models.network import SERENetwork


@dataclass
class ImportCheckSettings:
    """What to load into what.

    Args:
        weights: a sere checkpoint or export folder, a timm state dict, a SERE/iBOT/DINO
            checkpoint, or DINOv2/DINOv3 weights (`sere.io.pretrained`).
        config_paths: YAML files, layered in order.
        overrides: `key=value` settings on top (only model.* and data.global_crop_size matter).
        which: the network to read from a checkpoint with both, "teacher" or "student".
        heads: also load the projection and relation heads.
        trust_pickle: allow files holding Python objects besides tensors.
    """

    weights: str | Path
    config_paths: list[str | Path]
    overrides: list[str] = field(default_factory=list)
    which: str = "teacher"
    heads: bool = True
    trust_pickle: bool = False


@dataclass
class ImportCheck:
    """The load report, and the backbone tensors the file lacks."""

    report: LoadReport
    missing_backbone: int  # backbone tensors of the configured model absent from the file

    def refusal(self) -> SereError | None:
        """The error to raise when the backbone is incomplete, else None."""
        if self.report.backbone_complete:
            return None
        return SereError(f"{self.missing_backbone} backbone tensors are missing from "
                         f"{self.report.source}: these weights do not fit the configured model "
                         "(see the table above)")


def check_import(settings: ImportCheckSettings) -> ImportCheck:
    """Load `settings.weights` into the configured student, not strictly, and report."""
    s = settings
    # Only the model is built: a synthetic data source spares the data paths a preset requires,
    # and the file checked is the `init.from` a continuation preset requires (as a JSON string,
    # which YAML reads back as it is).
    cfg = load_config(s.config_paths, ["data.dataset=synthetic",
                                       f"init.from={json.dumps(str(s.weights))}", *s.overrides])
    network = SERENetwork(cfg, is_student=True)
    report = load_pretrained_weights(
        s.weights, network.backbone, network.head if s.heads else None, which=s.which,
        strict=False, trust_pickle=s.trust_pickle,
        relation=network.relation if s.heads else None)
    missing = sum(k.startswith("backbone.vit.") for k in report.missing)
    return ImportCheck(report, missing)
