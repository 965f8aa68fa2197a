"""A finished run's classifier, rebuilt from its record (``config.json`` and
``model.safetensors``) without its attack: what a reference model or a defense needs, below the
attacks and the training orchestrator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from veil import records as rec
from veil.errors import RecordError
from veil.models import create_model
from veil.models.base import Classifier


def load_classifier(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """The classifier of the finished run ``run_dir`` in eval mode on ``device``, and its recorded config.

    Raises:
        RecordError: the folder is missing, holds no finished run, or its weights do not fit its
            recorded model.
        CheckpointError: the weights file is missing, truncated or corrupted.
    """
    record = rec.RunRecord(run_dir).require()
    config = record.run_config()
    state = record.model_state()  # raises CheckpointError when missing or corrupted
    if "head.weight" not in state:
        raise RecordError(f"{record.path(rec.MODEL)} holds no classifier head")
    num_classes = int(state["head.weight"].shape[0])
    model = create_model(
        config["model"], num_classes=num_classes, image_size=config.get("image_size", 32), width=config.get("width")
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecordError(f"{record.path(rec.MODEL)} does not match model {config['model']!r} ({exc})") from exc
    return model.to(device).eval(), config
