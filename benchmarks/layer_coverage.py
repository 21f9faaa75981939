"""Share of the weight bytes that DPKFAC and QAT actually cover on models this project did not write.

Client models, each as a plain LightningModule: Lightning's demo ``LightningTransformer`` (an ``nn.Transformer``
with an input embedding and an untied output layer), a small random Hugging Face ``GPT2LMHeadModel``
(``transformers`` Conv1D layers, tied ``lm_head``), an ``nn.TransformerEncoder`` classifier and a BatchNorm CNN.

- K-FAC: a ``KFACPreconditioner`` over the LightningModule, one training forward/backward and ``step()``; a
  weight counts as covered when its layer has factors afterwards (not run on the demo at its WikiText-2
  vocabulary, whose output layer would need a 33278 x 33278 factor) (so a layer whose hooks never fire, like
  ``nn.MultiheadAttention.out_proj`` before the layer registry, does not count).
- QAT: ``convert_to_qat`` on a copy, one forward; a weight counts when it sits in a QAT layer.

Weights are parameters with two or more dimensions (embeddings included), tied ones counted once. The script
uses only names that exist before and after the layer registry, so the same command measures both checkouts::

    PYTHONPATH=. python benchmarks/layer_coverage.py --quick --json coverage.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.quantization import convert_to_qat


class EncoderClassifier(pl.LightningModule):
    """``nn.TransformerEncoder`` over token embeddings, mean-pooled, then a linear head."""

    def __init__(self, vocab: int = 128, width: int = 128, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, dim_feedforward=4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


class BatchNormCNN(pl.LightningModule):
    """Conv-BN-ReLU twice, pooled, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class HFGPT2(pl.LightningModule):
    """A random ``GPT2LMHeadModel`` from a small ``GPT2Config``."""

    def __init__(self, vocab: int, context: int, width: int, layers: int) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=4, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids).logits  # type: ignore[no-any-return]


def clients(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Tensor]]]:
    """``name -> (build, loss of one batch)``."""
    from lightning.pytorch.demos import LightningTransformer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 32), generator=g)

    def lm_loss(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))

    def demo_loss(model: nn.Module) -> Tensor:
        out = model(ids, ids)  # log-probabilities (B*T, V)
        return F.nll_loss(out, ids.reshape(-1))

    vocab = 33278  # the demo's WikiText-2 vocabulary
    return {
        "demo LightningTransformer (vocab 33278)": (lambda: LightningTransformer(vocab), demo_loss),
        "demo LightningTransformer (vocab 128)": (lambda: LightningTransformer(128), demo_loss),
        "HF GPT2LMHeadModel (E=128, 4 layers)": (lambda: HFGPT2(128, 64, 128, 4), lambda m: lm_loss(m(ids))),
        "nn.TransformerEncoder classifier": (
            EncoderClassifier,
            lambda m: F.cross_entropy(m(ids), ids[:, 0] % 10),
        ),
        "BatchNorm CNN": (
            BatchNormCNN,
            lambda m: F.cross_entropy(m(torch.randn(4, 3, 16, 16, generator=g)), ids[:, 0] % 10),
        ),
    }


def weights(model: nn.Module) -> dict[int, tuple[str, int]]:
    """``id -> (name, bytes)`` of the weight parameters (two or more dimensions, tied ones once)."""
    return {
        id(p): (name, p.numel() * p.element_size())
        for name, p in model.named_parameters()
        if p.dim() >= 2 and "quantizer" not in name
    }


def share(model: nn.Module, covered: set[int]) -> dict[str, Any]:
    table = weights(model)
    total = sum(b for _, b in table.values())
    got = sum(b for i, (_, b) in table.items() if i in covered)
    skipped = sorted(((n, b) for i, (n, b) in table.items() if i not in covered), key=lambda t: -t[1])
    return {
        "covered_bytes": got,
        "total_bytes": total,
        "fraction": round(got / total, 4),
        "covered_count": sum(1 for i in table if i in covered),
        "total_count": len(table),
        "largest_skipped": [n for n, _ in skipped[:3]],
    }


def kfac_coverage(build: Callable[[], nn.Module], loss: Callable[[nn.Module], Tensor]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().train()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None))
    loss(model).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfac.step()
    covered = set()
    for layer in kfac.layers:
        if layer.a_factor is not None:
            weight = getattr(layer, "weight", None)
            covered.add(id(weight if weight is not None else layer.module.weight))
    return share(model, covered)


def qat_coverage(build: Callable[[], nn.Module], loss: Callable[[nn.Module], Tensor]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = convert_to_qat(build().train())
    loss(model)  # runs
    covered = {
        id(p)
        for m in model.modules()
        if type(m).__name__.startswith("QAT")
        for name, p in m.named_parameters()
        if "quantizer" not in name
    }
    return share(model, covered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same measurement (it takes seconds)")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args()
    records = []
    for name, (build, loss) in clients(args.quick).items():
        for feature, measure in (("DPKFAC", kfac_coverage), ("QAT", qat_coverage)):
            if feature == "DPKFAC" and "33278" in name:
                continue  # its output layer's G factor would be 33278 x 33278 (4.4 GB): not a K-FAC model
            record = {"model": name, "feature": feature, **measure(build, loss)}
            records.append(record)
            print(
                f"{name:42s} {feature:6s} {100 * record['fraction']:6.1f}% of {record['total_bytes'] / 2**20:7.2f} MiB"
                f"  ({record['covered_count']}/{record['total_count']} tensors; largest skipped:"
                f" {', '.join(record['largest_skipped']) or '-'})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
