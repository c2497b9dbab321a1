"""What lets `sere finetune --resume` continue a run: `finetune_state.pt`, written after every
epoch (weights, optimizer, gradient scaler, random states, the epochs' records), and the log cut
back to the epochs it holds."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sere.errors import SereError
from sere.io.checkpoint import load_checkpoint, save_checkpoint

STATE_NAME = "finetune_state.pt"
STATE_KIND = "sere-finetune-state"


def save_state(path: Path, parts: dict[str, Any], epochs_done: int,
               history: list[dict]) -> None:
    """Write the state after `epochs_done` epochs. `parts` holds "model", "optimizer", "scaler"
    (or None), "shuffle" (the batch order's generator), "config" and "source"."""
    scaler = parts["scaler"]
    save_checkpoint(path, {
        "kind": STATE_KIND, "epochs_done": epochs_done, "history": history,
        "model": {k: v.detach().cpu() for k, v in parts["model"].state_dict().items()},
        "optimizer": parts["optimizer"].state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.get_state(), "shuffle": parts["shuffle"].get_state()},
        "config": parts["config"], "source": parts["source"]})


def restore_state(path: Path, parts: dict[str, Any]) -> tuple[int, list[dict]]:
    """Load the state at `path` into `parts` (as `save_state` names them) and return (epochs
    done, their records); a different configuration or source checkpoint is refused."""
    if not path.is_file():
        raise SereError(f"{path.parent} holds no {STATE_NAME} to resume from (a run saves it "
                        "after each epoch); start without --resume")
    state = load_checkpoint(path)
    if state.get("kind") != STATE_KIND:
        raise SereError(f"{path} is not a fine-tuning state")
    saved, now = state["config"], parts["config"]
    differ = [f"{s}.{k}" for s in now for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    if differ:
        raise SereError(f"{path} was made with other settings ({', '.join(differ[:5])}); "
                        "resume with the settings of the run, or start in another folder")
    if state["source"] != parts["source"]:
        raise SereError(f"{path} fine-tunes {state['source']}, not {parts['source']}; resume "
                        "with the checkpoint it started from")
    parts["model"].load_state_dict(state["model"])
    parts["optimizer"].load_state_dict(state["optimizer"])
    if parts["scaler"] is not None and state["scaler"]:
        parts["scaler"].load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    parts["shuffle"].set_state(rng["shuffle"])
    return int(state["epochs_done"]), list(state["history"])


def cut_log(path: Path, epochs_done: int) -> None:
    """Keep the lines of `finetune.jsonl` of the first `epochs_done` epochs (an interrupted
    epoch's step lines go: it runs again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    path.write_text("".join(f"{line}\n" for line in kept))
