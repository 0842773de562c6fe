"""Expert parallelism across processes with torch.distributed (launched by torchrun), and the one-process default.

    torchrun --nproc-per-node 8 -m moequant.cli quantize MODEL --out OUT ...   (the CLI calls `init_from_env`)

The scheme, chosen so that N processes write the same bits as one:

  capture   every rank runs the same forwards over all calibration batches, in the same order (the forwards are
            replicated, not split);
  Hessians  the solve work of a layer is cut into units, numbered u = 0, 1, ...: chunks of consecutive experts
            (`expert_chunk` experts; gate_up and down together) first, then the dense linears. Unit u belongs to
            rank u % world_size. A rank accumulates the Hessians of its own units only: its experts' routed
            (token, expert) rows, in the same batch order and the same row order as the one-process run, so every
            floating-point sum is associated the same way;
  solve     each rank solves its own units (GPTQ batched over the experts of a chunk);
  exchange  the owner of each unit broadcasts its packed result; every rank writes the dequantized weights back,
            so every rank holds the whole quantized layer before the re-run, and rank 0 writes the checkpoint.

Why not data-parallel capture (each rank a share of the batches)? Bitwise equality would then need every rank's
per-batch partial Hessians (E·K² floats per batch) shipped to the owner and added in batch order — far more bytes
than replicating the forwards costs. Why are dense Hessians not all-reduced? An all-reduce adds the ranks' partial
sums in an order of its own, which changes the last bits; computing each on its owner keeps them identical.

On GPUs the per-unit solves are the same computations as in one process only if the unit shapes match: the experts
of a chunk are solved as one batch, and cuBLAS may pick a different kernel for a different batch count. Give the
one-process run the same `expert_chunk` as the distributed one (the default chunk is ceil(E / world_size)) when
you compare them bit for bit. On CPU (gloo) per-matrix results do not depend on the batch.

Only torch.distributed collectives are used (broadcast, all_gather_object, barrier): no process pools, no RPC.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .packing import PackedWeight

_FIELDS = ("qweight", "scales", "qzeros", "g_idx")


@dataclass(frozen=True)
class Sharding:
    """Which rank this process is among how many. `Sharding()` is the one-process run."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owner(self, unit: int) -> int:
        return unit % self.world_size

    def mine(self, unit: int) -> bool:
        return self.owner(unit) == self.rank

    # -- collectives (no-ops in one process) ------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_tensor(self, t: torch.Tensor | None, src: int = 0) -> torch.Tensor:
        """`t` from rank `src` on every rank (others pass None); e.g. the calibration tokens rank 0 generated."""
        if not self.distributed:
            return t
        meta = [None if t is None else (tuple(t.shape), t.dtype, str(t.device))]
        dist.broadcast_object_list(meta, src=src)
        shape, dtype, device = meta[0]
        if self.rank != src:
            t = torch.empty(shape, dtype=dtype)
        return _broadcast(t, src).to(device if self.rank == src else t.device)

    def exchange(self, mine: dict[int, dict], num_units: int) -> dict[int, dict]:
        """Every unit's results on every rank.

        mine: {unit: {name: (PackedWeight, record)}} for the units this rank solved (records are small JSON-able
        dicts). Returns the same mapping for all `num_units` units, the packed tensors on this rank's device.
        """
        if not self.distributed:
            return mine
        local = {u: {n: (_packed_meta(p), rec) for n, (p, rec) in res.items()} for u, res in mine.items()}
        metas = {}
        for per_rank in self.all_gather_object(local):
            metas.update(per_rank)
        out = {}
        for u in range(num_units):
            src = self.owner(u)
            out[u] = {}
            for name, (meta, rec) in metas[u].items():
                sent = mine[u][name][0] if src == self.rank else None
                out[u][name] = (_broadcast_packed(sent, meta, src), rec)
        return out


def _packed_meta(p: PackedWeight) -> dict:
    return {"bits": p.bits, "group_size": p.group_size, "device": str(p.qweight.device),
            **{f: None if getattr(p, f) is None else (tuple(getattr(p, f).shape), getattr(p, f).dtype)
               for f in _FIELDS}}


def _comm_device(like: torch.device) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """Broadcast any dtype as raw bytes (gloo has no bf16 reductions, and bytes need none)."""
    dev = _comm_device(t.device)
    buf = t.detach().to(dev).contiguous()
    if buf.numel():
        dist.broadcast(buf.view(-1).view(torch.uint8), src=src)
    return buf


def _broadcast_packed(p: PackedWeight | None, meta: dict, src: int) -> PackedWeight:
    device = torch.device("cuda", torch.cuda.current_device()) if meta["device"].startswith("cuda") and \
        torch.cuda.is_available() else torch.device("cpu")
    fields = {}
    for f in _FIELDS:
        if meta[f] is None:
            fields[f] = None
            continue
        shape, dtype = meta[f]
        t = getattr(p, f) if p is not None else torch.empty(shape, dtype=dtype, device=device)
        fields[f] = _broadcast(t, src).to(device)
    return PackedWeight(fields["qweight"], fields["scales"], fields["qzeros"], fields["g_idx"], meta["bits"],
                        meta["group_size"])


def init_from_env(backend: str | None = None) -> Sharding:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or return the one-process Sharding.

    backend: default NCCL when CUDA is available (each rank on GPU LOCAL_RANK), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Sharding()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {rank} wants GPU {local_rank}, but only {torch.cuda.device_count()} are visible; "
                               f"use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Sharding(dist.get_rank(), dist.get_world_size())

