"""Does ``refresh --finetune-encoder`` help? The same store refreshed with and without it.

One store is built from the generated shop (MiniLM, the store's default document),
encoded, and copied; one copy runs ``refresh(since="all")``, the other the same
refresh with ``finetune_encoder=True``. Both start from version 1 with the same seed
and are judged on the same holdout (the newest 10 % of events), so the difference
in the candidates' metrics is the fine-tuned encoder's. Printed: both candidates'
NDCG@10 / Recall@10 / AUC, their ratio, and the time each refresh took.

Run: ``python benchmarks/bench_finetune.py [--size small] [--steps N] [--device cuda]``
(steps default to refresh's: one pass over the positives, at most 60 on a CPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynstore  # noqa: E402
from dynstore.demo import DEMO_RULES  # noqa: E402
from dynstore.samples import shop  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="samples.shop size (tiny, small, medium or a row count)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: refresh's)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        frames = shop.generate(int(args.size) if args.size.isdigit() else args.size, seed=0)
        store = dynstore.init(work / "plain", **DEMO_RULES)
        for kind in ("users", "items", "interactions"):
            store.ingest(kind, frames[kind])
        enc = store.encode(device=args.device)
        store.close()
        print(f"shop {args.size!r}: {enc.items} items encoded in {enc.seconds:.1f}s on {enc.device}")
        shutil.copytree(work / "plain", work / "finetuned")
        out = {}
        for name, opts in (("plain", {}), ("finetuned", {"finetune_encoder": True, "finetune_steps": args.steps})):
            with dynstore.connect(work / name) as s:
                t0 = time.perf_counter()
                r = s.refresh(since="all", device=args.device, **opts)
                out[name] = {"seconds": round(time.perf_counter() - t0, 1), "candidate": r.metrics["candidate"],
                             "status": r.status, "durations": r.durations, "finetune": r.finetune}
        a, b = out["plain"]["candidate"], out["finetuned"]["candidate"]
        print(f"{'':<22}{'NDCG@10':>9}{'Recall@10':>11}{'AUC':>8}{'refresh s':>11}")
        for name in ("plain", "finetuned"):
            m = out[name]["candidate"]
            print(f"{name + ' candidate':<22}{m['ndcg@10']:>9.4f}{m['recall@10']:>11.4f}{m['auc']:>8.4f}"
                  f"{out[name]['seconds']:>11.1f}")
        print(f"{'ratio':<22}{b['ndcg@10'] / a['ndcg@10']:>8.3f}x{b['recall@10'] / a['recall@10']:>10.3f}x"
              f"{b['auc'] / a['auc']:>7.3f}x   ({a['n_users']} holdout users)")
        ft = out["finetuned"]["finetune"]
        print(f"fine-tune: {ft['steps']} steps of the last {ft['layers']} layers in {ft['seconds']:.1f}s, "
              f"objective {ft['loss_before']:.4f} -> {ft['loss_after']:.4f}; new encoder {ft['encoder']}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
