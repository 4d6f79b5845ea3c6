"""embedpipe.ml.embedding.token_batches: length-sorted batches within a padded-token budget."""

from __future__ import annotations

import random

import pytest

from embedpipe.ml.embedding import padded, shard, token_batches


def check(lengths: list[int], budget: int, max_batch: int = 512) -> list[list[int]]:
    batches = token_batches(lengths, budget, max_batch)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    for b in batches:
        assert b, "no empty batch"
        assert len(b) <= max_batch
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget or len(b) == 1, f"batch {b} pads to {padded} > {budget}"
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True), "longest first"
    return batches


def test_empty():
    assert token_batches([], 100) == []


def test_small_example_exactly():
    # lengths 10, 40, 20, 30 with budget 80: [40, 30] pads to 80; [20, 10] pads to 40
    assert check([10, 40, 20, 30], 80) == [[1, 3], [2, 0]]


def test_single_row_over_budget_gets_its_own_batch():
    batches = check([5, 500, 5, 5], 100)
    assert batches[0] == [1]
    assert batches[1:] == [[0, 2, 3]]


def test_max_batch_caps_rows():
    batches = check([1] * 10, 1000, max_batch=4)
    assert [len(b) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize("seed", range(5))
def test_random_lengths_respect_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 400))]
    batches = check(lengths, 2048, max_batch=64)
    # not wasteful either: a batch only closes when the next row would not fit
    for b, nxt in zip(batches, batches[1:]):
        longest = lengths[b[0]]
        assert len(b) == 64 or (len(b) + 1) * max(longest, lengths[nxt[0]]) > 2048


def test_padded_rounds_up_within_the_cap():
    assert [padded(n, 16) for n in (1, 16, 17, 150)] == [16, 16, 32, 160]
    assert padded(150, 16, cap=150) == 150  # never past the chunk's (or the model's) width
    assert padded(150, 1) == 150


@pytest.mark.parametrize("seed", range(3))
def test_rounded_lengths_keep_the_budget_and_repeat_shapes(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 250) for _ in range(2000)]
    batches = token_batches(lengths, 4096, multiple=16, cap=256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    shapes = [(len(b), padded(max(lengths[i] for i in b), 16, 256)) for b in batches]
    assert all(rows * width <= 4096 for rows, width in shapes)
    # one shape per rounded length (16 of them up to 256), plus the last, partial batch: kernels are reused
    assert len(set(shapes[:-1])) <= 16
    assert len(set(shapes)) < len(batches) / 3


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7])
def test_replica_shards_cover_every_document_exactly_once(count):
    ids = [f"doc-{i}" for i in range(103)]
    shuffled = ids[::-1]  # each replica may list the corpus in another order
    shards = [shard(shuffled if i % 2 else ids, i, count) for i in range(count)]
    assert sorted(x for s in shards for x in s) == sorted(ids)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_replica_index_out_of_range_is_refused():
    with pytest.raises(ValueError):
        shard(["a"], 3, 3)
