"""twotower-assets: a TFRS two-tower retrieval pipeline as a Dagster asset graph.

TensorFlow Recommenders 0.7.x needs Keras 2 (the ``tf-keras`` package). TensorFlow picks
the Keras implementation when it is first imported, so the switch is set here, in the one
module every other module of the package is imported through. The same goes for the other
settings below that must be in the environment before TensorFlow or MLflow read them.
"""

import glob
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up chatter (oneDNN notes) hides real log lines; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def no_nvidia_gpu_here() -> bool:
    """Whether this machine certainly has no NVIDIA GPU TensorFlow could use: no ``/dev/nvidia*``
    device node, no loaded NVIDIA kernel driver (``/proc/driver/nvidia``), no WSL GPU
    (``/dev/dxg``), and ``CUDA_VISIBLE_DEVICES`` not set (a choice someone made)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return False
    return not (glob.glob("/dev/nvidia*") or os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg"))


# The tensorflow wheel carries CUDA support and, when asked for its devices, calls cuInit,
# which fails without a driver and logs an error line ("failed call to cuInit: ... CUDA error")
# on every CPU-only machine. Without a GPU, TensorFlow is told to register its CPU devices only,
# so it never calls cuInit; real errors still print. Set TF_ENABLED_DEVICE_TYPES yourself to
# choose otherwise.
if no_nvidia_gpu_here():
    os.environ.setdefault("TF_ENABLED_DEVICE_TYPES", "CPU")
# TensorFlow's default CPU allocator hands each large tensor (a training step's 4096 x 4096
# logits are 67 MB) to malloc, which maps fresh pages for it and unmaps them when it is freed:
# every step pays a page fault per 4 KB, as much kernel time as the step's own arithmetic.
# The pooling (BFC) allocator keeps the memory it has grown to and reuses it: half the step
# time at production size (docs/benchmarks-training.md). Set it to "false" to opt out.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# MLflow draws a tqdm bar ("Downloading artifacts") each time it reads a model's files back while
# logging or loading it: six per run of the graph, in the run's log, with nothing to act on.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"
