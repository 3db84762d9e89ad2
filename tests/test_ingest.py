"""Content splits built on a Ray cluster (ray_jobs.ingest.stream_splits): the same rows, order and
digests as the driver's split of the same data (ray_jobs.data.load_splits), from any files, blocks and
read order; the loaders' errors, raised as themselves."""

import pandas as pd
import pytest
from conftest import repeated_reviews, write_parts

from ray_jobs.config import DataConfig
from ray_jobs.data import generate_reviews, load_splits
from ray_jobs.errors import DataError

pytestmark = pytest.mark.integration


def same_as_the_driver(cfg: DataConfig, rows: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """stream_splits(cfg) against load_splits(cfg): sizes, digests and the rows, in order, of the splits
    named in `rows`."""
    from ray_jobs.ingest import stream_splits

    streamed, local = stream_splits(cfg), load_splits(cfg)
    assert streamed.sizes() == local.sizes()
    assert streamed.digests() == local.digests()
    for name in rows:
        assert streamed.collect(name) == getattr(local, name), name
    return streamed.digests()


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_a_content_split_built_on_the_cluster_is_the_drivers(ray_cluster, tmp_path, kind):
    """A folder of parts, read by Ray Data tasks in blocks that finish in any order: the splits' sizes
    and digests are the driver's (a digest is a sum over rows: equal digests, equal rows), and so are
    the test split's rows in order (parquet); a single file holding the same rows gives the same digests.
    (Two reads, on two nodes: tests/test_cluster_jobs.py.)"""
    data = repeated_reviews()
    write_parts(data, tmp_path / "parts", parts=7, kind=kind)
    cfg = DataConfig(
        source="file", path=str(tmp_path / "parts"), split="content", text_column="review", label_column="y"
    )
    digests = same_as_the_driver(cfg, rows=("test",) if kind == "parquet" else ())
    write_parts(data, tmp_path / "one", parts=1, kind=kind)
    assert same_as_the_driver(cfg.model_copy(update={"path": str(tmp_path / "one")}), rows=()) == digests


def test_subsampling_and_extra_files_match_the_driver(ray_cluster, tmp_path):
    """data.max_train_samples keeps the first rows by order; data.extra_val and data.extra_train join
    their split after its own rows, minus texts already in a split and repeats, as on the driver."""
    data = repeated_reviews(seed=1)
    write_parts(data, tmp_path / "parts", parts=5)
    base = DataConfig(
        source="file", path=str(tmp_path / "parts"), split="content", text_column="review", label_column="y"
    )
    local = load_splits(base)
    fresh = generate_reviews(40, seed=9)
    # extra_val: 20 new texts, a test text (dropped) and one new text twice (kept once).
    pd.DataFrame(
        {"text": fresh.texts[:20] + local.test.texts[:1] + fresh.texts[:1], "label": fresh.labels[:20] + [0, 1]}
    ).to_csv(tmp_path / "extra_val.csv", index=False)
    # extra_train: 20 new texts, one already in extra_val, one in validation (all but the new dropped).
    pd.DataFrame(
        {
            "text": fresh.texts[20:] + fresh.texts[:1] + local.val.texts[:1],
            "label": fresh.labels[20:] + [1, local.val.labels[0]],
        }
    ).to_csv(tmp_path / "extra_train.csv", index=False)
    cfg = base.model_copy(
        update={
            "max_train_samples": 500,
            "extra_val": str(tmp_path / "extra_val.csv"),
            "extra_train": str(tmp_path / "extra_train.csv"),
        }
    )
    same_as_the_driver(cfg, rows=("train",))  # cut, then extended: its rows in order
    assert load_splits(cfg).sizes() == {**local.sizes(), "train": 500 + 20, "val": len(local.val) + 20}


def test_an_aclimdb_folder_and_synthetic_reviews_match_the_driver(ray_cluster, tmp_path):
    data = generate_reviews(300, seed=3)
    for sub in ("pos", "neg"):
        (tmp_path / sub).mkdir()
    for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
        (tmp_path / ("pos" if label else "neg") / f"{i}_7.txt").write_text(text)
    same_as_the_driver(DataConfig(source="aclimdb", path=str(tmp_path), split="content"), rows=("test",))
    same_as_the_driver(DataConfig(split="content"), rows=())


def test_bad_data_on_the_cluster_is_the_loaders_error(ray_cluster, tmp_path):
    """A map task's DataError reaches the driver as itself, with the loader's message."""
    from ray_jobs.ingest import stream_splits

    data = repeated_reviews(300, 0)
    write_parts(data, tmp_path / "parts", parts=3)
    frame = pd.read_parquet(tmp_path / "parts" / "part-001.parquet")
    frame.loc[5, "y"] = 3
    frame.to_parquet(tmp_path / "parts" / "part-001.parquet")

    def cfg(**kw) -> DataConfig:
        return DataConfig(**{"source": "file", "split": "content", "text_column": "review", "label_column": "y", **kw})

    with pytest.raises(DataError, match="labels must be 0 or 1; found 3") as err:
        stream_splits(cfg(path=str(tmp_path / "parts")))
    assert type(err.value) is DataError and "Traceback" not in str(err.value)
    with pytest.raises(DataError, match="not found"):
        stream_splits(cfg(path=str(tmp_path / "nope")))
    (tmp_path / "parts" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        stream_splits(cfg(path=str(tmp_path / "parts")))
    write_parts(generate_reviews(20, seed=0), tmp_path / "few", parts=1)
    with pytest.raises(DataError, match="too few"):
        stream_splits(cfg(path=str(tmp_path / "few"), val_fraction=0.01, test_fraction=0.01))


def test_the_test_split_is_scored_on_the_cluster_as_in_the_driver(ray_cluster, tmp_path, untrained_tiny):
    """A content split's test split is scored by Ray Data actors where its blocks are; the driver gets
    labels, predictions and drift features only. The Evaluation and the drift reference are those of
    the collected split scored in the driver."""
    import numpy as np

    from ray_jobs.evaluate import evaluate_and_profile
    from ray_jobs.ingest import stream_splits

    write_parts(repeated_reviews(2500, 30, seed=6), tmp_path / "parts", parts=4)
    cfg = DataConfig(
        source="file", path=str(tmp_path / "parts"), split="content", text_column="review", label_column="y"
    )
    test = stream_splits(cfg).test_set()
    local = load_splits(cfg).test
    ev, ref = evaluate_and_profile(untrained_tiny, test, batch_size=32, name="m")
    ev0, ref0 = evaluate_and_profile(untrained_tiny, local, batch_size=32, name="m")
    # Labels and confidences differ from text to text: equal in order means scored in the split's order.
    assert len(set(ev0.labels)) == 2 and len(set(ref0.features.confidence.tolist())) > len(local) // 2
    assert (ev.labels, ev.predictions, ev.digest, ev.f1) == (ev0.labels, ev0.predictions, ev0.digest, ev0.f1)
    a, b = ref.features, ref0.features
    for name in ("label", "length", "truncated"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("confidence", "unk"):
        assert np.allclose(getattr(a, name), getattr(b, name), atol=1e-4), name
    # Fewer texts than the reference keeps: every [CLS] vector, in another order (a set for MMD).
    assert a.embedding.shape == b.embedding.shape == (len(local), b.embedding.shape[1])
    assert np.allclose(a.embedding.astype(np.float32).mean(0), b.embedding.astype(np.float32).mean(0), atol=1e-2)
    assert ref.meta["n"] == ref0.meta["n"] == len(local) and ref.meta["data_digest"] == local.digest()
