"""What people see: a progress bar (plain lines when not a terminal), per-epoch metrics in JSONL and
CSV (always), TensorBoard when installed, Weights & Biases when asked for."""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from deepkd.errors import ConfigError

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
GSNR_JSONL = "gsnr.jsonl"


class MetricsWriter:
    """Appends one record per epoch to ``metrics.jsonl`` and rewrites ``metrics.csv`` from it."""

    def __init__(self, run_dir: str | Path, *, tensorboard: str = "auto", wandb: bool = False,
                 wandb_project: str = "deepkd", config: Optional[Dict[str, Any]] = None):
        self.run_dir = Path(run_dir)
        self.tb = _open_tensorboard(self.run_dir, tensorboard)
        self.wandb = _open_wandb(self.run_dir, wandb_project, config) if wandb else None

    def log_epoch(self, record: Dict[str, Any], truncate_after: Optional[int] = None) -> None:
        records = [r for r in read_jsonl(self.run_dir / METRICS_JSONL)
                   if truncate_after is None or r["epoch"] < record["epoch"]]
        records.append(record)
        _write_jsonl(self.run_dir / METRICS_JSONL, records)
        _write_csv(self.run_dir / METRICS_CSV, records)
        for key, value in record.items():
            if self.tb is not None and isinstance(value, (int, float)) and key != "epoch":
                self.tb.add_scalar(key, value, record["epoch"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])

    def log_gsnr(self, record: Dict[str, Any]) -> None:
        with open(self.run_dir / GSNR_JSONL, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key.startswith("gsnr/"):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _open_tensorboard(run_dir: Path, mode: str):
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise ConfigError("train.tensorboard=on but tensorboard is not installed "
                               "(pip install 'deepkd[tensorboard]')") from None
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _open_wandb(run_dir: Path, project: str, config: Optional[Dict[str, Any]]):
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb=true but wandb is not installed (pip install 'deepkd[wandb]')") from None
    return wandb.init(project=project, dir=str(run_dir), config=config)


def read_jsonl(path: str | Path) -> list:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def _write_csv(path: Path, records: list) -> None:
    fields: list = []
    for record in records:
        fields += [k for k in record if k not in fields]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    tmp.replace(path)


class Progress:
    """Per-epoch progress: a tqdm bar on a terminal, a plain line every ``every`` steps otherwise."""

    def __init__(self, mode: str = "auto", every: int = 50, enabled: bool = True,
                 write: Optional[Callable[[str], None]] = None):
        is_tty = sys.stderr.isatty()
        self.write = write  # where :meth:`line` goes whatever the mode (e.g. a caller's log); None: print
        self.mode = "none" if not enabled else ("bar" if mode == "auto" and is_tty else
                                                 "lines" if mode == "auto" else mode)
        self.every = every

    def wrap(self, batches: Iterable, *, total: int, start: int, desc: str) -> Iterator:
        if self.mode == "bar":
            from tqdm import tqdm

            yield from tqdm(batches, total=total, initial=start, desc=desc, leave=False, dynamic_ncols=True)
        else:
            yield from batches

    def line(self, text: str) -> None:
        if self.write is not None:
            self.write(text)
        elif self.mode != "none":
            print(text, flush=True)

    def step(self, desc: str, index: int, total: int, values: Dict[str, float], started: float) -> None:
        if self.mode == "lines" and (index % self.every == 0 or index == total):
            shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
            print(f"{desc} [{index}/{total}] {shown} ({time.time() - started:.1f}s)", flush=True)
