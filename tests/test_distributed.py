"""Expert parallelism: 2 processes (gloo, CPU) write exactly the bits of the one-process run.

The workers join the process group the way torchrun's processes do (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
in the environment, `moequant.distributed.init_from_env`), quantize the same tiny models with the same tokens, and
rank 0 saves every packed tensor; the test compares them with a one-process run bit for bit, and the layer metadata
(token counts, empty-expert records) field by field.
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import moequant
from conftest import make_tiny
from moequant.config import QuantConfig
from moequant.distributed import Sharding, init_from_env
from moequant.models import get_adapter
from moequant.pipeline import quantize_model, solve_units

# (model type, settings): experts + attention; a shared expert with AGQ-weighted gate (qwen2) and uneven expert
# chunks (3 + 3 + 2 over two ranks); DeepSeek's dense first layer, act-order, asymmetric.
CASES = {
    "mixtral-agq": ("mixtral", dict(method="agq", group_size=32)),
    "qwen2_moe-gptq-chunk3": ("qwen2_moe", dict(method="gptq", group_size=32, expert_chunk=3)),
    "deepseek_v2-agq-actorder-asym": ("deepseek_v2", dict(method="agq", group_size=32, act_order=True, sym=False)),
}
VOLATILE = ("times", "peak_gpu_bytes", "estimated_gpu_bytes")


def _calib():
    return torch.randint(3, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def _run(case, sharding):
    model_type, kw = CASES[case]
    model = make_tiny(model_type, seed=1)
    cfg = QuantConfig(**kw, batch_size=2, device="cpu")
    return quantize_model(model, cfg, _calib(), progress=False, sharding=sharding)


def _tensors(res):
    out = {}
    for name, p in res.packed.items():
        for k, t in p.tensors(name).items():
            out[k] = t.contiguous()
    for k, v in res.model.state_dict().items():  # the quantized model itself, on every rank
        out[f"model::{k}"] = v.contiguous()
    return out


def _meta(res):
    return [{k: v for k, v in m.items() if k not in VOLATILE} for m in res.layers]


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sharding = init_from_env(backend="gloo")  # CPU processes, also on a machine with a GPU
    assert sharding == Sharding(rank, world)
    try:
        # what the CLI does with calibration tokens rank 0 generated (EBSS): every rank gets the same ids
        got = sharding.broadcast_tensor(_calib() if rank == 0 else None, src=0)
        assert torch.equal(got, _calib()) and got.dtype == torch.int64
        for case in CASES:
            res = _run(case, sharding)
            # every rank holds the whole quantized model; rank 0 also the packed weights
            state = {f"model::{k}": v.contiguous() for k, v in res.model.state_dict().items()}
            save_file(_tensors(res) if rank == 0 else state, os.path.join(out_dir, f"{case}-rank{rank}.safetensors"))
            if rank == 0:
                with open(os.path.join(out_dir, f"{case}.json"), "w") as f:
                    json.dump(_meta(res), f)
        # the API path the CLI drives under torchrun: rank 0 writes the checkpoint, the others only compute
        _api_run(os.path.join(out_dir, "ckpt"), sharding)
    finally:
        torch.distributed.destroy_process_group()


def _api_run(out, sharding):
    moequant.quantize(make_tiny("mixtral", seed=1), QuantConfig(method="agq", group_size=32, batch_size=2,
                                                                device="cpu"),
                      calib_tokens=_calib(), output_dir=out, progress=False, sharding=sharding)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_bit_for_bit(case, two_rank_outputs):
    torch.set_num_threads(1)
    single = _run(case, None)
    ref = _tensors(single)
    got = load_file(str(two_rank_outputs / f"{case}-rank0.safetensors"))
    assert sorted(got) == sorted(ref)
    n_packed = 0
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), f"{k} differs"  # bits, NaNs included
        n_packed += not k.startswith("model::")
    assert n_packed > 0
    other = load_file(str(two_rank_outputs / f"{case}-rank1.safetensors"))  # rank 1's model: the same weights
    for k, t in other.items():
        assert torch.equal(t.view(torch.uint8), ref[k].view(torch.uint8)), f"rank 1: {k} differs"
    with open(two_rank_outputs / f"{case}.json") as f:
        assert json.load(f) == json.loads(json.dumps(_meta(single)))


def test_units_are_shared_round_robin():
    model = make_tiny("deepseek_v2", experts=8)
    adapter = get_adapter(model)
    layer = adapter.layers[1]  # an MoE layer: 8 experts, shared experts, MLA attention
    cfg = QuantConfig(method="agq", group_size=32)
    units = solve_units(layer, adapter, cfg, world_size=3)
    chunks = [u.experts for u in units if u.experts]
    assert chunks == [(0, 3), (3, 6), (6, 8)]  # ceil(8 / 3) experts per chunk
    linears = [u.linear for u in units if u.linear]
    assert set(linears) == set(adapter.linears(layer, ["attn", "dense", "shared"]))
    assert [u.index for u in units] == list(range(len(units)))
    owners = [Sharding(r, 3) for r in range(3)]
    assert all(sum(s.mine(u.index) for s in owners) == 1 for u in units)  # every unit has exactly one owner
    assert len(solve_units(layer, adapter, cfg, world_size=1)[0].experts) == 2 and \
        solve_units(layer, adapter, cfg)[0].experts == (0, 8)


def test_two_rank_checkpoint_equals_one_process_checkpoint(two_rank_outputs, tmp_path):
    torch.set_num_threads(1)
    _api_run(str(tmp_path / "single"), None)
    shards = sorted(f for f in os.listdir(tmp_path / "single") if f.startswith("model-"))
    assert shards == sorted(f for f in os.listdir(two_rank_outputs / "ckpt") if f.startswith("model-"))
    for f in shards:
        a, b = load_file(str(tmp_path / "single" / f)), load_file(str(two_rank_outputs / "ckpt" / f))
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{f}:{k} differs"
