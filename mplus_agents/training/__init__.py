"""Co-training the M+ retriever on a user's own text (issue 6 items 3-4; SPEC 5.1-5.3).

`train` is what `mplus train` runs; `collect`, `batch_loss` and `evaluate` are its parts, exposed for the
benchmark (`benchmarks/retriever_precision.py`) and the tests.
"""

from mplus_agents.training.collect import Collected, CollectOptions, collect
from mplus_agents.training.data import Document, Segment, parse_text, read_files
from mplus_agents.training.io import attach_retriever, load_retriever, save_retriever
from mplus_agents.training.loss import balanced_bce, retriever_weights
from mplus_agents.training.trainer import TrainOptions, TrainResult, batch_loss, evaluate, train, trained_layers

__all__ = [
    "CollectOptions",
    "Collected",
    "Document",
    "Segment",
    "TrainOptions",
    "TrainResult",
    "attach_retriever",
    "balanced_bce",
    "batch_loss",
    "collect",
    "evaluate",
    "load_retriever",
    "parse_text",
    "read_files",
    "retriever_weights",
    "save_retriever",
    "train",
    "trained_layers",
]
