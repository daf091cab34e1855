"""bnviz: the helper package of the batch normalization course.

One concept per module: ``norms`` (BN from scratch), ``models`` (the LeNet builder),
``data`` (device-resident data sets), ``config`` (Config, LiveParams), ``history`` (History,
save/load), ``train`` (Trainer, train), ``callbacks``, ``fastpath`` (compile and capture),
``grid`` (K runs at once), ``precise`` (PreciseBN), ``stats`` (population statistics, folding, per-channel reading).
The dashboard (``bnviz.dashboard``) is imported on its own, since it needs ipywidgets.
"""
from .data import Dataset, load_dataset, make_synthetic
from .models import PRESETS, LeNetSpec, build_lenet, norm_layers, preset
from .norms import BatchNorm, D2LBatchNorm, LiteBatchNorm, batch_norm
from .config import Config, LiveParams
from .history import History, load_histories, save_histories
from .train import Trainer, train

__version__ = "0.1.0"
__all__ = ["Dataset", "load_dataset", "make_synthetic", "PRESETS", "LeNetSpec", "build_lenet",
           "norm_layers", "preset", "BatchNorm", "D2LBatchNorm", "LiteBatchNorm", "batch_norm",
           "Config", "History", "LiveParams", "Trainer", "train", "load_histories", "save_histories"]
