"""Sweep points as DVC experiments: queued and run N at a time (``dvc queue``) or one after the other in the
workspace, params.yaml and dvc.lock put back around them; their states, params and per-item results read back
at their experiment commits (``flows.sweep``)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import repo as flows_repo  # dvc_executable looked up on use, never bound at import
from flows.points import Point, _swept, yaml_text
from flows.repo import (RAN, RUN_LOG, DvcCommandError, DvcResult, FlowError, atomic_write, child_env, read_params,
                        read_run_log, retry_unless_input_error, run_dvc, stage_status)

PRUNED_METRICS = "results/pruned/summary.json"  # the report stage's whole record of each model
DENSE_METRICS = "results/dense/summary.json"
MODES = ("queue", "workspace")
#: ``dvc exp show --json`` executor states of an experiment that has finished
DONE, FAILED = "success", "failed"
#: what an experiment run changes in the workspace, put back after it
SNAPSHOT = ("params.yaml", "dvc.lock")


# -- per-item results ------------------------------------------------------------------------------------------------
Items = dict  # {task: {item id: [acc, acc_norm, lls]}}: one model's per-item correctness and choice log-likelihoods
#                (tables written before fidelity was measured hold [acc, acc_norm])



def task_items(result: dict[str, Any]) -> dict[str, list]:
    """``{item id: [acc, acc_norm, lls]}`` from one evaluate stage's JSON (``results/*/tasks/<task>.json``)."""
    return {str(r["id"]): [float(r["acc"]), float(r["acc_norm"]), *([r["lls"]] if r.get("lls") is not None else [])]
            for r in result.get("items") or []}


def fidelity_values(dense: Items, model: Items) -> dict[str, dict[str, dict[str, float]]]:
    """``{measure: {task: {item id: value}}}`` of the model's fidelity to the dense model
    (``diet.evaluation.fidelity``: flip, flip_norm, and kl where both recorded the choice log-likelihoods); empty
    when they were not evaluated on the same items (the paired accuracy comparison refuses those itself)."""
    from diet.errors import DataError
    from diet.evaluation.fidelity import MEASURES, measure, per_item

    def results(items: Items) -> dict[str, dict]:      # Items as the evaluate stage's results
        return {t: {"items": [{"id": i, "acc": v[0], "acc_norm": v[1], "lls": v[2] if len(v) > 2 else None}
                              for i, v in by_id.items()]} for t, by_id in items.items()}

    try:
        items = per_item(results(dense), results(model))
    except DataError:
        return {}
    return {m: values for m in MEASURES if (values := measure(items, m)) is not None}


def read_items(read, tasks: list[str], kind: str) -> Items | None:
    """One model's per-item results (``kind``: ``pruned`` or ``dense``) for ``tasks``, from ``read(path) -> str``
    (raising FileNotFoundError for a missing file); None when any task's results are missing."""
    out = {}
    for name in tasks:
        try:
            out[name] = task_items(json.loads(read(f"results/{kind}/tasks/{name}.json")))
        except FileNotFoundError:
            return None
    return out


def rev_reader(root: Path, rev: str):
    """``read(path) -> str`` of files as experiment commit ``rev`` recorded them (DVC outputs from the cache)."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(root), rev=rev)

    def read(path: str) -> str:
        try:
            return fs.read_text(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # a DVC output whose cache entry is gone reads as missing
            raise FileNotFoundError(path) from e

    return read


def params_at(read) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(read("params.yaml")) or {}


def experiment_refs(root: Path) -> dict[str, str]:
    """``{experiment name: commit}`` of every experiment DVC keeps (its git refs ``refs/exps/.../<name>``)."""
    res = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], cwd=root,
                         capture_output=True, text=True)
    out = res.stdout if res.returncode == 0 else ""  # not a git repository: no experiments
    return {ref.rsplit("/", 1)[-1]: sha for sha, ref in (line.split(" ", 1) for line in out.splitlines())}


def inferred_settings(params: list[dict[str, Any]], base: dict[str, Any]) -> list[tuple[tuple[str, str], ...]]:
    """Each run's ``setting`` read back from the params of a set of runs: the ``section.key`` values (other than
    the swept ones and ``tasks``) that differ among the runs and, in a run, from ``base`` (the workspace's
    params.yaml, whose values are the defaults an ablation varies)."""
    def flat(p: dict[str, Any]) -> dict[str, str]:
        return {f"{section}.{key}": yaml_text(value) for section, body in p.items() if isinstance(body, dict)
                for key, value in body.items()}

    flats, default = [flat(p) for p in params], flat(base)
    varied = sorted(k for k in {k for f in flats for k in f}
                    if not _swept(k) and len({f.get(k) for f in flats}) > 1)
    return [tuple((k, f[k]) for k in varied if k in f and f[k] != default.get(k)) for f in flats]


def finished_runs(root: Path, patterns: list[str]) -> list[dict[str, Any]]:
    """The finished experiments whose names match any of ``patterns`` (shell-style, e.g. ``'*-20261129T0351*'``),
    as runs (``run_points``' form): each point read back from the experiment's own params.yaml (method, sparsity,
    recovery, the task of weight 0 when its name says one was held out, and the other params in which the
    experiments differ from each other and from the workspace: ``inferred_settings``; the pruned groups are the
    rows' ``groups`` column, read by ``sweep_row``). Sorted by name; a pattern that matches nothing is a
    FlowError."""
    import dataclasses
    import fnmatch

    refs = experiment_refs(root)
    runs = []
    for pattern in patterns:
        names = sorted(n for n in refs if fnmatch.fnmatchcase(n, pattern))
        if not names:
            raise FlowError(f"no finished experiment matches {pattern!r}",
                            "list them with `dvc exp show --all-commits` or `git for-each-ref refs/exps`")
        for name in names:
            if any(r["experiment"] == name for r in runs):
                continue
            read = rev_reader(root, refs[name])
            params = params_at(read)
            merge, prune = params.get("merge") or {}, params.get("prune") or {}
            zero = sorted(t for t, w in (merge.get("weights") or {}).items() if float(w) == 0.0)
            held = next((t for t in zero if f"-no-{t}-" in name), None)
            point = Point(str(merge.get("method")), float(prune.get("sparsity")), prune.get("recover") or "none",
                          held_out=held)
            runs.append({"point": point, "experiment": name, "rev": refs[name], "stages": {}, "read": read,
                         "params": params})
    settings = inferred_settings([r.pop("params") for r in runs], read_params(root))
    for run, setting in zip(runs, settings):
        run["point"] = dataclasses.replace(run["point"], setting=setting)
    return runs


# -- running points ---------------------------------------------------------------------------------------------------
@task(name="dvc-exp-run", task_run_name="{point.label} @ {point.sparsity}", retries=1, retry_delay_seconds=5,
      cache_policy=NO_CACHE, retry_condition_fn=retry_unless_input_error)
def run_experiment(repo: str, point: Point, stages: list[str], sweep_id: str) -> dict[str, Any]:
    """One workspace experiment; returns its name and which of ``stages`` ran (its results are in the workspace)."""
    logger = get_run_logger()
    name = point.name(sweep_id)
    args = ["exp", "run", "--name", name, *point.sets()]
    res = run_dvc(args, repo, check=False)
    logger.info("dvc %s\n%s", " ".join(args), res.output.rstrip())
    if res.returncode != 0:
        raise DvcCommandError(args, res.returncode, res.output)
    return {"point": point, "experiment": name, "stages": stage_status(res, stages), "seconds": round(res.seconds, 2),
            "read": workspace_reader(Path(repo))}


def workspace_reader(root: Path):
    """``read(path) -> str`` of the workspace's files, frozen now (the next experiment overwrites them)."""
    cache: dict[str, str] = {}
    for path in [*root.glob("results/*/tasks/*.json"), *root.glob("results/*/summary.json"), root / "params.yaml"]:
        if path.is_file():
            cache[path.relative_to(root).as_posix()] = path.read_text()

    def read(path: str) -> str:
        if path not in cache:
            raise FileNotFoundError(path)
        return cache[path]

    return read


def check_mode(mode: str, jobs: Any) -> int:
    """``jobs`` if ``mode`` is a sweep mode and ``jobs`` a worker count, else a FlowError naming the fix."""
    if mode not in MODES:
        raise FlowError(f"sweep mode {mode!r} is unknown", f"use one of: {', '.join(MODES)}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise FlowError(f"jobs = {jobs!r}: the queue needs at least one worker", "pass jobs=2 (or more)")
    return jobs


def experiment_states(root: Path, rev: str | None = None, *, attempts: int = 4,
                      wait: float = 3.0) -> dict[str, dict[str, Any]]:
    """``{experiment name: {"state": executor state or None, "rev": its commit}}`` from ``dvc exp show --json``
    for the experiments of baseline commit ``rev`` (default HEAD; states: queued, running, success, failed; a
    finished experiment's commit holds its outputs' hashes).

    While the queue runs, ``dvc exp show`` can fail on an executor's temporary copy that is removed as it reads
    it ("directory '.dvc/tmp/exps/tmp…/.dvc' does not exist"): the command is tried ``attempts`` times,
    ``wait`` seconds apart, before its error is raised.
    """
    args = ["exp", "show", "--json", *(["--rev", rev] if rev else [])]
    for attempt in range(1, attempts + 1):
        try:
            res = run_dvc(args, root)
            break
        except DvcCommandError:
            if attempt == attempts:
                raise
            time.sleep(wait)
    starts = [i for i, line in enumerate(res.output.splitlines(keepends=True)) if line.startswith("[")]
    try:  # the JSON list starts a line of its own; stderr lines (warnings) may come before it
        text = "".join(res.output.splitlines(keepends=True)[starts[0]:])
        baselines, _ = json.JSONDecoder().raw_decode(text)
    except (IndexError, ValueError):
        raise FlowError("`dvc exp show --json` printed no JSON list", "run it in the repo to see why") from None
    out: dict[str, dict[str, Any]] = {}
    for baseline in baselines:
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            name = exp.get("name") or revs[0].get("name")
            if name:
                out[name] = {"state": (exp.get("executor") or {}).get("state"), "rev": revs[0].get("rev")}
    return out


def read_at(root: Path, path: str, rev: str) -> dict[str, Any] | None:
    """The JSON file ``path`` as experiment commit ``rev`` recorded it (from the DVC cache), None if absent."""
    try:
        return json.loads(rev_reader(root, rev)(path))
    except FileNotFoundError:
        return None


def queue_experiments(root: Path, points: list[Point], sweep_id: str) -> list[str]:
    """Queue one experiment per point with the workspace as it is now; returns their names."""
    names = []
    for point in points:
        name = point.name(sweep_id)
        run_dvc(["exp", "run", "--queue", "--name", name, *point.sets()], root)
        names.append(name)
    return names


def succeeded(root: Path, names: list[str]) -> set[str]:
    """Those of ``names`` whose experiment has a git ref (``refs/exps/.../<name>``): DVC writes it when the
    experiment succeeds. A cheap check (``git for-each-ref``) to poll often; ``experiment_states`` costs a DVC
    process and finds failures too."""
    return set(names) & set(experiment_refs(root))


def run_queue(root: Path, names: list[str], jobs: int, run_log: Path, *, poll: float = 2.0,
              check_every: float = 30.0, timeout: float | None = None, baseline: str | None = None,
              allow_failed: bool = False) -> dict[str, dict[str, Any]]:
    """Start DVC's queue with ``jobs`` workers and wait until every experiment of ``names`` has finished.

    ``dvc queue start`` leaves its workers running in the background; their stages append to ``run_log``.
    Polls ``succeeded`` every ``poll`` seconds and ``experiment_states`` (which sees failures) every
    ``check_every``, for the experiments of commit ``baseline`` (the HEAD they were queued on: commits made
    meanwhile do not hide them). Returns each experiment's state and commit; a failed one is a FlowError
    naming the command that shows its log (``allow_failed``: returned with its state, for the caller to retry).
    """
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:  # not a pipe: the workers keep their copy of it open
        proc = subprocess.run([flows_repo.dvc_executable(), "queue", "start", "--jobs", str(jobs)], cwd=root,
                              env=child_env({RUN_LOG: str(run_log)}), stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            out.seek(0)
            raise DvcCommandError(["queue", "start", "--jobs", str(jobs)], proc.returncode, out.read().decode())
    checked = time.monotonic()
    while True:
        time.sleep(poll)
        pending = [n for n in names if n not in succeeded(root, names)]
        if pending and time.monotonic() - checked >= check_every:
            states, checked = experiment_states(root, baseline), time.monotonic()
            pending = [n for n in names if (states.get(n) or {}).get("state") not in (DONE, FAILED)]
        if not pending:
            break
        if timeout is not None and time.monotonic() - start > timeout:
            raise FlowError(f"experiments {', '.join(pending)} had not finished after {timeout:.0f} s",
                            "see `dvc queue status`; stop them with `dvc queue kill NAME`, or raise the timeout")
    states = experiment_states(root, baseline)
    if not allow_failed:
        check_finished(states, names)
    return states


def check_finished(states: dict[str, dict[str, Any]], names: list[str]) -> None:
    """A FlowError naming every experiment of ``names`` that did not succeed, and the command that shows why."""
    failed = [n for n in names if (states.get(n) or {}).get("state") != DONE]
    if failed:
        raise FlowError(f"experiment(s) {', '.join(failed)} failed in DVC's queue "
                        f"(states: {', '.join(str((states.get(n) or {}).get('state')) for n in failed)})",
                        f"read why with `dvc queue logs {failed[0]}`; drop them with `dvc queue remove --failed`")


def requeue_failed(root: Path, points: list[Point], names: list[str], states: dict[str, dict[str, Any]],
                   sweep_id: str, queued: dict[str, Any], snap: dict[str, Any]) -> list[str]:
    """Queue again, under the same names, the experiments of ``names`` that failed: each from the params.yaml and
    dvc.lock it was first queued with (``queued``), the workspace's put back (``snap``) at once. The stages the
    first attempt finished come back from the run-cache. Returns the names queued again.

    A failure can be transient: DVC's run-cache is not safe against two experiments saving the same stage run
    at the same moment (two points whose masks agree reach the same ``report`` run), which fails one of them
    with a missing ``.dvc/cache/runs/.../*.tmp`` file."""
    logger = get_run_logger()
    failed = [(p, n) for p, n in zip(points, names) if (states.get(n) or {}).get("state") != DONE]
    for _, name in failed:
        log = run_dvc(["queue", "logs", name], root, check=False).output.strip().splitlines()
        logger.warning("experiment %s failed in DVC's queue; queueing it again. The end of its log:\n%s", name,
                       "\n".join(log[-12:]))
    again = [n for _, n in failed]
    if again:
        run_dvc(["queue", "remove", *again], root, check=False)  # the failed entries, so their names are free
        _put_back(root, queued)
        try:
            queue_experiments(root, [p for p, _ in failed], sweep_id)
        finally:
            _put_back(root, snap)
    return again


def queued_runs(root: Path, points: list[Point], stages: list[str], sweep_id: str, jobs: int,
                snap: dict[str, Any], timeout: float | None = None, retries: int = 0) -> list[dict[str, Any]]:
    """Every point as a queued experiment, ``jobs`` at a time: per point its experiment, commit, the stages
    that ran and a reader of its files (``rev_reader``). A failed experiment is queued again up to ``retries``
    times (``requeue_failed``)."""
    logger = get_run_logger()
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    queued = _snapshot(root)
    names = queue_experiments(root, points, sweep_id)
    _restore(root, snap)  # the queue holds each point's params.yaml and dvc.lock: the workspace goes back now
    logger.info("queued %s; running %d at a time", ", ".join(names), jobs)
    fd, log = tempfile.mkstemp(prefix="diet-queue-runs-", suffix=".jsonl")
    os.close(fd)
    start = time.monotonic()
    try:
        states = run_queue(root, names, jobs, Path(log), timeout=timeout, baseline=baseline, allow_failed=True)
        for _ in range(retries):
            again = requeue_failed(root, points, names, states, sweep_id, queued, snap)
            if not again:
                break
            states.update(run_queue(root, again, jobs, Path(log), timeout=timeout, baseline=baseline,
                                    allow_failed=True))
        check_finished(states, names)
        seconds = round(time.monotonic() - start, 2)
        runs = []
        for point, name in zip(points, names):
            rev = states[name]["rev"]
            ran = DvcResult([], 0, "", seconds, tuple(read_run_log(log, name)))
            runs.append({"point": point, "experiment": name, "rev": rev, "stages": stage_status(ran, stages),
                         "seconds": None, "queue_seconds": seconds, "read": rev_reader(root, rev)})
            logger.info("%s @ %s (%s): ran %s", point.label, point.sparsity, name,
                        ", ".join(s for s, st in runs[-1]["stages"].items() if st == RAN) or "nothing")
        return runs
    finally:
        os.unlink(log)


def run_points(root: Path, points: list[Point], order: list[str], sweep_id: str, mode: str, jobs: int,
               snap: dict[str, Any], retries: int, timeout: float | None) -> list[dict[str, Any]]:
    """Run every point as a DVC experiment (queued, or one after the other in the workspace)."""
    if mode == "queue":
        return queued_runs(root, points, order, sweep_id, jobs, snap, timeout, retries)
    logger = get_run_logger()
    experiment = run_experiment.with_options(retries=retries)
    runs = []
    for point in points:
        run = experiment(str(root), point, order, sweep_id)
        ran = [s for s, st in run["stages"].items() if st == RAN]
        logger.info("%s @ %s (%s): ran %s", point.label, point.sparsity, run["experiment"], ", ".join(ran) or "nothing")
        runs.append(run)
    return runs



def _staged(root: Path) -> set[str]:
    res = subprocess.run(["git", "diff", "--cached", "--name-only", "--", *SNAPSHOT], cwd=root, capture_output=True,
                         text=True)
    return set(res.stdout.split()) if res.returncode == 0 else set()


def _snapshot(root: Path) -> dict[str, Any]:
    """params.yaml and dvc.lock as they are, and which of them git's index holds changes of."""
    return {"files": {name: (root / name).read_bytes() if (root / name).is_file() else None for name in SNAPSHOT},
            "staged": _staged(root)}


def _put_back(root: Path, snap: dict[str, Any]) -> None:
    """Put params.yaml and dvc.lock back as ``_snapshot`` found them, in the working tree and in git's index
    (queueing an experiment stages them)."""
    for name, data in snap["files"].items():
        if data is None:
            (root / name).unlink(missing_ok=True)
        elif not (root / name).is_file() or (root / name).read_bytes() != data:
            atomic_write(root / name, data)
    unstage = sorted(_staged(root) - snap["staged"])
    if unstage:
        subprocess.run(["git", "reset", "-q", "--", *unstage], cwd=root, capture_output=True)


def _restore(root: Path, snap: dict[str, Any]) -> None:
    """``_put_back``, and check the workspace outputs out to match dvc.lock."""
    _put_back(root, snap)
    res = run_dvc(["checkout"], root, check=False)  # workspace outputs back in line with dvc.lock
    if res.returncode != 0:
        get_run_logger().warning("dvc checkout after the sweep could not put back every output that dvc.lock records "
                                 "(those the DVC cache lacks were never computed or pulled here; `dvc pull` or "
                                 "`dvc repro` brings them back; the sweep's own results are in its experiments):"
                                 "\n%s", res.output.rstrip())


