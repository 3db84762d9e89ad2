import pytest
import torch

from ray_jobs.config import ModelConfig
from ray_jobs.errors import ModelError
from ray_jobs.model import build_model, convert_bert, load_model, minilm_path, save_model

SENTENCES = [
    "The acting was superb, but the plot dragged in the middle.",
    "I would not recommend this film to anyone.",
    "A quiet, moving story told with great care and a wonderful soundtrack.",
]


def _hidden_states_equal(bert, distil, tok, tol):
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    bert.eval()
    distil.eval()
    with torch.no_grad():
        hb = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hd = distil.distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].bool()
    diff = (hb - hd).abs()[mask].max().item()
    assert diff < tol, diff
    return diff


def test_tiny_random_bert_converts_exactly(tmp_path):
    from transformers import BertConfig, BertModel

    from ray_jobs.model import load_tokenizer

    tok = load_tokenizer(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    bert = BertModel(cfg)
    with torch.no_grad():  # make token-type 0 matter, so that folding it is really tested
        bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)
    bert.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    distil, _ = convert_bert(tmp_path, ModelConfig(source="bert", name=str(tmp_path)))
    _hidden_states_equal(bert, distil, tok, 1e-4)


def test_real_minilm_converts_exactly():
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_path()), use_safetensors=True)
    distil, tok = build_model(ModelConfig(source="bert", name="minilm"))
    _hidden_states_equal(bert, distil, tok, 1e-4)


def test_conversion_rejects_non_bert(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError):
        convert_bert(tmp_path, ModelConfig())
    with pytest.raises(ModelError, match="no model.safetensors"):
        convert_bert(tmp_path / "missing", ModelConfig())


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model, tok = build_model(ModelConfig(source="tiny"), seed=3)
    model.eval()
    save_model(model, tok, tmp_path / "m", {"max_length": 64, "truncation": "head_tail"})
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.bin")), "weights must be saved as safetensors only"
    loaded, tok2, meta = load_model(tmp_path / "m")
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        b = loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert torch.equal(a, b)
    assert tok2(SENTENCES)["input_ids"] == tok(SENTENCES)["input_ids"]
    assert meta["truncation"] == "head_tail"
    assert loaded.config.id2label == {0: "negative", 1: "positive"}


def test_load_refuses_pickle_only_folder(tmp_path):
    model, tok = build_model(ModelConfig(source="tiny"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="only safetensors"):
        load_model(tmp_path)


def test_tiny_tokenizer_is_deterministic():
    _, t1 = build_model(ModelConfig(source="tiny"))
    _, t2 = build_model(ModelConfig(source="tiny"))
    assert t1.get_vocab() == t2.get_vocab()
