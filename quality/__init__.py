"""``make quality``: retrieval quality of the whole pipeline on a real BEIR collection (see ``quality.run``)."""
