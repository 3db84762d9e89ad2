"""Training input as Ray Data (issue 34): the training and validation splits become Ray Datasets of token
ids, tokenized once per run by map tasks on the cluster's CPUs and materialized in the object store, where
every worker of every trial reads them (`ray.train.get_dataset_shard`) instead of tokenizing its slice of
the texts again.

The splits themselves are still built by ray_jobs.data on the driver (exact, digested). A worker's shard
is defined by each row's position in its split (`position % world == rank`, as before), never by Ray
Data's blocks: the same rows reach the same rank, in the same order, whatever the number of nodes, blocks
or tasks, so a run trains on exactly what it trained on when each worker tokenized its own slice, and a
resumed run finds the same shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ray_jobs.config import ModelConfig
from ray_jobs.data import Split, encode

log = logging.getLogger(__name__)

# Rows per block of the text datasets: the unit of one tokenization task (about 5 MB of IMDB text).
BLOCK_ROWS = 4096
TRAIN, VAL = "train", "val"


@dataclass(frozen=True)
class TokenizedSplits:
    """The materialized datasets (columns `ids`, `label`, `position`), keyed "train" and "val", and what
    the tokenization cost: the worker side reads them by name."""

    datasets: dict[str, Any]
    sizes: dict[str, int]
    seconds: float

    def describe(self) -> str:
        n = sum(self.sizes.values())
        return f"tokenized {n} texts once for every worker and trial in {self.seconds:.1f}s ({n / self.seconds:.0f}/s)"


def _quiet_data_context() -> None:
    """Ray Data's progress bars and execution banners would fill the job's log on every run (the driver's
    and, once per dataset, each worker's)."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


def text_blocks(split: Split, rows: int = BLOCK_ROWS) -> list:
    """`split` as pyarrow tables of `rows` rows: text, label and each row's position in the split."""
    import pyarrow as pa

    return [
        pa.table(
            {
                "text": split.texts[i : i + rows],
                "label": pa.array(split.labels[i : i + rows], pa.int8()),
                "position": pa.array(range(i, min(i + rows, len(split))), pa.int64()),
            }
        )
        for i in range(0, len(split), rows)
    ]


def _encode_batch(batch, tokenizer, max_length: int, truncation: str, head_fraction: float):
    """One block's token ids (a map task): `ray_jobs.data.encode`, as training always tokenized."""
    import pyarrow as pa

    seqs = encode(tokenizer, batch["text"].to_pylist(), max_length, truncation, head_fraction)
    ids = pa.array(seqs, pa.list_(pa.int32()))
    return pa.table({"ids": ids, "label": batch["label"], "position": batch["position"]})


def tokenize_splits(train: Split, val: Split, mc: ModelConfig) -> TokenizedSplits:
    """Both splits tokenized by Ray Data map tasks (one CPU each) and materialized: the object store
    holds the token ids, the driver keeps the references for as long as the run needs them."""
    import ray

    from ray_jobs.model import build_tokenizer

    _quiet_data_context()
    t0 = time.perf_counter()
    kwargs = {
        "tokenizer": build_tokenizer(mc),  # serialized once with the map operator, not per task
        "max_length": mc.max_length,
        "truncation": mc.truncation,
        "head_fraction": mc.head_fraction,
    }
    datasets = {
        name: ray.data.from_arrow(text_blocks(split))
        .map_batches(_encode_batch, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs)
        .materialize()
        for name, split in ((TRAIN, train), (VAL, val))
    }
    out = TokenizedSplits(datasets, {TRAIN: len(train), VAL: len(val)}, time.perf_counter() - t0)
    log.info("%s", out.describe())
    return out


def read_shard(name: str, rank: int, world: int, equal: bool) -> tuple[TokenRows, list[int]]:
    """This rank's rows of dataset `name`, inside a Ray Train worker (see `shard_rows`)."""
    import ray.train

    _quiet_data_context()
    batches = ray.train.get_dataset_shard(name).iter_batches(batch_size=BLOCK_ROWS, batch_format="pyarrow")
    return shard_rows(batches, rank, world, equal)


class TokenRows:
    """A shard's token id sequences in two flat arrays (int32 ids and int64 offsets): about 4 bytes a
    token, where lists of Python ints take about 36. Indexing gives one row as a numpy array."""

    def __init__(self, values, offsets):
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __bool__(self) -> bool:
        return len(self) > 0

    def lengths(self) -> list[int]:
        import numpy as np

        return np.diff(self.offsets).tolist()


def shard_rows(batches: Iterable, rank: int, world: int, equal: bool) -> tuple[TokenRows, list[int]]:
    """(token ids, labels) of this rank's rows, in position order: positions rank, rank + world, ...,
    picked from `batches` (pyarrow tables of a tokenized dataset) in whatever order they come. With
    `equal`, every rank gets the same number of rows (len // world), as DDP needs for training: each step
    all-reduces, and a rank with one batch more would hang. Only this rank's rows are kept, compactly."""
    import numpy as np
    import pyarrow.compute as pc

    positions, lengths, values, labels = [], [], [], []
    total = 0
    for batch in batches:
        pos = batch["position"].to_numpy()
        total += len(pos)
        mine = np.flatnonzero(pos % world == rank)
        if len(mine):
            ids = batch["ids"].take(mine)
            positions.append(pos[mine])
            lengths.append(pc.list_value_length(ids).to_numpy())
            values.append(pc.list_flatten(ids).to_numpy().astype(np.int32, copy=False))
            labels.append(batch["label"].take(mine).to_numpy())
    if equal and total // world < 1:
        raise ValueError(f"{total} training examples cannot feed {world} workers")
    if not positions:
        return TokenRows(np.zeros(0, np.int32), np.zeros(1, np.int64)), []
    pos, length = np.concatenate(positions), np.concatenate(lengths).astype(np.int64)
    flat, label = np.concatenate(values), np.concatenate(labels)
    starts = np.concatenate([[0], np.cumsum(length)[:-1]])
    order = np.argsort(pos, kind="stable")
    if equal:
        order = order[pos[order] < (total // world) * world]
    kept = length[order]
    # Gather each kept row's ids, in position order, without a Python loop over rows.
    offsets = np.concatenate([[0], np.cumsum(kept)])
    index = np.repeat(starts[order] - offsets[:-1], kept) + np.arange(offsets[-1])
    return TokenRows(flat[index], offsets), label[order].tolist()
