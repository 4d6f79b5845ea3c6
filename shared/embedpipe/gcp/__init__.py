"""Google Cloud adapters: object storage (``storage``; fake-gcs-server locally), Pub/Sub (``bus``), push
authentication (``auth``), the retry policy for transient errors of these services (``retries``) and BigQuery as a
dataset source (``bqsource``). Thin wrappers over the official clients; they know the contracts and the settings, and
nothing about runs, jobs or models."""
