"""twotower-assets: a TFRS two-tower retrieval pipeline as a Dagster asset graph.

TensorFlow Recommenders 0.7.x needs Keras 2 (the ``tf-keras`` package). TensorFlow picks
the Keras implementation when it is first imported, so the switch is set here, in the one
module every other module of the package is imported through.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up chatter (oneDNN notes, missing CUDA) hides real log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
