"""Run metrics: a JSON-lines file (one record per line) and, optionally, TensorBoard event files.

Every record has ``"type"`` (``"train"`` or ``"val"``) and ``"step"`` (the global iteration). On resume
the records after the checkpoint's step are dropped (they belong to work the resumed run redoes), and
TensorBoard is told to purge them too, so a resumed run's logs read like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spotocc.engine.atomic import write_text_atomic

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines metrics file (a torn last line from a kill is skipped)."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to ``<work_dir>/metrics.jsonl`` and scalars to TensorBoard (rank 0 only).

    Args:
        work_dir: run directory.
        resume_step: drop existing records with ``step > resume_step`` (None: start a new file).
        tensorboard: also write TensorBoard event files under ``<work_dir>/tensorboard``.
        enabled: False on ranks other than 0 (everything becomes a no-op).
    """

    def __init__(
        self, work_dir: str | os.PathLike, *, resume_step: int | None, tensorboard: bool, enabled: bool
    ):
        self.enabled = enabled
        self.path = Path(work_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text_atomic(self.path, "")
        else:
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(Path(work_dir) / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, record: Mapping[str, Any], *, scalars_prefix: str | None = None) -> None:
        """Append ``record`` (must hold ``"step"``); numeric entries also go to TensorBoard."""
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self._writer is not None:
            prefix = scalars_prefix if scalars_prefix is not None else f"{record.get('type', 'train')}/"
            for key, value in clean.items():
                if key in ("type", "step") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self._writer.add_scalar(prefix + key, value, global_step=int(record["step"]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
