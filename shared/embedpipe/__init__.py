"""embedpipe: keep a Milvus index fresh with a domain-tuned embedding model on Google Cloud."""

__version__ = "0.1.0"
