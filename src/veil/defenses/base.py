"""The defense API: detectors and mitigators on two base classes, registered by name.

A defense reads a finished run (:func:`veil.runs.load_run`: the trained model, the attack
with its trigger, the run's data) and returns a frozen result:

* a :class:`Mitigator` (input pre-processing such as JPEG or an autoencoder, fine-pruning, ...)
  returns a :class:`MitigationResult`: clean accuracy and attack success rate after the defense,
  the undefended values on the same test set, and optionally a curve over the defense's strength;
* a :class:`Detector` (Neural Cleanse, STRIP, ...) returns a :class:`DetectionResult`: whether the
  model or the inputs were flagged, a score and threshold, and detection metrics.

:func:`run_defense` does the plumbing shared by every defense: it loads the run, builds the test
set, runs the defense and writes ``RUN/defenses/NAME/result.json``. Defenses write their figures and
tables under ``RUN/defenses/NAME/figures/*.png`` and ``RUN/defenses/NAME/tables/*.json`` (the HTML
report embeds both).

Adding a defense::

    @register_defense("my_defense")
    class MyDefense(Mitigator):
        @dataclass(frozen=True)
        class Config(DefenseConfig):
            strength: float = 1.0

        def run(self, loaded, train, test, out_dir):
            ...
            return MitigationResult(defense=self.name, clean_accuracy=..., attack_success_rate=...)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from veil.data.base import ImageDataset, to_float
from veil.errors import ConfigError, RecordError
from veil.inference import module_device
from veil.metrics import accuracy
from veil.records import FolderLock, atomic_write_json, read_json
from veil.registry import Registry

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)

DEFENSES: Registry[type[Defense]] = Registry("defense")
RESULT_FILE = "result.json"


def register_defense(name: str):  # type: ignore[no-untyped-def]
    """Class decorator: register a :class:`Detector` or :class:`Mitigator` subclass under ``name``."""

    def decorator(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        return DEFENSES.register(name)(cls)

    return decorator


# ---------------------------------------------------------------------- results
def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples to lists, tensors and numpy scalars to Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


@dataclass(frozen=True)
class MitigationResult:
    """What a mitigator achieved on a run.

    Attributes:
        defense: the defense's registered name.
        clean_accuracy: clean test accuracy of the defended pipeline, in [0, 1].
        attack_success_rate: share of triggered non-target test inputs classified as the target
            by the defended pipeline, in [0, 1].
        original_clean_accuracy, original_attack_success_rate: the same without the defense, on the
            same test set (``None`` if not measured).
        robust_accuracy, original_robust_accuracy: share of the same triggered inputs classified as
            their true label, after and before the defense (``None`` if not measured).
        curve: points of a sweep over the defense's strength, one dict each (e.g.
            ``{"quality": 90, "clean_accuracy": ..., "attack_success_rate": ...}``).
        extra: defense-specific numbers and settings.
        config: the defense's options.
        run: the run folder the defense was applied to.
        seconds: wall time of the defense.
    """

    defense: str
    clean_accuracy: float
    attack_success_rate: float
    original_clean_accuracy: float | None = None
    original_attack_success_rate: float | None = None
    robust_accuracy: float | None = None
    original_robust_accuracy: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run: str | None = None
    seconds: float | None = None

    kind: ClassVar[str] = "mitigation"

    @property
    def defense_effectiveness_rate(self) -> float | None:
        """BackdoorBench's defense effectiveness rate (Wu et al., NeurIPS 2022 Datasets and
        Benchmarks): ``(max(0, ASR drop) - max(0, clean-accuracy drop) + 1) / 2``, in ``[0, 1]``
        (0.5: nothing changed); ``None`` without the undefended figures."""
        if self.original_clean_accuracy is None or self.original_attack_success_rate is None:
            return None
        return der(self.original_clean_accuracy, self.original_attack_success_rate, self.clean_accuracy,
                   self.attack_success_rate)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (``kind`` and the defense effectiveness rate included)."""
        return {"kind": self.kind, **_plain(dataclasses.asdict(self)),
                "defense_effectiveness_rate": self.defense_effectiveness_rate}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MitigationResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        """One line: accuracy and ASR after (and before) the defense."""

        def pair(now: float, before: float | None) -> str:
            return f"{now:.4f}" + (f" (was {before:.4f})" if before is not None else "")

        text = (
            f"clean accuracy {pair(self.clean_accuracy, self.original_clean_accuracy)}  "
            f"attack success rate {pair(self.attack_success_rate, self.original_attack_success_rate)}"
        )
        if self.robust_accuracy is not None:
            text += f"  robust accuracy {pair(self.robust_accuracy, self.original_robust_accuracy)}"
        if self.defense_effectiveness_rate is not None:
            text += f"  DER {self.defense_effectiveness_rate:.4f}"
        return text


def der(clean_before: float, asr_before: float, clean_after: float, asr_after: float) -> float:
    """The defense effectiveness rate of BackdoorBench: ``(max(0, asr_before - asr_after) -
    max(0, clean_before - clean_after) + 1) / 2``; ``nan`` when a figure is ``nan``."""
    figures = (clean_before, asr_before, clean_after, asr_after)
    if any(v is None or v != v for v in figures):
        return float("nan")
    return (max(0.0, asr_before - asr_after) - max(0.0, clean_before - clean_after) + 1.0) / 2.0


@dataclass(frozen=True)
class DetectionResult:
    """What a detector found.

    Attributes:
        defense: the defense's registered name.
        detected: whether the model (model-level detectors such as Neural Cleanse) or the input set
            (input-level detectors such as STRIP) was flagged as backdoored.
        score: the detector's statistic (e.g. Neural Cleanse's anomaly index), if it has one.
        threshold: the value ``score`` is compared against.
        flagged: flagged labels (model-level) or flagged input rows (input-level).
        metrics: detection quality where ground truth is known (e.g. ``{"frr": ..., "far": ...,
            "auroc": ...}``).
        curve, extra, config, run, seconds: as in :class:`MitigationResult`.
    """

    defense: str
    detected: bool
    score: float | None = None
    threshold: float | None = None
    flagged: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run: str | None = None
    seconds: float | None = None

    kind: ClassVar[str] = "detection"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectionResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        text = "backdoor detected" if self.detected else "no backdoor detected"
        if self.score is not None:
            text += f"  score {self.score:.4f}" + (f" (threshold {self.threshold:.4f})" if self.threshold is not None else "")
        if self.flagged:
            shown = ", ".join(str(v) for v in self.flagged[:10]) + (", ..." if len(self.flagged) > 10 else "")
            text += f"  flagged {shown}" if len(self.flagged) <= 10 else f"  flagged {len(self.flagged)}: {shown}"
        known = [(k, self.metrics[k]) for k in ("tpr", "fpr", "frr", "far", "auroc") if k in self.metrics]
        if known:
            text += "  " + " ".join(f"{k.upper()} {v:.4f}" for k, v in known)
        return text


DefenseResult = MitigationResult | DetectionResult


def load_result(path: str | Path) -> DefenseResult:
    """Read a ``result.json`` written by :func:`run_defense` back into its result type."""
    data = read_json(path)
    cls = {"mitigation": MitigationResult, "detection": DetectionResult}.get(data.get("kind"))
    if cls is None:
        raise ConfigError(f"{path} is not a defense result (kind {data.get('kind')!r})")
    return cls.from_dict(data)


# ---------------------------------------------------------------------- defenses
@dataclass(frozen=True)
class DefenseConfig:
    """Options every defense shares (none yet); each defense's ``Config`` derives from it."""


class Defense:
    """Base of :class:`Detector` and :class:`Mitigator`.

    Args:
        config: an instance of ``type(self).Config`` (defaults when ``None``).
        progress: show progress bars on long work.
    """

    name: ClassVar[str] = "defense"
    kind: ClassVar[str] = "defense"
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig
    #: options that say only where reusable work is kept (MNTD's shadows, FTD's detector), not
    #: what is computed: a result made with other values of them still answers the same question
    STORAGE_OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DefenseConfig | None = None, progress: bool = True) -> None:
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.progress = progress

    @classmethod
    def from_options(cls, progress: bool = True, **options: Any) -> Defense:
        """Build from keyword options, ignoring ``None`` values and refusing unknown names."""
        from veil.options import build_options

        config = build_options("defense", cls.name, cls.Config, options)
        return cls(config, progress=progress)

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DefenseResult:
        """Apply the defense to a loaded run.

        Args:
            loaded: the run (model in eval mode on the device to use, attack with its trigger).
            train: the run's clean training set (the defender's clean data).
            test: the clean test set to evaluate on.
            out_dir: folder for the defense's figures (``figures/*.png``), tables
                (``tables/*.json``) and any cached state; :func:`run_defense` writes
                ``result.json`` there.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, **_plain(dataclasses.asdict(self.config))}

    def describe_work(self) -> dict[str, Any]:
        """:meth:`describe` without the :attr:`STORAGE_OPTIONS`: what decides the result."""
        return {k: v for k, v in self.describe().items() if k not in self.STORAGE_OPTIONS}

    @classmethod
    def not_applicable(cls, model: nn.Module) -> str | None:
        """Why this defense cannot run on ``model`` (e.g. a ViT-only defense on a CNN), or
        ``None`` when it can; the stealth card (:mod:`veil.defenses.card`) skips it then."""
        return None


class Detector(Defense):
    """A defense that flags backdoored models or triggered inputs; :meth:`run` returns a
    :class:`DetectionResult`."""

    kind = "detector"

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        raise NotImplementedError


class Mitigator(Defense):
    """A defense that removes or disables a backdoor (pre-processing the inputs or repairing the
    model); :meth:`run` returns a :class:`MitigationResult`."""

    kind = "mitigator"

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> MitigationResult:
        raise NotImplementedError


def create_defense(name: str, progress: bool = True, **options: Any) -> Defense:
    """Create a registered defense, e.g. ``create_defense("jpeg", quality=80)``.

    Raises:
        ConfigError: unknown name, unknown option, or an invalid option value.
    """
    return DEFENSES.get(name).from_options(progress=progress, **options)


def list_defenses(kind: str | None = None) -> list[str]:
    """Registered defense names (``kind``: ``"detector"`` or ``"mitigator"`` to filter)."""
    return [n for n in DEFENSES.names() if kind is None or DEFENSES.get(n).kind == kind]


# ---------------------------------------------------------------------- shared evaluation
Transform = Callable[[Tensor], Tensor]


@torch.no_grad()
def transformed_accuracy(
    model: nn.Module, data: ImageDataset, transform: Transform | None = None, batch_size: int = 512
) -> float:
    """Accuracy of ``model`` on ``data`` after ``transform`` (a float ``[0, 1]`` batch -> batch
    function applied on the model's device); ``nan`` for an empty set.

    With ``data`` = the attack's poisoned test set (:meth:`veil.attacks.Attack.poison_test`: triggered
    non-target images labelled with the target) this is the attack success rate.
    """
    from veil.train import predict

    if len(data) == 0:
        return float("nan")
    if transform is None:
        return accuracy(predict(model, data.images, batch_size=batch_size), data.labels)
    dev = module_device(model)
    preds = []
    for i in range(0, len(data), batch_size):
        xb = transform(to_float(data.images[i : i + batch_size].to(dev)))
        preds.append(predict(model, xb, batch_size=batch_size))
    return accuracy(torch.cat(preds), data.labels)


def evaluate_pipeline(
    model: nn.Module, test: ImageDataset, poisoned_test: ImageDataset, transform: Transform | None = None
) -> tuple[float, float]:
    """(clean accuracy, attack success rate) of ``model`` behind ``transform``."""
    return transformed_accuracy(model, test, transform), transformed_accuracy(model, poisoned_test, transform)


def robust_test(attack: Any, dataset: ImageDataset, poisoned: ImageDataset) -> ImageDataset:
    """``poisoned`` (``attack.poison_test(dataset)``: the triggered non-target images of ``dataset``,
    labelled with the target) labelled with the images' true labels instead: accuracy on it is the
    robust accuracy (triggered inputs classified as their true label).

    Raises:
        ConfigError: ``poisoned`` is not ``attack.poison_test(dataset)`` (its length differs).
    """
    keep = dataset.labels != attack.target_labels(dataset.labels)
    labels = dataset.labels[keep]
    if labels.numel() != len(poisoned):
        raise ConfigError(f"the triggered set has {len(poisoned)} images, but {dataset.name} has {labels.numel()} "
                          "non-target images: pass attack.poison_test(dataset)")
    return ImageDataset(poisoned.images, labels.clone(), poisoned.classes, dataset.name + "-triggered-true-labels",
                        poisoned.hflip)


# ---------------------------------------------------------------------- runner
def defense_dir(run_dir: str | Path, name: str) -> Path:
    """``RUN/defenses/NAME``."""
    return Path(run_dir) / "defenses" / name


def run_defense(
    name: str,
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    data_root: str | None = None,
    cache_dir: str | None = None,
    test_subset: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> DefenseResult:
    """Apply a registered defense to a finished run and record the result.

    Args:
        name: registered defense name (:func:`list_defenses`).
        run_dir: the run folder.
        device: where the model (and anything the defense trains) runs.
        data_root: dataset folder, overriding the one recorded in the run.
        cache_dir: decoded-dataset cache, overriding the run's.
        test_subset: evaluate on a stratified subset of this many test images (seeded with the
            run's seed), for quick looks.
        out_dir: where to write (default ``RUN/defenses/NAME``).
        progress: progress bars.
        **options: the defense's options (see its ``Config``); ``None`` values are ignored.

    Returns:
        The defense's result, also written to ``OUT/result.json``.

    Raises:
        ConfigError: unknown defense or option.
        RecordError, CheckpointError: the run folder is missing, unfinished or has no weights.
    """
    defense = create_defense(name, progress=progress, **options)
    if test_subset is not None and test_subset <= 0:
        raise ConfigError(f"test subset must be positive, got {test_subset}")
    with FolderLock(run_dir, f"veil defend {name}", create=False):
        return _run_defense(defense, name, run_dir, device, data_root, cache_dir, test_subset, out_dir)


def _run_defense(defense: Any, name: str, run_dir: str | Path, device: str | torch.device, data_root: str | None,
                 cache_dir: str | None, test_subset: int | None, out_dir: str | Path | None) -> DefenseResult:
    """:func:`run_defense` with the run folder locked; a failure removes the output folder it made."""
    from veil.data import stratified_subset
    from veil.runs import load_run

    t0 = time.perf_counter()
    loaded = load_run(run_dir, device=device)
    train, test = loaded.data(data_root=data_root, cache_dir=cache_dir)
    if test_subset and test_subset < len(test):
        if test_subset < test.num_classes:
            # stratified_subset keeps one image per class (and loops forever below that)
            raise ConfigError(f"test subset {test_subset} is smaller than the number of classes ({test.num_classes})")
        test = stratified_subset(test, test_subset, seed=loaded.config.seed)
    out = Path(out_dir) if out_dir is not None else defense_dir(loaded.record.root, name)
    if out.exists() and not out.is_dir():
        raise RecordError(f"defense output {out} exists and is not a folder")
    made = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)  # the topmost folder made here
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot create the defense output folder {out} ({exc.strerror or exc})") from None
    log.info("%s %s on %s (%d test images)", defense.kind, name, loaded.record.root, len(test))
    try:
        result = defense.run(loaded, train, test, out)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)  # a failed defense leaves no empty or half-written folder
        raise
    result = dataclasses.replace(
        result,
        config=defense.describe(),
        run=str(loaded.record.root),
        seconds=time.perf_counter() - t0,
    )
    atomic_write_json(out / RESULT_FILE, result.to_dict())
    log.info("%s: %s -> %s", name, result.summary(), out / RESULT_FILE)
    return result
