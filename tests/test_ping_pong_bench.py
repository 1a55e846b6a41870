"""The ping-pong benchmark's reading of a profiler trace: how much of the GPU's NCCL time other kernels ran beside."""

from gptoss_serve.bench.ping_pong import covered, merged, nccl_overlap


def test_merged_joins_overlapping_intervals():
    assert merged([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert merged([]) == []


def test_covered_counts_only_the_shared_length():
    assert covered([(0, 10)], [(2, 4), (6, 12)]) == 6
    assert covered([(0, 2), (5, 9)], [(1, 6)]) == 2
    assert covered([(0, 2)], [(3, 4)]) == 0


def test_nccl_overlap_of_a_trace():
    kernels = [("ncclDevKernel_SendRecv", 0, 100), ("ncclDevKernel_Recv", 50, 150),  # 150 µs of NCCL in all
               ("attention_kernel", 120, 200), ("gemm", 10, 40)]  # beside it: 30 + 30
    assert nccl_overlap(kernels) == {"nccl_us": 150, "other_us": 110, "overlap_us": 60}
    assert nccl_overlap([("gemm", 0, 5)]) == {"nccl_us": 0, "other_us": 5, "overlap_us": 0}
