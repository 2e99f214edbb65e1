"""Every seed npo derives, in one place, and the forked RNG that keeps side sampling out of training's stream.

Exact resume rests on these being pure functions of the recipe's seed and the step: the data order of an
epoch, the eval sample of a step, the guide's and the probe's sampling. Sampling that is not training's
own (eval, guide, probe) runs under `forked_rng`, so whether it ran (a warm guide cache, an eval) never
changes the training stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import torch


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def data_order(seed: int, epoch: int, n: int) -> list[int]:
    """The shuffled order of n training problems in an epoch: resume needs only (epoch, position)."""
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


def eval_seed(seed: int, step: int) -> int:
    """The seed of the eval sample at a step (the trainer's eval and `npo eval` of that checkpoint agree)."""
    return seed * 7919 + step


@contextlib.contextmanager
def forked_rng(seed: int) -> Iterator[None]:
    """torch's RNG (CPU and the current CUDA device) seeded with `seed` inside, restored on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
