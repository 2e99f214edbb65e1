"""Where a run's per-step metrics go: metrics.jsonl, TensorBoard, W&B."""

from __future__ import annotations

import json
from pathlib import Path

from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe

# keys of per-step metrics that depend on wall-clock time (everything else is deterministic on CPU)
TIMING_KEYS = ("step_time", "gen_time", "update_time", "tokens_per_s", "eval/time", "npo/guide_seconds")


def _row_step(line: str) -> int:
    """The step of a metrics.jsonl row (-1 for a line that is not one)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


class MetricSinks:
    """metrics.jsonl, TensorBoard, W&B. A relative metrics_jsonl lives under ./runs/RUN/BRANCH/ (like an
    output_dir); {run} and {branch} in the path are filled in.

    metrics.jsonl keeps the rows of steps (first, start] (this branch's steps before the resume) and the
    run appends to them: a new run or branch starts the file afresh (another store's run of the same name
    wrote there before), and a resume drops the rows a stopped process logged after its last checkpoint."""

    def __init__(self, recipe: Recipe, run: str, branch: str, first: int = 0, start: int = 0):
        lg = recipe.logging
        self.jsonl_path = None
        self._f = self._tb = self._wandb = None
        if lg.metrics_jsonl:
            p = Path(lg.metrics_jsonl.replace("{run}", run).replace("{branch}", branch)).expanduser()
            if not p.is_absolute():
                p = Path("runs") / run / branch / p
            p.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl_path = str(p)
            kept = [line for line in (p.read_text().splitlines() if p.is_file() else [])
                    if first < _row_step(line) <= start]
            p.write_text("".join(line + "\n" for line in kept))
            self._f = open(p, "a")  # noqa: SIM115 (kept open for the whole run, closed in close())
        if lg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise NpoError("logging.tensorboard is set but tensorboard is not installed "
                               "(pip install tensorboard, or unset logging.tensorboard)") from None
            self._tb = SummaryWriter(str(Path(lg.tensorboard) / run / branch))
        if lg.wandb:
            try:
                import wandb
            except ImportError:
                raise NpoError("logging.wandb is set but wandb is not installed "
                               "(pip install wandb, or unset logging.wandb)") from None
            self._wandb = wandb.init(project=lg.wandb, name=f"{run}/{branch}", config=recipe.model_dump(),
                                     resume="allow")

    def write(self, m: dict) -> None:
        if self._f:
            self._f.write(json.dumps(m) + "\n")
            self._f.flush()
        if self._tb:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, m["step"])
        if self._wandb:
            self._wandb.log(m, step=m["step"])

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
