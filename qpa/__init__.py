"""QPA: quantum-generated and quantum-inspired adapters for language models.

The library half of the product: circuits, backends, generators, adapter methods,
the trainer and the exporter. It knows nothing about the web service or Celery.
"""

from qpa.config import JobConfig, load_config
from qpa.errors import ConfigError, JobCancelled, QPAError

__all__ = ["ConfigError", "JobCancelled", "JobConfig", "QPAError", "load_config"]
__version__ = "0.1.0"
