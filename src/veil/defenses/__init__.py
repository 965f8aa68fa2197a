"""Defenses: detectors and mitigators on two base classes, registered by name.

>>> from veil.defenses import list_defenses
>>> list_defenses()
['activation_clustering', 'autoencoder', 'fine_pruning', 'ftd', 'gradcam', 'jpeg', 'mntd', 'nad', 'neural_cleanse', 'patch_processing', 'spectral_signatures', 'strip']

Input pre-processing: ``jpeg``, ``autoencoder`` (:mod:`veil.defenses.preprocess`). Model inspection:
``mntd`` (:mod:`~veil.defenses.mntd`), ``neural_cleanse`` (:mod:`~veil.defenses.neural_cleanse`), ``fine_pruning``
(:mod:`~veil.defenses.fine_pruning`), ``gradcam`` (:mod:`~veil.defenses.gradcam`). Input filtering:
``strip`` (:mod:`~veil.defenses.strip`), ``ftd`` (:mod:`~veil.defenses.ftd`), ``patch_processing``
(:mod:`~veil.defenses.patch_processing`, vision transformers). Distillation: ``nad``
(:mod:`~veil.defenses.nad`). Training-set filtering: ``spectral_signatures``
(:mod:`~veil.defenses.spectral_signatures`), ``activation_clustering``
(:mod:`~veil.defenses.activation_clustering`).

See :mod:`veil.defenses.base` for the API and :func:`run_defense` for applying one to a run.
"""

from veil.defenses import preprocess as _preprocess  # noqa: F401  (registers jpeg, autoencoder)
from veil.defenses.activation_clustering import ActivationClustering
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
    der,
    load_result,
    register_defense,
    robust_test,
    run_defense,
    transformed_accuracy,
)
from veil.defenses.fine_pruning import FinePruning
from veil.defenses.ftd import FTD
from veil.defenses.gradcam import GradCam
from veil.defenses.mntd import MNTD
from veil.defenses.nad import NAD
from veil.defenses.neural_cleanse import NeuralCleanse
from veil.defenses.patch_processing import PatchProcessing
from veil.defenses.preprocess import AutoencoderDefense, JpegDefense
from veil.defenses.spectral_signatures import SpectralSignatures
from veil.defenses.strip import Strip

__all__ = [
    "DEFENSES",
    "ActivationClustering",
    "AutoencoderDefense",
    "Defense",
    "DefenseConfig",
    "DetectionResult",
    "Detector",
    "FTD",
    "FinePruning",
    "GradCam",
    "JpegDefense",
    "MNTD",
    "MitigationResult",
    "NAD",
    "Mitigator",
    "NeuralCleanse",
    "PatchProcessing",
    "SpectralSignatures",
    "Strip",
    "create_defense",
    "defense_dir",
    "der",
    "evaluate_pipeline",
    "list_defenses",
    "load_result",
    "register_defense",
    "robust_test",
    "run_defense",
    "transformed_accuracy",
]
