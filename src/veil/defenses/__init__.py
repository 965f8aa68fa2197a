"""Defenses: detectors and mitigators on two base classes, registered by name.

>>> from veil.defenses import list_defenses
>>> list_defenses()
['autoencoder', 'jpeg']

See :mod:`veil.defenses.base` for the API and :func:`run_defense` for applying one to a run.
"""

from veil.defenses import preprocess as _preprocess  # noqa: F401  (registers jpeg, autoencoder)
from veil.defenses.base import (
    DEFENSES,
    Defense,
    DefenseConfig,
    DetectionResult,
    Detector,
    MitigationResult,
    Mitigator,
    create_defense,
    defense_dir,
    evaluate_pipeline,
    list_defenses,
    load_result,
    register_defense,
    run_defense,
    transformed_accuracy,
)
from veil.defenses.preprocess import AutoencoderDefense, JpegDefense

__all__ = [
    "DEFENSES",
    "AutoencoderDefense",
    "Defense",
    "DefenseConfig",
    "DetectionResult",
    "Detector",
    "JpegDefense",
    "MitigationResult",
    "Mitigator",
    "create_defense",
    "defense_dir",
    "evaluate_pipeline",
    "list_defenses",
    "load_result",
    "register_defense",
    "run_defense",
    "transformed_accuracy",
]
