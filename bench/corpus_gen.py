"""A deterministic generator of short-document BEIR folders with labeled queries, for ``make bench SECTIONS=scale``.

Documents belong to topics (10 documents each); a topic has its own few rare words that its documents mention among
common filler words, so a retriever can find them and recall means something. One query per sampled topic asks for
its rare words in a different order; its qrels are the topic's documents. Topics are split into train queries
(``qrels/train.tsv``, the trainer's pairs) and test queries (``qrels/test.tsv``). Same ``n`` and ``seed``, same bytes.
``mutate`` changes the text of a share of the documents (same ids): the corpus a user's small edit uploads.

    python -m bench.corpus_gen OUT_DIR N [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DOCS_PER_TOPIC = 10
QUERIES = 400  # labeled queries in all, half train, half test (capped by the number of topics)


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(n))


def generate(out: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    common = [_word(rng, 2) for _ in range(2000)]
    topics = max(1, n // DOCS_PER_TOPIC)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    rare: list[list[str]] = []
    with open(out / "corpus.jsonl", "w") as corpus:
        for i in range(n):
            t = i % topics
            while len(rare) <= t:
                rare.append([_word(rng, 4) for _ in range(3)])
            words = rng.sample(common, 12) + rng.sample(rare[t], 2)
            rng.shuffle(words)
            doc = {"_id": f"d{i}", "title": f"{rare[t][0]} {common[i % len(common)]}", "text": " ".join(words)}
            corpus.write(json.dumps(doc) + "\n")
    asked = sorted(rng.sample(range(topics), min(QUERIES, topics)))
    with open(out / "queries.jsonl", "w") as queries:
        for t in asked:
            words = list(rare[t])
            rng.shuffle(words)
            queries.write(json.dumps({"_id": f"q{t}", "text": "what about " + " ".join(words)}) + "\n")
    for split, chosen in (("train", asked[0::2]), ("test", asked[1::2])):
        with open(out / "qrels" / f"{split}.tsv", "w") as qrels:
            qrels.write("query-id\tcorpus-id\tscore\n")
            for t in chosen:
                for i in range(t, n, topics):
                    qrels.write(f"q{t}\td{i}\t1\n")
    return out


def mutate(folder: Path, share: float = 0.01, seed: int = 1) -> int:
    """Rewrite ``folder/corpus.jsonl`` with ``share`` of its documents' text changed (a filler word appended, so
    topics and ids stay); returns how many. Deterministic. The file is replaced by a new one, so a hard link to the
    original keeps it."""
    path = folder / "corpus.jsonl"
    with open(path) as fh:
        n = sum(1 for _ in fh)
    rng = random.Random(seed)
    chosen = set(rng.sample(range(n), min(n, max(1, round(n * share)))))
    tmp = path.with_name(".corpus.jsonl.tmp")
    with open(path) as src, open(tmp, "w") as dst:
        for i, line in enumerate(src):
            if i in chosen:
                doc = json.loads(line)
                doc["text"] = f"{doc['text']} {_word(rng, 3)}"
                line = json.dumps(doc) + "\n"
            dst.write(line)
    tmp.replace(path)
    return len(chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(generate(a.out, a.n, a.seed))


if __name__ == "__main__":
    main()
