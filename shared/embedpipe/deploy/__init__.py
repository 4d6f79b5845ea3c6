"""The GCP deploy, ``embedpipe deploy gcp --project P --region R [--dry-run]``, one module per job: ``config`` (what is
deployed where, the deployed settings and runtime env), ``plan`` (the topology as an ordered list of ``Step``s, and
the printed plan ``--dry-run`` shows), ``apply`` (runs the steps' gcloud commands, idempotently) and ``staging`` (the
folder each function and service is deployed from, with the requirements its imports need). ``apply`` and ``plan``
sit above ``config`` and ``staging``, which do not import each other (``.importlinter``).
"""
