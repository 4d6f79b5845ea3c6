"""A dataset as stored: its BEIR files in the data bucket (``datasets/<dataset>/``) plus the BigQuery tables its
``source.json`` names (``bqsource``), read into one ``contracts.datasets.Dataset``. The format and its checks are
``contracts.datasets``; this module only reads.
"""

from __future__ import annotations

from collections.abc import Callable

from embedpipe.config import Settings
from embedpipe.contracts import datasets
from embedpipe.gcp import storage


class KnownLinesUnreadable(RuntimeError):
    """The known lines (the live id/hash table) could not be read: not a fault of any dataset file, so no caller
    may take it for one (a NotFound here is not a file gone between listing and reading)."""


def load_gcs(
    data_bucket: str,
    dataset: str,
    *,
    settings: Settings,
    test: bool = True,
    max_bytes: int | None = None,
    exclude: frozenset[str] = frozenset(),
    generations: dict[str, int] | None = None,
    as_of=None,
    known: datasets.KnownLines | Callable[[], datasets.KnownLines] | None = None,
) -> datasets.Dataset:
    """The dataset as stored. ``test=False`` (the trainer) never opens ``qrels/test.tsv`` (nor a test qrels table):
    test labels cannot reach training or any choice made from them. With ``max_bytes``, a file over it raises
    DatasetError unread. Files and BigQuery parts named in ``exclude`` (relative paths, ``source.json#corpus``) are
    left out; ``generations`` receives each read file's generation. A ``source.json`` adds the BigQuery parts it
    names (``bqsource``, with ``settings``), read as of ``as_of`` (a datetime; None: now). ``known``: corpus lines
    not parsed again (``datasets.parse_corpus``), or a function returning them, called once everything is read and
    before the parse (the incremental embed job reads the live table meanwhile)."""
    root = datasets.prefix(data_bucket, dataset)
    files, tables = {}, {}
    for uri, generation, size, encoding in storage.list_objects(root):
        rel = uri[len(root) :]
        if generations is not None:
            generations[rel] = generation
        if datasets.classify(rel) and (test or rel != datasets.TEST_QRELS) and rel not in exclude:
            if max_bytes is not None and (problem := datasets.size_problem(size, max_bytes, encoding)):
                raise datasets.DatasetError(rel, None, problem)
            # the version whose size was checked (NotFound if replaced since: intake.load_valid loads again)
            data = storage.read_bytes(uri, generation if max_bytes is not None else None)
            if rel == datasets.SOURCE_FILE:
                tables = _source_tables(data, settings, test, exclude, as_of, max_bytes)
            else:
                files[rel] = data
    if callable(known):
        try:
            known = known()
        except Exception as exc:
            raise KnownLinesUnreadable(f"the known corpus lines could not be read: {exc!r}") from exc
    return datasets.load_files(dataset, files, tables, known=known)


def _source_tables(
    data: bytes, settings: Settings, test: bool, exclude: frozenset[str], as_of, max_bytes: int | None
) -> dict:
    from embedpipe.gcp import bqsource

    parts = [p for p in bqsource.parse(data) if p.rel not in exclude and (test or p.split != "test")]
    # a table over the object cap is refused like a file (when BigQuery knows its size)
    return {p: bqsource.records(p, settings, as_of, max_bytes) for p in parts}
