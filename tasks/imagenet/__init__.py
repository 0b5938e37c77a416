"""ImageNet-1k evaluation of a backbone's own classifier (``task=imagenet``)."""
from tasks.imagenet import task  # noqa: F401  (registers the adapter and the eval protocol)
