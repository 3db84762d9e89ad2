"""Training data as Ray Data (issue 34).

Tokenizing: the training and validation splits become Ray Datasets of token ids, tokenized once per run
by map tasks on the cluster's CPUs and materialized in the object store, where every worker of every
trial reads them (`ray.train.get_dataset_shard`) instead of tokenizing its slice of the texts again.

Splitting: with `data.split: content` the splits are built here too, block by block on the cluster
(`stream_splits`): each node reads its share of the files, each row goes to the split its text hashes to
(ray_jobs.data.split_of), and the digests are order-free sums of row hashes, so the driver never holds
the corpus and the splits do not depend on files, blocks, nodes or read order. With `seeded` (the
default, whose split depends on read order) the driver builds the splits (ray_jobs.data.load_splits).

A worker's shard is defined by each row's place in its split (its `order`: the position for a seeded
split, the hash order for a content split), never by Ray Data's blocks: the row at place p goes to rank
p % world. The same rows reach the same rank, in the same order, whatever the number of nodes, blocks or
tasks, so a resumed run finds the same shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_jobs.config import DataConfig, ModelConfig
from ray_jobs.data import (
    EXTRA_ORDER,
    ROW_SUM_MOD,
    Split,
    checked_rows,
    data_kind,
    encode,
    generate_reviews,
    is_data_file,
    load_file,
    multiset_digest,
    new_texts,
    order_cutoff,
    order_key,
    row_hash,
    row_sum,
    split_of,
    text_key,
)
from ray_jobs.errors import DataError

log = logging.getLogger(__name__)

# Rows per block of the text datasets built on the driver, and per batch of every map over the data (about
# 5 MB of IMDB text): what one call holds, whatever size of blocks a reader makes (Ray Data's are up to
# 128 MiB: the tokenizer's full output for a block that size took 9.9 GB).
BLOCK_ROWS = 4096
TRAIN, VAL, TEST = "train", "val", "test"
FILE_READERS = {".parquet": "read_parquet", ".csv": "read_csv", ".jsonl": "read_json"}  # by data.DATA_KINDS kind


@dataclass(frozen=True)
class TokenizedSplits:
    """The materialized datasets (columns `ids`, `label`, `order`), keyed "train" and "val", and what
    the tokenization cost: the worker side reads them by name."""

    datasets: dict[str, Any]
    sizes: dict[str, int]
    seconds: float

    def describe(self) -> str:
        n = sum(self.sizes.values())
        return f"tokenized {n} texts once for every worker and trial in {self.seconds:.1f}s ({n / self.seconds:.0f}/s)"


def quiet_data_context() -> None:
    """Ray Data's progress bars and execution banners would fill the job's log on every run (the driver's
    and, once per dataset, each worker's)."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


def text_blocks(split: Split, rows: int = BLOCK_ROWS, first: int = 0) -> list:
    """`split` as pyarrow tables of `rows` rows: text, label and each row's order (its position in the
    split, counted from `first`)."""
    import pyarrow as pa

    return [
        pa.table(
            {
                "text": pa.array(split.texts[i : i + rows], pa.string()),
                "label": pa.array(split.labels[i : i + rows], pa.int8()),
                "order": pa.array(range(first + i, first + min(i + rows, len(split))), pa.uint64()),
            }
        )
        for i in range(0, len(split), rows)
    ]


def _encode_batch(batch, tokenizer, max_length: int, truncation: str, head_fraction: float):
    """One block's token ids (a map task): `ray_jobs.data.encode`, as training always tokenized."""
    import pyarrow as pa

    seqs = encode(tokenizer, batch["text"].to_pylist(), max_length, truncation, head_fraction)
    ids = pa.array(seqs, pa.list_(pa.int32()))
    return pa.table({"ids": ids, "label": batch["label"], "order": batch["order"]})


def as_dataset(split: Split | Any):
    """A split built on the driver as a Ray Dataset (text, label, order); a dataset stays as it is."""
    import ray

    return ray.data.from_arrow(text_blocks(split)) if isinstance(split, Split) else split


def tokenize_splits(
    train: Split | Any, val: Split | Any, mc: ModelConfig, sizes: dict[str, int] | None = None
) -> TokenizedSplits:
    """Both splits (built on the driver, or datasets of `stream_splits`) tokenized by Ray Data map tasks
    (one CPU each) and materialized: the object store holds the token ids, the driver keeps the
    references for as long as the run needs them. `sizes`: the datasets' rows (a Split knows its own)."""
    from ray_jobs.model import build_tokenizer

    quiet_data_context()
    sizes = sizes or {TRAIN: len(train), VAL: len(val)}
    t0 = time.perf_counter()
    kwargs = {
        "tokenizer": build_tokenizer(mc),  # serialized once with the map operator, not per task
        "max_length": mc.max_length,
        "truncation": mc.truncation,
        "head_fraction": mc.head_fraction,
    }
    datasets = {
        name: as_dataset(split)
        .map_batches(_encode_batch, batch_format="pyarrow", batch_size=BLOCK_ROWS, fn_kwargs=kwargs)
        .materialize()
        for name, split in ((TRAIN, train), (VAL, val))
    }
    out = TokenizedSplits(datasets, sizes, time.perf_counter() - t0)
    log.info("%s", out.describe())
    return out


# --------------------------------------------------------------------------------------------------
# Content splits, built on the cluster


@dataclass(frozen=True)
class StreamedTest:
    """A test split left on the cluster (ray_jobs.ingest.StreamedSplits): a dataset of text, label and
    order, its size and its digest. Scored where its blocks are (ray_jobs.evaluate.score_streamed); only labels,
    predictions and drift features come back to the driver, a few bytes a text."""

    dataset: Any
    n: int
    digest: str

    def __len__(self) -> int:
        return self.n

    def collect(self) -> Split:
        """The texts themselves on the driver, for what scores only there (the ONNX guard)."""
        return collect_split(self.dataset)


@dataclass(frozen=True)
class StreamedSplits:
    """A content split built block by block (`stream_splits`): per split a lazy dataset (text, label,
    order), its size and its order-free digest. Nothing of the corpus is held by the driver."""

    datasets: dict[str, Any]
    counts: dict[str, int]
    digest_of: dict[str, str]
    seconds: float

    def digests(self) -> dict[str, str]:
        return dict(self.digest_of)

    def sizes(self) -> dict[str, int]:
        return dict(self.counts)

    def collect(self, name: str) -> Split:
        """One split's rows on the driver, in their split's order (what content_split would give)."""
        return collect_split(self.datasets[name])

    def test_set(self) -> StreamedTest:
        """The test split as ray_jobs.evaluate scores it where it is."""
        return StreamedTest(self.datasets[TEST], self.counts[TEST], self.digest_of[TEST])

    def describe(self) -> str:
        sizes = " / ".join(f"{self.counts[k]} {k}" for k in (TRAIN, VAL, TEST))
        return f"split on the cluster in {self.seconds:.1f}s: {sizes}, digests {self.digest_of}"


def collect_split(dataset) -> Split:
    """A dataset of (text, label, order) rows on the driver, in order: an order-free split's rows as
    ray_jobs.data.content_split gives them."""
    import numpy as np

    texts, labels, orders = [], [], []
    for batch in dataset.iter_batches(batch_size=BLOCK_ROWS, batch_format="pyarrow"):
        texts += batch["text"].to_pylist()
        labels += batch["label"].to_pylist()
        orders.append(batch["order"].to_numpy())
    split = Split(texts, labels, order_free=True)
    return split.take(np.argsort(np.concatenate(orders), kind="stable")) if orders else split


def _absolute(path: str) -> str:
    """A local path as every node's read task must see it (their working folders differ); URIs as given."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _file_reader(path: str) -> str:
    """The ray.data reader for `path`: a file by its suffix, a folder by its data files' (one kind)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data file not found: {path}")
        if info.type == pafs.FileType.File:
            names = [Path(root).name]
        else:
            files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            names = [
                Path(f.path).name for f in files if f.type == pafs.FileType.File and is_data_file(Path(f.path).name)
            ]
    except DataError:
        raise
    except Exception as err:  # a filesystem's own errors (credentials, an unknown scheme)
        raise DataError(f"{path}: cannot list ({type(err).__name__}: {err})") from None
    return FILE_READERS[data_kind(path, names)]


def read_examples(cfg: DataConfig, hf_split: str | None = None) -> tuple[Any, tuple[str, str], str]:
    """(the source as a Ray Dataset, its (text, label) columns, its name for errors). Files are read by
    tasks on the cluster's nodes, each a share of the files; `hf_split` names another hub split."""
    import ray

    if cfg.source == "synthetic":
        split = generate_reviews(cfg.synthetic.n_samples, cfg.synthetic.seed)
        return ray.data.from_arrow(text_blocks(split)), ("text", "label"), "synthetic"
    assert cfg.path is not None  # enforced by DataConfig
    columns = (cfg.text_column, cfg.label_column)
    if cfg.source == "file":
        path = _absolute(cfg.path)
        reader = _file_reader(path)
        ds = getattr(ray.data, reader)(path, **({"lines": True} if reader == "read_json" else {}))
        return ds, columns, cfg.path
    if cfg.source == "aclimdb":
        root = Path(cfg.path).expanduser().resolve()
        for sub in ("pos", "neg"):
            if not (root / sub).is_dir():
                raise DataError(f"{root}: expected sub-folders pos/ and neg/ (missing {sub}/)")
        ds = ray.data.read_binary_files(
            [str(root / "pos"), str(root / "neg")], include_paths=True, file_extensions=["txt"]
        )
        return ds.map_batches(_aclimdb_rows, batch_format="pyarrow"), ("text", "label"), str(root)
    from ray_jobs.data import load_hf_dataset

    name = hf_split or cfg.hf_split
    return ray.data.from_huggingface(load_hf_dataset(cfg.path, name)), columns, f"{cfg.path}[{name}]"


def _aclimdb_rows(batch):
    """aclImdb files (bytes, path) as text and label: the label is the folder, pos/ or neg/."""
    import pyarrow as pa

    texts = [b.decode("utf-8", errors="replace") for b in batch["bytes"].to_pylist()]
    labels = [1 if Path(p).parent.name == "pos" else 0 for p in batch["path"].to_pylist()]
    return pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.int8())})


def _place(batch, columns, source, val_fraction, test_fraction, seed, only=None):
    """One block of examples checked (as ray_jobs.data's loaders check them) and placed: each row's
    split and order key from its text (ray_jobs.data.split_of); `only` puts every row in that split."""
    import pyarrow as pa

    texts, labels = checked_rows(batch.column_names, lambda c: batch[c].to_pylist(), *columns, source)
    names, orders = [], []
    for text, label in zip(texts, labels, strict=True):
        name, h = split_of(text, val_fraction, test_fraction, seed)
        names.append(only or name)
        orders.append(order_key(h, label))
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.int8()),
            "split": pa.array(names, pa.string()),
            "order": pa.array(orders, pa.uint64()),
        }
    )


def _only(batch, name: str):
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch["split"], name)).drop_columns(["split"])


def _below(batch, cutoff: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.less(batch["order"], pa.scalar(cutoff, pa.uint64())))


def _block_sums(batch, extra_keys: frozenset, split: str | None = None, error: str | None = None):
    """One block's rows and row-hash sum per split (ray_jobs.data.row_sum), and which rows' texts are
    among `extra_keys` (with their split and order). `split`: the batch is that split's (no column);
    `error`: the block was refused, for this reason."""
    import pyarrow as pa

    rows: list[tuple[str, int, str, int, str]] = []
    if error is not None:
        rows.append(("error", 0, "", 0, error))
    else:
        texts, labels = batch["text"].to_pylist(), batch["label"].to_pylist()
        names = batch["split"].to_pylist() if split is None else [split] * len(texts)
        sums: dict[str, list[int]] = {}
        for text, label, name, order in zip(texts, labels, names, batch["order"].to_pylist(), strict=True):
            acc = sums.setdefault(name, [0, 0])
            acc[0] += 1
            acc[1] = (acc[1] + row_hash(text, label)) % ROW_SUM_MOD
            if extra_keys and (key := text_key(text)) in extra_keys:
                rows.append((f"found:{name}", 0, "", order, key))
        rows += [(name, n, f"{total:032x}", 0, "") for name, (n, total) in sums.items()]
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], [], []]
    return pa.table(
        {
            "kind": pa.array(cols[0], pa.string()),
            "n": pa.array(cols[1], pa.int64()),
            "sum": pa.array(cols[2], pa.string()),
            "order": pa.array(cols[3], pa.uint64()),
            "key": pa.array(cols[4], pa.string()),
        }
    )


def _checked_sums(batch, place: dict, extra_keys: frozenset):
    """`_block_sums` of a block of the source once `_place` has checked it; a block it refuses gives one
    row of kind "error" with the message (an exception raised in a Ray Data task reaches the driver as
    Ray Data's own, without the DataError it wrapped)."""
    try:
        placed = _place(batch, **place)
    except DataError as err:
        return _block_sums(None, extra_keys, error=str(err))
    return _block_sums(placed, extra_keys)


def _totals(rows: list[dict]) -> tuple[dict[str, list[int]], list[tuple[str, int, str]]]:
    """The blocks' `_block_sums` added up: (split -> [rows, row-hash sum], extra texts found)."""
    sums: dict[str, list[int]] = {name: [0, 0] for name in (TRAIN, VAL, TEST)}
    found = []
    for row in rows:
        if row["kind"] == "error":
            raise DataError(row["key"])
        if row["kind"].startswith("found:"):
            found.append((row["kind"][6:], row["order"], row["key"]))
        else:
            acc = sums[row["kind"]]
            acc[0] += row["n"]
            acc[1] = (acc[1] + int(row["sum"], 16)) % ROW_SUM_MOD
    return sums, found


def stream_splits(cfg: DataConfig) -> StreamedSplits:
    """data.split=content built on the cluster: the same splits, in the same order, with the same
    digests as ray_jobs.data.load_splits gives on one machine (data.max_train_samples, data.extra_val
    and data.extra_train included), from reads of blocks on any nodes in any order. The source is read
    twice (the counts and digests, then the tokenization); the driver holds only the extra files, and for
    max_train_samples the train split's order keys (8 bytes a row)."""
    import numpy as np
    import ray

    quiet_data_context()
    t0 = time.perf_counter()
    carve = not (cfg.source == "hf" and cfg.hf_test_split)
    ds, columns, source = read_examples(cfg)
    fractions = {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction if carve else 0.0}
    sources = [(ds, {"columns": columns, "source": source, **fractions, "seed": cfg.split_seed})]
    if not carve:
        test_ds, test_columns, test_source = read_examples(cfg, cfg.hf_test_split)
        sources.append(
            (
                test_ds,
                {"columns": test_columns, "source": test_source, "val_fraction": 0.0, "test_fraction": 0.0}
                | {"seed": cfg.split_seed, "only": TEST},
            )
        )
    extras = {into: load_file(path) for into, path in ((VAL, cfg.extra_val), (TRAIN, cfg.extra_train)) if path}
    extra_keys = frozenset(text_key(t) for extra in extras.values() for t in extra.texts)

    def sums_of(dataset, fn, **kwargs):
        rows = dataset.map_batches(
            fn, batch_format="pyarrow", batch_size=BLOCK_ROWS, fn_kwargs={"extra_keys": extra_keys, **kwargs}
        ).take_all()
        return _totals(rows)

    # Pass 1: every block checked and placed, each split's rows counted and digested.
    parts = [sums_of(source_ds, _checked_sums, place=place) for source_ds, place in sources]
    sums = {
        name: [sum(p[0][name][0] for p in parts), sum(p[0][name][1] for p in parts) % ROW_SUM_MOD]
        for name in (TRAIN, VAL, TEST)
    }
    found = [f for p in parts for f in p[1]]
    placed = sources[0][0].map_batches(_place, batch_format="pyarrow", batch_size=BLOCK_ROWS, fn_kwargs=sources[0][1])
    for source_ds, place in sources[1:]:
        placed = placed.union(
            source_ds.map_batches(_place, batch_format="pyarrow", batch_size=BLOCK_ROWS, fn_kwargs=place)
        )
    n, n_val, n_test = sum(c for c, _ in sums.values()), sums[VAL][0], sums[TEST][0]
    if sums[TRAIN][0] < 2 or n_val < 1 or (carve and n_test < 1):
        raise DataError(
            f"{n} examples are too few for val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction}"
        )
    datasets = {
        name: placed.map_batches(_only, batch_format="pyarrow", fn_kwargs={"name": name}) for name in (TRAIN, VAL, TEST)
    }
    if cfg.max_train_samples and sums[TRAIN][0] > cfg.max_train_samples:
        keys = [
            b["order"].to_numpy()
            for b in datasets[TRAIN].select_columns(["order"]).iter_batches(batch_size=65536, batch_format="pyarrow")
        ]
        cutoff = order_cutoff(np.concatenate(keys), cfg.max_train_samples)
        del keys
        datasets[TRAIN] = datasets[TRAIN].map_batches(_below, batch_format="pyarrow", fn_kwargs={"cutoff": cutoff})
        sums[TRAIN] = sums_of(datasets[TRAIN], _block_sums, split=TRAIN)[0][TRAIN]
        found = [(name, order, key) for name, order, key in found if name != TRAIN or order < cutoff]
    # data.extra_*: as ray_jobs.data.with_extra, validation's first: texts already in a split, and
    # repeats, are dropped; the rest follow the split's own rows.
    seen = {key for _, _, key in found}
    for into, extra in extras.items():
        added = new_texts(extra, seen)
        if len(added):
            datasets[into] = datasets[into].union(ray.data.from_arrow(text_blocks(added, first=EXTRA_ORDER)))
            count, total = row_sum(added.texts, added.labels)
            sums[into] = [sums[into][0] + count, (sums[into][1] + total) % ROW_SUM_MOD]
    out = StreamedSplits(
        datasets,
        {name: c for name, (c, _) in sums.items()},
        {name: multiset_digest(c, total) for name, (c, total) in sums.items()},
        time.perf_counter() - t0,
    )
    log.info("%s", out.describe())
    return out


class _Batches:
    """A dataset shard's pyarrow batches, iterable more than once (shard_rows reads twice)."""

    def __init__(self, shard, columns: list[str] | None = None):
        self.shard, self.columns = shard, columns

    def __iter__(self):
        for batch in self.shard.iter_batches(batch_size=BLOCK_ROWS, batch_format="pyarrow"):
            yield batch.select(self.columns) if self.columns else batch


def read_shard(name: str, rank: int, world: int, equal: bool) -> tuple[TokenRows, list[int]]:
    """This rank's rows of dataset `name`, inside a Ray Train worker (see `shard_rows`)."""
    import ray.train

    quiet_data_context()
    shard = ray.train.get_dataset_shard(name)
    return shard_rows(_Batches(shard), rank, world, equal, orders=_Batches(shard, ["order"]))


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


def places(orders: Iterable) -> tuple[Any, Any]:
    """(every order key of a split, sorted; the keys that occur more than once), from the `order`
    columns of `orders`' batches: a row's place in its split is the count of keys below its own."""
    import numpy as np

    keys = [batch["order"].to_numpy() for batch in orders]
    ordered = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.uint64)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    return ordered, repeated


def shard_rows(
    batches: Iterable, rank: int, world: int, equal: bool, orders: Iterable | None = None
) -> tuple[TokenRows, list[int]]:
    """(token ids, labels) of this rank's rows, in their split's order: places rank, rank + world, ...,
    picked from `batches` (pyarrow tables of a tokenized dataset) in whatever order they come. A row's
    place is its rank among the split's order keys, read in a first pass (from `orders`, or `batches`
    again); repeats of one key (one text, one label: the same row) take the places from the first
    onwards in the order they come, which cannot change what a rank trains on. With `equal`, every rank
    gets the same number of rows (len // world), as DDP needs for training: each step all-reduces, and a
    rank with one batch more would hang. Only this rank's rows are kept, compactly."""
    import numpy as np
    import pyarrow.compute as pc

    ordered, repeated = places(orders if orders is not None else batches)
    total = len(ordered)
    if equal and total // world < 1:
        raise ValueError(f"{total} training examples cannot feed {world} workers")
    seen: dict[int, int] = {}
    positions, lengths, values, labels = [], [], [], []
    for batch in batches:
        key = batch["order"].to_numpy()
        pos = np.searchsorted(ordered, key, side="left").astype(np.int64)
        if len(repeated):
            for i in np.flatnonzero(np.isin(key, repeated)):
                k = int(key[i])
                pos[i] += seen.get(k, 0)
                seen[k] = seen.get(k, 0) + 1
        mine = np.flatnonzero(pos % world == rank)
        if len(mine):
            ids = batch["ids"].take(mine)
            positions.append(pos[mine])
            lengths.append(pc.list_value_length(ids).to_numpy())
            values.append(pc.list_flatten(ids).to_numpy().astype(np.int32, copy=False))
            labels.append(batch["label"].take(mine).to_numpy())
    if not positions:
        return TokenRows(np.zeros(0, np.int32), np.zeros(1, np.int64)), []
    pos, length = np.concatenate(positions), np.concatenate(lengths).astype(np.int64)
    flat, label = np.concatenate(values), np.concatenate(labels)
    starts = np.concatenate([[0], np.cumsum(length)[:-1]])
    order = np.argsort(pos, kind="stable")
    if equal:
        order = order[pos[order] < (total // world) * world]
    kept = length[order]
    # Gather each kept row's ids, in place order, without a Python loop over rows.
    offsets = np.concatenate([[0], np.cumsum(kept)])
    index = np.repeat(starts[order] - offsets[:-1], kept) + np.arange(offsets[-1])
    return TokenRows(flat[index], offsets), label[order].tolist()
