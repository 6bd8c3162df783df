"""The mixed batch sampler: a fixed ratio of box to salient samples in every batch.

An epoch is one pass over (this rank's slice of) the salient set; box samples are drawn
at random without replacement from a stream of permutations that continues across
epochs (the paper's answer to COCO's imbalance). Everything is a pure function of
(seed, step, rank, world size), so the sampler's state is just the step number: a run
resumed at step k draws exactly what an uninterrupted run draws.

Several datasets of a kind (box sets, salient folders) share one index space
(:class:`SetMix`): drawn in proportion to their sizes, or to the weights the config gives.

Keys yielded are ``(kind, index, sample_seed)`` with kind 0 = box, 1 = salient; the
sample seed drives that sample's augmentation, independent of workers.
"""

from __future__ import annotations

import bisect
import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from boxcaseg.kernels.mil_smooth_common import bag_labels

BOX, SALIENT = 0, 1


def split_batch(batch_size: int, box_per_batch: int = 9, salient_per_batch: int = 7) -> tuple[int, int]:
    """Scale a box:salient ratio to ``batch_size``, keeping at least one of each kind."""
    total = box_per_batch + salient_per_batch
    if box_per_batch == 0 or salient_per_batch == 0 or batch_size < 2:
        return (batch_size, 0) if salient_per_batch == 0 else (0, batch_size) if box_per_batch == 0 else (batch_size, 0)
    ns = int(round(batch_size * salient_per_batch / total))
    ns = min(max(ns, 1), batch_size - 1)
    return batch_size - ns, ns


def _sample_seed(seed: int, step: int, rank: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, j]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SetMix:
    """How the items of several datasets of one kind are drawn: one index space of
    ``virtual`` positions that the sampler permutes, each mapped to a dataset's item.

    Without weights, set k holds ``sizes[k]`` positions: the sets are drawn in proportion to
    their sizes and position v is item v of their concatenation (one set: the identity).
    With weights, set k holds ``V_k = max(1, round(N * w_k / sum(w)))`` positions (N = the
    sets' total size): its share of the draws is its weight's. Position ``v`` of set k in
    the sampler's ``cycle`` c (its pass over the positions) is item ``(c * V_k + v) mod n_k``
    of that set, so a set with fewer positions than items shows the next ones each cycle,
    and one with more repeats its items. Pure arithmetic: the draws stay a function of
    (seed, step).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None):
        self.sizes = [int(n) for n in sizes]
        if any(n < 0 for n in self.sizes):
            raise ValueError(f"negative dataset size in {self.sizes}")
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.weighted = bool(weights)
        if self.weighted:
            if len(weights) != len(self.sizes):
                raise ValueError(f"{len(weights)} weight(s) for {len(self.sizes)} dataset(s)")
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"weights must be finite numbers > 0, got {list(weights)}")
            total, wsum = sum(self.sizes), float(sum(weights))
            self.virtual = [max(1, round(total * w / wsum)) if n else 0 for n, w in zip(self.sizes, weights)]
        else:
            self.virtual = list(self.sizes)
        self.voffsets = [0]
        for v in self.virtual:
            self.voffsets.append(self.voffsets[-1] + v)

    def __len__(self) -> int:
        return self.voffsets[-1]

    def shares(self) -> list[float]:
        """Each set's fraction of the draws."""
        n = len(self)
        return [v / n if n else 0.0 for v in self.virtual]

    def item(self, position: int, cycle: int) -> int:
        """The concatenation index of the item drawn at ``position`` in pass ``cycle``."""
        if not self.weighted:
            return position
        k = bisect.bisect_right(self.voffsets, position) - 1
        local = position - self.voffsets[k]
        return self.offsets[k] + (cycle * self.virtual[k] + local) % self.sizes[k]


class MixedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``n_box`` box keys followed by ``n_salient`` salient keys.

    n_box_items / n_salient_items: dataset sizes, or :class:`SetMix` of several datasets;
    steps ``start_step .. end_step - 1``.
    """

    def __init__(
        self,
        n_box_items: int | SetMix,
        n_salient_items: int | SetMix,
        n_box: int,
        n_salient: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        end_step: int = 1000,
    ):
        self.box_mix = n_box_items if isinstance(n_box_items, SetMix) else SetMix([n_box_items])
        self.salient_mix = n_salient_items if isinstance(n_salient_items, SetMix) else SetMix([n_salient_items])
        n_box_items, n_salient_items = len(self.box_mix), len(self.salient_mix)
        if n_box and n_box_items <= 0:
            raise ValueError("box samples requested but the box set is empty")
        if n_salient and n_salient_items <= 0:
            raise ValueError("salient samples requested but the salient set is empty")
        self.n_box_items, self.n_salient_items = n_box_items, n_salient_items
        self.n_box, self.n_salient = n_box, n_salient
        self.seed, self.rank, self.world = seed, rank, world_size
        self.start_step, self.end_step = start_step, end_step

    # -- permutations (same on every rank; each rank takes its own stride slice)
    @lru_cache(maxsize=4)
    def _salient_slice(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n_salient_items)
        return perm[self.rank::self.world] if len(perm) >= self.world else perm

    @lru_cache(maxsize=4)
    def _box_slice(self, cycle: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, 0, cycle]).permutation(self.n_box_items)
        return perm[self.rank::self.world] if len(perm) >= self.world else perm

    def steps_per_epoch(self) -> int:
        if self.n_salient:
            return max(1, len(self._salient_slice(0)) // self.n_salient)
        return max(1, len(self._box_slice(0)) // max(self.n_box, 1))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch()

    def _box_draws(self, step: int) -> list[int]:
        per_cycle = len(self._box_slice(0))
        out = []
        for pos in range(step * self.n_box, (step + 1) * self.n_box):
            cycle, off = divmod(pos, per_cycle)
            sl = self._box_slice(cycle)
            out.append(self.box_mix.item(int(sl[off % len(sl)]), cycle))
        return out

    def _salient_draws(self, step: int) -> list[int]:
        spe = self.steps_per_epoch()
        epoch, i = divmod(step, spe)
        sl = self._salient_slice(epoch)
        return [self.salient_mix.item(int(sl[(i * self.n_salient + j) % len(sl)]), epoch)
                for j in range(self.n_salient)]

    def batch(self, step: int) -> list[tuple[int, int, int]]:
        keys = [(BOX, b, 0) for b in self._box_draws(step)] + [(SALIENT, s, 0) for s in self._salient_draws(step)]
        return [(k, i, _sample_seed(self.seed, step, self.rank, j)) for j, (k, i, _) in enumerate(keys)]

    def __iter__(self):
        for step in range(self.start_step, self.end_step):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


class ConcatSets(torch.utils.data.Dataset):
    """Several datasets of one kind as one: index ``i`` of the concatenation, key
    ``(index, seed)`` passed on with the index made local."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset]):
        self.datasets = list(datasets)
        self.offsets = [0]
        for ds in self.datasets:
            self.offsets.append(self.offsets[-1] + len(ds))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, key)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} outside the {len(self)} items of the datasets")
        k = bisect.bisect_right(self.offsets, idx) - 1
        return self.datasets[k][(idx - self.offsets[k], seed)]


class MixedDataset(torch.utils.data.Dataset):
    """Routes ``(kind, index, seed)`` keys to the box or the salient dataset."""

    def __init__(self, box_ds, salient_ds):
        self.box_ds, self.salient_ds = box_ds, salient_ds

    def __len__(self) -> int:
        return (len(self.box_ds) if self.box_ds else 0) + (len(self.salient_ds) if self.salient_ds else 0)

    def __getitem__(self, key):
        kind, idx, seed = key
        ds = self.box_ds if kind == BOX else self.salient_ds
        return ds[(idx, seed)]


def collate(batch):
    """(images [N,3,S,S], targets [N,C,S,S], is_salient [N], bags [N, 2S]). Labels with fewer
    channels than the widest (salient masks beside box labels that carry a pseudo mask) get
    -1 (ignore) in the missing ones. ``bags`` are the weak map's MIL bag labels in compact
    form (uint8, each row's then each column's: the box extent, or the rows and columns the
    salient mask touches), made here in the loader's workers so that the loss kernels
    read no dense label map."""
    images = torch.stack([b[0] for b in batch])
    c = max(b[1].shape[0] for b in batch)
    targets = torch.stack([b[1] if b[1].shape[0] == c else
                           torch.cat([b[1], b[1].new_full((c - b[1].shape[0], *b[1].shape[1:]), -1.0)])
                           for b in batch])
    is_salient = torch.tensor([bool(b[2]) for b in batch])
    return images, targets, is_salient, bag_labels(targets[:, :1])
