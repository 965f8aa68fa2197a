"""ATTEQ's training hook: co-optimisation rounds (Algorithm 1) and alternating retraining (section
4.4) on veil's one trainer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from veil.attacks.base import Attack
from veil.data.base import PoisonedDataset
from veil.inference import eval_mode
from veil.train import Batch, StepContext, TrainHook


def epochs_per_round(epochs: int, rounds: int) -> int:
    """The run's epochs split evenly between the rounds (the last round may be shorter)."""
    return max(1, math.ceil(epochs / rounds))


def poisoned_epoch(epoch: int, per_round: int, alternation: str) -> bool:
    """Whether ``epoch`` (0-based) trains on the poisoned mix: ``"epoch"`` (the release: the 2nd,
    4th, ... epoch of each round; the 1st, 3rd, ... clean only), ``"round"`` (the paper: rounds
    2, 4, ... mixed, rounds 1, 3, ... clean only), ``"none"`` (every epoch)."""
    if alternation == "none":
        return True
    if alternation == "epoch":
        return (epoch % per_round) % 2 == 1 or per_round == 1
    return (epoch // per_round) % 2 == 1


class AtteqHook(TrainHook):
    """Starts the classifier from the benign model ``F_V`` (``F_A^0 = F_V``); at the first epoch
    of every round but the first re-optimises the trigger against the current classifier; on the
    poisoned epochs appends a poisoned copy (the blended trigger, the target label) of every row
    of the batch at the training set's ``poison_indices``. The trigger and the round are the
    attack's state and checkpointed with the run, so a run killed mid-round resumes to the same
    trigger and round."""

    def __init__(self, attack: Attack) -> None:  # an AtteqAttack (typed by its base: no import circle)
        self.attack = attack
        self._mask: Tensor | None = None
        self._sums: dict[str, float] = {}

    def setup(self, ctx: StepContext) -> None:
        a = self.attack
        if ctx.step == 0 and a.benign_state and a.start_from_benign:  # not on a resume
            ctx.model.load_state_dict(a.benign_state)
        data = ctx.train_data
        idx = data.poison_indices if isinstance(data, PoisonedDataset) else a.select_poison_indices(data)
        mask = torch.zeros(len(data), dtype=torch.bool)
        mask[idx] = True
        self._mask = mask.to(ctx.device)

    def on_epoch_start(self, ctx: StepContext) -> None:
        a, c = self.attack, self.attack.config
        per = epochs_per_round(ctx.epochs, c.rounds)
        k = ctx.epoch // per
        if ctx.step_in_epoch == 0 and k > a.round:  # a new round (not again on a resume inside it)
            a.round = k
            pool = ctx.images[a.pool_indices.to(ctx.device)] if a.pool_indices is not None else ctx.images[:c.trigger_images]
            with eval_mode(ctx.model):
                a.reoptimise(ctx.model, pool)

    def transform_batch(self, ctx: StepContext, batch: Batch) -> Batch:
        a, c = self.attack, self.attack.config
        if self._mask is None:
            raise RuntimeError("AtteqHook.setup must run before the first batch")
        if not poisoned_epoch(ctx.epoch, epochs_per_round(ctx.epochs, c.rounds), c.alternation):
            self._add("clean_epoch_steps", 1.0)
            return batch
        sel = self._mask[batch.index]
        if bool(sel.any()):
            x_p = a.apply(batch.x[sel]).to(batch.x.dtype)
            batch.x = torch.cat((batch.x, x_p))
            batch.y = torch.cat((batch.y, a.target_labels(batch.y[sel])))
            self._add("poisoned_copies", float(sel.sum()))
        self._add("poisoned_epoch_steps", 1.0)
        return batch

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value

    def on_epoch_end(self, ctx: StepContext) -> dict[str, float]:
        per = epochs_per_round(ctx.epochs, self.attack.config.rounds)
        out = {"atteq_round": float(ctx.epoch // per + 1),
               "atteq_poisoned_epoch": float(self._sums.get("poisoned_epoch_steps", 0.0) > 0),
               "atteq_poisoned_copies": self._sums.get("poisoned_copies", 0.0)}
        self._sums = {}
        return out

    def state_dict(self) -> dict[str, Any]:
        a = self.attack
        state = super().state_dict()
        state.update({"sums": dict(self._sums), "round": a.round,
                      "delta": a.delta.clone() if a.delta is not None else torch.empty(0),
                      "history": list(a.history)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        a = self.attack
        self._sums = dict(state.get("sums", {}))
        a.round = int(state.get("round", a.round))
        delta = state.get("delta")
        if delta is not None and delta.numel():
            a.delta = delta.clone()
        a.history = list(state.get("history", a.history))
