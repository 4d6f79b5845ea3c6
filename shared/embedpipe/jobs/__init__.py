"""Jobs: the ``JobSpec``/``JobLauncher`` contract and its backends, the local job runner (``local``, ``runner``)
and Vertex AI (``vertex``), plus the HP-tuning spec (``hypertune``). It launches and watches containers; what runs in
them lives in ``ml`` and ``containers/``, and it never imports either."""
