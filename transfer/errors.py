"""User-facing errors: ``python -m transfer.run`` prints these as one message, with no traceback."""


class TransferError(Exception):
    """Bad input or an impossible request; the message names the bad value and the fix."""


class WeightsError(TransferError):
    """Weights that cannot be found, downloaded, read or loaded."""


class ConfigError(TransferError):
    """A configuration value that is invalid."""


class DataError(TransferError):
    """A data set that is missing, in an unknown layout, or too damaged to use."""


class StorageError(TransferError):
    """A file of the run that cannot be written: a full disk, a quota, a read-only folder."""
