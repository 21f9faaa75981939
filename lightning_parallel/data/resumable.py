"""A DataLoader that Lightning can resume in the middle of an epoch.

Design decisions:

- Lightning saves ``state_dict()`` of every training loader that has one in the checkpoint (the fit loop's
  ``combined_loader`` entry) and hands it back to ``load_state_dict`` before the first batch of a resumed
  run. A plain ``DataLoader(shuffle=True)`` has neither: the resumed epoch restarts with a new order drawn
  from the global generator, so the remaining batches are not those the interrupted run would have seen.
- The order of an epoch is a pure function of ``(seed, epoch)``: :class:`EpochRandomSampler` draws
  ``randperm`` from its own generator seeded with ``seed + epoch``, the way ``DistributedSampler`` does.
  Lightning calls ``set_epoch`` on it every epoch. It subclasses ``RandomSampler``, so under DDP Lightning
  still swaps in its own ``DistributedSampler(shuffle=True)``, which is a function of ``(seed, epoch)`` too.
- The seed is Lightning's global seed (``PL_GLOBAL_SEED``, what ``seed_everything`` sets and what Lightning
  gives its ``DistributedSampler``), else one draw of the global generator; it is part of the state.
- The state is the number of batches served in the current epoch. Resuming skips that many batches of the
  epoch's order by index, without loading their data. Lightning does not prefetch from a loader whose
  length it knows, so "served" is "consumed by training" when a checkpoint is written.
- Every generator: Lightning does not checkpoint the global generators (torch CPU/CUDA, ``random``, NumPy),
  so dropout, ``torch.randn`` in ``training_step`` or augmentation drawn in ``__getitem__`` would resume on
  another stream. The state holds every rank's global generators at the moment the checkpoint is written
  (:func:`~lightning_parallel.utils.rng.gather_states`: one ``all_gather_object`` with several processes;
  Lightning asks every rank for the loader's state when it writes a checkpoint). They are put back at the
  point of the resumed run that the checkpoint's moment corresponds to: in the middle of an epoch after the
  iterator exists (creating it draws a seed from the global generator; the interrupted run had created its
  own before the checkpoint) and before the first batch is loaded; at an epoch's end before the next epoch's
  iterator is created. A checkpoint of another number of ranks restores none of them, with a warning.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from lightning_parallel.utils.rng import gather_states, restore, this_rank

__all__ = ["EpochRandomSampler", "ResumableDataLoader", "global_seed"]


def global_seed() -> int:
    """Lightning's global seed (``PL_GLOBAL_SEED``), else one draw of torch's global generator."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class EpochRandomSampler(RandomSampler):
    """A random permutation per epoch, a pure function of ``seed + epoch``.

    Args:
        data_source: the dataset (only its length is used).
        seed: seed of the permutations. ``None`` (default): :func:`global_seed`.
    """

    def __init__(self, data_source: Sized, *, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = global_seed() if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Chooses the permutation of ``epoch`` (Lightning calls this at the start of every epoch)."""
        self.epoch = int(epoch)

    @override
    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict``/``load_state_dict``: the batches served in the current epoch.

    Takes every ``DataLoader`` argument. Pass ``sampler=EpochRandomSampler(dataset)`` for a shuffled order
    that a resumed run can reproduce (``shuffle=True`` draws from the global generator instead).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0
        self._rng: dict[str, Any] | None = None  # this rank's generators, put back at the next iteration

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # a generator: nothing runs until the first batch, after Lightning's set_epoch
        skip, self._skip = self._skip, 0
        rng, self._rng = self._rng, None
        self._served = skip
        if rng is not None and not skip:
            restore(rng)  # an epoch's end: before the next epoch's iterator draws its seed
        iterator: Iterator[Any] = self._remaining(skip) if skip else super().__iter__()
        if rng is not None and skip:
            restore(rng)  # mid-epoch: the interrupted run's iterator already existed
        for batch in iterator:
            self._served += 1
            yield batch

    def _remaining(self, skip: int) -> Iterator[Any]:
        """The batches of this epoch's order after the first ``skip`` (skipped by index, not loaded)."""
        if self.batch_sampler is None:
            raise RuntimeError("ResumableDataLoader resumes batched loaders only (batch_size is None).")
        batches = list(itertools.islice(iter(self.batch_sampler), skip, None))
        rest = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            worker_init_fn=self.worker_init_fn,
            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
            generator=self.generator,
        )
        return iter(rest)

    def state_dict(self) -> dict[str, Any]:
        """Batches served in the current epoch, the sampler's seed and epoch when it has them, every rank's
        global generators (a collective with several processes: call it on every rank)."""
        state: dict[str, Any] = {"served": self._served, "rng": gather_states()}
        sampler = self.sampler
        for name in ("seed", "epoch"):
            if hasattr(sampler, name):
                state[f"sampler_{name}"] = int(getattr(sampler, name))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Makes the next iteration skip the batches the checkpointed run had already served.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        served = int(state_dict.get("served", 0))
        # a checkpoint written after the last batch of an epoch resumes at the next epoch's start
        self._skip = served if served < len(self) else 0
        sampler = self.sampler
        for name in ("seed", "epoch"):
            key = f"sampler_{name}"
            if key in state_dict and hasattr(sampler, name):
                setattr(sampler, name, int(state_dict[key]))
        states = state_dict.get("rng")
        rank, world = this_rank()
        if states is not None and len(states) == world:
            self._rng = states[rank]
        elif states is not None:
            warnings.warn(
                f"The checkpoint holds the random generators of {len(states)} ranks and this run has {world}; "
                "they are not restored, so dropout and other draws from the global generators continue on another "
                "stream (resume with the same number of processes to continue exactly).",
                stacklevel=2,
            )
