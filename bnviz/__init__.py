"""bnviz: the helper package of the batch normalization course.

One concept per module: ``norms`` (BN from scratch), ``models`` (the LeNet builder),
``data`` (device-resident data sets), ``train`` (Config, LiveParams, Trainer, History).
The dashboard (``bnviz.dashboard``) is imported on its own, since it needs ipywidgets.
"""
from .data import Dataset, load_dataset, make_synthetic
from .models import PRESETS, LeNetSpec, build_lenet, norm_layers, preset
from .norms import BatchNorm, D2LBatchNorm, LiteBatchNorm, batch_norm
from .train import Config, History, LiveParams, Trainer, train

__version__ = "0.1.0"
__all__ = ["Dataset", "load_dataset", "make_synthetic", "PRESETS", "LeNetSpec", "build_lenet",
           "norm_layers", "preset", "BatchNorm", "D2LBatchNorm", "LiteBatchNorm", "batch_norm",
           "Config", "History", "LiveParams", "Trainer", "train"]
