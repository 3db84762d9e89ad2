"""`python -m ray_jobs registry [--config FILE] <command>`: inspect and change the model registry, and run a
challenger on live traffic.

    status | compare 1 2 | experiments | rollback | promote 3 --force --reason "hotfix"
    shadow 3 | canary 3 --share 0.1 | promote 3 | abort        (ray_jobs.rollout: these redeploy the app)
"""

from __future__ import annotations

import time

from ray_jobs import rollout
from ray_jobs.cli.common import EXIT_BLOCKED, EXIT_OK, config_parser, fraction, load_from_args, run
from ray_jobs.config import PipelineConfig
from ray_jobs.errors import ConfigError, RegistryError
from ray_jobs.registry import PREVIOUS, Registry
from ray_jobs.runtime import with_cluster_addresses


def _status(reg: Registry) -> None:
    by_version: dict[str, list[str]] = {}
    for a, v in reg.aliases().items():
        by_version.setdefault(v, []).append(a)
    print(f"registered model: {reg.name}  ({reg.uri})")
    live = reg.rollout()
    if live is not None:
        print(
            f"live: version {live.version} in {live.mode} beside champion {live.champion} "
            f"(share {live.share:g}, mirror {live.mirror:g})"
        )
    print(f"{'version':>7}  {'aliases':<18} {'test_f1':>8}  {'gate':<8} {'created':<19}  reason")
    for v in reg.versions():
        t = v.tags or {}
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.creation_timestamp / 1000))
        print(
            f"{v.version:>7}  {','.join(sorted(by_version.get(str(v.version), []))) or '-':<18} "
            f"{t.get('test_f1', '-'):>8}  {t.get('gate.decision', '-'):<8} {created:<19}  {t.get('gate.reason', '')}"
        )


def _compare(reg: Registry, a: str, b: str) -> None:
    va, vb = reg.get_version(a), reg.get_version(b)
    keys = sorted(
        {k for v in (va, vb) for k in (v.tags or {}) if k.startswith(("test_", "val_", "gate.", "hp.", "data_digest"))}
    )
    print(f"{'':<28} {'v' + a:>22} {'v' + b:>22}")
    for k in keys:
        print(f"{k:<28} {str((va.tags or {}).get(k, '-'))[:22]:>22} {str((vb.tags or {}).get(k, '-'))[:22]:>22}")


def _experiments(reg: Registry, limit: int) -> None:
    print(f"{'started':<19}  {'run':<34} {'status':<9} {'best_val_f1':>11} {'version':>7}  gate")
    for r in reg.pipeline_runs(limit):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.start_time / 1000))
        m, t = r.data.metrics, r.data.tags
        best = f"{m['best_val_f1']:.4f}" if "best_val_f1" in m else "-"
        print(
            f"{started:<19}  {r.info.run_name[:34]:<34} {r.info.status:<9} {best:>11} "
            f"{t.get('registered_version', '-'):>7}  {t.get('gate.decision', '-')}"
        )


def _by_hand(reg: Registry, version: str, kind: str, reason: str) -> None:
    old = reg.move_champion_by_hand(version, kind, reason)
    print(f"{kind}: champion is now version {version} (was {old})")


def _live(args, cfg: PipelineConfig) -> int:
    """shadow, canary, promote (on live evidence) and abort: ray_jobs.rollout, which deploys."""
    deploy_app = not args.no_deploy
    if args.cmd in ("shadow", "canary"):
        r = rollout.start(cfg, args.cmd, args.version, getattr(args, "share", 0.0), args.mirror, deploy_app)
        print(f"{r.mode}: version {r.version} beside champion {r.champion} (share {r.share:g}, mirror {r.mirror:g})")
        return EXIT_OK
    if args.cmd == "abort":
        r = rollout.abort(cfg, deploy_app)
        print(f"abort: version {r.version} ({r.mode}) is off live traffic; the champion serves alone")
        return EXIT_OK
    decision = rollout.promote(cfg, args.version, deploy_app)
    print(decision.summary().replace("gate:", "live gate:", 1))
    return EXIT_OK if decision.promote else EXIT_BLOCKED


def parser():
    p = config_parser(
        "registry",
        "Inspect and change the model registry (status, compare, rollback, promote, experiments) and run a "
        "challenger on live traffic (shadow, canary, promote, abort). "
        "The config's registry section names the store, e.g. --set registry.tracking_uri=http://host:5000.",
        config_required=False,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="versions, aliases, test F1 and gate decisions")
    c = sub.add_parser("compare", help="two versions' metrics side by side")
    c.add_argument("a")
    c.add_argument("b")
    sub.add_parser("rollback", help="champion <- previous (recorded)")
    pr = sub.add_parser(
        "promote",
        help="make VERSION the champion: the challenger in shadow/canary on live evidence, or by hand with --force",
    )
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true", help="bypass the gate and the live evidence (needs --reason)")
    pr.add_argument("--reason", help="why (required with --force)")
    e = sub.add_parser("experiments", help="recent pipeline runs and their best trials")
    e.add_argument("--limit", type=int, default=20)
    sh = sub.add_parser("shadow", help="VERSION scores live traffic beside the champion; the champion answers")
    ca = sub.add_parser("canary", help="VERSION answers a share of live traffic (sticky per routing key)")
    for cmd in (sh, ca):
        cmd.add_argument("version")
        cmd.add_argument(
            "--mirror", type=fraction, default=1.0, help="share of requests both versions score (default 1)"
        )
    ca.add_argument("--share", type=fraction, required=True, help="share of routing keys VERSION answers")
    ab = sub.add_parser("abort", help="end the shadow/canary: the champion alone serves")
    for cmd in (pr, sh, ca, ab):
        cmd.add_argument("--no-deploy", action="store_true", help="only record; the next deploy applies it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        cfg = with_cluster_addresses(load_from_args(args))
        reg = Registry(cfg.registry)
        reg.ping()
        if args.cmd == "status":
            _status(reg)
        elif args.cmd == "compare":
            _compare(reg, args.a, args.b)
        elif args.cmd == "experiments":
            _experiments(reg, args.limit)
        elif args.cmd == "rollback":
            prev = reg.alias_version(PREVIOUS)
            if prev is None:
                raise RegistryError("no 'previous' version to roll back to")
            _by_hand(reg, prev, "rollback", f"rollback from version {reg.champion()}")
        elif args.cmd == "promote" and args.force:
            if not args.reason:
                raise ConfigError("promote --force needs --reason")
            _by_hand(reg, args.version, "manual", args.reason)
        else:
            return _live(args, cfg)
        return EXIT_OK

    return run(body, f"registry {args.cmd}", usage_errors=(ConfigError,))
