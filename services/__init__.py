"""What the API and the worker share: settings, the job store, the artifact store, the
backend registry, the job runner, plus the REST client, CLI commands and ``qpa serve``.

Dependencies point one way: api -> services <- worker, and services -> qpa.
"""
