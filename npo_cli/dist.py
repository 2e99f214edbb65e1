"""Data-parallel training under torchrun: the few collective operations the trainer needs.

`torchrun --nproc-per-node N -m npo_cli run RECIPE` starts N copies of `npo run`; `init()` joins them
(gloo on CPU, nccl on CUDA). Every function here is a no-op / identity in a single process, so the
trainer calls them unconditionally.

How a step is split: every rank walks the same global prompt order and keeps prompts rank::world
(whole groups, so rewards and advantages stay on the owning rank). Loss normalisers are the global
token / sequence counts, so the per-rank gradients *sum* to the single-process gradient.

Parallel modes (recipe train.parallel):
- ddp: every rank holds the full model; gradients are summed with one bucketed all-reduce per
  optimizer step. Not torch's DDP wrapper: ranks skip different numbers of zero-advantage rows and
  micro-batches, and the wrapper needs every rank to run the same backward passes.
- fsdp: FSDP2 (`fully_shard`) on every decoder layer, so their weights, gradients and AdamW state
  are sharded. The embeddings, final norm and LM head stay replicated and are all-reduced like ddp:
  token_logprobs calls the decoder and the (chunked) LM head separately, so they cannot sit in one
  root FSDP unit. Ranks pad their micro-batch count to the same number (FSDP's collectives run per
  forward/backward). Sampling always uses a full-weight copy (HF) or the vLLM engine.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import NoReturn

import torch
import torch.distributed as dist

from npo_cli.errors import NpoError

_terminated: list[int] = []  # SIGTERM arrived (torchrun stops the other ranks when one fails)


def _note_sigterm(signum, frame) -> None:
    _terminated.append(signum)


def terminated() -> bool:
    """torchrun sent this rank SIGTERM (before training, whose handler takes over): a rank that then fails
    failed because another process of the torchrun stopped, whichever error its collective met first."""
    return bool(_terminated)


def init(console=None) -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); no-op otherwise. `console` (the
    CLI's) is silenced on every rank but 0, so a command prints its output once.

    When one rank fails, torchrun sends SIGTERM to the others. A rank notes it and stops at its next
    collective: that collective fails (the failed rank is gone), so the rank says another process stopped,
    whenever the signal came; if every rank is alive (torchrun itself was stopped), the collective completes
    and the rank stops with that reason. Training replaces this with its own handler (stop after the step)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _note_sigterm)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    if rank() != 0 and console is not None:
        console.quiet = True


def finish() -> None:
    """After a command's last collective: wait for every rank, then leave the group, so no rank tears its
    connections down while another still uses them."""
    if on():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int | str | None) -> NoReturn:
    """End a torchrun rank (after `finish`) without interpreter teardown: os._exit after flushing stdio.

    destroy_process_group leaves gloo's C++ threads running, and the interpreter's teardown races them
    (pytorch#179291): in CI a rank that had done its work once died with SIGABRT ("terminate called
    without an active exception"), and torchrun reported the whole command as failed. Every file the
    commands write is closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


def on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if on() else 0


def world() -> int:
    return dist.get_world_size() if on() else 1


def is_main() -> bool:
    return rank() == 0


def rank_seed(seed: int) -> int:
    """Sampling seed of this rank: rank 0 (and a single process) keeps the recipe seed."""
    return seed + 1_000_003 * rank()


def _device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if on():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not on():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float) -> float:
    """The largest of the ranks' values (of the caller's type)."""
    if not on():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def gather_json(obj) -> list:
    """Every rank's JSON-able `obj`, in rank order, on every rank (JSON bytes, never pickle)."""
    if not on():
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=_device())
    sizes = [torch.zeros(1, dtype=torch.int64, device=_device()) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=_device()))
    n = max(int(s.item()) for s in sizes)
    bufs = [torch.zeros(n, dtype=torch.uint8, device=_device()) for _ in range(world())]
    dist.all_gather(bufs, torch.cat([data, data.new_zeros(n - data.numel())]))
    if _terminated:  # see init: every rank got here, so torchrun itself was told to stop
        raise NpoError("stopped by SIGTERM (torchrun was stopped)")
    return [json.loads(bytes(b[: int(s.item())].tolist()).decode()) for b, s in zip(bufs, sizes)]


def gather_strided(items: list) -> list:
    """Every rank's JSON-able `items` merged in the global order of a rank::world split (rank r's i-th item
    is global item i * world + r): what one process would have produced."""
    w = world()
    return [x for _, x in sorted(((i * w + r, x) for r, part in enumerate(gather_json(items))
                                  for i, x in enumerate(part)), key=lambda t: t[0])]


def broadcast_json(obj):
    """Rank 0's `obj` on every rank."""
    return gather_json(obj if is_main() else None)[0]


def gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (same shape and dtype on all ranks), in rank order."""
    if not on():
        return [t]
    src = t.to(_device())
    out = [torch.empty_like(src) for _ in range(world())]
    dist.all_gather(out, src)
    return [x.cpu() for x in out]


def _local_params(model):
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if not isinstance(p, DTensor)]


@torch.no_grad()
def broadcast_params(model) -> None:
    """Rank 0's weights on every rank (before sharding): all ranks start from the same policy."""
    if on():
        for p in model.parameters():
            if p.device.type == _device().type:
                dist.broadcast(p.data, 0)
            else:
                buf = p.data.to(_device())
                dist.broadcast(buf, 0)
                p.data.copy_(buf)


@torch.no_grad()
def sum_grads(model, bucket_elems: int = 1 << 25) -> None:
    """Sum the gradients of the replicated (non-FSDP) parameters over ranks, in flat buckets."""
    if not on():
        return
    params = _local_params(model)
    if all_max(int(any(p.grad is not None for p in params))) == 0:
        return  # no rank ran a backward: nothing to sum (and AdamW skips the step, as in one process)
    for p in params:  # a rank whose rows were all skipped still takes part, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    i = 0
    while i < len(grads):
        j, n = i, 0
        while j < len(grads) and (n == 0 or n + grads[j].numel() <= bucket_elems) and \
                grads[j].dtype == grads[i].dtype:
            n += grads[j].numel()
            j += 1
        flat = torch.cat([g.reshape(-1) for g in grads[i:j]]).to(_device())
        dist.all_reduce(flat)
        off = 0
        for g in grads[i:j]:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()
        i = j


@torch.no_grad()
def clip_grad_norm(model, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over a mix of sharded (DTensor) and replicated gradients."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    if not any(isinstance(p, DTensor) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sharded = sum((p.grad.to_local().float().pow(2).sum() for p in params if isinstance(p, DTensor)),
                  torch.zeros((), device=params[0].grad.device))
    sq = float(all_sum([float(sharded)])[0])  # shards are disjoint: their squares add up over ranks
    sq += sum(float(p.grad.float().pow(2).sum()) for p in params if not isinstance(p, DTensor))
    total = sq**0.5
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def shard(model) -> None:
    """FSDP2 on every decoder layer; gradients summed (not averaged) across ranks."""
    if not on():
        return
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise NpoError("train.parallel=fsdp needs a decoder-only model with model.model.layers "
                       "(Llama/Qwen-style); use train.parallel=ddp")
    for layer in layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)  # sum: the loss is already normalised by the global counts
        layer.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def _full(v):
    from torch.distributed.tensor import DTensor

    return v.full_tensor() if isinstance(v, DTensor) else v


def full_state(model, optimizer) -> tuple:
    """(model view, optimizer view) whose state_dict() holds full tensors (collective: call on all ranks).

    The views are what save_checkpoint needs: `state_dict()` plus the model's other attributes.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model, optimizer
    msd = {k: _full(v) for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    osd = {"state": {i: {k: _full(v) for k, v in s.items()} for i, s in osd["state"].items()},
           "param_groups": osd["param_groups"]}
    return StateView(model, msd), StateView(optimizer, osd)


class StateView:
    """A model or optimizer as save_checkpoint reads it: `state_dict()` (given), the rest passed through."""

    def __init__(self, obj, sd: dict):
        self._obj, self._sd = obj, sd

    def state_dict(self) -> dict:
        return self._sd

    def __getattr__(self, name):
        return getattr(self._obj, name)


def move_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Copy a (restored, full) optimizer state onto the same parameters after sharding."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    olds = [p for g in old.param_groups for p in g["params"]]
    news = [p for g in new.param_groups for p in g["params"]]
    for po, pn in zip(olds, news):
        st = old.state.get(po)
        if not st:
            continue
        new.state[pn] = {
            k: distribute_tensor(v.to(pn.device), pn.device_mesh, pn.placements)
            if isinstance(pn, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in st.items()
        }
    for go, gn in zip(old.param_groups, new.param_groups):
        # hyperparameters only: the kernel flags of a restored state (fused on one GPU) do not fit DTensors
        gn.update({k: v for k, v in go.items() if k not in ("params", "foreach", "fused", "capturable")})
