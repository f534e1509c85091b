"""Distributed training of converted models: DDP and FSDP2 (``fully_shard``) on torch.distributed.

Two CPU processes (gloo, file rendezvous: no ports) train the same tiny timm model twice under
the same wrapper, once as timm built it and once after ``vitkern.optimize``, for a few SGD steps
on rank-specific batches. Checked, per rank and step: the loss and every (all-reduced or
re-gathered) parameter gradient of the converted model equal timm's (float64, 1e-10 relative), and
the gradients are the same on both ranks (the wrapper really averaged them). Under FSDP2 the full
state dict gathered from the converted model loads strictly into a plain timm model, and back,
with equal outputs.

On a machine with more than one GPU, ``scripts/gpu_check.sh`` runs the same with NCCL
(``VITKERN_DIST_BACKEND=nccl``).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

timm = pytest.importorskip("timm")
from timm.models import pvt_v2, swin_transformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.timm

WORLD = 2
STEPS = 3
RTOL = 1e-10


def _vit():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=5)


def _swin():
    return swin_transformer.SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                                            window_size=4, mlp_ratio=2.0, num_classes=5, drop_path_rate=0.0)


def _pvt():
    return pvt_v2.PyramidVisionTransformerV2(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 2),
                                             mlp_ratios=(2, 2), num_classes=5)


BUILDERS = {"vit": _vit, "swin": _swin, "pvt": _pvt}


def _blocks(model):
    """The modules FSDP2 shards one by one (as a user would: each transformer block)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    if hasattr(model, "layers"):
        return [b for layer in model.layers for b in layer.blocks]
    return [b for stage in model.stages for b in stage.blocks]


def _device(backend):
    if backend == "nccl":
        return torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _train(model, wrapper, device, rank):
    """STEPS SGD steps on this rank's batches; returns [(loss, {name: full grad})] per step."""
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (WORLD,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)
    history = []
    for _ in range(STEPS):
        x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64).to(device)
        y = torch.randint(0, 5, (2,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        grads = {}
        for name, p in wrapped.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor; gather the whole gradient
                g = g.full_tensor()
            grads[name.replace("module.", "", 1) if wrapper == "ddp" else name] = g.detach().cpu().clone()
        history.append((loss.detach().cpu().clone(), grads))
        opt.step()
    return wrapped, history


def _worker(rank, wrapper, backend, init_file, out_dir):
    """Every model under one wrapper in one process group (process start-up is the slow part)."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import vitkern
        device = _device(backend)
        results = {}
        for model_id in BUILDERS:
            torch.manual_seed(0)  # the same weights on every rank, as a checkpoint load would give
            base = MODELS_RANDOMISED(model_id)
            res = results[model_id] = {}
            for kind in ("timm", "vitkern"):
                model = copy.deepcopy(base)
                if kind == "vitkern":
                    model = vitkern.optimize(model)
                model = model.to(device)
                wrapped, history = _train(model, wrapper, device, rank)
                res[kind] = history
                if wrapper == "fsdp" and kind == "vitkern":
                    res["checkpoint"] = _checkpoint_round_trip(wrapped, model_id)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def MODELS_RANDOMISED(model_id):  # noqa: N802 - reads like the builders it wraps
    model = BUILDERS[model_id]().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name.endswith("weight"):
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _checkpoint_round_trip(wrapped, model_id):
    """Full state dict of the sharded converted model -> plain timm (strict) -> converted (strict)."""
    import vitkern
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))  # on every rank
    full = {k: v.detach().cpu() for k, v in full.items()}
    plain = BUILDERS[model_id]().double()
    plain.load_state_dict(full, strict=True)
    again = vitkern.optimize(BUILDERS[model_id]().double())
    again.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        return plain.eval()(x), again.eval()(x), sorted(full) == sorted(plain.state_dict())


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


_RUNS = {}


def _launch(wrapper, tmp_path_factory):
    """Both ranks' results for every model under ``wrapper`` (one launch per wrapper, cached)."""
    if wrapper not in _RUNS:
        backend = os.environ.get("VITKERN_DIST_BACKEND", "gloo")
        if backend == "nccl" and torch.cuda.device_count() < WORLD:
            pytest.skip(f"NCCL needs {WORLD} GPUs, found {torch.cuda.device_count()}")
        out = tmp_path_factory.mktemp(f"dist-{wrapper}")
        mp.start_processes(_worker, args=(wrapper, backend, str(out / "rendezvous"), str(out)), nprocs=WORLD,
                           join=True, start_method="spawn")
        _RUNS[wrapper] = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return _RUNS[wrapper]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("model_id", list(BUILDERS))
def test_converted_model_trains_like_timm(model_id, wrapper, tmp_path_factory):
    ranks = [r[model_id] for r in _launch(wrapper, tmp_path_factory)]
    for rank, res in enumerate(ranks):
        for step, ((loss_t, grads_t), (loss_v, grads_v)) in enumerate(zip(res["timm"], res["vitkern"])):
            assert _rel(loss_v, loss_t) <= RTOL, f"rank {rank} step {step}: loss {loss_v} != {loss_t}"
            assert grads_v.keys() == grads_t.keys()
            for name, g in grads_t.items():
                assert _rel(grads_v[name], g) <= RTOL, f"rank {rank} step {step}: grad of {name}"
    # The wrapper averaged the gradients: both ranks hold the same ones, though their batches differ.
    for (loss0, g0), (loss1, g1) in zip(ranks[0]["vitkern"], ranks[1]["vitkern"]):
        assert not torch.equal(loss0, loss1)
        for name in g0:
            assert _rel(g1[name], g0[name]) <= RTOL, name
    if wrapper == "fsdp":
        for res in ranks:
            out_plain, out_again, same_keys = res["checkpoint"]
            assert same_keys
            assert _rel(out_again, out_plain) <= RTOL
