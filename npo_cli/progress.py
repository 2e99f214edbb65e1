"""One progress display for long commands: a Rich bar on a terminal, a plain line every ~5% in a log."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def step_info(m: dict, status: str = "") -> str:
    """A training step's progress line after `step N/T`: reward, accuracy, speed, the eval when one ran; in an
    NPO window the share of groups at or below the gate and the guide's hit rate on those; status: AutoNPO's
    phase."""
    info = (f"reward {m['reward']:.3f}  acc {m['accuracy']:.3f}  {m['tokens_per_s']:.0f} tok/s  "
            f"{m['step_time']:.2f} s/step")
    if "eval/accuracy" in m:
        info += f"  eval {m['eval/accuracy']:.3f}"
    if "npo/gated_frac" in m:
        info += f"  npo gated {m['npo/gated_frac']:.2f} hit {m['npo/hit_rate']:.2f}"
    return info + (f"  {status}" if status else "")


class Progress:
    """`update(done, info)` as work completes; nothing at all when disabled or without a console."""

    def __init__(self, console, label: str, total: int, start: int = 0, enabled: bool = True):
        self.console, self.label, self.total = console, label, total
        self.enabled = enabled and console is not None
        self.every = max(1, (total - start) // 20)
        self.bar = None
        if self.enabled and console.is_terminal:
            self.bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, done: int, info: str = "", always: bool = False) -> None:
        """always: print this one in a log too (e.g. a step with an eval)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=info)
        elif always or done % self.every == 0 or done == self.total:
            self.console.print(f"{self.label} {done}/{self.total}  {info}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> Progress:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()
