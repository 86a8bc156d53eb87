"""Resumable training state in one safetensors file: tensors (model, best weights, optimizer, RNG) plus a JSON
header (epoch, history, optimizer hyperparameters, scheduler, configs) in the file's own metadata.

One file, written atomically, so tensors and state can never disagree after a crash. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tlearn.config import AugmentConfig, BackboneConfig, TlearnError, TrainConfig, validate
from tlearn.configio import from_dict
from tlearn.fileio import atomic_path, require_regular
from tlearn.train import History

log = logging.getLogger("tlearn")
CHECKPOINT_FILE = "checkpoint.safetensors"


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, values in state["state"].items():
        plain["state"][str(idx)] = {}
        for k, v in values.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v
            else:
                plain["state"][str(idx)][k] = v
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)  # "<param index>.<state name>"
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(path: Path, state: dict[str, Any], configs: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """Write the state that ``train.fit`` hands its checkpoint callback, with the run's configs and RNG states."""
    opt_tensors, opt_plain = _split_optimizer(state["optimizer"])
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    tensors |= {f"best.{k}": v for k, v in state["best"]["weights"].items()}
    tensors |= opt_tensors | {f"rng.{k}": v for k, v in rng.items()}
    header = {"stage": state["stage"], "epoch": state["epoch"], "waited": state["waited"],
              "best": {"loss": state["best"]["loss"], "epoch": state["best"]["epoch"]},
              "optimizer": opt_plain, "scheduler": state["scheduler"], "history": state["history"].to_dict(),
              "configs": configs}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "tlearn-checkpoint", "state": json.dumps(header)})


def writer(path: Path, configs: dict[str, Any]):
    """The checkpoint callback of a run: each epoch's state saved to ``path`` with the run's ``configs``, except
    the last (the final save follows; an interrupted save leaves the last epoch's checkpoint)."""
    def checkpoint(state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
        if not state.pop("done"):
            save_checkpoint(path, state, configs, rng)

    return checkpoint


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint back as (state for ``train.fit(resume=...)``, configs, RNG states)."""
    if not path.parent.is_dir():
        raise TlearnError(f"--resume {path.parent}: no such folder; give the --out folder of the interrupted run")
    if not path.is_file():
        raise TlearnError(f"{path.parent} has no {CHECKPOINT_FILE} to resume from: the run finished, or never "
                          "completed an epoch; start it again without --resume")
    try:
        require_regular(path)
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        history = History(**{k: header["history"][k] for k in ("epoch", "history", "stage", "best_epoch")})
        state = {"stage": header["stage"], "epoch": int(header["epoch"]), "waited": int(header["waited"]),
                 "model": part("model."), "optimizer": _join_optimizer(part("optimizer."), header["optimizer"]),
                 "scheduler": header["scheduler"], "history": history,
                 "best": {**header["best"], "weights": part("best.")}}
        configs = header["configs"]
        if not isinstance(configs, dict) or not isinstance(state["stage"], str):
            raise TypeError("the configs or the stage are not what tlearn writes")
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise TlearnError(f"{path} is damaged or incomplete ({type(e).__name__}: {e}); start the run again "
                          "without --resume") from e
    return state, configs, part("rng.")


def resume_configs(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                           tuple[BackboneConfig, TrainConfig, AugmentConfig]]:
    """An interrupted run's checkpoint: its training state, RNG states and (backbone, train, augment) configs,
    checked, with which it resumes."""
    state, configs, rng = load_checkpoint(run_dir / CHECKPOINT_FILE)
    where = str(run_dir / CHECKPOINT_FILE)
    saved = tuple(from_dict(cls, configs.get(name), where) for cls, name in
                  ((BackboneConfig, "backbone"), (TrainConfig, "train"), (AugmentConfig, "augment")))
    validate(*saved)
    log.info(f"resuming {run_dir} after epoch {state['epoch']} of stage {state['stage']}, with its saved settings")
    return state, rng, saved
