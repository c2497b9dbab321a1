"""What a fine-tuning run writes into `train.output_dir`.

* `finetune.yaml`: the resolved configuration, written first;
* `finetune.jsonl`: step lines (step, epoch, loss, lr, images/s) every `train.log_every` steps and
  one line per epoch (train loss, lr, test top-1 / top-5 / loss, images/s, elapsed seconds);
* `finetuned.pt`: the classifier (a checksummed checkpoint of kind `sere-finetune`, written
  atomically);
* `result.json`: the `FinetuneResult` fields, the source checkpoint and the configuration;
* `finetune_state.pt`: after every epoch, what `--resume` continues from (`sere.finetune.state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sere.errors import SereError
from sere.finetune.state import STATE_NAME
from sere.runtime.files import atomic_write_bytes

CONFIG_NAME = "finetune.yaml"
LOG_NAME = "finetune.jsonl"
CHECKPOINT_NAME = "finetuned.pt"
RESULTS_NAME = "result.json"  # the one name of every command's result file


@dataclass
class RunLog:
    """The `finetune.jsonl` log of a run: one JSON object per line, appended."""

    path: Path

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one line."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def refuse_used_folder(output_dir: Path) -> None:
    """Raise SereError when `output_dir` holds an earlier fine-tuning run that this one would
    overwrite (`finetuned.pt`, `result.json`, `finetune_state.pt` or a `finetune.jsonl` with
    records), as `sere pretrain` refuses a used folder."""
    log = output_dir / LOG_NAME
    used = [p.name for p in (output_dir / CHECKPOINT_NAME, output_dir / RESULTS_NAME,
                             output_dir / STATE_NAME) if p.is_file()] + ([LOG_NAME] if log.is_file() and log.read_text().strip() else [])
    if used:
        raise SereError(f"{output_dir} already holds a fine-tuning run ({', '.join(used)}); "
                        "continue it with --resume, or start over in another folder "
                        "(train.output_dir=...) or after deleting this one")


def start_run_folder(output_dir: Path, config: dict[str, Any]) -> RunLog:
    """Create the folder, write `finetune.yaml` and start an empty `finetune.jsonl`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    log = RunLog(output_dir / LOG_NAME)
    log.path.write_text("")
    return log


def write_results(path: Path, record: dict[str, Any]) -> None:
    """Write `result.json` atomically; paths in `record` become strings."""
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}
    atomic_write_bytes(path, (json.dumps(plain, indent=2) + "\n").encode())
