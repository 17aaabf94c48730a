"""fp32 matmul throughput of PyTorch (TF32 off) for the sizes of bench/gpu/matmul.ts: chained products,
timed with CUDA events (or wall time on CPU). Run: python3 bench/peers/torch_matmul.py [cuda|cpu] [sizes] [reps]"""
import json
import sys
import time

import torch

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
sizes = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "1024,2048,4096").split(",")]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
for n in sizes:
    a = torch.randn(n, n, device=device) / n ** 0.5
    b = torch.randn(n, n, device=device) / n ** 0.5

    def chain():
        x = a
        for _ in range(reps):
            x = x @ b
        return x

    chain()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        chain()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / reps
    else:
        t0 = time.perf_counter()
        chain()
        ms = (time.perf_counter() - t0) * 1000 / reps
    print(json.dumps({"n": n, "torchGflops": round(2 * n ** 3 / (ms * 1e6), 1)}), flush=True)
