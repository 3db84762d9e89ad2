import json

import pandas as pd
import pytest

from ray_jobs.config import DataConfig
from ray_jobs.data import (
    Split,
    batch_order,
    encode,
    generate_reviews,
    load_aclimdb,
    load_file,
    load_splits,
    split_examples,
    truncate_ids,
)
from ray_jobs.errors import DataError


def test_synthetic_is_deterministic_balanced_and_varied():
    a, b = generate_reviews(400, seed=3), generate_reviews(400, seed=3)
    assert a == b and a.digest() == b.digest()
    assert generate_reviews(400, seed=4).digest() != a.digest()
    assert sum(a.labels) == 200
    assert len(set(a.texts)) > 390
    joined = " ".join(a.texts)
    for feature in (", but ", " not ", "very ", ". "):
        assert feature in joined


def test_split_determinism_and_disjointness():
    ex = generate_reviews(500, seed=0)
    s1 = split_examples(ex, 0.1, 0.2, seed=7)
    s2 = split_examples(ex, 0.1, 0.2, seed=7)
    s3 = split_examples(ex, 0.1, 0.2, seed=8)
    assert s1.digests() == s2.digests()
    assert s1.digests()["test"] != s3.digests()["test"]
    assert (len(s1.train), len(s1.val), len(s1.test)) == (350, 50, 100)
    assert not set(s1.train.texts) & set(s1.test.texts)


def test_the_quickstart_split_is_the_one_the_readme_shows():
    """data.split's default (seeded) keeps the split of every existing config: the README's digest."""
    from conftest import ROOT

    from ray_jobs.config import load_config

    cfg = load_config(ROOT / "tune_configs/quickstart.yaml")
    assert cfg.data.split == "seeded"
    assert load_splits(cfg.data).test.digest() == "196b7837c71a8452"


def test_a_content_split_does_not_depend_on_the_order_it_reads():
    """data.split=content: the same splits and digests whatever order (or blocks, or nodes) the examples
    come in; repeats of a text land in one split; the fractions hold to within sampling noise; the seed
    moves it."""
    import random

    ex = generate_reviews(3000, seed=0)
    texts, labels = ex.texts + ex.texts[:200], ex.labels + ex.labels[:200]  # 200 texts twice
    order = list(range(len(texts)))
    random.Random(5).shuffle(order)
    shuffled = Split([texts[i] for i in order], [labels[i] for i in order])
    a = split_examples(Split(texts, labels), 0.1, 0.2, seed=7, method="content")
    b = split_examples(shuffled, 0.1, 0.2, seed=7, method="content")
    assert a == b and a.digests() == b.digests()
    homes = {}
    for name in ("train", "val", "test"):
        for text in getattr(a, name).texts:
            assert homes.setdefault(text, name) == name  # a repeat never straddles two splits
    n = len(texts)
    assert abs(len(a.test) - 0.2 * n) < 4 * (0.2 * 0.8 * n) ** 0.5 and abs(len(a.val) - 0.1 * n) < 4 * (0.09 * n) ** 0.5
    assert len(a.train) + len(a.val) + len(a.test) == n
    assert split_examples(Split(texts, labels), 0.1, 0.2, seed=8, method="content").test != a.test
    seeded = split_examples(Split(texts, labels), 0.1, 0.2, seed=7)  # the default depends on order
    assert seeded.digests() != split_examples(shuffled, 0.1, 0.2, seed=7).digests()


def test_digest_sees_labels_and_order():
    s = Split(["a", "b"], [0, 1])
    assert s.digest() != Split(["a", "b"], [1, 1]).digest()
    assert s.digest() != Split(["b", "a"], [1, 0]).digest()


def test_head_tail_truncation_keeps_both_ends():
    ids = list(range(100))
    out = truncate_ids(ids, 10, "head_tail", 0.3)
    assert out == [0, 1, 2, 93, 94, 95, 96, 97, 98, 99]
    assert truncate_ids(ids, 10, "head", 0.3) == list(range(10))
    assert truncate_ids([1, 2], 10, "head_tail", 0.3) == [1, 2]


def test_encode_head_tail_with_a_real_tokenizer():
    from ray_jobs.model import load_tokenizer, minilm_path

    tok = load_tokenizer(minilm_path())
    text = "beginning " + "middle " * 300 + "verdict"
    [ids] = encode(tok, [text], max_length=16, truncation="head_tail", head_fraction=0.25)
    words = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 16 and words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert words[1] == "beginning" and words[-2] == "verdict"
    [head] = encode(tok, [text], max_length=16, truncation="head")
    assert "verdict" not in tok.convert_ids_to_tokens(head)


def test_batch_order_covers_everything_once_and_buckets():
    lengths = [i % 37 for i in range(1000)]
    batches = batch_order(lengths, 16, seed=1, bucketing=True)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    unbucketed = batch_order(lengths, 16, seed=1, bucketing=False)
    spread_plain = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in unbucketed) / len(unbucketed)
    assert spread < spread_plain / 3


def _frame(n=20):
    return pd.DataFrame({"review": [f"text {i}" for i in range(n)], "sentiment": [i % 2 for i in range(n)]})


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_load_file_formats_and_columns(tmp_path, ext):
    f = tmp_path / f"d.{ext}"
    df = _frame()
    if ext == "parquet":
        df.to_parquet(f)
    elif ext == "csv":
        df.to_csv(f, index=False)
    else:
        f.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    s = load_file(f, "review", "sentiment")
    assert s.texts[3] == "text 3" and s.labels[:3] == [0, 1, 0]


def test_bad_data_errors(tmp_path):
    f = tmp_path / "d.csv"
    _frame().to_csv(f, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\].*review"):
        load_file(f, "text", "sentiment")
    bad = _frame()
    bad.loc[3, "sentiment"] = 2
    bad.to_csv(f, index=False)
    with pytest.raises(DataError, match="labels must be 0 or 1; found 2"):
        load_file(f, "review", "sentiment")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_file(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_file(header_only)
    with pytest.raises(DataError, match="not found"):
        load_file(tmp_path / "nope.parquet")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="cannot read"):
        load_file(garbage)
    with pytest.raises(DataError, match="unsupported file type"):
        load_file(tmp_path)  # a folder of .csv and .parquet files
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_file(tmp_path / "none")


def test_a_folder_is_its_files_in_name_order(tmp_path):
    """A dataset written in parts (part-0.parquet, ...): the rows of every part, the parts by name."""
    ex = generate_reviews(50, seed=2)
    for k, rows in enumerate((range(0, 20), range(20, 50))):
        pd.DataFrame({"text": [ex.texts[i] for i in rows], "label": [ex.labels[i] for i in rows]}).to_parquet(
            tmp_path / f"part-{k}.parquet"
        )
    (tmp_path / "_SUCCESS").write_text("")  # a writer's marker file is no data
    assert load_file(tmp_path) == ex


def test_unsupported_extension(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_file(f)


def test_aclimdb_layout(tmp_path):
    for sub, n in (("pos", 3), ("neg", 2)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            (tmp_path / sub / f"{i}_9.txt").write_text(f"{sub} review {i}")
    s = load_aclimdb(tmp_path)
    assert sorted(s.labels) == [0, 0, 1, 1, 1]
    assert s.texts[s.labels.index(0)].startswith("neg")
    with pytest.raises(DataError, match="missing neg"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "pos").mkdir()
        load_aclimdb(tmp_path / "other")


def test_load_splits_from_config_and_subsample():
    cfg = DataConfig(synthetic={"n_samples": 300}, max_train_samples=50)
    s = load_splits(cfg)
    assert len(s.train) == 50 and len(s.val) == 30 and len(s.test) == 30
    assert load_splits(cfg).digests() == s.digests()


def test_encode_drops_html_line_breaks():
    from ray_jobs.model import load_tokenizer, minilm_path

    tok = load_tokenizer(minilm_path())
    [a] = encode(tok, ["great film.<br /><br />loved it"], 32)
    [b] = encode(tok, ["great film.  loved it"], 32)
    assert a == b
