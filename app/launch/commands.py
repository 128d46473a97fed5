"""`dinoctl submit | status | logs | cancel | rerun | render`: stage jobs on either backend."""

from __future__ import annotations

import os
import re
import secrets
import sys
import time

from app.config import Config, load_config
from app.errors import UserError
from app.launch.jobspec import STAGES, JobSpec, JobSpecError, Resources

BACKENDS = ("local", "k8s")


def _user_error(message: str) -> Exception:
    return UserError(message)


def get_executor(backend: str = "local", namespace: str | None = None):
    """The executor for `backend`; the Kubernetes one is imported only when asked for."""
    if backend == "local":
        from app.launch.local import LocalExecutor

        return LocalExecutor()
    if backend == "k8s":
        try:
            from app.launch.kubernetes import KubernetesExecutor
        except ImportError as exc:
            raise _user_error(f"--backend k8s is not available: {exc}") from None
        # The chart's object names when its release is not called "dinoctl" (its pipeline Job sets them).
        options = {k: os.environ[e] for k, e in (("s3_secret", "DINOCTL_S3_CREDENTIALS_REF"),
                                                  ("settings_configmap", "DINOCTL_SETTINGS_CONFIGMAP"))
                   if os.environ.get(e)}
        return KubernetesExecutor(namespace=namespace or "default", render_options=options)
    raise _user_error(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")


def dns1035(text: str, limit: int = 63) -> str:
    """A DNS-1035 label made from `text`: lower case, [-a-z0-9], starts with a letter."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"j-{name}".rstrip("-")
    return name[:limit].rstrip("-")


def default_job_name(cfg: Config, stage: str) -> str:
    suffix = f"-{stage}-{secrets.token_hex(2)}"
    return dns1035(cfg.run.name, 63 - len(suffix)) + suffix


def spec_from_config(cfg: Config, stage: str, args: list[str], name: str | None = None,
                     **overrides) -> JobSpec:
    """A JobSpec from the config's `launch` section; keyword overrides win (None = not given)."""
    launch = cfg.launch
    fields = dict(
        name=name or default_job_name(cfg, stage), stage=stage, args=tuple(args),
        image=launch.image, replicas=launch.replicas, nproc_per_node=launch.nproc_per_node,
        resources=Resources(cpu=launch.cpu, memory=launch.memory, gpus=launch.gpus_per_node),
        restart_policy=launch.restart_policy, backoff_limit=launch.backoff_limit,
        active_deadline_seconds=launch.active_deadline_seconds, namespace=launch.namespace,
        queue=launch.queue, env=(("DINOCTL_RUN_NAME", cfg.run.name),),
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return JobSpec(**fields)
    except JobSpecError as exc:
        raise _user_error(str(exc)) from None


def _stage_args(args) -> list[str]:
    out = ["--config", args.config]
    for item in args.overrides:
        out += ["--set", item]
    return out + list(args.stage_args or [])


def pod_config_error(config: str) -> str | None:
    """Why `--config` cannot be read inside a pod, or None: a pod sees the presets shipped in the
    image and the chart's stage configs (mounted at /etc/dinoctl/configs), not this machine."""
    from app.config import CONFIG_DIR
    from app.launch.render import CONFIG_MOUNT

    if config.startswith(CONFIG_MOUNT + "/"):
        return None
    if config.startswith("s3://"):  # in the store every pod reads (a pipeline's stage configs)
        return None
    if "/" not in config and not config.endswith((".yaml", ".yml")) and (CONFIG_DIR / f"{config}.yaml").exists():
        return None
    return (f"--config: '{config}' is not in the image: with --backend k8s use a preset name "
            f"(one of configs/*.yaml), a stage config of the chart under {CONFIG_MOUNT}/ or an "
            "s3:// URI, and --set for changes")


def _spec_from_args(args) -> JobSpec:
    from app.launch.render import CONFIG_MOUNT

    if getattr(args, "backend", "local") == "k8s":
        problem = pod_config_error(args.config)
        if problem:
            raise _user_error(problem)
    if args.config.startswith(CONFIG_MOUNT + "/") and not os.path.exists(args.config):
        # the chart's stage config exists only in the pod: launch settings from the defaults
        cfg = load_config(None, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    return spec_from_config(
        cfg, args.stage, _stage_args(args), name=args.name, replicas=args.replicas,
        nproc_per_node=args.nproc_per_node, restart_policy=args.restart_policy,
        backoff_limit=args.backoff_limit, active_deadline_seconds=args.active_deadline_seconds,
        image=args.image, namespace=args.namespace)


# ------------------------------------------------------------------------------------------------


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _status_rows(statuses) -> list[list[str]]:
    now = time.time()
    return [[s.name, s.stage, s.phase, str(s.restarts), format_age(now - s.start_time) if s.start_time
             else "-", s.reason if s.phase in ("Failed", "Restarting") else ""] for s in statuses]


def _cmd_submit(args) -> int:
    spec = _spec_from_args(args)
    executor = get_executor(args.backend, args.namespace or spec.namespace)
    name = executor.submit(spec)
    print(f"submitted {name} ({spec.stage}, {spec.replicas} x {spec.nproc_per_node} processes, "
          f"backend {args.backend})")
    if not args.wait:
        print(f"follow it with: dinoctl logs {name} --follow")
        return 0
    return _wait_and_report(executor, name)


def _wait_and_report(executor, name: str) -> int:
    for line in executor.logs(name, "master-0", follow=True):
        sys.stdout.write(line)
    status = executor.wait(name)
    print(f"{name}: {status.phase}" + (f" ({status.reason})" if status.phase == "Failed" else ""))
    return 0 if status.phase == "Succeeded" else 1


def _not_found(exc: Exception, name: str) -> Exception:
    return _user_error(str(exc) if name in str(exc) else f"job '{name}' not found ({exc})")


def _cmd_status(args) -> int:
    executor = get_executor(args.backend, args.namespace)
    if args.job:
        try:
            status = executor.status(args.job)
        except FileNotFoundError as exc:
            raise _not_found(exc, args.job) from None
        print(format_table(_status_rows([status]), ["NAME", "STAGE", "PHASE", "RESTARTS", "AGE", "REASON"]))
        print("\nconditions:")
        for c in status.conditions:
            stamp = time.strftime("%H:%M:%S", time.localtime(c.time)) if c.time else "-"
            print(f"  {c.type:<11} {c.status:<5} {stamp}  {c.reason}: {c.message}")
        return 0
    statuses = sorted(executor.list(), key=lambda s: s.start_time)
    if not statuses:
        print("no jobs")
        return 0
    print(format_table(_status_rows(statuses), ["NAME", "STAGE", "PHASE", "RESTARTS", "AGE", "REASON"]))
    return 0


def _cmd_logs(args) -> int:
    executor = get_executor(args.backend, args.namespace)
    try:
        for line in executor.logs(args.job, args.replica, follow=args.follow):
            sys.stdout.write(line)
            sys.stdout.flush()
    except FileNotFoundError as exc:
        raise _not_found(exc, args.job) from None
    return 0


def _cmd_cancel(args) -> int:
    executor = get_executor(args.backend, args.namespace)
    try:
        executor.cancel(args.job)
        status = executor.status(args.job)
    except FileNotFoundError as exc:
        raise _not_found(exc, args.job) from None
    print(f"{args.job}: {status.phase}" + (f" ({status.reason})" if status.reason else ""))
    return 0


def _cmd_rerun(args) -> int:
    executor = get_executor(args.backend, args.namespace)
    try:
        name = executor.rerun(args.job, args.name)
    except FileNotFoundError as exc:
        raise _not_found(exc, args.job) from None
    print(f"submitted {name} (rerun of {args.job}, resuming from LATEST)")
    return _wait_and_report(executor, name) if args.wait else 0


def _cmd_render(args) -> int:
    try:
        from app.launch.render import render_pytorchjob
    except ImportError as exc:
        raise _user_error(f"rendering PyTorchJobs is not available: {exc}") from None
    import yaml

    manifest = render_pytorchjob(_spec_from_args(args))
    print(manifest if isinstance(manifest, str) else yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


# ------------------------------------------------------------------------------------------------


def _add_backend(p) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="local", help="where jobs run (default local)")
    p.add_argument("--namespace", default=None, help="Kubernetes namespace (k8s backend)")


def _add_spec_args(p) -> None:
    from app.config_commands import add_config_args

    p.add_argument("stage", choices=STAGES, help="the entry stage (torchrun -m app.entry <stage>)")
    add_config_args(p)
    p.add_argument("--name", help="job name (DNS-1035; default <run.name>-<stage>-<random>)")
    p.add_argument("--replicas", type=int, help="replicas: 1 Master + N-1 Workers (launch.replicas)")
    p.add_argument("--nproc-per-node", type=int, help="processes per replica (launch.nproc_per_node)")
    p.add_argument("--restart-policy", choices=("OnFailure", "ExitCode", "Never"),
                   help="launch.restart_policy")
    p.add_argument("--backoff-limit", type=int, help="restarts before the job fails (launch.backoff_limit)")
    p.add_argument("--active-deadline-seconds", type=int, help="launch.active_deadline_seconds")
    p.add_argument("--image", help="container image (launch.image)")
    p.add_argument("stage_args", nargs="*", metavar="-- ARGS", help="extra stage arguments after --")
    _add_backend(p)


def register(sub) -> None:
    p = sub.add_parser("submit", help="run one stage as a job (local processes or a PyTorchJob)")
    _add_spec_args(p)
    p.add_argument("--wait", action="store_true", help="stream the master log and wait for the end")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", help="jobs and their conditions")
    p.add_argument("job", nargs="?", help="one job (default: all)")
    _add_backend(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("logs", help="a replica's log")
    p.add_argument("job")
    p.add_argument("--replica", default="master-0", help="master-0 | worker-<i> (default master-0)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    _add_backend(p)
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("cancel", help="stop a job and all its processes")
    p.add_argument("job")
    _add_backend(p)
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("rerun", help="run a job again under a new name, resuming from LATEST")
    p.add_argument("job")
    p.add_argument("--name", help="new job name (default <job>-r<N>)")
    p.add_argument("--wait", action="store_true")
    _add_backend(p)
    p.set_defaults(func=_cmd_rerun)

    p = sub.add_parser("render", help="print the PyTorchJob manifest of a stage job")
    _add_spec_args(p)
    p.set_defaults(func=_cmd_render)
