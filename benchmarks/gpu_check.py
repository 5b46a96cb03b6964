"""GPU check: the encoder on CUDA (fp16) vs on the CPU, same run.

Prints CPU and GPU throughput on product documents, the GPU/CPU speed
ratio, and the cosine between CPU fp32 vectors and GPU fp16 vectors (target
>= 0.99; MiniLM usually gives > 0.999).  Without a CUDA device it prints
``no CUDA device: skipped`` and exits 0, so CI can always run it.

    python benchmarks/gpu_check.py --n 10000
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling module, not a package


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="documents encoded on the GPU (default 10000)")
    ap.add_argument("--cpu-n", type=int, default=2_000,
                    help="documents timed on the CPU (a subset keeps the check short; default 2000)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="GPU rounds; the best is kept")
    ap.add_argument("--st", action="store_true", help="also time sentence-transformers on the GPU")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("no CUDA device: skipped (torch is not installed)")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0

    from bench_encode import product_documents

    from dynstore.encoders import HFEncoder, get_encoder

    texts, source = product_documents(args.n, seed=0)
    cpu_texts = texts[: min(args.cpu_n, len(texts))]
    gpu = get_encoder(args.model, device="cuda")
    path = gpu.path
    cpu = HFEncoder(path, device="cpu", max_length=gpu.max_length)  # what a CPU-only machine would use
    cpu32 = cpu if cpu.precision == "fp32" else HFEncoder(path, device="cpu", max_length=gpu.max_length, precision="fp32")
    print(f"{torch.cuda.get_device_name(0)}; {len(texts)} documents from {source}; encoder {gpu.id}")
    print(f"GPU precision {gpu.precision}; CPU precision {cpu.precision}, {torch.get_num_threads()} threads")

    gpu.encode(texts[:512], batch_size=args.batch_size)  # CUDA context, kernels, allocator
    gpu_best = float("inf")
    for _ in range(args.repeat):
        v_gpu, dt = _timed(lambda: gpu.encode(texts, batch_size=args.batch_size))
        gpu_best = min(gpu_best, dt)
    cpu.encode(cpu_texts[:64], batch_size=args.batch_size)
    _, cpu_s = _timed(lambda: cpu.encode(cpu_texts, batch_size=args.batch_size))
    v_cpu32 = cpu32.encode(cpu_texts, batch_size=args.batch_size)

    gpu_rate, cpu_rate = len(texts) / gpu_best, len(cpu_texts) / cpu_s
    cos = (v_gpu[: len(cpu_texts)] * v_cpu32).sum(1)
    print(f"GPU {gpu_rate:.0f} items/s, CPU {cpu_rate:.0f} items/s ({len(cpu_texts)} docs) -> {gpu_rate / cpu_rate:.1f}x")
    print(f"cosine CPU fp32 vs GPU {gpu.precision}: min {cos.min():.5f} mean {cos.mean():.5f}")

    rows = [
        "| encoder | GPU | GPU items/s | CPU items/s | GPU/CPU | cosine CPU fp32 vs GPU fp16 min / mean |",
        "|---|---|---:|---:|---:|---|",
        f"| dynstore ({gpu.precision}) | {torch.cuda.get_device_name(0)} | {gpu_rate:.0f} | {cpu_rate:.0f} | "
        f"{gpu_rate / cpu_rate:.1f}x | {cos.min():.4f} / {cos.mean():.4f} |",
    ]
    if args.st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device="cuda")
        st.encode(texts[:512], batch_size=args.batch_size)
        st_best = min(_timed(lambda: st.encode(texts, batch_size=args.batch_size))[1] for _ in range(args.repeat))
        print(f"sentence-transformers on GPU (fp32): {len(texts) / st_best:.0f} items/s -> dynstore "
              f"{st_best / gpu_best:.2f}x")
        rows.append(f"| sentence-transformers (fp32) | {torch.cuda.get_device_name(0)} | {len(texts) / st_best:.0f} "
                    f"| | | |")
    ok = bool(cos.min() >= 0.99)
    print("\n" + "\n".join(rows))
    print(f"\ncosine check (>= 0.99): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
