"""The local stack (``embedpipe up``/``down``: emulators, Milvus Lite, functions and services as processes,
``stack``) and its reconcile ticker (``ticker``, the local stand-in for Cloud Scheduler)."""
