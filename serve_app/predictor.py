"""Texts in, probabilities out: tokenize, pad each batch to its longest member, forward, softmax.

Plain Python (no Ray): the Serve deployment, the evaluation command, the gate and the benchmarks all use it,
so a model is scored the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ray_jobs.data import encode, pad_batch
from ray_jobs.model import LABELS, load_model
from ray_jobs.train import autocast_dtype


class Predictor:
    def __init__(self, model_dir: str | Path, num_threads: int | None = None, precision: str = "fp32", batch_size: int = 64, device: str = "cpu"):
        import torch

        if num_threads:
            # One replica per CPU it reserved: more threads than that only contend with other replicas.
            torch.set_num_threads(num_threads)
        self.model, self.tokenizer, self.meta = load_model(model_dir)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.amp_dtype = autocast_dtype(precision, self.device.type)
        self.batch_size = batch_size
        self.max_length = int(self.meta.get("max_length", 128))
        self.truncation = self.meta.get("truncation", "head")
        self.head_fraction = float(self.meta.get("head_fraction", 0.25))
        self.model_dir = str(model_dir)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode(self.tokenizer, texts, self.max_length, self.truncation, self.head_fraction)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 2) class probabilities, in input order. Inputs are grouped by length so that
        each forward pass pads little; the result order does not depend on that grouping."""
        import torch

        if len(texts) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        seqs = self.encode(texts)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = np.zeros((len(seqs), 2), dtype=np.float32)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                ids, mask = pad_batch([seqs[i] for i in idx], self.tokenizer.pad_token_id)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    def predict(self, texts: Sequence[str]) -> list[dict]:
        probs = self.predict_proba(texts)
        results = []
        for p in probs:
            label = int(p.argmax())
            results.append({
                "label": LABELS[label],
                "score": float(p[label]),
                "probabilities": {LABELS[0]: float(p[0]), LABELS[1]: float(p[1])},
            })
        return results
