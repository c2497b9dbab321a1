"""Run outputs: metrics as JSON lines, TensorBoard events, and the loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sere.errors import SereError


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard.

    A resumed run first drops the lines past the step it resumes from, so the file reads as one
    uninterrupted run.

    Args:
        folder: the run folder.
        resume_step: the step a resumed run continues from (None for a fresh run).
    """

    def __init__(self, folder: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = folder / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in keep))
        self.tensorboard = SummaryWriter(log_dir=str(folder / "tensorboard"),
                                         purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        """Log `record`, which must hold a `step`."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a `metrics.jsonl` file."""
    path = Path(path)
    if not path.is_file():
        raise SereError(f"{path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LOSS_KEYS = ("loss", "loss_cls", "loss_patch", "loss_spatial", "loss_channel")


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> None:
    """Draw every non-zero loss term (and k-NN top-1, when logged) against the step, one panel
    each, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_records = read_metrics(metrics_path)
    records = [r for r in all_records if "loss" in r]
    keys = [k for k in LOSS_KEYS if any(r.get(k, 0) != 0 for r in records)]
    if not records or not keys:
        return
    knn = [r for r in all_records if "knn_top1" in r]
    panels = [(key, records) for key in keys] + ([("knn_top1", knn)] if knn else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (key, rows) in zip(axes[0], panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1.2,
                marker="o" if key == "knn_top1" else None, ms=3)
        ax.set_title("k-NN top-1 (%)" if key == "knn_top1" else key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
