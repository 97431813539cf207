"""Training progress on rank 0, for :func:`medtransfer.train.loop.fit`: a rich bar on a terminal, plain periodic
lines on stderr elsewhere (log files, SLURM, pipes). It only displays: nothing here touches the training state."""

from __future__ import annotations

import sys
import time
from typing import Optional

import numpy as np

PROGRESS_LINES = 10  # plain progress: about this many evenly spaced lines per run when the step count is known
PROGRESS_INTERVAL_S = 30.0  # ... and never longer apart than this


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class _Progress:
    """Training progress on rank 0: a rich bar when stderr is a terminal; elsewhere (a log file, SLURM, a pipe),
    where a bar cannot redraw, plain lines on stderr, flushed as they are written:

    * one at the first step, then one every ``total // PROGRESS_LINES`` steps and at least every
      ``PROGRESS_INTERVAL_S`` seconds: ``step 40/200 epoch 2/10 loss 0.412 lr 0.001 0.31 s/it eta 49s`` (loss:
      the mean over the steps since the previous line; s/it: over those steps, validation time excluded; eta:
      from the mean time per step so far, validations included);
    * one at each validation: the same, with ``val loss 0.52 dice_mean 0.61 (best 0.61 at step 40)``;
    * one at the end: ``done: 200 steps in 1m 02s, best dice_mean 0.61 at step 160``.
    """

    def __init__(self, enabled: bool, total: Optional[int], *, epochs: Optional[int] = None,
                 monitor: str = "") -> None:
        self.bar, self.lines = None, False
        self.total, self.epochs, self.monitor = total, epochs, monitor
        if not enabled:
            return
        if sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                pass
            else:
                self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                    TimeElapsedColumn(), transient=False)
                self.bar.start()
                self.task = self.bar.add_task("train", total=total, info="")
                return
        self.lines = True
        self.every = max(1, total // PROGRESS_LINES) if total else None
        self.t_start = self.t_line = self.t_step = time.perf_counter()
        self.first_step: Optional[int] = None
        self.step_no, self.epoch = 0, 0
        self.losses: list[float] = []  # mean loss of each step since the previous line
        self.lrs: dict[str, float] = {}

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def after_step(self, step: int, epoch: int, loss: float, lrs: dict[str, float]) -> None:
        """One optimiser step done (``loss``: its mean over the micro-batches); prints a line when one is due."""
        if not self.lines:
            return
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = step - 1
        self.step_no, self.epoch, self.lrs, self.t_step = step, epoch, lrs, now
        self.losses.append(loss)
        if step == self.first_step + 1 or (self.every and step % self.every == 0) or now - self.t_line >= PROGRESS_INTERVAL_S:
            self._print()

    def validation(self, val: dict[str, float], best: Optional[float], best_step: int) -> None:
        if not self.lines:
            return
        parts = [f"val loss {val.get('loss', float('nan')):.4g}"]
        if self.monitor and self.monitor != "loss" and self.monitor in val:
            parts.append(f"{self.monitor} {val[self.monitor]:.4g}")
        if best is not None:
            parts.append(f"(best {best:.4g} at step {best_step})")
        self._print(" ".join(parts))

    def _print(self, val: str = "") -> None:
        head = f"step {self.step_no}" + (f"/{self.total}" if self.total else "")
        head += f" epoch {self.epoch + 1}" + (f"/{self.epochs}" if self.epochs else "")
        parts = [head]
        done_here = self.step_no - (self.first_step or 0)
        if self.losses:
            parts.append(f"loss {float(np.mean(self.losses)):.4g}")
            values = sorted(set(self.lrs.values()))
            if len(values) == 1:
                parts.append(f"lr {values[0]:.3g}")
            elif values:
                parts.append("lr " + " ".join(f"{k} {v:.3g}" for k, v in self.lrs.items()))
        if val:
            parts.append(val)
        if self.losses:
            parts.append(f"{(self.t_step - self.t_line) / len(self.losses):.3g} s/it")
        if self.total and done_here > 0:
            remaining = max(self.total - self.step_no, 0) * (time.perf_counter() - self.t_start) / done_here
            parts.append(f"eta {_duration(remaining)}")
        print(" ".join(parts), file=sys.stderr, flush=True)
        self.losses, self.t_line = [], time.perf_counter()

    def close(self, *, done: bool = False, best: Optional[float] = None, best_step: int = 0) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.lines and done:
            ran = self.step_no - (self.first_step or 0)
            line = f"done: {self.step_no} steps"
            if ran > 0:
                line += f" in {_duration(time.perf_counter() - self.t_start)}"
                line += f" ({ran} in this process)" if ran != self.step_no else ""
            if best is not None:
                line += f", best {self.monitor} {best:.4g} at step {best_step}"
            print(line, file=sys.stderr, flush=True)
