"""fedsky: federated training and fine-tuning of language models across clouds."""

from fedsky.config import JobConfig, load_job
from fedsky.errors import FedskyError

__all__ = ["FedskyError", "JobConfig", "load_job"]
__version__ = "0.1.0"
