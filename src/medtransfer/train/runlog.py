"""What a training run logs besides its checkpoints: ``metrics.jsonl`` (one JSON record per validation and per
logging window: ``step``, ``epoch``, ``lr``, ``train_loss``, ``val``, ``time`` in seconds since the start,
``data_wait``), its truncation on resume, and TensorBoard scalars when TensorBoard is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

class _TensorBoard:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` imports; silently nothing otherwise."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: optional
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, (int, float)):
                        self.writer.add_scalar(f"{key}/{k}", v, step)
            elif isinstance(value, (int, float)) and key not in ("step",):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None  # JSON has no NaN/inf
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    with path.open("a") as fh:
        fh.write(json.dumps(clean(record)) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (the checkpoint resumed from), so that the steps logged after it by the
    interrupted process, which the resumed one runs again, are not logged twice; a half-written last line goes too."""
    from ..weights.io import atomic_write

    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break  # a kill mid-append: this line and anything after it is not a record
        if int(record["step"]) > step:
            break
        kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))
