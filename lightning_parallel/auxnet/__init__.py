"""AuxNet: forward-unlocked layer-parallel training with auxiliary networks and penalty / AL local losses.

Sun, Dong et al., "Layer-Parallel Training of Residual Networks with Auxiliary-Variable Networks"
(arXiv 2112.05387). The objectives are written down in :mod:`lightning_parallel.auxnet.objective`, the
execution over ranks in :mod:`lightning_parallel.auxnet.runtime`. This package imports no Lightning.
"""

from lightning_parallel.auxnet.aux_nets import build_aux_nets, default_aux_net, split_trunk_with_aux_nets
from lightning_parallel.auxnet.messages import Messenger
from lightning_parallel.auxnet.objective import LOSSES, RhoSchedule, constraint_term
from lightning_parallel.auxnet.options import AuxNetOptions
from lightning_parallel.auxnet.runtime import AuxNetRuntime
from lightning_parallel.auxnet.stage import AuxNetStage

__all__ = [
    "LOSSES",
    "AuxNetOptions",
    "AuxNetRuntime",
    "AuxNetStage",
    "Messenger",
    "RhoSchedule",
    "build_aux_nets",
    "constraint_term",
    "default_aux_net",
    "split_trunk_with_aux_nets",
]
