"""What every command shares: the `--config/--set` arguments, exit codes, and the mapping of errors to them.

Commands parse, call one library function and print; the library never imports this package.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from ray_jobs.config import PipelineConfig, load_config
from ray_jobs.errors import SentimentError
from ray_jobs.ingest import TokenizedSplits
from ray_jobs.runtime import configure_logging

log = logging.getLogger(__name__)

# Exit codes of every `python -m ray_jobs <command>`.
EXIT_OK = 0  # success (pipeline: the challenger was promoted)
EXIT_FAILURE = 1  # something broke; nothing was promoted
EXIT_USAGE = 2  # bad config, bad arguments or bad input data
EXIT_BLOCKED = 3  # pipeline/gate: a valid run whose challenger the gate did not promote
EXIT_NOT_DEPLOYED = 4  # pipeline: promoted in the registry (the alias moved), then deploying or recording failed
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (`ray job stop`); pipeline: before any promotion


def config_parser(prog: str, description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """The one command-line shape of every command: `--config FILE` and repeatable `--set key=value`."""
    parser = argparse.ArgumentParser(prog=f"python -m ray_jobs {prog}", description=description)
    parser.add_argument(
        "--config",
        required=config_required,
        help="YAML file, e.g. tune_configs/quickstart.yaml"
        + ("" if config_required else " (default: built-in defaults)"),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-5 (repeatable; the value is YAML)",
    )
    return parser


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model`, as every command that takes one model reads it (Registry.resolve_model_dir)."""
    parser.add_argument(
        "--model",
        required=True,
        help="models:/<name>@<alias>, models:/<name>/<version>, a version number, or a model folder",
    )


def load_from_args(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 1")
    return value


def run(body: Callable[[], int], what: str, usage_errors: tuple[type[Exception], ...] = (SentimentError,)) -> int:
    """Run a command's body with logging configured, and turn what it raises into an exit code:
    `usage_errors` (by default every SentimentError: bad config, data or model reference) exit 2, any
    other SentimentError or exception exits 1 with `what failed` and the reason, Ctrl-C/SIGTERM exits 130."""
    configure_logging()
    try:
        return body()
    except usage_errors as err:
        log.error("%s", err)
        return EXIT_USAGE
    except SentimentError as err:
        log.error("%s", err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        log.error("%s interrupted (Ctrl-C or SIGTERM)", what)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the last line of defence says what broke
        log.error("%s failed: %s: %s", what, type(err).__name__, err)
        return EXIT_FAILURE


def start_training(args: argparse.Namespace) -> tuple[PipelineConfig, TokenizedSplits, dict]:
    """For `train` and `tune`: config and splits loaded, Ray started, the splits tokenized once into Ray
    Datasets. Returns (config, tokenized splits, run metadata). A driver-side split is loaded before Ray
    starts (bad data fails fast); a content split is built on the cluster, so after."""
    from ray_jobs.runtime import init_ray
    from ray_jobs.train import load_data, prepare_data, streams

    cfg = load_from_args(args)
    splits = None if streams(cfg) else load_data(cfg)
    init_ray(cfg.ray)
    if splits is None:
        splits = load_data(cfg)
    digests, sizes = splits.digests(), splits.sizes()
    log.info(
        "data: %d train / %d val / %d test examples, digests %s", sizes["train"], sizes["val"], sizes["test"], digests
    )
    return cfg, prepare_data(cfg, splits), {"config_digest": cfg.digest(), "data_digests": digests}
