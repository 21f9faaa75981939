"""Example LightningModules that implement the pipeline protocol (used by configs, tests and benchmarks).

:class:`HFGPT2LanguageModel` (a Hugging Face GPT-2, ``hf`` extra) is a plain LightningModule without it.
"""

from lightning_parallel.models.base import PipelineClassifier
from lightning_parallel.models.deq import DEQClassifier
from lightning_parallel.models.flow import CNFDensityModel
from lightning_parallel.models.gpt import GPTLanguageModel
from lightning_parallel.models.hf_gpt2 import HFGPT2LanguageModel
from lightning_parallel.models.mlp import MLPClassifier
from lightning_parallel.models.ode import ODEClassifier
from lightning_parallel.models.resnet import ResNetClassifier

__all__ = [
    "CNFDensityModel",
    "DEQClassifier",
    "GPTLanguageModel",
    "HFGPT2LanguageModel",
    "MLPClassifier",
    "ODEClassifier",
    "PipelineClassifier",
    "ResNetClassifier",
]
