"""Check a measured profile against an independent measurement that shares no code with the profiler.

numpy (single-threaded OpenBLAS, no torch) times:
- a STREAM-like read (BLAS dot, GEMV) and copy over 1 GiB arrays -> compare with `memory_read_gbps(1)`;
- a gated expert FFN in float32 at 1 and 32 tokens, weights rotated through copies larger than twice the
  LLC -> compare with `cpu_expert_seconds(H, I, "float32", tokens, 1)`.

    .venv/bin/python bench/diagnostics/check_profile.py profiles/<host>.yaml [--hidden 1024 --intermediate 3584]

Prints one line per figure: profile, independent, ratio. Best-of-N for bandwidth (STREAM's convention),
median for the expert (as the profile records it).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads its BLAS: one thread, like threads=1
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from planner.profile import Profile  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def median_seconds(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("profile")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--gib", type=float, default=1.0)
    args = p.parse_args()
    prof = Profile.load(args.profile)

    n = int(args.gib * (1 << 30)) // 8
    a = np.ones(n, dtype=np.float64)
    b = np.empty_like(a)
    # numpy's sum is pairwise and does not stream at full rate; BLAS ddot (a with itself: read once) and
    # a GEMV over the same bytes do. The best of the two, as the profile keeps its best kernel.
    rows, v = a.reshape(-1, 4096), np.ones(4096)
    read = max(a.nbytes / best_seconds(lambda: a @ a, 7), a.nbytes / best_seconds(lambda: rows @ v, 7)) / 1e9
    # STREAM counts copy as 2 x bytes (read a, write b); the write-allocate read of b is not counted.
    copy = 2 * a.nbytes / best_seconds(lambda: np.copyto(b, a), 7) / 1e9
    del a, b
    print(f"DRAM read 1 thread: profile {prof.memory_read_gbps(1):.2f} GB/s, numpy dot/gemv {read:.2f} GB/s "
          f"(ratio {prof.memory_read_gbps(1) / read:.2f}); numpy STREAM copy {copy:.2f} GB/s")

    h, i = args.hidden, args.intermediate
    rng = np.random.default_rng(0)
    w_in = (rng.standard_normal((2 * i, h)) * 0.02).astype(np.float32)
    w_out = (rng.standard_normal((h, i)) * 0.02).astype(np.float32)
    one = w_in.nbytes + w_out.nbytes
    copies = max(2, -(-(640 << 20) // one))  # > twice a 300 MiB LLC: every call reads from DRAM
    pool = [(w_in.copy(), w_out.copy()) for _ in range(copies)]
    state = {"k": 0}

    def expert(x: np.ndarray) -> None:
        wi, wo = pool[state["k"]]
        state["k"] = (state["k"] + 1) % copies
        hdn = x @ wi.T
        g, u = hdn[:, :i], hdn[:, i:]
        (g / (1 + np.exp(-g)) * u) @ wo.T

    for tokens in (1, 32):
        x = rng.standard_normal((tokens, h)).astype(np.float32)
        t = median_seconds(lambda: expert(x), 15)
        pt = prof.cpu_expert_seconds(h, i, "float32", tokens, 1)
        print(f"expert {h}x{i} float32, {tokens} tokens, 1 thread: profile {pt * 1e3:.3f} ms, "
              f"numpy {t * 1e3:.3f} ms (ratio {pt / t:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
