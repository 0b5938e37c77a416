"""Image classification transfer: linear probe, k-NN and fine-tuning on registered data sets."""
from tasks.classification import task  # noqa: F401  (registers the adapter)
