"""`python -m ray_jobs pipeline`: tune (-> train) -> register the best trial -> gate -> deploy -> summary.

    python -m ray_jobs pipeline --config tune_configs/quickstart.yaml
    ray job submit --working-dir . -- python -m ray_jobs pipeline --config tune_configs/imdb.yaml

Exit codes: 0 promoted, or in shadow with gate.on_pass: shadow (and deployed unless --no-deploy), 3
blocked by the gate (a valid outcome), 2 bad config or data, 1 failure (nothing promoted, no alias
changed), 4 promoted in the registry (the champion alias moved) but a later step failed: recording the
decision, deploying, or the sample request; 130 interrupted (Ctrl-C, or SIGTERM from `ray job stop`)
before a promotion.
"""

from __future__ import annotations

import logging

from ray_jobs.cli.common import (
    EXIT_BLOCKED,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_DEPLOYED,
    EXIT_OK,
    EXIT_USAGE,
    config_parser,
    load_from_args,
)
from ray_jobs.config import PipelineConfig
from ray_jobs.errors import ConfigError, DataError, PromotedNotDeployedError, SentimentError
from ray_jobs.pipeline import SAMPLE_REVIEW, Outcome, run_pipeline
from ray_jobs.runtime import configure_logging, sigterm_received, wait_until_interrupted

log = logging.getLogger(__name__)


def print_summary(cfg: PipelineConfig, out: Outcome) -> None:
    d = out.decision
    champ = "none" if d.champion_f1 is None else f"v{out.champion_before} F1 {d.champion_f1:.4f}"
    print(f"\n=== pipeline '{cfg.name}' ===")
    print(f"registered     {cfg.registry.model_name} version {out.version}")
    print(f"challenger     test F1 {d.challenger_f1:.4f} on {d.n} examples (digest {d.test_digest})")
    print(f"champion       {champ}")
    verdict = ("PASSED, IN SHADOW" if out.shadowed else "PROMOTED") if d.promote else "BLOCKED"
    print(f"gate           {verdict}: {d.reason}")
    if out.shadowed:
        print(f"shadow         v{out.version} scores live traffic beside v{out.champion_before}; decide with")
        print(f"               python -m ray_jobs registry --config ... promote {out.version}   (or abort)")
    if out.url:
        print(f"endpoint       {out.url}/predict   (docs: {out.url}/docs)")
    if out.sample:
        print(f'sample request POST /predict {{"text": "{SAMPLE_REVIEW}"}}')
        print(f"       answer  {out.sample}")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("pipeline", "Tune, register, gate and serve the sentiment classifier.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-deploy", action="store_true", help="do not deploy or hot-swap the Serve app")
    mode.add_argument("--deploy-only", action="store_true", help="only deploy (or hot-swap to) the current champion")
    parser.add_argument("--resume-tune", metavar="EXPERIMENT_PATH", help="continue an interrupted Tune search")
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="stay up (Ctrl-C stops) so the endpoint outlives the run when Ray was started in-process",
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_from_args(args)
    except ConfigError as err:
        log.error("%s", err)
        return EXIT_USAGE
    try:
        if args.deploy_only:
            from ray_jobs.deploy import deploy_champion

            _, url = deploy_champion(cfg)
            print(f"endpoint       {url}/predict")
            code = EXIT_OK
        else:
            out = run_pipeline(cfg, deploy_app=not args.no_deploy, resume_tune=args.resume_tune)
            print_summary(cfg, out)
            code = EXIT_OK if out.decision.promote else EXIT_BLOCKED
    except PromotedNotDeployedError as err:
        log.error(
            "version %s was promoted in the registry (it is the champion now), not deployed: %s. "
            "Fix the cause and run --deploy-only, or roll back: python -m ray_jobs registry ... rollback",
            err.version,
            err,
        )
        print(f"gate           PROMOTED v{err.version} in the registry, NOT DEPLOYED: {err}", flush=True)
        return EXIT_NOT_DEPLOYED
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the last line of defence says what broke
        if isinstance(err, KeyboardInterrupt) or sigterm_received():
            # A promotion (the alias moved) that was interrupted afterwards exits 4 (promoted_steps).
            log.error("interrupted (Ctrl-C or SIGTERM) before any promotion: nothing promoted")
            return EXIT_INTERRUPTED
        if isinstance(err, (ConfigError, DataError)):
            log.error("%s", err)
            return EXIT_USAGE
        if isinstance(err, SentimentError):
            log.error("pipeline failed, nothing promoted: %s", err)
            return EXIT_FAILURE
        log.exception("pipeline failed, nothing promoted: %s: %s", type(err).__name__, err)
        return EXIT_FAILURE
    if args.keep_serving:
        print("serving until Ctrl-C ...", flush=True)
        wait_until_interrupted()
    return code
