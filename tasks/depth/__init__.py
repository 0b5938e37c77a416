"""Monocular depth estimation transfer on NYU Depth v2 (``task=nyu_depth``), trained by the shared Lightning engine.

Importing this package registers the ``depth`` task adapter. Reading the labelled ``.mat`` release needs
h5py, imported only when such a copy is read.
"""
from tasks.depth import task as _registers_adapter  # noqa: F401
