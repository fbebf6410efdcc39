"""The optimizer loop shared by the fine-tuning tasks (classification, translation): AdamW on every
parameter (no weight decay on embeddings, norms, biases), linear warmup to the peak lr then linear
decay to 0, gradient clipping, and an optional progress bar. The tasks own their data, batches and
losses; this module owns one optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from smallscale.optim import OptimConfig, param_groups

OPTIMIZER = "AdamW; no weight decay on embeddings, norms, biases"
SCHEDULE = "linear warmup to lr, then linear decay to 0"


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (total_steps - step) / max(1, total_steps - warmup_steps)


def progress_bar(total_steps: int, show: bool | None) -> Any:
    """A started rich progress bar with one task, or None: `show` None shows it from 200 steps."""
    if not (show or (show is None and total_steps >= 200)):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    bar.add_task("fine-tune", total=total_steps)
    bar.start()
    return bar


class Finetuner:
    """One `step(loss)` per optimizer step of `module`: set the scheduled lr, backward, clip, AdamW.
    Use it as a context manager, so that its progress bar is stopped however the loop ends."""

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        grad_clip: float,
        total_steps: int,
        warmup_frac: float,
        progress: bool | None,
    ):
        self.module, self.lr, self.grad_clip, self.total_steps = module, lr, grad_clip, total_steps
        self.warmup_steps = math.ceil(warmup_frac * total_steps)
        groups = param_groups(module, OptimConfig(weight_decay=weight_decay))
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
        self.steps_done = 0
        self.bar = progress_bar(total_steps, progress)

    def step(self, loss: Tensor, description: str = "fine-tune") -> float:
        """Backward `loss` (computed on the current weights) and update them; returns its value."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(self.steps_done, self.total_steps, self.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.steps_done += 1
        value = loss.item()
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], advance=1, description=f"{description} loss {value:.3f}")
        return value

    def __enter__(self) -> Finetuner:
        return self

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.stop()
