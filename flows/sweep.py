"""Sparsity x merge-method sweep: one DVC experiment per point, every task score computed once.

1. The stages that read no swept parameter (model, prepare@*, score@*, score_generic, evaluate_dense@*,
   perplexity_dense) run once in the workspace through the pipeline flow; their outputs land in DVC's cache
   and run-cache.
2. Each (method, sparsity) is a DVC experiment with ``-S prune.sparsity=.. -S merge.method=..``; DVC skips
   every stage whose inputs are unchanged, so only merge, select, prune, the pruned model's evaluate@*,
   perplexity and report run per point.
   ``mode="queue"`` (default): every point is queued (``dvc exp run --queue``), params.yaml and dvc.lock are
   put back at once, and ``dvc queue start --jobs N`` runs the points N at a time, each in its own temporary
   copy of the repo sharing the DVC cache: the workspace, params.yaml, dvc.lock and HEAD stay as they are
   while they run. The flow waits on the experiments' states in ``dvc exp show --json`` and reads each one's
   ``results/{pruned,dense}/summary.json`` at its experiment commit through ``dvc.api.read``.
   ``mode="workspace"``: ``dvc exp run`` in the workspace, one point after the other, each point's metrics
   read from the workspace right after it.
3. The rows go to ``results/sweep.csv``, ``results/sweep.md`` and ``plots/accuracy_vs_sparsity.png``, and
   are published as Prefect artifacts.
4. params.yaml and dvc.lock are put back as they were, and the workspace outputs checked out to match.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import repo as flows_repo  # dvc_executable looked up on use, never bound at import
from flows.pipeline import make_task_runner, plan, publish_report, run_stages, validate_run
from flows.repo import (RAN, RUN_LOG, DvcCommandError, DvcResult, FlowError, atomic_write, child_env, downstream,
                        merged_params, read_params, read_run_log, retry_unless_input_error, run_dvc, stage_status,
                        stages_reading, write_params)

SWEPT = ("prune.sparsity", "merge.method", "prune.recover", "merge.weights", "prune.groups")
DEFAULT_SPARSITIES, DEFAULT_METHODS = (0.1, 0.2, 0.3), ("vote",)
PRUNED_METRICS = "results/pruned/summary.json"  # the report stage's whole record of each model
DENSE_METRICS = "results/dense/summary.json"
CSV, MARKDOWN, PLOT = "results/sweep.csv", "results/sweep.md", "plots/accuracy_vs_sparsity.png"
SWEEP_DENSE = "results/sweep-dense.json"  # the dense metrics of the sweep's own evaluation settings
SWEEP_ITEMS = "results/sweep-items.json"  # per-item results of every row and of the dense model
MODES = ("queue", "workspace")
#: merge methods of the field (Wanda-sp, FLAP): ``vs best baseline`` compares a row with the best of them
FIELD_BASELINES = ("wanda_sp", "flap")
#: the task-agnostic reference of every comparison
TASK_AGNOSTIC = "task_agnostic"
#: ``dvc exp show --json`` executor states of an experiment that has finished
DONE, FAILED = "success", "failed"


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def metrics_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The sweep columns of one evaluation's metrics: mean and per-task accuracy, size, perplexity."""
    mean = metrics.get("mean") or {}
    params = metrics.get("params") or {}
    row: dict[str, Any] = {
        "achieved_sparsity": _number(metrics.get("sparsity")),
        "acc": _number(mean.get("acc")),
        "acc_norm": _number(mean.get("acc_norm")),
        "perplexity": _number(metrics.get("perplexity")),
    }
    for name, value in params.items():
        if _number(value) is not None:
            row[f"params_{name}"] = int(value)
    tasks = metrics.get("tasks") or {}
    if tasks and all(isinstance(t.get("n"), int) for t in tasks.values()):
        row["eval_items"] = sum(t["n"] for t in tasks.values())
    for name, t in sorted(tasks.items()):
        row[f"acc_{name}"] = _number(t.get("acc"))
        row[f"acc_norm_{name}"] = _number(t.get("acc_norm"))
    return row


def _check_same_items(table, dense: dict[str, Any], dense_path: Path) -> None:
    """Refuse a dense reference evaluated on another number of items than the sweep's rows."""
    if "eval_items" not in table.columns or table["eval_items"].isna().all():
        return                                  # tables written before eval_items was recorded
    dense_items = metrics_row(dense).get("eval_items")
    sweep_items = sorted({int(n) for n in table["eval_items"].dropna()})
    if dense_items is not None and sweep_items != [dense_items]:
        raise FlowError(f"the dense metrics in {dense_path} cover {dense_items} evaluation items, the sweep rows "
                        f"{', '.join(map(str, sweep_items))}: the comparison would mix evaluation sizes",
                        "pass --dense with the dense metrics of the sweep's evaluate.limit, or rerun the sweep")


@dataclass(frozen=True)
class Point:
    """One experiment of a sweep: a merge method at a sparsity, optionally with a recovery, the dimension
    groups it prunes, and a task left out.

    ``recover`` None keeps params.yaml's ``prune.recover``; ``groups`` None keeps its ``prune.groups``;
    ``held_out`` names a task whose merge weight is set to 0 (left out of the calibration) and whose evaluation
    alone the experiment runs (leave-one-task-out); ``setting`` is other params the point changes, as
    ``((dotted key, YAML value), ...)`` (an ablation: ``(("score.statistic", "l2"),)``).
    """

    method: str
    sparsity: float
    recover: str | None = None
    held_out: str | None = None
    groups: tuple[str, ...] | None = None
    setting: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """``vote``, ``vote+bias``, ``vote [mlp+hidden]``, ``vote score.statistic=l2``: the row's name."""
        return row_label(self.method, self.recover, self.groups, setting_text(self.setting))

    def name(self, sweep_id: str) -> str:
        """The DVC experiment name, e.g. ``vote-s0.2-20261129T0312``, ``flap-bias-s0.2-..``,
        ``vote-no-boolq-s0.2-..``, ``vote-mlp_hidden-s0.2-..``, ``vote-score.statistic_l2-s0.2-..`` (unique per
        sweep)."""
        parts = [self.method] + ([self.recover] if self.recover not in (None, "none") else []) + \
            (["_".join(self.groups)] if self.groups else []) + \
            [re.sub(r"[^A-Za-z0-9_.]+", "_", f"{k}-{v}").strip("_.") for k, v in self.setting] + \
            ([f"no-{self.held_out}"] if self.held_out else [])
        return f"{'-'.join(parts)}-s{self.sparsity:g}-{sweep_id}"

    def sets(self) -> list[str]:
        """``dvc exp run`` arguments: the point's params and, for a held-out task, its targets."""
        out = ["-S", f"prune.sparsity={self.sparsity}", "-S", f"merge.method={self.method}"]
        if self.recover:
            out += ["-S", f"prune.recover={self.recover}"]
        if self.groups:
            out += ["-S", f"prune.groups=[{','.join(self.groups)}]"]
        for key, value in self.setting:
            out += ["-S", f"{key}={value}"]
        if self.held_out:  # ``++``: add the key to the weights mapping, or replace its value
            out += ["-S", f"++merge.weights.{self.held_out}=0", f"evaluate@{self.held_out}",
                    f"evaluate_dense@{self.held_out}"]
        return out


def parse_variant(text: str) -> tuple[str, str | None]:
    """``"vote"`` -> ("vote", None); ``"vote+bias"`` -> ("vote", "bias"): a merge method, optionally with the
    ``prune.recover`` its experiment uses. Refuses unknown methods and recoveries."""
    from diet.config import METHODS, RECOVERIES

    method, _, recover = str(text).partition("+")
    if method not in METHODS:
        raise FlowError(f"merge method {method!r} is unknown", f"use one of: {', '.join(METHODS)}")
    if recover and recover not in RECOVERIES:
        raise FlowError(f"recovery {recover!r} in {text!r} is unknown",
                        f"write METHOD+RECOVERY with one of: {', '.join(RECOVERIES)}, e.g. vote+bias")
    return method, recover or None


def parse_groups(text: str) -> tuple[str, ...]:
    """``"mlp+hidden"`` -> ("mlp", "hidden"): the dimension groups one sweep point prunes (``prune.groups``).
    Refuses unknown and repeated groups."""
    from diet.config import GROUPS

    groups = tuple(g.strip() for g in str(text).split("+"))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise FlowError(f"group {bad[0]!r} in {text!r} is unknown",
                        f"write groups joined by +, each one of: {', '.join(GROUPS)}, e.g. mlp+hidden")
    if len(set(groups)) != len(groups):
        raise FlowError(f"{text!r} names a group twice", "name each group once, e.g. mlp+hidden")
    return groups


def yaml_text(value: Any) -> str:
    """One line of YAML for a params value (``l2``, ``true``, ``0.1``, ``{mlp: 8, attention: 1}``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def setting_text(setting: tuple[tuple[str, str], ...]) -> str:
    """``score.statistic=l2 merge.normalize=rank``: a setting as the tables show it ('' for none)."""
    return " ".join(f"{k}={v}" for k, v in setting)


def _swept(key: str) -> bool:
    """Whether ``key`` is, holds or lies inside a parameter every sweep point sets itself (``SWEPT``)."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in SWEPT)


def parse_setting(text: str) -> tuple[tuple[str, str], ...]:
    """``"score.statistic=l2"`` -> ``(("score.statistic", "l2"),)``: one ablation point's params change (the value
    is YAML, written back in one canonical line). Refuses the params a sweep sets itself."""
    import yaml

    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise FlowError(f"--vary {text!r} is not KEY=VALUE", "write e.g. --vary score.statistic=l2")
    if _swept(key):
        raise FlowError(f"--vary {key} changes a parameter the sweep sets itself ({', '.join(SWEPT)})",
                        "use --methods (METHOD+bias for prune.recover), --groups or --sparsities for those")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise FlowError(f"--vary {text!r}: the value is not YAML ({e.__class__.__name__})",
                        "quote it for the shell, e.g. --vary 'select.min_keep={mlp: 0.1}'") from None
    return ((key, yaml_text(parsed)),)


def group_order(groups: str) -> tuple:
    """Sort key of a ``+``-joined groups cell: fewer groups first, then in diet.config's order."""
    from diet.config import GROUPS

    names = [g for g in str(groups).split("+") if g]
    return len(names), [GROUPS.index(g) if g in GROUPS else len(GROUPS) for g in names]


def make_points(sparsities: list[float] | None, methods: list[str] | None,
                groups: list[str] | None = None, vary: list[str] | None = None) -> list[Point]:
    """One point per (method[+recovery], groups, sparsity): ``methods`` like ``vote``, ``flap+bias``; ``groups``
    like ``mlp``, ``mlp+hidden`` (None keeps params.yaml's prune.groups). None sparsities or methods: the
    defaults. ``vary`` (``KEY=VALUE`` each, e.g. ``score.statistic=l2``) adds, per such point, one point with
    that one change: an ablation of each setting against the same point without it. Refuses empty, repeated
    and out-of-range values."""
    sparsities = [float(s) for s in (sparsities if sparsities is not None else DEFAULT_SPARSITIES)]
    methods = [str(m) for m in (methods if methods is not None else DEFAULT_METHODS)]
    if not sparsities or not methods:
        raise FlowError("the sweep needs at least one sparsity and one method", "pass e.g. sparsities=[0.1, 0.2]")
    if len(set(sparsities)) != len(sparsities) or len(set(methods)) != len(methods):
        raise FlowError("sparsities and methods must not repeat", "list each value once")
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad:
        raise FlowError(f"sparsities {bad} are outside (0, 1)", "pass shares of parameters to remove, e.g. 0.2")
    variants = [parse_variant(m) for m in methods]
    combos = [parse_groups(g) for g in groups] if groups else [None]
    if len(set(combos)) != len(combos):
        raise FlowError("the group combinations repeat", "list each combination once")
    settings = [()] + [parse_setting(v) for v in vary or []]
    if len(set(settings)) != len(settings):
        raise FlowError("the --vary settings repeat", "give each KEY=VALUE once")
    points = [Point(method, sparsity, recover, groups=g, setting=st) for method, recover in variants
              for g in combos for st in settings for sparsity in sparsities]
    names = [p.name("") for p in points]
    if len(set(names)) != len(names):
        raise FlowError("two --vary values give the same experiment name", "vary values that differ in letters "
                        "or digits, not only in punctuation")
    return points


#: the model stage's output: its config gives the widths that select's constraints are checked against
BASE_MODEL = "models/base"


def check_points(root: Path, params: dict[str, Any] | None, points: list[Point]) -> bool:
    """Every point's params.yaml (the workspace's, ``params`` and the point's values) must pass the checks the
    stages run: diet.config's, and select's constraints and budget against the model's geometry when the
    workspace holds the model the sweep uses (its config only). A point that would fail in DVC's queue fails
    here, before anything runs. Returns whether the model's geometry was checked (False: the sweep's model,
    e.g. another ``model.source``, is not in the workspace yet; check again once the model stage has run)."""
    import yaml

    from diet.config import ConfigError, Params
    from diet.geometry import geometry_from_folder
    from diet.select import check_budget, check_constraints

    current = read_params(root)
    base = merged_params(current, params)
    model = root / BASE_MODEL if base.get("model") == current.get("model") and \
        (root / BASE_MODEL / "config.json").is_file() else None
    for point in points:
        values = {"prune.sparsity": point.sparsity, "merge.method": point.method}
        if point.recover:
            values["prune.recover"] = point.recover
        if point.groups:
            values["prune.groups"] = list(point.groups)
        if point.held_out:
            values[f"merge.weights.{point.held_out}"] = 0
        values.update({k: yaml.safe_load(v) for k, v in point.setting})
        try:
            checked = Params.from_dict(merged_params(base, values))
            if model is not None:  # reads the config only; a group the family cannot prune is a ConfigError
                groups, select = checked.prune.groups, checked.select
                geo = geometry_from_folder(model, groups)
                check_constraints(geo.widths, groups, select.min_keep, select.multiple)
                check_budget(geo, groups, checked.prune.sparsity, select.min_keep, select.multiple, select.layout)
        except ConfigError as e:
            raise FlowError(f"sweep point {point.label} @ {point.sparsity:g}: {e.problem}", e.fix) from None
    return model is not None


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


def sweep_row(run: dict[str, Any], tasks: list[str]) -> tuple[dict[str, Any], Items | None, Items | None]:
    """One sweep row (its metrics), the pruned model's per-item results and the dense model's."""
    read, point = run["read"], run["point"]
    try:
        metrics = json.loads(read(PRUNED_METRICS))
    except FileNotFoundError:
        raise FlowError(f"experiment {run['experiment']} recorded no {PRUNED_METRICS}",
                        "check dvc.yaml: the report stage must write it as an output") from None
    prune = params_at(read).get("prune") or {}
    row = {"method": point.method, "recover": prune.get("recover") or "none",
           "groups": "+".join(prune.get("groups") or ()), "setting": setting_text(point.setting),
           "sparsity": point.sparsity, **metrics_row(metrics), "experiment": run["experiment"]}
    return row, read_items(read, tasks, "pruned"), read_items(read, tasks, "dense")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _blank(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def row_label(method: str, recover: Any, groups: Any = None, setting: Any = None) -> str:
    """A row's name: the merge method, with ``+bias`` when the row's model used a recovery, the pruned groups in
    brackets when given (``vote [mlp+hidden]``; a tuple or a ``+``-joined string), and the params it changes
    (``vote score.statistic=l2``)."""
    label = str(method) if recover in (None, "none") or _blank(recover) else f"{method}+{recover}"
    if not _blank(groups):
        label += f" [{groups if isinstance(groups, str) else '+'.join(groups)}]"
    return label if _blank(setting) else f"{label} {setting}"


def with_labels(table):
    """The sweep table with ``recover`` (``none`` where a table predates it), ``groups`` (the pruned groups,
    ``+``-joined; empty where a table predates it), ``setting`` (an ablation's params change, or empty) and
    ``label`` columns. Labels name the groups only when the table's rows prune different groups."""
    table = table.copy()
    if "recover" not in table.columns:
        table.insert(1, "recover", "none")
    table["recover"] = table["recover"].fillna("none")
    if "groups" not in table.columns:
        table.insert(2, "groups", "")
    table["groups"] = table["groups"].fillna("")
    if "setting" not in table.columns:
        table.insert(3, "setting", "")
    table["setting"] = table["setting"].fillna("")
    several = table["groups"].nunique() > 1
    table["label"] = [row_label(m, r, g if several else None, st)
                      for m, r, g, st in zip(table["method"], table["recover"], table["groups"], table["setting"])]
    return table


def accuracy_table(table, dense: dict[str, Any] | None):
    """Mean accuracy with one column per row label and a row per sparsity (the dense model as sparsity 0 when
    known): the data of ``accuracy_vs_sparsity.csv``, which ``dvc plots show`` draws as one line per method."""
    table = with_labels(table)
    wide = table.pivot_table(index="sparsity", columns="label", values="acc", sort=False)
    wide = wide[list(dict.fromkeys(table["label"]))].sort_index()
    dense_acc = _number(((dense or {}).get("mean") or {}).get("acc"))
    if dense_acc is not None and 0.0 not in wide.index:
        wide.loc[0.0] = dense_acc
        wide = wide.sort_index()
    wide.columns.name = None
    return wide.reset_index()


def plot_accuracy(table, path: Path, dense: dict[str, Any] | None) -> None:
    """Mean accuracy against requested sparsity, one line per method; the dense model as a reference.
    Writes the plot's data beside it (same name, ``.csv``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, g in with_labels(table).groupby("label", sort=False):
        g = g.sort_values("sparsity")
        ax.plot(g["sparsity"], g["acc"], marker="o", label=f"{label} acc")
        if g["acc_norm"].notna().any():
            ax.plot(g["sparsity"], g["acc_norm"], marker="x", linestyle="--", label=f"{label} acc_norm")
    dense_acc = _number(((dense or {}).get("mean") or {}).get("acc"))
    if dense_acc is not None:
        ax.axhline(dense_acc, color="grey", linestyle=":", label="dense acc")
    ax.set_xlabel("sparsity (share of decoder parameters removed)")
    ax.set_ylabel("mean zero-shot accuracy")
    ax.set_title("DIET: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    atomic_write(path.with_suffix(".csv"), accuracy_table(table, dense).to_csv(index=False))


# -- paired comparisons --------------------------------------------------------------------------------------------
#: the comparisons of every row: column prefix -> what the row is compared with
COMPARISONS = {"vs_dense": "the dense model", "vs_task_agnostic": "task_agnostic (recover none)",
               "vs_best_baseline": "the best field baseline (wanda_sp, flap, any recovery) at that sparsity",
               "vs_default": "the same method without the row's setting, or pruning params.yaml's prune.groups"}
# each reference prunes the same groups at the same sparsity, and (but for vs_default) changes no setting


def paired_mean(reference: Items, candidate: Items, metric: int = 0, seed: int = 0):
    """``candidate - reference`` mean accuracy over tasks with its paired 95% bootstrap interval
    (``diet.evaluation.stats``); ``metric`` 0 = acc, 1 = acc_norm."""
    from diet.evaluation.stats import MEAN, paired_bootstrap

    pick = lambda items: {t: {i: v[metric] for i, v in by_id.items()} for t, by_id in items.items()}  # noqa: E731
    return paired_bootstrap(pick(reference), pick(candidate), seed=seed)[MEAN]


#: the fidelity columns of a sweep table (mean over tasks; ``diet.evaluation.fidelity``) and their paired
#: comparisons: a row's flip rate and KL with their intervals (``<m>_vs_dense``, the dense model's being 0),
#: and their paired differences from task_agnostic and the best field baseline
FIDELITY = ("flip", "kl")
FIDELITY_COMPARISONS = ("vs_dense", "vs_task_agnostic", "vs_best_baseline")
#: perplexity's paired comparisons over the held-out passages (``ppl_<comparison>``; diet.evaluation.stats)
PPL_COMPARISONS = ("vs_dense", "vs_best_baseline")


def paired_fidelity(reference: dict | None, candidate: dict, name: str, seed: int = 0):
    """``candidate - reference`` mean over tasks of fidelity measure ``name`` (per-item values from
    ``fidelity_values``; ``reference`` None: the dense model) with its paired interval."""
    from diet.evaluation.fidelity import compare
    from diet.evaluation.stats import MEAN

    return compare(name, candidate[name], reference[name] if reference is not None else None, seed=seed)[MEAN]


def _paired_prefixes() -> tuple[str, ...]:
    """Column prefixes of the paired comparisons a table is given by ``add_paired_columns``."""
    return (*(f"acc_{k}" for k in COMPARISONS), *(f"{m}_{k}" for m in FIDELITY for k in FIDELITY_COMPARISONS),
            *(f"ppl_{k}" for k in PPL_COMPARISONS))


def add_paired_columns(table, items: dict[str, Items], dense_items: Items | None, default_groups: str | None = None,
                       docs: dict[str, dict] | None = None, dense_docs: dict | None = None):
    """Add each row's paired difference in mean acc (``acc_<comparison>`` with ``_low`` / ``_high``; ``best_baseline``
    names the baseline row) against the dense model, task_agnostic and the best field baseline at its sparsity,
    and against its default (``vs_default``): for a row with a ``--vary`` setting, the same method without it;
    for a row pruning other groups than ``default_groups`` (params.yaml's ``prune.groups``, ``+``-joined), the
    same method pruning those. With ``docs`` (experiment -> per-passage perplexity values, ``per_doc`` of
    diet.evaluation.perplexity) and ``dense_docs``, also the paired difference in perplexity from the dense model
    and the best field baseline (``ppl_<comparison>``).

    ``items`` maps an experiment name to its per-item results; rows without them, or without the reference's,
    get empty cells. A row is not compared with itself."""
    table = with_labels(table).reset_index(drop=True)
    for key in COMPARISONS:
        for suffix in ("", "_low", "_high"):
            table[f"acc_{key}{suffix}"] = float("nan")
    for name in FIDELITY:
        table[name] = float("nan")
        for key in FIDELITY_COMPARISONS:
            for suffix in ("", "_low", "_high"):
                table[f"{name}_{key}{suffix}"] = float("nan")
    for key in PPL_COMPARISONS:
        for suffix in ("", "_low", "_high"):
            table[f"ppl_{key}{suffix}"] = float("nan")
    table["best_baseline"] = ""
    fidelity = {e: fidelity_values(dense_items, cand) for e, cand in items.items()} if dense_items else {}
    at_default = table["groups"].isin(["", default_groups]) if default_groups else table["groups"] == ""
    for (sparsity, _), group in table.groupby(["sparsity", "groups"]):  # references prune the same groups
        plain = group[group["setting"] == ""]
        agnostic = plain[(plain["method"] == TASK_AGNOSTIC) & (plain["recover"] == "none")]
        field = plain[plain["method"].isin(FIELD_BASELINES)].sort_values("acc", ascending=False, kind="stable")
        for idx, row in group.iterrows():
            cand = items.get(row.get("experiment"))
            if cand is None:
                continue
            if row["setting"]:
                default = plain[(plain["method"] == row["method"]) & (plain["recover"] == row["recover"])]
            elif not at_default[idx]:
                default = table[at_default & (table["sparsity"] == sparsity) & (table["setting"] == "") &
                                (table["method"] == row["method"]) & (table["recover"] == row["recover"])]
            else:
                default = plain.iloc[:0]
            refs = {"vs_task_agnostic": agnostic.iloc[0] if len(agnostic) else None,
                    "vs_best_baseline": field.iloc[0] if len(field) else None,
                    "vs_default": default.iloc[0] if len(default) else None}
            references = {"vs_dense": dense_items}
            for key, ref in refs.items():
                if ref is not None and ref.get("experiment") != row.get("experiment"):
                    references[key] = items.get(ref.get("experiment"))
            if refs["vs_best_baseline"] is not None:
                table.loc[idx, "best_baseline"] = refs["vs_best_baseline"]["label"]
            for key, ref_items in references.items():
                if ref_items is None:
                    continue
                d = paired_mean(ref_items, cand)
                table.loc[idx, [f"acc_{key}", f"acc_{key}_low", f"acc_{key}_high"]] = [d.diff, d.low, d.high]
            mine = fidelity.get(row.get("experiment")) or {}
            for name in (n for n in FIDELITY if n in mine):
                for key in FIDELITY_COMPARISONS:
                    if key not in references:
                        continue
                    ref = None if key == "vs_dense" else fidelity.get(refs[key].get("experiment")) or {}
                    if ref is not None and name not in ref:
                        continue
                    d = paired_fidelity(ref, mine, name)
                    table.loc[idx, [f"{name}_{key}", f"{name}_{key}_low", f"{name}_{key}_high"]] = [d.diff, d.low,
                                                                                                   d.high]
                table.loc[idx, name] = table.loc[idx, f"{name}_vs_dense"]
            mine_docs = (docs or {}).get(row.get("experiment"))
            ppl_refs = {"vs_dense": dense_docs, "vs_best_baseline": (docs or {}).get(
                refs["vs_best_baseline"].get("experiment")) if "vs_best_baseline" in references else None}
            for key, ref_docs in ppl_refs.items():
                d = paired_perplexity(ref_docs, mine_docs) if mine_docs and ref_docs else None
                if d is not None:
                    table.loc[idx, [f"ppl_{key}", f"ppl_{key}_low", f"ppl_{key}_high"]] = [d.diff, d.low, d.high]
    return table


def paired_perplexity(reference: dict, candidate: dict):
    """``candidate - reference`` perplexity over the same held-out passages with its paired interval
    (``diet.evaluation.stats.perplexity_difference``), or None where the two were measured on other passages."""
    from diet.errors import DietError
    from diet.evaluation.stats import perplexity_difference

    try:
        return perplexity_difference(reference, candidate)
    except DietError:
        return None


def perplexity_docs(record: dict | None) -> dict | None:
    """The per-passage perplexity values of a report stage's model record (None where it has none)."""
    return ((record or {}).get("perplexity_detail") or {}).get("per_doc")


def interval_cell(r: dict[str, Any], key: str, metric: str = "acc", sign: str = "+", star: bool = True,
                  digits: int = 3) -> str:
    """``+0.031 [+0.004, +0.058]*`` from a row's paired columns ``<metric>_<key>`` (star: the interval excludes
    zero), or ''. ``sign=""`` and ``star=False`` for a value that cannot be negative (a flip rate)."""
    d, lo, hi = (r.get(f"{metric}_{key}{s}") for s in ("", "_low", "_high"))
    if any(_number(v) is None or math.isnan(v) for v in (d, lo, hi)):
        return ""
    f = f"{{:{sign}.{digits}f}}"
    return f"{f.format(d)} [{f.format(lo)}, {f.format(hi)}]" + ("*" if star and (lo > 0 or hi < 0) else "")


def comparison_markdown(table, dense: dict[str, Any] | None) -> str:
    """One table per sparsity: a row per method (the dense model first), "acc / acc_norm" per task, the means,
    perplexity and the paired differences in mean acc (when the table has them). ``table`` is the sweep table."""
    from diet.evaluation.stats import DEFAULT_RESAMPLES as RESAMPLES

    table = with_labels(table)
    tasks = sorted(c[len("acc_"):] for c in table.columns if c.startswith("acc_") and not c.startswith("acc_norm")
                   and c != "acc_norm" and not any(c.startswith(f"acc_{k}") for k in COMPARISONS))
    paired = [k for k in COMPARISONS if f"acc_{k}" in table.columns and table[f"acc_{k}"].notna().any()]
    heads = {"vs_dense": "Δ acc vs dense", "vs_task_agnostic": "Δ acc vs task_agnostic",
             "vs_best_baseline": "Δ acc vs best baseline", "vs_default": "Δ acc vs default"}
    # fidelity: the row's flip rate and KL with their intervals, and their differences from the best baseline
    faithful = [m for m in FIDELITY if f"{m}_vs_dense" in table.columns and table[f"{m}_vs_dense"].notna().any()]
    fidelity_heads = {"flip": "flip rate", "kl": "KL to dense"}
    versus = [m for m in faithful if table[f"{m}_vs_best_baseline"].notna().any()]
    ppl = [k for k in PPL_COMPARISONS if f"ppl_{k}" in table.columns and table[f"ppl_{k}"].notna().any()]
    ppl_heads = {"vs_dense": "Δ perplexity vs dense", "vs_best_baseline": "Δ perplexity vs best baseline"}
    # rows that prune different groups differ in size: their total parameters (embedding included) are shown
    sizes = table["groups"].nunique() > 1 and "params_total" in table.columns
    timed = all(c in table.columns for c in LATENCY) and table[list(LATENCY)].notna().any().any()
    head = ["method", *tasks, "mean acc", "mean acc_norm", "perplexity", *(fidelity_heads[m] for m in faithful),
            *(["total params (M)"] if sizes else []), *(["prefill / decode CPU time (× dense)"] if timed else []),
            *(heads[k] for k in paired), *(f"Δ {fidelity_heads[m]} vs best baseline" for m in versus),
            *(ppl_heads[k] for k in ppl)]

    def ratios(r: dict[str, Any]) -> str:
        values = [_number(r.get(c)) for c in LATENCY]
        return " / ".join(f"{v:.2f}" for v in values) if all(v is not None and not math.isnan(v) for v in values) \
            else ""

    def pair(a: Any, b: Any) -> str:
        ok = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v))  # noqa: E731
        return f"{a:.2f} / {b:.2f}" if ok(a) and ok(b) else (f"{a:.2f}" if ok(a) else "")

    def line(name: str, r: dict[str, Any]) -> str:
        cells = [name, *(pair(r.get(f"acc_{t}"), r.get(f"acc_norm_{t}")) for t in tasks),
                 *(f"{r[k]:.4f}" if isinstance(r.get(k), float) and not math.isnan(r[k]) else ""
                   for k in ("acc", "acc_norm")),
                 f"{r['perplexity']:.2f}" if isinstance(r.get("perplexity"), float) else "",
                 *(interval_cell(r, "vs_dense", m, sign="", star=False) for m in faithful),
                 *([f"{r['params_total'] / 1e6:.1f}" if _number(r.get("params_total")) is not None
                    and not math.isnan(r["params_total"]) else ""] if sizes else []),
                 *([ratios(r)] if timed else []), *(interval_cell(r, k) for k in paired),
                 *(interval_cell(r, "vs_best_baseline", m) for m in versus),
                 *(interval_cell(r, k, "ppl", digits=2) for k in ppl)]
        return "| " + " | ".join(cells) + " |"

    out = []
    dense_row = metrics_row(dense) if dense else None
    for sparsity, group in table.groupby("sparsity", sort=True):
        out += [f"**Sparsity {sparsity:g}** (share of decoder-layer parameters removed); cells are acc / acc_norm",
                "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        if dense_row:
            zero = {f"{m}_vs_dense{x}": 0.0 for m in faithful for x in ("", "_low", "_high")}
            out.append(line("dense", {**dense_row, **{c: 1.0 for c in LATENCY}, **zero}))
        out += [line(str(r["label"]), r) for r in group.to_dict("records")]
        out.append("")
        best = sorted({b for b in group.get("best_baseline", []) if isinstance(b, str) and b})
        if paired:
            out += ["Δ: the row's mean acc over tasks minus the reference's, on the same items, with the 95% interval "
                    f"of a paired bootstrap over items ({RESAMPLES:,} resamples, seed 0); * marks an interval that excludes "
                    "zero." + (f" Best field baseline at this sparsity: {', '.join(best)}." if best else ""), ""]
        if faithful:
            out += ["Fidelity to the dense model, mean over tasks: flip rate, the share of items whose correctness "
                    "differs from the dense model's; KL, the divergence (nats) of the distribution over each item's "
                    "choices from the dense model's. Lower is closer; each with its 95% bootstrap interval over "
                    "items, and Δ the paired difference from the best field baseline (negative: closer).", ""]
        if ppl:
            out += ["Δ perplexity: the row's perplexity on the held-out passages minus the reference's, with the 95% "
                    "interval of a paired bootstrap over passages.", ""]
    return "\n".join(out)


def render(table, dense: dict[str, Any] | None) -> str:
    """The sweep's markdown: the summary table, the dense model's figures, and the per-task tables."""
    summary = with_labels(table)
    columns = ["label"] + [c for c in summary.columns if not c.startswith("acc_norm_") and c not in
                           ("label", "method", "recover", "setting", *LATENCY)
                           and not c.startswith(_paired_prefixes())]
    md = "# DIET sweep\n\n" + markdown_table(summary.to_dict("records"), columns)
    if dense:
        md += "\nDense model: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics_row(dense).items()
                                             if k in ("acc", "acc_norm", "perplexity") and v is not None) + "\n"
    return md + "\n## Per task\n\n" + comparison_markdown(table, dense)


def items_path(csv: Path) -> Path:
    """Where a sweep table's per-item results lie: ``sweep.csv`` -> ``sweep-items.json``."""
    return csv.with_name(f"{csv.stem}-items.json")


def write_items(path: Path, rows: dict[str, Items], dense: Items | None, docs: dict[str, dict] | None = None,
                dense_docs: dict | None = None) -> None:
    """The per-item results of a table's rows and of the dense model, with (``perplexity``) their per-passage
    perplexity values where known."""
    data = {"dense": dense, "rows": rows}
    if docs or dense_docs:
        data["perplexity"] = {"rows": docs or {}, "dense": dense_docs}
    atomic_write(path, json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


def load_docs(csv: Path) -> tuple[dict[str, dict], dict | None]:
    """The per-passage perplexity values beside a sweep table (``write_items``): (by experiment, the dense model's)."""
    path = items_path(csv)
    data = (json.loads(path.read_text()).get("perplexity") or {}) if path.is_file() else {}
    return data.get("rows") or {}, data.get("dense")


def default_groups(root: Path) -> str | None:
    """The workspace's ``prune.groups``, ``+``-joined (the groups a ``--groups`` row is compared with), or None."""
    try:
        groups = (read_params(root).get("prune") or {}).get("groups")
    except FlowError:
        return None
    return "+".join(groups) if groups else None


def sweep_rows(runs: list[dict[str, Any]], tasks: list[str]):
    """The rows of ``runs`` (``sweep_row``), their per-item results by experiment, the dense model's per-item
    results, its summary (the first the runs recorded, or None) and the rows' per-passage perplexity values by
    experiment (``perplexity_docs``). Runs whose dense models' per-item results
    differ (other items, or another evaluation) are refused: their rows could not be paired."""
    rows, items, dense_items, dense, dense_from, docs = [], {}, None, None, None, {}
    for run in runs:
        row, pruned, dense_run = sweep_row(run, tasks)
        rows.append(row)
        mine = perplexity_docs(json.loads(run["read"](PRUNED_METRICS)))
        if mine:
            docs[row["experiment"]] = mine
        if pruned is not None:
            items[row["experiment"]] = pruned
        if dense_items is not None and dense_run is not None and dense_run != dense_items:
            raise FlowError(f"the dense model's per-item results of experiment {run['experiment']} differ from "
                            f"those of {dense_from}: their rows cannot be paired",
                            "combine experiments evaluated on the same items (same evaluate.limit, evaluate.seed "
                            "and tasks)")
        if dense_items is None and dense_run is not None:
            dense_items, dense_from = dense_run, run["experiment"]
        if dense is None:
            try:
                dense = json.loads(run["read"](DENSE_METRICS))
            except FileNotFoundError:
                pass
    return rows, items, dense_items, dense, docs


def write_results(root: Path, runs: list[dict[str, Any]], tasks: list[str]):
    """The sweep table as CSV, markdown and plot under ``root``, and the per-item results beside the CSV;
    returns the table, the markdown and the paths."""
    import pandas as pd

    rows, items, dense_items, dense, docs = sweep_rows(runs, tasks)
    table = add_paired_columns(pd.DataFrame(rows), items, dense_items, default_groups(root), docs,
                               perplexity_docs(dense)).drop(columns="label")
    atomic_write(root / CSV, table.to_csv(index=False))
    write_items(items_path(root / CSV), items, dense_items, docs, perplexity_docs(dense))
    if dense is not None:
        atomic_write(root / SWEEP_DENSE, json.dumps(dense, indent=2, sort_keys=True) + "\n")
    md = render(table, dense)
    atomic_write(root / MARKDOWN, md)
    plot_accuracy(table, root / PLOT, dense)
    return table, md, [root / CSV, root / MARKDOWN, root / PLOT, items_path(root / CSV)]


def table_tasks(table) -> list[str]:
    return sorted(c[len("acc_norm_"):] for c in table.columns if c.startswith("acc_norm_")
                  and not any(c.startswith(f"acc_norm_{k}") for k in COMPARISONS))


def load_items(root: Path, csv: Path, table) -> tuple[dict[str, Items], Items | None]:
    """The per-item results of a sweep table's rows: from the file beside it (``items_path``), else read from
    the experiments DVC still keeps (by the names in the table's ``experiment`` column)."""
    path = items_path(csv)
    if path.is_file():
        data = json.loads(path.read_text())
        return data.get("rows") or {}, data.get("dense")
    refs, items, dense = experiment_refs(root), {}, None
    tasks = table_tasks(table)
    for name in table.get("experiment", []):
        if name in refs:
            read = rev_reader(root, refs[name])
            pruned = read_items(read, tasks, "pruned")
            if pruned is not None:
                items[name] = pruned
            dense = dense or read_items(read, tasks, "dense")
    return items, dense


#: the latency columns a report takes from ``benchmarks/latency.py --experiments`` (CPU time, pruned / dense)
LATENCY = ("prefill_cpu_ratio", "decode_cpu_ratio")


def add_latency(table, path: Path):
    """The table with the pruned / dense CPU-time ratios of prefill and decoding that ``benchmarks/latency.py
    --experiments`` measured for its rows' experiments (``LATENCY`` columns; empty for rows it did not time)."""
    try:
        variants = json.loads(Path(path).read_text()).get("variants") or []
    except (OSError, ValueError, AttributeError) as e:
        raise FlowError(f"cannot read latency results from {path}: {e}",
                        "pass the JSON that `python benchmarks/latency.py --experiments PATTERN --out FILE` wrote")
    timed = {v["experiment"]: v for v in variants if isinstance(v, dict) and v.get("experiment")}
    if not timed:
        raise FlowError(f"{path} times no experiment (it was not written with --experiments)",
                        "run `python benchmarks/latency.py --experiments PATTERN --out FILE` and pass that FILE")
    table = table.copy()
    for column in LATENCY:
        table[column] = [_number((timed.get(e) or {}).get(column)) for e in table.get("experiment", [])]
    return table


def report(repo: str | Path = ".", csvs: list[str | Path] | None = None, out: str | Path | None = None,
           dense: str | Path | None = None, experiments: list[str] | None = None,
           latency: str | Path | None = None) -> str:
    """Render the sweep markdown and plot again from sweep tables; return the markdown.

    By default from ``results/sweep.csv`` into ``results/sweep.md`` and ``plots/accuracy_vs_sparsity.png``.
    ``csvs`` combines several sweeps' tables (e.g. one per sparsity run on different days, or one with
    ``prune.recover: bias``) and ``out`` names a folder for ``sweep.csv``, ``sweep-items.json``, ``sweep.md``
    and ``accuracy_vs_sparsity.png``. The dense reference row comes from ``dense`` (default:
    ``results/sweep-dense.json``, which a sweep writes, else ``results/dense/summary.json``); it must cover as
    many evaluation items as the rows. The paired intervals are computed again from the per-item results beside
    each table (``sweep-items.json``), or from the experiments DVC still keeps. ``experiments`` (shell-style
    name patterns) adds rows read straight from finished DVC experiments, e.g. those of a sweep whose flow
    was stopped: their metrics, params and per-item results at their commits. ``latency`` (a JSON of
    ``benchmarks/latency.py --experiments``) adds each timed row's prefill and decoding CPU time against the
    dense model's.
    """
    import pandas as pd

    root = Path(repo)
    paths = [Path(c) for c in csvs] if csvs else ([] if experiments else [root / CSV])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FlowError(f"no sweep table at {', '.join(missing)}", "run `diet-flow sweep` first")
    tables, items, dense_items, docs, dense_docs = [], {}, None, {}, None
    if experiments:
        runs = finished_runs(root, experiments)
        rows, items, dense_items, dense_record, docs = sweep_rows(runs, read_params(root).get("tasks") or [])
        dense_docs = perplexity_docs(dense_record)
        from diet.config import METHODS, RECOVERIES

        rows.sort(key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS),
                                 RECOVERIES.index(r["recover"]) if r["recover"] in RECOVERIES else len(RECOVERIES),
                                 group_order(r["groups"]), r["setting"]))
        tables.append(with_labels(pd.DataFrame(rows)))  # in the order of diet.config's methods, recovery last
    for p in paths:
        t = with_labels(pd.read_csv(p))
        tables.append(t.drop(columns=[c for c in t.columns if c.startswith(_paired_prefixes())
                                      or c in ("best_baseline", *FIDELITY)]))
        rows_items, d = load_items(root, p, t)
        items.update(rows_items)
        table_docs, table_dense_docs = load_docs(p)
        docs.update(table_docs)
        dense_docs = dense_docs or table_dense_docs
        if d is not None and dense_items is not None and d != dense_items:
            raise FlowError(f"the dense model's per-item results beside {p} differ from another table's",
                            "combine sweeps evaluated on the same items (same evaluate.limit and evaluate.seed)")
        dense_items = dense_items or d
    table = pd.concat(tables, ignore_index=True)
    table = table.drop_duplicates(["method", "recover", "groups", "setting", "sparsity"], keep="last").sort_values("sparsity",
                                                                                              kind="stable")
    table = add_paired_columns(table, items, dense_items, default_groups(root), docs, dense_docs).drop(columns="label")
    if experiments and dense is None:
        dense, dense_path = dense_record, Path(f"experiment {runs[0]['experiment']}")
    else:
        if dense is not None:
            dense_path = Path(dense)
        else:  # the dense metrics the sweep itself used, else the workspace's
            dense_path = root / SWEEP_DENSE if (root / SWEEP_DENSE).is_file() else root / DENSE_METRICS
        if dense is not None and not dense_path.is_file():
            raise FlowError(f"no dense metrics at {dense_path}", "pass the results/dense/summary.json of a pipeline run (the report stage writes it)")
        dense = json.loads(dense_path.read_text()) if dense_path.is_file() else None
    if dense is not None:
        _check_same_items(table, dense, dense_path)
    if latency is not None:
        table = add_latency(table, Path(latency))
    md = render(table, dense)
    if out is None:
        md_path, plot_path = root / MARKDOWN, root / PLOT
    else:
        out = Path(out)
        md_path, plot_path = out / "sweep.md", out / "accuracy_vs_sparsity.png"
        atomic_write(out / "sweep.csv", table.to_csv(index=False))
        kept = list(table.get("experiment", []))
        write_items(out / "sweep-items.json", {e: items[e] for e in kept if e in items}, dense_items,
                    {e: docs[e] for e in kept if e in docs}, dense_docs)
    atomic_write(md_path, md)
    plot_accuracy(table, plot_path, dense)
    return md


SNAPSHOT = ("params.yaml", "dvc.lock")


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


@flow(name="diet-sweep")
def sweep_flow(repo: str = ".", sparsities: list[float] | None = None, methods: list[str] | None = None,
               params: dict[str, Any] | None = None, task_runner: str = "threads", workers: int = 2,
               address: str | None = None, retries: int = 1, mode: str = "queue", jobs: int | None = None,
               timeout: float | None = None, groups: list[str] | None = None,
               vary: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every (method, groups, sparsity) as a DVC experiment, reusing one computation of every task score.

    ``methods`` are merge methods, each optionally with the recovery its models use: ``vote``, ``vote+bias``.
    ``groups`` are combinations of dimension groups to prune (``prune.groups``), e.g. ``["mlp", "mlp+hidden"]``;
    None keeps params.yaml's. ``vary`` (``KEY=VALUE`` each) adds an ablation: per point, one more experiment with
    that one params change, compared with the point without it (``acc_vs_default``); the stages that read the key
    run in each experiment (``score.statistic`` reruns the score@ stages there). Every point's params are
    checked as the stages would check them, before anything runs.
    ``params`` overrides other settings for the whole sweep (restored afterwards with params.yaml).
    ``mode``: ``queue`` runs the experiments ``jobs`` (default: ``workers``) at a time in DVC's queue, each in a
    temporary copy of the repo (``timeout``: seconds to wait for them, None: no limit); ``workspace`` runs them
    one after the other in the workspace. Returns the table rows, the output paths, and which stages ran in the
    shared step and per experiment.
    """
    points = make_points(sparsities, methods, groups, vary)
    runs, root, shared = experiments_flow(repo, points, params, task_runner, workers, address, retries, mode, jobs,
                                          timeout, "diet-sweep")
    tasks = read_params(root).get("tasks") or []
    table, md, paths = write_results(root, runs, tasks)
    create_table_artifact(key="diet-sweep", table=table.to_dict("records"),
                          description=f"DIET sweep in {root}: one row per (method, sparsity)")
    create_markdown_artifact(key="diet-sweep-summary", markdown=md + "\n" + "\n".join(f"- `{p}`" for p in paths))
    create_link_artifact(key="diet-sweep-plot", link=paths[2].as_uri(), link_text="accuracy vs sparsity")
    get_run_logger().info("sweep table -> %s\n%s", paths[0], md)
    return {"rows": table.to_dict("records"), "files": [str(p) for p in paths], "shared": shared,
            "experiments": [{"method": r["point"].label, "sparsity": r["point"].sparsity,
                             "experiment": r["experiment"], "stages": r["stages"]} for r in runs]}


def experiments_flow(repo: str, points: list[Point], params: dict[str, Any] | None, task_runner: str, workers: int,
                     address: str | None, retries: int, mode: str, jobs: int | None, timeout: float | None,
                     artifact: str) -> tuple[list[dict[str, Any]], Path, dict[str, str]]:
    """What every sweep does: apply ``params``, run the stages no point changes once in the workspace, run the
    points as DVC experiments, and put params.yaml, dvc.lock and the workspace outputs back.
    Returns the runs, the repository root, and the shared stages' statuses (``ran`` / ``cached``)."""
    logger = get_run_logger()
    jobs = check_mode(mode, workers if jobs is None else jobs)
    runner = make_task_runner(task_runner, workers, address)
    root = validate_run(repo, params)
    geometry_checked = check_points(root, params, points)  # a point that would fail in the queue fails here
    snap = _snapshot(root)
    try:
        changed = write_params(root, params)
        if changed:
            logger.info("params.yaml for the sweep: set %s", ", ".join(changed))
        graph, order = plan(root)
        varied = {key for point in points for key, _ in point.setting}  # an ablation's stages run per experiment
        swept = downstream(graph, stages_reading(root, graph, (*SWEPT, *varied)))
        shared = [s for s in order if s not in swept]
        logger.info("shared stages, run once: %s; per experiment: %s", ", ".join(shared),
                    ", ".join(s for s in order if s in swept))
        rows = run_stages.with_options(task_runner=runner)(str(root), graph, shared, False, retries)
        publish_report(rows, f"{artifact}-shared", f"{artifact} in {root}: stages shared by every experiment")
        if not geometry_checked:  # the sweep's model is in the workspace now: its widths decide what fits
            check_points(root, None, points)
        sweep_id = time.strftime("%Y%m%dT%H%M%S")
        runs = run_points(root, points, order, sweep_id, mode, jobs, snap, retries, timeout)
    finally:
        _restore(root, snap)
    return runs, root, {r["stage"]: r["status"] for r in rows}
