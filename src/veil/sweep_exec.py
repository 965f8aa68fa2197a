"""Where a sweep's points run: in this process, in N worker processes, as Ray tasks or as SLURM
job-array tasks (through submitit), with the same sweep file and the same table.

Every executor runs :func:`run_point` for each point, which makes a point idempotent: a finished
point is skipped (its defenses run if some are missing), a point another worker holds a live claim
on (:mod:`veil.claims`) is left to it, an interrupted one resumes from its checkpoint, and the
sweep's ``defenses`` run on the point right after it finishes, in the same worker. Executors:

* :class:`Local`: the points one after another in this process (``veil sweep FILE``).
* :class:`Jobs`: N worker processes on this machine (``--jobs N``), the CPU threads split between
  them, one GPU each (round robin) where GPUs exist; each worker claims the next free point.
* :class:`Ray`: one Ray task per point declaring its CPUs and GPUs (``--ray [ADDRESS]``), on an
  existing cluster or on a local one started for the sweep; ``pip install 'veil[ray]'``.
* :class:`Slurm`: one job-array task per point through submitit (``--slurm``), partition, time,
  GPUs and array parallelism as options; a requeued task takes its own claim back and resumes the
  point; ``pip install 'veil[slurm]'``. ``cluster="local"`` is submitit's local executor.

Ray and SLURM run every point (as ``keep_going``); the table and report are written when they end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from veil import records as rec
from veil.claims import claim_point, clear_stale
from veil.errors import ConfigError, VeilError
from veil.runs import RunConfig
from veil.sweep import CARD, SWEEP_JSON, PointResult, Sweep, SweepResult, defense_items, format_metric, write_results

log = logging.getLogger(__name__)

__all__ = ["Executor", "Jobs", "Local", "Ray", "Slurm", "execute", "point_metrics", "run_point", "run_sweep"]


@dataclass(frozen=True)
class Executor:
    """Base of the executors; ``name`` is what the run record and the logs call it."""

    name = "local"


@dataclass(frozen=True)
class Local(Executor):
    """The points in order, in this process."""

    name = "local"


@dataclass(frozen=True)
class Jobs(Executor):
    """``n`` worker processes on this machine (``threads`` CPU threads each: default the CPUs
    this process may use, split evenly)."""

    n: int = 2
    threads: int | None = None
    name = "jobs"


@dataclass(frozen=True)
class Ray(Executor):
    """One Ray task per point. ``address``: an existing cluster (``"auto"``, ``"HOST:PORT"``,
    ``"ray://HOST:10001"``); ``None`` starts a local one for the sweep (``num_cpus`` of them)."""

    address: str | None = None
    cpus_per_point: float = 1.0
    gpus_per_point: float = 0.0
    num_cpus: int | None = None
    name = "ray"


@dataclass(frozen=True)
class Slurm(Executor):
    """One SLURM job-array task per point, through submitit. ``cluster``: ``None`` or ``"slurm"``
    (``sbatch`` must exist), or ``"local"`` / ``"debug"`` (submitit's executors that run
    on this machine, for testing). ``folder``: submitit's logs (default ``OUT/.submitit``)."""

    partition: str | None = None
    time_min: int = 24 * 60
    gpus_per_point: int = 0
    cpus_per_point: int = 2
    mem_gb: int | None = None
    array_parallelism: int = 32
    cluster: str | None = None
    folder: str | None = None
    wait: bool = True
    name = "slurm"


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this executor needs {module}, which is not installed: pip install 'veil[{extra}]'") from None


# --------------------------------------------------------------------------- one point


def _card_done(card: dict[str, Any], config: RunConfig) -> bool:
    from veil.defenses.card import CARD_DIR

    if config.attack == "none":  # the card is for attack runs; a clean point has none
        return True
    try:
        old = rec.read_json(Path(config.out) / CARD_DIR / "card.json")
    except (VeilError, OSError, ValueError):
        return False
    done = {r["defense"] for r in old.get("rows", [])}
    return Path(old.get("reference", "")) == Path(card["reference"]) and set(card["defenses"]) <= done


def _defenses_done(sweep: Sweep, config: RunConfig) -> bool:
    from veil.defenses.card import cached_result

    for d, opts in sweep.defenses.items():
        if d == CARD:
            if not _card_done(opts, config):
                return False
        elif cached_result(d, config.out, opts) is None:
            return False
    return True


def point_metrics(sweep: Sweep, config: RunConfig) -> dict[str, Any] | None:
    """A finished point's ``metrics.json``, with the figures of the sweep's defenses that ran on it
    (with the sweep's options) under ``defenses.NAME`` (:func:`veil.defenses.card` figures);
    ``None`` when the point has not finished."""
    from veil.defenses.card import result_figures, cached_result

    record = rec.RunRecord(config.out)
    if not record.finished:
        return None
    metrics = dict(record.metrics())
    figures = {}
    for d, opts in defense_items(sweep):
        result = cached_result(d, config.out, opts)
        if result is not None:
            figures[d] = {**result_figures(result), "seconds": result.seconds}
    if figures:
        metrics["defenses"] = figures
    return metrics


def _finished_since(config: RunConfig, since: float | None) -> bool:
    """Finished, and (with ``since``: an overwriting sweep) finished after ``since``."""
    record = rec.RunRecord(config.out)
    if not record.finished:
        return False
    return since is None or record.path(rec.METRICS).stat().st_mtime >= since


def run_point(sweep: Sweep, name: str, config: RunConfig, device: str | None = None,
              overwrite_before: float | None = None, progress: bool = True) -> PointResult:
    """Run one point (and the sweep's defenses on it) unless it is finished or claimed.

    ``overwrite_before``: retrain a point whose run finished before this time (an overwriting
    sweep started then; a point it already retrained is not retrained again by another worker).

    Returns a :class:`PointResult`: ``skipped``, ``trained``, ``failed`` or ``claimed`` (a live
    claim of another worker holds it).
    """
    from veil.experiment import run_experiment, seed_everything

    config = dataclasses.replace(config, progress=progress, **({"device": device} if device else {}))
    finished = _finished_since(config, overwrite_before)
    if finished and _defenses_done(sweep, config):
        clear_stale(sweep.out, name)
        return PointResult(name, config, "skipped", metrics=point_metrics(sweep, config))
    claim, holder = claim_point(sweep.out, name)
    if claim is None:
        who = f"{holder.get('host')} process {holder.get('pid')}" + (f" ({holder['job']})" if holder.get("job") else "")
        log.info("%s: claimed by %s; left to it", name, who)
        return PointResult(name, config, "claimed", error=f"running on {who}")
    t0 = time.perf_counter()
    status = "skipped"
    with claim:
        try:
            if not _finished_since(config, overwrite_before):  # another worker may have finished it meanwhile
                record = rec.RunRecord(config.out)
                state = "resuming" if record.path(rec.CHECKPOINT).is_file() and overwrite_before is None else "training"
                log.info("%s: %s", name, state)
                seed_everything(config.seed)
                run_experiment(dataclasses.replace(config, overwrite=overwrite_before is not None))
                status = "trained"
            _run_defenses(sweep, config, device, progress)
        except Exception as exc:  # noqa: BLE001  (recorded in the result)
            seconds = time.perf_counter() - t0
            msg = str(exc) if isinstance(exc, VeilError) else f"{type(exc).__name__}: {exc}"
            log.error("%s: failed after %.0fs: %s", name, seconds, msg)
            return PointResult(name, config, "failed", error=msg, seconds=seconds)
    metrics = point_metrics(sweep, config)
    seconds = time.perf_counter() - t0
    if status == "trained" and metrics:
        log.info("%s: finished in %.0fs: clean accuracy %s, attack success rate %s", name, seconds,
                 format_metric("clean_accuracy", metrics.get("clean_accuracy")),
                 format_metric("attack_success_rate", metrics.get("attack_success_rate")))
    return PointResult(name, config, status, metrics=metrics, seconds=seconds)


def _run_defenses(sweep: Sweep, config: RunConfig, device: str | None, progress: bool) -> None:
    from veil.defenses.card import apply_defense, make_card

    for d, opts in sweep.defenses.items():
        if d == CARD:
            if config.attack == "none":
                log.info("%s: a clean run; the card is for attack runs", Path(config.out).name)
            elif not _card_done(opts, config):
                make_card(config.out, opts["reference"], defenses=None if opts["all"] else opts["defenses"],
                          options=opts["options"], device=device or _device(config), data_root=config.data_root,
                          progress=progress)
            continue
        result, reused = apply_defense(d, config.out, opts, device=device or _device(config), progress=progress,
                                       data_root=config.data_root)
        if not reused:
            log.info("%s on %s: %s", d, Path(config.out).name, result.summary())


def _device(config: RunConfig) -> str:
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def work(sweep: Sweep, names: Sequence[str], device: str | None = None, overwrite_before: float | None = None,
         progress: bool = True, keep_going: bool = False) -> list[PointResult]:
    """Run the named points in order in this process; stop at the first failure unless ``keep_going``."""
    configs = dict(sweep.points())
    results = []
    for i, name in enumerate(names):
        result = run_point(sweep, name, configs[name], device, overwrite_before, progress)
        results.append(result)
        if result.status == "failed" and not keep_going:
            results += [PointResult(n, configs[n], "not run") for n in names[i + 1:]]
            break
    return results


# --------------------------------------------------------------------------- executors


def run_sweep(
    sweep: Sweep,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    keep_going: bool = False,
    executor: Any = None,
    only: list[str] | None = None,
) -> SweepResult:
    """Run every point of ``sweep`` (``only``: these) and write the results table and report.

    Each point runs like ``veil run``: global RNGs seeded with the point's seed
    (:func:`veil.experiment.seed_everything`), then :func:`veil.experiment.run_experiment`. Points whose
    folder holds a finished run are skipped (unless ``overwrite``); interrupted ones resume from
    their checkpoint; a point another worker holds a live claim on is left to it
    (:mod:`veil.claims`); the sweep's ``defenses`` run on each point when it finishes.

    Args:
        sweep: from :func:`veil.sweep.load_sweep`.
        device: overrides every point's ``device`` (``auto``, ``cpu``, ``cuda``).
        overwrite: retrain finished points from scratch (each once).
        progress: progress bars while training.
        keep_going: after a point fails, go on with the next one (default: stop at the first
            failure; Ray and SLURM always go on). Either way the failures are in the result and the
            table holds every point that finished.
        executor: where the points run, an :class:`Executor` (default: in this
            process, one after another).
        only: run only these points (by name).

    Raises:
        ConfigError: a data folder or reference run is missing, or (without ``overwrite``) a point's
            folder holds a run recorded with other settings: checked before any training.
    """
    return execute(sweep, executor, device=device, overwrite=overwrite, progress=progress, keep_going=keep_going,
                   only=only)


def execute(sweep: Sweep, executor: Executor | None = None, device: str | None = None, overwrite: bool = False,
            progress: bool = True, keep_going: bool = False, only: Sequence[str] | None = None,
            write: bool = True) -> SweepResult:
    """Run the sweep's points (``only``: these) with ``executor`` (default :class:`Local`) and,
    with ``write``, write the table and report over every finished point."""
    executor = executor or Local()
    points = sweep.points()
    names = [n for n, _ in points] if only is None else list(only)
    unknown = [n for n in names if n not in dict(points)]
    if unknown:
        raise ConfigError(f"sweep {sweep.name!r} has no point {unknown[0]!r} (veil sweep FILE --list names them)")
    sweep.check(overwrite)
    rec.atomic_write_json(sweep.out / SWEEP_JSON, sweep.to_dict())
    since = time.time() if overwrite else None
    if isinstance(executor, Jobs):
        results = _run_jobs(sweep, names, executor, device, since, progress, keep_going)
    elif isinstance(executor, Ray):
        results = _run_ray(sweep, names, executor, device, since, progress)
    elif isinstance(executor, Slurm):
        results = _run_slurm(sweep, names, executor, device, since)
    else:
        os.environ.setdefault("VEIL_EXECUTOR", "local")
        results = work(sweep, names, device, since, progress, keep_going)
    configs = dict(points)
    by_name = {r.name: r for r in results}
    ordered = [by_name.get(n) or PointResult(n, configs[n], "not run") for n in names]
    table: dict[str, Any] = {}
    files: dict[str, Path] = {}
    if write:
        table, files = write_results(sweep, {n: point_metrics(sweep, c) for n, c in points})
    return SweepResult(sweep=sweep, points=ordered, table=table, files=files)


def _plain(result: PointResult) -> dict[str, Any]:
    """A result without its config, to send between processes (the receiver has the configs)."""
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)} | {"config": None}


def _merge(results: list[list[PointResult]], names: Sequence[str]) -> list[PointResult]:
    """One result per point from the workers' lists: the one that ran or skipped it over one that
    found it claimed or did not reach it."""
    rank = {"trained": 0, "failed": 1, "skipped": 2, "claimed": 3, "not run": 4}
    best: dict[str, PointResult] = {}
    for lst in results:
        for r in lst:
            if r.name not in best or rank[r.status] < rank[best[r.name].status]:
                best[r.name] = r
    return [best[n] for n in names if n in best]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker_logging(level: int) -> None:
    """A worker process logs like the ``veil`` command that started it."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _jobs_worker(level: int, index: int, n: int, threads: int, gpus: list[int], sweep: Sweep, names: list[str],
                 device: str | None, since: float | None, progress: bool, keep_going: bool, queue: Any) -> None:
    """One ``--jobs`` worker: its threads and GPU, then every point it can claim."""
    os.environ["VEIL_EXECUTOR"] = "jobs"
    os.environ["VEIL_TASK_ID"] = f"jobs-{os.getppid()}-{index}"
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[index % len(gpus)])
    import torch

    torch.set_num_threads(threads)
    _worker_logging(level)
    # start each worker at a different point, so that they do not queue on the same claim
    order = names[index:] + names[:index]
    results = work(sweep, order, device, since, progress and index == 0, keep_going)
    queue.put([_plain(r) for r in results])


def _run_jobs(sweep: Sweep, names: list[str], executor: Jobs, device: str | None, since: float | None,
              progress: bool, keep_going: bool) -> list[PointResult]:
    import multiprocessing as mp

    if executor.n < 1:
        raise ConfigError(f"--jobs must be at least 1, got {executor.n}")
    gpus: list[int] = []
    if device != "cpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [int(g) for g in visible.split(",") if g.strip().isdigit()]
        else:
            import torch

            gpus = list(range(torch.cuda.device_count()))
    threads = executor.threads or max(1, _cpus() // executor.n)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_jobs_worker, name=f"veil-sweep-worker-{i}",
                         args=(logging.getLogger().getEffectiveLevel(), i, executor.n, threads, gpus, sweep, names, device, since, progress, keep_going, queue))
             for i in range(executor.n)]
    log.info("sweep %s: %d workers, %d thread(s) each%s", sweep.name, executor.n, threads,
             f", GPUs {gpus}" if gpus else "")
    for p in procs:
        p.start()
    collected: list[list[PointResult]] = []
    configs = dict(sweep.points())
    pending = len(procs)
    while pending:
        try:
            raw = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001  (queue.Empty: check whether a worker died)
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        collected.append([PointResult(**{**r, "config": configs[r["name"]]}) for r in raw])
        pending -= 1
    for p in procs:
        p.join()
    dead = [p.name for p in procs if p.exitcode]
    if dead:
        log.error("sweep %s: worker(s) %s exited with an error", sweep.name, ", ".join(dead))
    merged = _merge(collected, names)
    done = {r.name for r in merged}
    for n in names:  # a point of a worker that died: its record says what happened
        if n not in done:
            finished = rec.RunRecord(configs[n].out).finished
            merged.append(PointResult(n, configs[n], "skipped" if finished else "failed",
                                      error=None if finished else "its worker died"))
    return merged


def _ray_point(sweep: Sweep, name: str, config: RunConfig, device: str | None, since: float | None,
               progress: bool, threads: int) -> dict[str, Any]:
    import ray
    import torch

    os.environ["VEIL_EXECUTOR"] = "ray"
    os.environ["VEIL_TASK_ID"] = ray.get_runtime_context().get_task_id() or ""
    torch.set_num_threads(max(1, threads))
    result = run_point(sweep, name, config, device, since, progress)
    return _plain(result)


def _run_ray(sweep: Sweep, names: list[str], executor: Ray, device: str | None, since: float | None,
             progress: bool) -> list[PointResult]:
    ray = _require("ray", "ray")
    started = False
    if not ray.is_initialized():
        if executor.address is None:
            ray.init(num_cpus=executor.num_cpus or _cpus(), include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=executor.address, log_to_driver=True)
        started = True
    try:
        task = ray.remote(num_cpus=executor.cpus_per_point, num_gpus=executor.gpus_per_point)(_ray_point)
        configs = dict(sweep.points())
        refs = {n: task.remote(sweep, n, configs[n], device, since, False, int(max(1, executor.cpus_per_point)))
                for n in names}
        log.info("sweep %s: %d Ray task(s) submitted (%s CPU, %s GPU each)", sweep.name, len(refs),
                 executor.cpus_per_point, executor.gpus_per_point)
        results = []
        for n, ref in refs.items():
            try:
                raw = ray.get(ref)
                results.append(PointResult(**{**raw, "config": configs[n]}))
            except Exception as exc:  # noqa: BLE001  (a crashed worker or task)
                results.append(PointResult(n, configs[n], "failed", error=f"{type(exc).__name__}: {exc}"))
        return results
    finally:
        if started:
            ray.shutdown()


class _SlurmPoint:
    """The callable each job-array task runs: one point. Checkpointable, so that a preempted or
    timed-out task is requeued (the point resumes from its checkpoint)."""

    def __init__(self, sweep: Sweep, device: str | None, since: float | None, level: int = logging.INFO,
                 threads: int = 1) -> None:
        self.sweep, self.device, self.since, self.level, self.threads = sweep, device, since, level, threads

    def __call__(self, name: str) -> dict[str, Any]:
        import submitit

        os.environ["VEIL_EXECUTOR"] = "slurm"
        try:
            os.environ["VEIL_TASK_ID"] = str(submitit.JobEnvironment().job_id)
        except RuntimeError:
            pass
        _worker_logging(self.level)
        import torch

        torch.set_num_threads(max(1, self.threads))
        config = dict(self.sweep.points())[name]
        return _plain(run_point(self.sweep, name, config, self.device, self.since, False))

    def checkpoint(self, name: str) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(_SlurmPoint(self.sweep, self.device, self.since, self.level, self.threads), name)


def _run_slurm(sweep: Sweep, names: list[str], executor: Slurm, device: str | None,
               since: float | None) -> list[PointResult]:
    submitit = _require("submitit", "slurm")
    import shutil

    if executor.cluster in (None, "slurm") and shutil.which("sbatch") is None:
        raise ConfigError("--slurm: no SLURM on this machine (sbatch not found); submit from a login node, or pass "
                          "--slurm-cluster local to run the tasks here")
    folder = Path(executor.folder) if executor.folder else sweep.out / ".submitit"
    ex = submitit.AutoExecutor(folder=str(folder), cluster=executor.cluster)
    params: dict[str, Any] = {"name": f"veil-{sweep.name}", "timeout_min": executor.time_min,
                              "cpus_per_task": executor.cpus_per_point, "tasks_per_node": 1, "nodes": 1}
    if executor.gpus_per_point:
        params["gpus_per_node"] = executor.gpus_per_point
    if executor.mem_gb:
        params["mem_gb"] = executor.mem_gb
    if ex.cluster == "slurm":
        params["slurm_array_parallelism"] = executor.array_parallelism
        if executor.partition:
            params["slurm_partition"] = executor.partition
    ex.update_parameters(**params)
    jobs = ex.map_array(_SlurmPoint(sweep, device, since, logging.getLogger().getEffectiveLevel(), executor.cpus_per_point),
                        list(names))
    log.info("sweep %s: %d %s job(s) submitted: %s", sweep.name, len(jobs), ex.cluster,
             ", ".join(str(j.job_id) for j in jobs[:4]) + (" ..." if len(jobs) > 4 else ""))
    configs = dict(sweep.points())
    if not executor.wait:
        return [PointResult(n, configs[n], "not run", error=f"submitted as job {j.job_id}") for n, j in zip(names, jobs)]
    results = []
    for n, job in zip(names, jobs):
        try:
            raw = job.result()
            results.append(PointResult(**{**raw, "config": configs[n]}))
        except Exception as exc:  # noqa: BLE001  (the job failed or was cancelled)
            results.append(PointResult(n, configs[n], "failed", error=f"job {job.job_id}: {type(exc).__name__}: {exc}"))
    return results
