"""Model loading for a replica: which version an alias names, where its files are, the supervised model
process that serves it (serve_app.model_worker), and the trial load that refuses a model before a deploy."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

from ray_jobs.config import serving_device
from ray_jobs.onnx_runtime import RuntimeChoice
from ray_jobs.registry import Registry, Rollout, parse_model_uri
from serve_app.model_worker import ModelWorker
from serve_app.schemas import AppArgs, ModelInfo
from serve_app.supervised_model import SupervisedModel


def resolve_version(args: AppArgs, model_uri: str) -> str:
    """The concrete version an alias points to now ('local' for a folder)."""
    return Registry(args.registry).resolve_version(model_uri)


def locate_model(args: AppArgs, model_uri: str, version: str) -> tuple[str, ModelInfo]:
    """(model folder, ModelInfo) for a concrete version, reading metadata from the registry."""
    name, alias, _ = parse_model_uri(model_uri)
    reg = Registry(args.registry)
    model_dir = reg.version_dir(model_uri, version)
    tags = (reg.for_model(name).get_version(version).tags or {}) if name is not None else {}
    f1 = tags.get("test_f1")
    info = ModelInfo(
        name=name or Path(model_uri).name,
        version=version,
        alias=alias,
        model_uri=model_uri,
        test_f1=float(f1) if f1 else None,
        data_digest=tags.get("data_digest.test"),
        loaded_at=time.time(),
    )
    return model_dir, info


def worker_factory(
    args: AppArgs,
    model_dir: str,
    features: bool | None = None,
    device: str | None = None,
    test_digest: str | None = None,
    fork_server: bool | None = None,
    start_fork_server: bool = True,
):
    """What starts one model process for `model_dir` (the supervisor calls it again to replace one).
    `features`: answers carry drift features (default: where drift monitoring is on). `device`: default
    cuda where the replica reserves a GPU (serve.num_gpus), else cpu. `test_digest`: the version's test
    split as the registry records it (an ONNX export's guard must have scored it). `fork_server`: default
    serve.fork_server; `start_fork_server=False`: fork only from a server that runs already."""
    s = args.serve
    return functools.partial(
        ModelWorker,
        model_dir,
        num_threads=max(1, int(s.num_cpus)),
        precision=s.precision,
        deadline_s=s.batch_deadline_s,
        features=s.drift.enabled if features is None else features,
        runtime=RuntimeChoice.of(s, test_digest),
        device=device or serving_device(s),
        batch_size=max(64, s.max_batch_size),
        fork_server=s.fork_server if fork_server is None else fork_server,
        start_fork_server=start_fork_server,
    )


async def load_served_model(
    args: AppArgs, model_uri: str, version: str, features: bool | None = None
) -> tuple[SupervisedModel, ModelInfo]:
    """(SupervisedModel, ModelInfo) for a concrete version. The model runs in a process of its own
    (see serve_app.model_worker for why), replaced if it dies or wedges."""
    model_dir, info = await asyncio.to_thread(locate_model, args, model_uri, version)
    model = await SupervisedModel.create(
        worker_factory(args, model_dir, features, test_digest=info.data_digest),
        max_restarts=args.serve.max_model_restarts,
    )
    return model, info


def challenger_config(model_uri: str, rollout: Rollout | None) -> dict | None:
    """The challenger part of `user_config`: what a replica loads beside the champion."""
    if rollout is None:
        return None
    name, _, _ = parse_model_uri(model_uri)
    return {
        "version": rollout.version,
        "model_uri": f"models:/{name}/{rollout.version}",
        "mode": rollout.mode,
        "share": rollout.share,
        "mirror": rollout.mirror,
    }


def trial_load(args: AppArgs, model_uri: str, version: str) -> None:
    """Load the model once in a throwaway process and answer one text: a model that cannot load or
    predict is refused here, before a deployment changes (ModelWorkerError says why)."""
    model_dir, info = locate_model(args, model_uri, version)
    # On the CPU: the deploying process (often a head node without a GPU) proves that the files load and
    # predict; each GPU replica's process checks its own device when it starts. Forked where a fork server
    # runs already on this machine (a head node that also serves: ~0.2 s instead of ~3.5), else started
    # the plain way: a command must not leave a server behind it.
    worker = worker_factory(
        args, model_dir, features=False, device="cpu", test_digest=info.data_digest, start_fork_server=False
    )()
    try:
        worker.predict(["a trial prediction before deploying"])
    finally:
        worker.close()
