"""The static floors of the benchmarks (benchmarks/floors.py) against hand-computed figures."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import floors  # noqa: E402
from vitkern.reference import attention_reference, patch_embed_reference  # noqa: E402

BF16 = 2  # bytes per element: the floors count in bf16


def _attention_naive(backward: bool):
    shape = (1, 1, 4, 2)  # B, h, N, d
    q, k, v = (floors.meta(shape, backward) for _ in range(3))

    def run():
        out = attention_reference(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), floors.meta(shape))
    return run


def test_naive_attention_forward_by_hand():
    # N = 4, d = 2: q, k, v, out have 8 elements, the scores 16.
    #   q * scale      read 8, write 8           16
    #   (q s) @ k^T    read 8 + 8, write 16      32
    #   softmax        read 16, write 16         32
    #   p @ v          read 16 + 8, write 8      32   -> 112 elements = 224 bytes
    # FLOPs: two matmuls of 2 * 4 * 4 * 2 = 64 each.
    cost, by_op = floors.count(_attention_naive(False))
    assert cost == floors.Cost(flops=128, bytes=112 * BF16)
    assert by_op == {"mul": 16 * BF16, "bmm": 64 * BF16, "_softmax": 32 * BF16}


def test_naive_attention_backward_by_hand():
    # backward of the four ops above, from dout (8 elements):
    #   dp = dout @ v^T     read 8 + 8, write 16       32
    #   dv = p^T @ dout     read 16 + 8, write 8       32
    #   ds = softmax'       read 16 (dp) + 16 (p), write 16   48
    #   d(q s) = ds @ k     read 16 + 8, write 8       32
    #   dk = ds^T @ (q s)   read 16 + 8, write 8       32
    #   dq = d(q s) * scale read 8, write 8            16   -> 192 elements on top of the forward's 112
    # FLOPs: four more matmuls of 64.
    cost, _ = floors.count(_attention_naive(True))
    assert cost == floors.Cost(flops=128 + 4 * 64, bytes=(112 + 192) * BF16)


def test_naive_patchify_by_hand():
    # x (1, 1, 2, 2), weight (3, 1, 2, 2), bias (3,), patch 2 -> one patch, D = 3.
    #   conv       read x 4 + w 12 + b 3, write 3     22   (flatten / transpose are views)
    #   cat(cls)   read cls 3 (expanded: 3 distinct) + tokens 3, write 6       12
    #   + pos      read 6 + pos 6, write 6            18   -> 52 elements
    # FLOPs: 2 * (1 token) * 3 * 4.
    x, w, b = floors.meta((1, 1, 2, 2)), floors.meta((3, 1, 2, 2)), floors.meta((3,))
    cls, pos = floors.meta((1, 1, 3)), floors.meta((1, 2, 3))
    cost, _ = floors.count(lambda: patch_embed_reference(x, w, b, cls_token=cls, pos_embed=pos))
    assert cost == floors.Cost(flops=24, bytes=52 * BF16)


def test_in_place_op_reads_and_writes_its_target():
    x, y = floors.meta((5,)), floors.meta((5,))
    cost, by_op = floors.count(lambda: x.add_(y))
    assert cost.bytes == 3 * 5 * BF16 and by_op == {"add_": 3 * 5 * BF16}
    cost, by_op = floors.count(lambda: x.copy_(y))  # overwrites x without reading it
    assert by_op == {"copy_": 2 * 5 * BF16}


def test_distinct_bytes_counts_an_expanded_tensor_once():
    t = torch.empty(3, 1, dtype=torch.bfloat16).expand(3, 7)
    assert floors.distinct_bytes(t) == 3 * BF16
    assert floors.distinct_bytes(torch.empty(3, 7, dtype=torch.float32).t()) == 21 * 4


def test_floor_is_the_larger_of_compute_and_memory_time():
    spec = floors.DeviceSpec("card", bytes_per_s=2e12, flops_per_s=100e12, source="test")
    memory_bound = floors.Cost(flops=10 * 10 ** 12, bytes=4 * 10 ** 12)  # 0.1 s of math, 2 s of traffic
    compute_bound = floors.Cost(flops=300 * 10 ** 12, bytes=2 * 10 ** 12)  # 3 s of math, 1 s of traffic
    assert memory_bound.floor_s(spec) == pytest.approx(2.0) and memory_bound.bound(spec) == "memory"
    assert compute_bound.floor_s(spec) == pytest.approx(3.0) and compute_bound.bound(spec) == "compute"
    rec = floors.case_floors(memory_bound, compute_bound, devices=[spec])["devices"]["card"]
    assert rec["vitkern_us"] == pytest.approx(2e6) and rec["naive_us"] == pytest.approx(3e6)
    assert rec["speedup_bound"] == pytest.approx(1.5)


def test_device_figures():
    # H200 measured (copy bandwidth, bf16 matmul); H100 SXM5 datasheet (dense bf16, not the sparse 2x figure).
    assert (floors.H200.bytes_per_s, floors.H200.flops_per_s) == (4.3e12, 790e12)
    assert (floors.H100.bytes_per_s, floors.H100.flops_per_s) == (3.35e12, 989.4e12)


def test_attention_kernel_floor_and_bound_by_hand():
    # vitkern's fused forward reads q, k, v and writes out: 4 x 8 elements = 64 bytes against naive's 224,
    # and both are memory-bound at this size on an H200, so physics allows 224 / 64 = 3.5x.
    import bench_attention

    case = bench_attention.AttnCase("hand", B=1, heads=1, N=4, head_dim=2)
    fwd = bench_attention.MODES[0]
    kernel = floors.Cost(bench_attention.kernel_flops(case, fwd), bench_attention.kernel_min_bytes(case, fwd, BF16))
    assert kernel == floors.Cost(flops=128, bytes=64)
    naive, _ = floors.count(_attention_naive(False))
    rec = floors.case_floors(kernel, naive)["devices"]["H200"]
    assert rec["vitkern_us"] == pytest.approx(64 / 4.3e12 * 1e6)
    assert rec["speedup_bound"] == pytest.approx(3.5)
