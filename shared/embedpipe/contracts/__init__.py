"""Contracts: what the parts of embedpipe and its users agree on, with no behaviour behind it. The CloudEvents
we publish and parse (``events``, payload JSON Schemas in ``schemas/``), the records we store and the payloads we
publish, typed with one constructor each (``records``), and the BEIR dataset layout with its record checks
(``datasets``). The lowest layer: it imports nothing else from embedpipe, so a subscriber or a tool can depend
on it alone."""
