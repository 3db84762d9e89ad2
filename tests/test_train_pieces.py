"""The named pieces of the training loop, without Ray: the schedule and the shard split."""

from pathlib import Path

import pytest

from ray_jobs.data import generate_reviews
from ray_jobs.train_steps import LinearSchedule, Progress


def test_schedule_warms_up_then_decays_to_zero_at_the_horizon():
    s = LinearSchedule(total_steps=100, warmup_ratio=0.1)
    factors = [s.factor(step) for step in range(101)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 10
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[100] == 0.0


def test_a_time_budget_moves_the_horizon_to_the_step_it_allows():
    s = LinearSchedule(total_steps=1000, warmup_ratio=0.0, budget_s=100)
    s.re_estimate(step=50, seconds_per_step=0.5, elapsed_s=25)  # 75 s left = 150 steps, 3% kept in reserve
    assert s.horizon == 50 + int(0.97 * 150)
    assert s.factor(s.horizon) == 0.0
    assert not s.over_budget(99.9) and s.over_budget(100.1)
    s.re_estimate(step=999, seconds_per_step=0.001, elapsed_s=0)  # never past the planned steps
    assert s.horizon == 1000
    unbudgeted = LinearSchedule(total_steps=10, warmup_ratio=0.0)
    unbudgeted.re_estimate(step=5, seconds_per_step=100, elapsed_s=1e9)
    assert unbudgeted.horizon == 10 and not unbudgeted.over_budget(1e9)


def test_a_resumed_schedule_keeps_the_horizon_its_checkpoint_saved():
    assert LinearSchedule(total_steps=100, warmup_ratio=0.1, horizon=40).horizon == 40
    assert LinearSchedule(total_steps=100, warmup_ratio=0.1, horizon=400).horizon == 100
    assert Progress(**{"epoch": 1, "step_in_epoch": 3, "global_step": 9, "elapsed_s": 1.5, "horizon": 40}).horizon == 40


def _tokenized_blocks(split, tok, cfg, block_rows: int, seed: int) -> list:
    """`split` tokenized as ray_jobs.ingest's map tasks do, in blocks of `block_rows`, the blocks shuffled
    (Ray Data gives no order between blocks)."""
    import random

    from ray_jobs.ingest import _encode_batch, text_blocks

    blocks = [
        _encode_batch(block, tok, cfg.max_length, cfg.truncation, cfg.head_fraction)
        for block in text_blocks(split, block_rows)
    ]
    random.Random(seed).shuffle(blocks)
    return blocks


def test_shards_are_equal_disjoint_and_the_same_whatever_the_blocks():
    """A rank's shard is picked by position: the same rows, in the same order, with the same token ids as
    tokenizing its slice directly, whatever the block size and block order."""
    from ray_jobs.config import ModelConfig
    from ray_jobs.data import encode
    from ray_jobs.ingest import shard_rows
    from ray_jobs.model import build_tokenizer

    train = generate_reviews(103, seed=1)
    cfg = ModelConfig(source="tiny", max_length=32)
    tok = build_tokenizer(cfg)
    layouts = [_tokenized_blocks(train, tok, cfg, rows, seed) for rows, seed in ((7, 0), (50, 1), (103, 2))]
    for rank in range(3):
        expected_rows = list(range(rank, 103, 3))[: 103 // 3]  # every rank the same number of steps
        expected = encode(tok, [train.texts[i] for i in expected_rows], 32, cfg.truncation, cfg.head_fraction)
        for blocks in layouts:
            ids, labels = shard_rows(blocks, rank, 3, equal=True)
            assert [row.tolist() for row in ids] == expected and labels == [train.labels[i] for i in expected_rows]
            assert ids.lengths() == [len(seq) for seq in expected]
    # Validation: every example scored once, by one rank.
    val = [shard_rows(layouts[0], rank, 3, equal=False)[0] for rank in range(3)]
    assert sum(len(v) for v in val) == 103
    assert all(len(v[i]) <= 32 for v in val for i in range(len(v)))
    with pytest.raises(ValueError):
        shard_rows(_tokenized_blocks(generate_reviews(2, seed=1), tok, cfg, 2, 0), 0, 3, equal=True)


def test_shards_of_a_content_split_follow_its_hash_order_whatever_the_blocks():
    """A content split's rows carry order keys from their texts' hashes (ray_jobs.data.order_key), not
    positions, and repeats of a text share one: a rank gets places rank, rank + world, ... of the rows
    in key order (the split's own order), whatever the blocks and their order."""
    import random

    import pyarrow as pa

    from ray_jobs.config import ModelConfig
    from ray_jobs.data import Split, content_split, encode, order_keys
    from ray_jobs.ingest import _encode_batch, shard_rows
    from ray_jobs.model import build_tokenizer

    ex = generate_reviews(120, seed=4)
    repeated = Split(ex.texts + ex.texts[:30], ex.labels + ex.labels[:30])  # 30 texts twice
    train = content_split(repeated, 0.05, 0.05, seed=3).train
    keys = order_keys(train, 3)
    assert keys == sorted(keys) and len(set(keys)) < len(keys)  # in key order, with repeats
    cfg = ModelConfig(source="tiny", max_length=32)
    tok = build_tokenizer(cfg)
    for seed, rows in ((0, 7), (1, 40)):
        idx = list(range(len(train)))
        random.Random(seed).shuffle(idx)
        blocks = [
            _encode_batch(
                pa.table(
                    {
                        "text": [train.texts[i] for i in idx[b : b + rows]],
                        "label": pa.array([train.labels[i] for i in idx[b : b + rows]], pa.int8()),
                        "order": pa.array([keys[i] for i in idx[b : b + rows]], pa.uint64()),
                    }
                ),
                tok,
                cfg.max_length,
                cfg.truncation,
                cfg.head_fraction,
            )
            for b in range(0, len(idx), rows)
        ]
        for rank in range(3):
            places = list(range(rank, len(train), 3))[: len(train) // 3]
            expected = encode(tok, [train.texts[i] for i in places], 32, cfg.truncation, cfg.head_fraction)
            ids, labels = shard_rows(blocks, rank, 3, equal=True)
            assert [row.tolist() for row in ids] == expected and labels == [train.labels[i] for i in places]


def test_a_checkpoint_on_remote_storage_is_downloaded_for_the_driver(tmp_path):
    """Ray reports a checkpoint on s3://-style storage without its scheme; the driver gets a local copy.
    file:// storage takes the same path through pyarrow's filesystem as s3:// does."""
    from ray_jobs.train import local_checkpoint_dir

    remote = tmp_path / "storage" / "run" / "checkpoint_0"
    remote.mkdir(parents=True)
    (remote / "model.safetensors").write_bytes(b"weights")
    assert local_checkpoint_dir(str(remote), str(tmp_path / "storage")) == str(remote)  # local: the folder itself
    local = local_checkpoint_dir(str(remote), f"file://{tmp_path}/storage")
    assert local != str(remote) and (Path(local) / "model.safetensors").read_bytes() == b"weights"


def test_checkpoint_selection_follows_train_select_by():
    """The loss picks the lowest, F1 the highest; a tie goes to the later step; a trial's best report
    and the best trial use the same rule."""
    from types import SimpleNamespace

    from ray_jobs.train import best_checkpoint
    from ray_jobs.tune import CHECKPOINT_KEY, SearchOutcome, TrialRecord

    reports = [
        {"step": 500, "val_loss": 0.234, "val_f1": 0.9105},
        {"step": 936, "val_loss": 0.211, "val_f1": 0.9084},
        {"step": 1200, "val_loss": 0.211, "val_f1": 0.9001},
    ]
    result = SimpleNamespace(best_checkpoints=[(SimpleNamespace(path=f"ckpt-{r['step']}"), r) for r in reports])
    assert best_checkpoint(result, "val_loss")[0] == "ckpt-1200"  # tie on the loss: the later one
    assert best_checkpoint(result, "val_f1")[0] == "ckpt-500"
    with pytest.raises(Exception, match="no checkpoint"):
        best_checkpoint(SimpleNamespace(best_checkpoints=[]), "val_loss")

    history = [{**r, CHECKPOINT_KEY: f"ckpt-{r['step']}"} for r in reports]
    by_loss = TrialRecord("a", {}, "TERMINATED", history, select_by="val_loss")
    by_f1 = TrialRecord("a", {}, "TERMINATED", history, select_by="val_f1")
    assert by_loss.best["step"] == 1200 and by_f1.best["step"] == 500
    other = TrialRecord("b", {}, "TERMINATED", [{"step": 10, "val_loss": 0.3, "val_f1": 0.95, CHECKPOINT_KEY: "x"}])
    assert SearchOutcome([by_loss, other], "exp").best_trial.trial_id == "a"  # lower loss, despite lower F1


def test_select_by_last_takes_the_final_checkpoint_and_compares_trials_by_their_loss():
    """`train.select_by: last`: a run's latest checkpoint whatever its metrics; trials (all at their last
    step) are compared by validation loss, which is also what Tune and ASHA are given."""
    from types import SimpleNamespace

    from ray_jobs.train import best_checkpoint, checkpoint_metric, trial_metric
    from ray_jobs.tune import CHECKPOINT_KEY, SearchOutcome, TrialRecord

    reports = [
        {"step": 1250, "val_loss": 0.196, "val_f1": 0.929},
        {"step": 2750, "val_loss": 0.206, "val_f1": 0.936},
        {"step": 2000, "val_loss": 0.203, "val_f1": 0.933},
    ]
    result = SimpleNamespace(best_checkpoints=[(SimpleNamespace(path=f"ckpt-{r['step']}"), r) for r in reports])
    assert best_checkpoint(result, "last")[0] == "ckpt-2750"
    assert best_checkpoint(result, "val_loss")[0] == "ckpt-1250"
    assert (checkpoint_metric("last"), trial_metric("last")) == ("step", "val_loss")
    history = [{**r, CHECKPOINT_KEY: f"ckpt-{r['step']}"} for r in reports]
    a = TrialRecord("a", {}, "TERMINATED", history, select_by="last")
    b = TrialRecord("b", {}, "TERMINATED", [{"step": 99, "val_loss": 0.19, CHECKPOINT_KEY: "x"}], select_by="last")
    assert a.best["step"] == 2750
    assert SearchOutcome([a, b], "exp").best_trial.trial_id == "b"  # its last loss is lower


def test_step_settings_pad_to_a_multiple_and_pin_only_for_gpus():
    """CPU runs keep the loop they had (pad to the longest text, eager, pageable tensors); a GPU run pads
    to 64 and pins its batches; explicit settings win. Padding is masked and never past max_length."""
    import torch

    from ray_jobs.config import TrainConfig
    from ray_jobs.train_steps import StepSettings

    cpu = StepSettings.of(TrainConfig(), torch.device("cpu"))
    gpu = StepSettings.of(TrainConfig(), torch.device("cuda"))
    assert (cpu.compile, cpu.pad_to_multiple, cpu.pin_memory) == (False, 1, False)
    assert (gpu.compile, gpu.pad_to_multiple, gpu.pin_memory) == (False, 64, True)
    own = StepSettings.of(TrainConfig(compile=True, pad_to_multiple=8), torch.device("cuda"))
    assert (own.compile, own.pad_to_multiple) == (True, 8)

    seqs, labels = [[5, 6, 7], [8]], [1, 0]
    ids, mask, y = cpu.batch(seqs, labels, 0, 512)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]] and y.tolist() == [1, 0]
    ids, mask, _ = StepSettings(False, 8, False).batch(seqs, labels, 0, 512)
    assert ids.shape == (2, 8) and mask.sum().item() == 4 and ids[0, :3].tolist() == [5, 6, 7]
    ids, _, _ = StepSettings(False, 64, False).batch([[1] * 70], [1], 0, 100)
    assert ids.shape == (1, 100)  # rounded up to 128, capped at max_length


def test_the_training_loss_window_sums_device_tensors_without_reading_them():
    import torch

    from ray_jobs.train_worker import _Window

    w = _Window()
    for loss in (0.5, 0.3):
        w.add(torch.tensor(loss), 16)
    assert w.mean_loss == pytest.approx(0.4) and w.samples == 32
    assert isinstance(w.loss_sum, torch.Tensor)  # summed where it lives: a GPU loop never waits for a step


@pytest.mark.parametrize("score_block", [None, 1])
def test_the_matmul_attention_matches_sdpa_with_padding(score_block, monkeypatch):
    """The CPU training attention gives SDPA's logits on a padded batch (fp32), whole or a row at a time
    (long sequences are split into blocks of rows), and gradients flow."""
    import torch

    import ray_jobs.model
    from ray_jobs.config import ModelConfig
    from ray_jobs.model import MATMUL_ATTENTION, build_model, set_attention, training_attention

    assert training_attention("auto") == "sdpa" and training_attention("sdpa") == "sdpa"
    assert training_attention("matmul") == MATMUL_ATTENTION
    if score_block:
        monkeypatch.setattr(ray_jobs.model, "SCORE_BLOCK", score_block)
    model, tok = build_model(ModelConfig(source="tiny", dropout=0.0), seed=0)
    model.eval()
    batch = tok(
        ["good fun film", "a dull, slow and long film that I did not like at all"], padding=True, return_tensors="pt"
    )
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first row is padded
    with torch.no_grad():
        expected = model(**batch).logits
        set_attention(model, MATMUL_ATTENTION)
        got = model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    model.train()
    model(**batch).logits.sum().backward()
    assert model.distilbert.transformer.layer[0].attention.q_lin.weight.grad.abs().sum() > 0


def test_the_weight_average_is_an_ema_whose_first_updates_remember_less():
    import torch

    from ray_jobs.train_steps import weight_average

    model = torch.nn.Linear(2, 1, bias=False)
    average = weight_average(model, decay=0.9)
    expected = None
    for n, value in enumerate([1.0, 3.0, 7.0, -2.0, 5.0] + [1.0] * 100):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        if expected is None:  # the first update copies
            expected = value
        else:
            d = min(0.9, (1 + n) / (10 + n))  # n updates were averaged before this one
            expected = d * expected + (1 - d) * value
        assert average.module.weight[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert int(average.n_averaged) == 105  # past n = 80 the decay itself (0.9) decided
    assert not average.module.training  # it is scored, never trained


def test_compact_token_rows_pad_exactly_like_lists():
    import numpy as np
    import torch

    from ray_jobs.data import pad_batch
    from ray_jobs.ingest import TokenRows

    seqs = [[101, 7, 8, 102], [101, 102], [101, 5, 6, 9, 4000, 102]]
    rows = TokenRows(np.array([t for s in seqs for t in s], np.int32), np.array([0, 4, 6, 12]))
    assert len(rows) == 3 and rows.lengths() == [4, 2, 6] and rows[2].tolist() == seqs[2]
    for multiple, cap in ((1, None), (8, 8)):
        as_lists = pad_batch(seqs, 0, multiple, cap)
        as_rows = pad_batch([rows[i] for i in range(3)], 0, multiple, cap)
        assert all(torch.equal(a, b) for a, b in zip(as_lists, as_rows, strict=True))
