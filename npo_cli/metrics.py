"""Where a run's per-step metrics go: metrics.jsonl, TensorBoard, W&B."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from npo_cli.errors import NpoError
from npo_cli.lease import Lease
from npo_cli.manifest import Manifest
from npo_cli.recipe import Recipe

# keys of per-step metrics that depend on wall-clock time (everything else is deterministic on CPU)
TIMING_KEYS = ("step_time", "gen_time", "update_time", "tokens_per_s", "eval/time", "npo/guide_seconds")


def _row_step(line: str) -> int:
    """The step of a metrics.jsonl row (-1 for a line that is not one)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def store_tag(url: str) -> str:
    """A short, stable, readable name of a store for local paths: its last path part and a hash of its
    resolved URL, so that runs of one name in two stores keep apart."""
    if "://" not in url:
        url = os.path.realpath(url)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1]).strip("._") or "store"
    return f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def wandb_id(url: str, run: str, branch: str) -> str:
    """The W&B run id of a branch: the same for every process that trains it (a resume appends to the W&B
    run), another for each branch and store."""
    return hashlib.sha256(f"{store_tag(url)}/{run}/{branch}".encode()).hexdigest()[:16]


class MetricSinks:
    """metrics.jsonl, TensorBoard, W&B, written under the branch lease. A relative metrics_jsonl lives
    under ./runs/STORE/RUN/BRANCH/ (STORE: `store_tag`); {store}, {run} and {branch} in the path are
    filled in.

    metrics.jsonl keeps the rows of steps (first, start] (this branch's steps before the resume) and the
    run appends to them: a new run or branch starts the file afresh, and a resume drops the rows a stopped
    process logged after its last checkpoint. Each row is written only while the lease is still ours: a
    writer paused past its lease must not append steps after those of the process that took over.

    W&B: one W&B run per branch (`wandb_id`), named RUN/BRANCH, continued by every resume; its config is the
    recipe plus `lineage`: store, run, branch, and the checkpoint the branch started from (`parent`, as
    RUN/BRANCH@STEP, `parent_checkpoint`, its id, and `fork_step`; None for a run's first branch)."""

    def __init__(self, recipe: Recipe, lease: Lease, start: int = 0, first: int = 0, fork: Manifest | None = None):
        lg, run, branch = recipe.logging, lease.run, lease.branch
        self.lease = lease
        self.jsonl_path = None
        self._f = self._tb = self._wandb = None
        if lg.metrics_jsonl:
            tag = store_tag(lease.store.url)
            p = Path(lg.metrics_jsonl.replace("{store}", tag).replace("{run}", run)
                     .replace("{branch}", branch)).expanduser()
            if not p.is_absolute():
                p = Path("runs") / tag / run / branch / p
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
            lineage = {"store": lease.store.url, "run": run, "branch": branch,
                       "parent": f"{fork.run}/{fork.branch}@{fork.step}" if fork else None,
                       "parent_checkpoint": fork.id if fork else None, "fork_step": fork.step if fork else None}
            self._wandb = wandb.init(project=lg.wandb, id=wandb_id(lease.store.url, run, branch),
                                     name=f"{run}/{branch}", config={**recipe.model_dump(), "lineage": lineage},
                                     resume="allow")

    def write(self, m: dict) -> None:
        self.lease.check()
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
