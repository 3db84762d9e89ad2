"""Data: load labelled reviews, split them deterministically, digest them, and encode them for the model.

The same `load_splits` is used by training, tuning, the gate and the benchmarks, so that every part of
the system agrees on which examples are train, validation and test.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from ray_jobs import synthetic
from ray_jobs.config import DataConfig
from ray_jobs.errors import DataError


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]
    # A content split's rows are placed and ordered by their own hashes; its digest is of the rows as a
    # multiset, so that it can be summed block by block in any order (ray_jobs.ingest streams it).
    order_free: bool = False

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        """Content hash: two runs with equal digests saw exactly the same examples (in the same order,
        unless the split is order-free)."""
        if self.order_free:
            return multiset_digest(*row_sum(self.texts, self.labels))
        h = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            h.update(_row_prefix(text, label))
            h.update(text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]

    def take(self, indices: Sequence[int]) -> Split:
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.order_free)


def _row_prefix(text: str, label: int) -> bytes:
    return f"{label}\t{len(text)}\t".encode()


def row_hash(text: str, label: int) -> int:
    """One row's 128-bit hash (the same bytes an ordered digest hashes)."""
    h = hashlib.sha256(_row_prefix(text, label))
    h.update(text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:16], "big")


ROW_SUM_MOD = 2**128


def row_sum(texts: Sequence[str], labels: Sequence[int]) -> tuple[int, int]:
    """(rows, sum of their row hashes mod 2**128): adds up over any partition of the rows, in any order."""
    return len(texts), sum(row_hash(t, int(y)) for t, y in zip(texts, labels, strict=True)) % ROW_SUM_MOD


def multiset_digest(count: int, total: int) -> str:
    """An order-free split's digest from its `row_sum` (a sum of hashes: adding or dropping rows, or
    changing a label, moves it; the order of rows does not)."""
    return hashlib.sha256(f"multiset:{count}:{total:032x}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split

    def digests(self) -> dict[str, str]:
        return {"train": self.train.digest(), "val": self.val.digest(), "test": self.test.digest()}

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def generate_reviews(n: int, seed: int = 0) -> Split:
    """`n` synthetic movie reviews (ray_jobs.synthetic), balanced, reproducible from `seed`."""
    return Split(*synthetic.reviews(n, seed))


# --------------------------------------------------------------------------------------------------
# Loaders


def _validate_labels(labels: list, source: str) -> list[int]:
    out: list[int] = []
    bad: set = set()
    for y in labels:
        if isinstance(y, (bool, np.bool_)):
            out.append(int(y))
            continue
        try:
            v = int(y)
            ok = v == y and v in (0, 1)
        except (TypeError, ValueError):
            ok = False
        if ok:
            out.append(v)
        else:
            bad.add(repr(y))
    if bad:
        raise DataError(f"{source}: labels must be 0 or 1; found {', '.join(sorted(bad)[:5])}")
    return out


def _frame_to_split(df, text_column: str, label_column: str, source: str) -> Split:
    _missing(list(df.columns), text_column, label_column, source)
    if len(df) == 0:
        raise DataError(f"{source}: no rows")
    return Split(*checked_rows(list(df.columns), lambda c: df[c].tolist(), text_column, label_column, source))


def _missing(present: list[str], text_column: str, label_column: str, source: str) -> None:
    missing = [c for c in (text_column, label_column) if c not in present]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; columns present: {present}")


def checked_rows(present: list[str], column, text_column: str, label_column: str, source: str):
    """(texts, labels) of a table whose columns are `present` and read by `column(name)`, checked as
    every loader checks them (a file on the driver, a block on the cluster): both columns there, texts
    that are text, labels 0 or 1."""
    _missing(present, text_column, label_column, source)
    texts = column(text_column)
    bad_text = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad_text:
        raise DataError(
            f"{source}: column '{text_column}' has {len(bad_text)} non-text value(s), e.g. row {bad_text[0]}"
        )
    return texts, _validate_labels(column(label_column), source)


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> Split:
    """A labelled .parquet, .csv or .jsonl file."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _load_folder(path, text_column, label_column)
    if not path.is_file():
        raise DataError(f"not a file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=True)
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}' (use .parquet, .csv or .jsonl)")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except Exception as err:  # pandas/pyarrow raise many types for unreadable files
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    return _frame_to_split(df, text_column, label_column, str(path))


# Data file suffixes and the kind each is read as.
DATA_KINDS = {".parquet": ".parquet", ".csv": ".csv", ".jsonl": ".jsonl", ".json": ".jsonl"}


def is_data_file(name: str) -> bool:
    """A folder's files that are data: not hidden, not a writer's marker (_SUCCESS, _metadata)."""
    return not name.startswith((".", "_"))


def data_kind(path: str | Path, names: Sequence[str]) -> str:
    """The one kind (a DATA_KINDS value) of the data files named `names` (a file's, or a folder's data
    files) at `path`; a folder of no files, of unknown or of mixed kinds is refused."""
    if not names:
        raise DataError(f"{path}: no data files in the folder")
    suffixes = {Path(n).suffix.lower() for n in names}
    unknown = sorted(suffixes - set(DATA_KINDS))
    if unknown or len({DATA_KINDS[x] for x in suffixes}) > 1:
        raise DataError(
            f"{path}: unsupported file type(s) {unknown or sorted(suffixes)} (use one of .parquet, .csv or .jsonl)"
        )
    return DATA_KINDS[suffixes.pop()]


def _load_folder(path: Path, text_column: str, label_column: str) -> Split:
    """A folder of labelled files of one kind (as a dataset's parts are written), in file-name order."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and is_data_file(f.name))
    data_kind(path, [f.name for f in files])
    parts = [load_file(f, text_column, label_column) for f in files]
    return Split([t for p in parts for t in p.texts], [y for p in parts for y in p.labels])


def load_aclimdb(path: str | Path) -> Split:
    """The original aclImdb layout: `<path>/pos/*.txt` and `<path>/neg/*.txt` (e.g. path=aclImdb/train)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"aclImdb folder not found: {root}")
    texts: list[str] = []
    labels: list[int] = []
    for label, sub in ((1, "pos"), (0, "neg")):
        folder = root / sub
        if not folder.is_dir():
            raise DataError(f"{root}: expected sub-folders pos/ and neg/ (missing {sub}/)")
        for f in sorted(folder.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    if not texts:
        raise DataError(f"{root}: no .txt reviews under pos/ or neg/")
    return Split(texts, labels)


def load_hf_dataset(dataset_id: str, split: str):
    """A Hugging Face hub dataset split (needs network access to the hub, or its local cache)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError("data.source 'hf' needs the 'datasets' package: pip install datasets") from None
    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as err:
        raise DataError(
            f"cannot load hub dataset '{dataset_id}' split '{split}': {type(err).__name__}: {err}"
        ) from None


def load_hf(dataset_id: str, split: str, text_column: str, label_column: str) -> Split:
    """A Hugging Face hub dataset's split as a Split."""
    ds = load_hf_dataset(dataset_id, split)
    return _frame_to_split(ds.to_pandas(), text_column, label_column, f"{dataset_id}[{split}]")


def load_source(cfg: DataConfig) -> tuple[Split, Split | None]:
    """All labelled examples of the configured source, and a separate test split if the source has one."""
    if cfg.source == "synthetic":
        return generate_reviews(cfg.synthetic.n_samples, cfg.synthetic.seed), None
    assert cfg.path is not None  # enforced by DataConfig
    if cfg.source == "file":
        return load_file(cfg.path, cfg.text_column, cfg.label_column), None
    if cfg.source == "aclimdb":
        return load_aclimdb(cfg.path), None
    test = load_hf(cfg.path, cfg.hf_test_split, cfg.text_column, cfg.label_column) if cfg.hf_test_split else None
    return load_hf(cfg.path, cfg.hf_split, cfg.text_column, cfg.label_column), test


def split_examples(
    examples: Split,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    carve_test: bool = True,
    method: str = "seeded",
) -> Splits:
    """Deterministic split: the same examples and seed always give the same three splits. `seeded`
    (data.split): a permutation of the examples as read; `content`: content_split."""
    n = len(examples)
    if method == "content":
        splits = content_split(examples, val_fraction, test_fraction if carve_test else 0.0, seed)
        n_test, n_val = len(splits.test), len(splits.val)
    else:
        order = np.random.default_rng(seed).permutation(n)
        n_test = int(round(n * test_fraction)) if carve_test else 0
        n_val = int(round(n * val_fraction))
        test = examples.take(order[:n_test])
        val = examples.take(order[n_test : n_test + n_val])
        splits = Splits(train=examples.take(order[n_test + n_val :]), val=val, test=test)
    if n - n_test - n_val < 2 or n_val < 1 or (carve_test and n_test < 1):
        raise DataError(f"{n} examples are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    return splits


def split_of(text: str, val_fraction: float, test_fraction: float, seed: int) -> tuple[str, int]:
    """data.split=content for one text: (train, val or test; the text's 64-bit hash). Both come from the
    text alone, so any reader of any block of the data, in any order, on any node, puts the text in the
    same split (and, by order_key, at the same place)."""
    h = split_hash(text, seed)
    u = h / 2**64  # unit_hash of the same key and salt
    return ("test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"), h


# Order keys of an order-free split: rows from the data below 2**63 (by text hash, then label), rows a
# split gained from data.extra_* after them, in the extra file's order.
EXTRA_ORDER = 2**63


def order_key(h: int, label: int) -> int:
    """A content-split row's place in its split: by its text's hash (split_of), then by label; repeats of
    one text with one label are the same row, so their relative order does not matter."""
    return ((h >> 2) << 1) | int(label)


def content_split(examples: Split, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Each example in the split its text hashes to (split_of), each split ordered by order_key: the
    result, and so each (order-free) digest, does not depend on the examples' order. ray_jobs.ingest
    builds the same splits block by block on a cluster."""
    placed: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for i, (text, label) in enumerate(zip(examples.texts, examples.labels, strict=True)):
        name, h = split_of(text, val_fraction, test_fraction, seed)
        placed[name].append((order_key(h, label), i))
    picked = {name: examples.take([i for _, i in sorted(rows)]) for name, rows in placed.items()}
    return Splits(**{name: replace(split, order_free=True) for name, split in picked.items()})


def split_hash(text: str, seed: int) -> int:
    """The 64-bit hash of a text that places it in a content split (split_of) and orders it (order_key)."""
    return key_hash(text_key(text), f"split:{seed}")


def order_keys(split: Split, seed: int) -> list[int]:
    """Each row's order_key in a content split."""
    return [
        order_key(key_hash(text_key(t), f"split:{seed}"), y) for t, y in zip(split.texts, split.labels, strict=True)
    ]


def order_cutoff(orders, n: int) -> int:
    """data.max_train_samples on an order-free split: rows whose order key is below the returned value
    are kept, at most `n` of them (repeats of a row straddling the cut are all dropped, so a streamed
    split, which cannot count them in place, keeps the same rows)."""
    keys = np.asarray(orders, dtype=np.uint64)
    return int(np.partition(keys, n)[n]) if n < len(keys) else 2**64 - 1


def first_rows(split: Split, n: int, seed: int) -> Split:
    """`split` cut to data.max_train_samples: its first `n` rows, or for an order-free split the rows
    below order_cutoff."""
    if not split.order_free:
        return split.take(range(n))
    keys = order_keys(split, seed)
    cutoff = order_cutoff(keys, n)
    return split.take([i for i, k in enumerate(keys) if k < cutoff])


def load_splits(cfg: DataConfig) -> Splits:
    examples, test = load_source(cfg)
    splits = split_examples(
        examples, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, carve_test=test is None, method=cfg.split
    )
    if test is not None:
        splits = Splits(train=splits.train, val=splits.val, test=test)
        if cfg.split == "content":  # the separate test split ordered (and digested) like the others
            keys = order_keys(test, cfg.split_seed)
            splits = replace(splits, test=replace(test.take(np.argsort(keys, kind="stable")), order_free=True))
    if cfg.max_train_samples and len(splits.train) > cfg.max_train_samples:
        splits = replace(splits, train=first_rows(splits.train, cfg.max_train_samples, cfg.split_seed))
    if cfg.extra_val:
        splits = with_extra(splits, load_file(cfg.extra_val), "val")
    if cfg.extra_train:
        splits = with_extra(splits, load_file(cfg.extra_train), "train")
    return splits


def with_extra(splits: Splits, extra: Split, into: Literal["train", "val"]) -> Splits:
    """`extra` appended to one split (never to test): texts already in any split, and repeats, are dropped (a
    text in two splits would leak between training and its scoring)."""
    added = new_texts(extra, {text_key(t) for split in (splits.train, splits.val, splits.test) for t in split.texts})
    base = getattr(splits, into)
    return replace(splits, **{into: Split(base.texts + added.texts, base.labels + added.labels, base.order_free)})


def new_texts(extra: Split, seen: set[str]) -> Split:
    """The rows of `extra` whose texts are not in `seen` (text_keys), repeats dropped; `seen` gains them."""
    keep = []
    for i, text in enumerate(extra.texts):
        key = text_key(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return extra.take(keep)


def text_key(text: str) -> str:
    """A text's identity for deduplication (its sha256)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def unit_hash(key: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by `key`: the same key always falls on the same side of a share
    (canary routing, mirroring, the retraining holdout), independently for each salt."""
    return key_hash(key, salt) / 2**64


def key_hash(key: str, salt: str) -> int:
    """A 64-bit hash of `key` under `salt` (unit_hash's, before scaling to [0, 1))."""
    return int.from_bytes(hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest(), "big")


# --------------------------------------------------------------------------------------------------
# Encoding (shared by training, evaluation and serving so that all three truncate the same way)


HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def truncate_ids(ids: list[int], budget: int, strategy: str, head_fraction: float) -> list[int]:
    """Cut a token id list to `budget` ids: its head, or its head and its tail."""
    if len(ids) <= budget:
        return ids
    if strategy == "head":
        return ids[:budget]
    head = int(budget * head_fraction)
    tail = budget - head
    return ids[:head] + (ids[-tail:] if tail else [])


def encode(
    tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head_tail", head_fraction: float = 0.25
) -> list[list[int]]:
    """Token ids with [CLS]/[SEP], at most `max_length` long, unpadded (batches pad to their longest)."""
    return encode_counted(tokenizer, texts, max_length, truncation, head_fraction)[0]


def encode_counted(
    tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head_tail", head_fraction: float = 0.25
) -> tuple[list[list[int]], list[int], list[int]]:
    """`encode`'s ids, with each text's token count before truncation and its count of [UNK] tokens
    (what drift monitoring profiles: ray_jobs.drift)."""
    budget = max_length - 2
    # Very long inputs are clipped by characters first: a 1 MB text must not cost a 1 MB tokenization.
    # 40 chars per token is far above English's ~4-5, so no kept token is lost.
    char_cap = max(1, max_length) * 40
    # HTML line breaks (IMDB has ~5 per review) would cost ~4 tokens each of the budget for nothing.
    texts = [HTML_BREAK.sub(" ", t) for t in texts]
    clipped = [t if len(t) <= 2 * char_cap else t[:char_cap] + " " + t[-char_cap:] for t in texts]
    raw = tokenizer(list(clipped), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    cls, sep, unk = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id
    seqs = [[cls] + truncate_ids(ids, budget, truncation, head_fraction) + [sep] for ids in raw]
    return seqs, [len(ids) for ids in raw], [ids.count(unk) for ids in raw]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 1, cap: int | None = None):
    """Pad to the longest sequence of this batch (dynamic padding), rounded up to a multiple of `multiple`
    but not past `cap` (a GPU's compiled kernels then see a few shapes, not one per length); torch tensors.
    One numpy fill, not a copy per row: a GPU waits on this for every batch."""
    import torch

    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    longest = int(lengths.max())
    if multiple > 1:
        longest = max(longest, min(-(-longest // multiple) * multiple, cap or longest))
    mask = np.arange(longest) < lengths[:, None]
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    if isinstance(seqs[0], np.ndarray):  # rows of a training shard (ray_jobs.ingest.TokenRows)
        ids[mask] = np.concatenate(seqs)
    else:
        ids[mask] = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, bucketing: bool, drop_last: bool = False
) -> list[list[int]]:
    """Shuffled batches of indices. With bucketing, batches hold similar lengths (less padding) while
    their order stays random: shuffle, sort within windows of 50 batches, cut, shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    if bucketing:
        window = batch_size * 50
        order = [
            i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda j: lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)
    return batches
