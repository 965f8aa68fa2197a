"""What the attacks that co-train a generator with the classifier (multinomial, adaptive) share:
:class:`GeneratorHook`, a training hook holding the generator and its Adam optimiser, a seeded
noise stream on the training device that is checkpointed with the run, the mask of the training
rows that get poisoned copies, and per-epoch means of what the loss logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from veil.attacks.base import Attack
from veil.data.base import PoisonedDataset
from veil.train import Batch, StepContext, TrainHook


class GeneratorHook(TrainHook):
    """Base of the co-training hooks: ``attack.generator`` trained by Adam at ``lr``, ``noise`` a
    device generator seeded with ``attack.config.seed * 1_000_003 + noise_salt`` (its state
    restored on a resume), ``poison_mask`` the rows of the training set at its
    ``poison_indices``. Subclasses call :meth:`setup` (via ``super()``) and log with :meth:`add`."""

    def __init__(self, attack: Attack, lr: float, noise_salt: int) -> None:
        self.attack = attack
        self.generator: nn.Module = attack.generator  # type: ignore[attr-defined]
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr)
        self.noise_salt = noise_salt
        self.noise: torch.Generator | None = None
        self._noise_state: Tensor | None = None
        self._poison_mask: Tensor | None = None
        self._sums: dict[str, float] = {}

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.generator,)

    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.optimizer,)

    def setup(self, ctx: StepContext) -> None:
        self.noise = torch.Generator(device=ctx.device)
        self.noise.manual_seed(self.attack.config.seed * 1_000_003 + self.noise_salt)
        if self._noise_state is not None:
            self.noise.set_state(self._noise_state)
        data = ctx.train_data
        idx = data.poison_indices if isinstance(data, PoisonedDataset) else self.attack.select_poison_indices(data)
        mask = torch.zeros(len(data), dtype=torch.bool)
        mask[idx] = True
        self._poison_mask = mask.to(ctx.device)

    def poisoned_rows(self, batch: Batch) -> Tensor:
        """Which rows of ``batch`` get poisoned copies (``(B,)`` bool, after :meth:`setup`)."""
        if self._poison_mask is None or self.noise is None:
            raise RuntimeError(f"{type(self).__name__}.setup must run before the first batch")
        return self._poison_mask[batch.index]

    def add(self, key: str, value: float) -> None:
        """Add ``value`` to this epoch's sum of ``key``."""
        self._sums[key] = self._sums.get(key, 0.0) + value

    def epoch_means(self, prefix: str, keys: Sequence[str], per: str = "steps") -> dict[str, float]:
        """``{prefix_key: sum / sum of per}`` for the ``keys`` logged this epoch; the sums restart."""
        n = self._sums.get(per, 0.0)
        out = {f"{prefix}_{k}": self._sums[k] / n for k in keys if n and k in self._sums}
        return out

    def reset_sums(self) -> None:
        self._sums = {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["noise_rng"] = self.noise.get_state() if self.noise is not None else torch.empty(0, dtype=torch.uint8)
        state["sums"] = dict(self._sums)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        rng = state.get("noise_rng")
        self._noise_state = rng if rng is not None and rng.numel() else None
        self._sums = dict(state.get("sums", {}))
