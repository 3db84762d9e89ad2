"""`python -m ray_jobs onnx --model REF [--quantization int8] [--data FILE] [--json]`: export a registered
version (or a model folder) to ONNX once, score it against the eager model, and store both beside the
model (ray_jobs.onnx_export). Exit 3 where the guard refuses the export."""

from __future__ import annotations

import json

from ray_jobs.cli.common import EXIT_BLOCKED, EXIT_OK, add_model_argument, config_parser, load_from_args, run
from ray_jobs.data import load_file, load_splits
from ray_jobs.onnx_export import build, store
from ray_jobs.onnx_runtime import MODEL_FILES
from ray_jobs.registry import Registry
from ray_jobs.runtime import with_cluster_addresses


def main(argv: list[str] | None = None) -> int:
    p = config_parser(
        "onnx",
        "Export a registered version (or a model folder) to ONNX once, score it against the eager model, "
        "and store both beside the model.",
        config_required=False,
    )
    add_model_argument(p)
    p.add_argument("--quantization", choices=sorted(MODEL_FILES), help="default: the config's serve.quantization")
    p.add_argument("--data", help="labelled file for the guard (default: the config's test split, as the pipeline)")
    p.add_argument("--json", action="store_true", help="print the guard report as one JSON object")
    args = p.parse_args(argv)

    def body() -> int:
        cfg = with_cluster_addresses(load_from_args(args))
        quantization = args.quantization or cfg.serve.quantization
        if args.data:
            split = load_file(args.data, cfg.data.text_column, cfg.data.label_column)
        else:
            split = load_splits(cfg.data).test
        reg = Registry(cfg.registry)
        model_dir = reg.resolve_model_dir(args.model)
        files, report = build(
            model_dir, split, quantization, precision=cfg.gate.precision, batch_size=cfg.gate.eval_batch_size
        )
        where = store(reg, args.model, model_dir, files)
        # A replica checks the guard against the version's recorded test split: say now what it will say.
        refusal = report.refusal(
            cfg.serve.max_f1_drop, cfg.serve.min_label_agreement, cfg.serve.min_guard_texts, reg.test_digest(args.model)
        )
        if args.json:
            print(json.dumps({**report.model_dump(), "stored_in": where, "refusal": refusal}))
        else:
            print(f"{MODEL_FILES[quantization]} stored in {where}: {report.summary()}")
            print("guard: " + (refusal or "passed: replicas with serve.runtime=onnx serve it"))
        return EXIT_BLOCKED if refusal else EXIT_OK

    return run(body, "export")
