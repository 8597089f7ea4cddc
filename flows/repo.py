"""The DVC repository from the flows' side: run its CLI, read its stage graph, learn what it ran, edit params.

No Prefect, no torch here. DVC owns the stage graph and the cache; the flows only decide which ``dvc``
command runs when. What DVC did is read from machine-readable sources, never from its log text: the stage
graph from DVC's Python API, and the stages whose command ran from the run log that every stage appends to
(``stages._common.record_run``: ``$DIET_RUN_LOG`` gets one JSON line per stage run, named by DVC's
``$DVC_STAGE``).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import json
import os
import shutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from diet.errors import DietError

# Variables every child process gets: offline model hubs, no analytics, one thread per process.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # the temporary Prefect server a flow starts may take longer than Prefect's 20 s on a busy machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}

RAN, CACHED = "ran", "cached"
RUN_LOG = "DIET_RUN_LOG"  # the variable stages._common.record_run appends to


class FlowError(DietError):
    """A user-facing orchestration error: ``problem`` says what is wrong, ``fix`` what to do."""

    def __reduce__(self):  # pickled whole (a Dask worker sends it back), not rebuilt from the message alone
        return functools.partial(type(self), artifact=self.artifact), (self.problem, self.fix)


class DvcCommandError(FlowError):
    """A ``dvc`` command exited non-zero; ``output`` holds what it printed (stdout and stderr)."""

    def __init__(self, args: list[str], returncode: int, output: str):
        self.command = args
        self.returncode = returncode
        self.output = output
        super().__init__(f"`dvc {' '.join(args)}` failed (exit {returncode}):\n{_tail(output)}",
                         "read the DVC output above; rerun the same command in the repo to reproduce it")

    def __reduce__(self):
        return type(self), (self.command, self.returncode, self.output)


#: how a stage reports that it refused its input (stages._common.run_stage, exit 2): a retry meets the same input;
#: or that it was interrupted (Ctrl-C, exit 130): the user asked everything to stop
_NO_RETRY = re.compile(r"^error: .+\n  fix: |^interrupted: ", re.M)


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect's retry condition of the tasks that run DVC: retry a failure (a killed worker, a full disk freed
    meanwhile) unless a stage refused its input (it printed ``error:`` and ``  fix:``), which would fail the same
    way again and print the same error once more, or was interrupted."""
    exc = getattr(state, "data", None)
    return not (isinstance(exc, DvcCommandError) and _NO_RETRY.search(exc.output or ""))


@dataclass(frozen=True)
class DvcResult:
    args: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved as printed
    seconds: float
    ran: tuple[str, ...] = ()  # the stages whose command ran, in the order they started (from the run log)
    runs: tuple[dict, ...] = ()  # the run log's rows as written (``{"stage", "pid"[, "experiment"]}``)


def _tail(text: str, lines: int = 40) -> str:
    rows = text.rstrip().splitlines()
    return "\n".join((["..."] if len(rows) > lines else []) + rows[-lines:])


def dvc_executable() -> str:
    """The ``dvc`` next to this interpreter (the project's environment), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise FlowError("the `dvc` command is not installed in this environment",
                        "install the project: pip install -e . (it brings dvc)")
    return found


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus the offline/analytics/thread settings (already-set values win), with
    this interpreter's bin folder first on PATH: the stages' ``python -m stages.X`` is the flow's Python."""
    env = dict(os.environ)
    for k, v in CHILD_ENV.items():
        env.setdefault(k, v)
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def run_dvc(args: list[str], repo: str | os.PathLike, *, check: bool = True,
            timeout: float | None = None) -> DvcResult:
    """Run ``dvc <args>`` in ``repo``; with ``check`` a non-zero exit raises ``DvcCommandError``.

    Commands wait for DVC's repository lock instead of failing, so independent stages can run side by side.
    """
    start = time.monotonic()
    scratch = Path(repo) / ".dvc" / "tmp"  # DVC's own scratch folder (git-ignored): a killed run leaves no file
    fd, log = tempfile.mkstemp(prefix="diet-runs-", suffix=".jsonl",  # in the system's temp folder
                               dir=scratch if scratch.is_dir() else None)
    os.close(fd)
    try:
        proc = subprocess.run([dvc_executable(), "--wait-for-lock", *args], cwd=repo, env=child_env({RUN_LOG: log}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        runs = read_run_rows(log)
    finally:
        os.unlink(log)
    ran = list(dict.fromkeys(r["stage"] for r in runs))
    res = DvcResult(list(args), proc.returncode, proc.stdout, time.monotonic() - start, tuple(ran), tuple(runs))
    if check and proc.returncode != 0:
        raise DvcCommandError(list(args), proc.returncode, proc.stdout)
    return res


# --- the repository -------------------------------------------------------------------------------------

def ensure_repo(repo: str | os.PathLike) -> Path:
    """Return ``repo`` resolved; fail fast unless it is the root of a DVC project with a dvc.yaml."""
    root = Path(repo).expanduser().resolve()
    if not root.is_dir():
        raise FlowError(f"repository folder not found: {root}", "pass the path of the DIET project (repo=...)")
    if not (root / ".dvc").is_dir():
        raise FlowError(f"{root} is not a DVC repository (no .dvc folder)",
                        "run from the project root, or create one with: git init && dvc init")
    if not (root / "dvc.yaml").is_file():
        raise FlowError(f"{root} has no dvc.yaml: there is no pipeline to run",
                        "run from the DIET project root, which holds dvc.yaml")
    return root


def available_tasks(repo: Path, task_dir: str = "data/tasks") -> list[str]:
    return sorted(p.stem for p in (repo / task_dir).glob("*.yaml"))


def check_task_names(tasks: Iterable[Any]) -> list[str]:
    """The names as a list, or a ConfigError naming the first one that breaks the task-name rule
    (``diet.config.check_task_name``)."""
    from diet.config import check_task_name

    return [check_task_name(t) for t in tasks]


def check_tasks(repo: Path, tasks: Iterable[str], task_dir: str = "data/tasks") -> None:
    """Every task needs a valid name and a task file ``<task_dir>/<task>.yaml``; name the missing ones and the
    known ones."""
    tasks = check_task_names(tasks)
    known = available_tasks(repo, task_dir)
    missing = [t for t in tasks if not (repo / task_dir / f"{t}.yaml").is_file()]
    if missing:
        hints = [f"'{m}' (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(m, known, n=1))
                 else f"'{m}'" for m in missing]
        files = ", ".join(f"{task_dir}/{m}.yaml" for m in missing)
        raise FlowError(f"unknown task {', '.join(hints)}: no task file {files}",
                        f"use one of: {', '.join(known) or '(none)'}; or add a task file {task_dir}/<task>.yaml")


# --- params.yaml ----------------------------------------------------------------------------------------

def read_params(repo: Path) -> dict[str, Any]:
    path = repo / "params.yaml"
    if not path.is_file():
        raise FlowError(f"{path} not found", "the pipeline reads its settings from params.yaml in the repo root")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise FlowError(f"{path} must be a mapping of sections", "see the params.yaml shipped with the project")
    return data


def flatten_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Overrides as dotted keys. ``{"prune": {"sparsity": 0.3}, "merge.method": "mean"}`` ->
    ``{"prune.sparsity": 0.3, "merge.method": "mean"}``.

    A mapping under a section name is taken one level deep (``{section: {key: value}}``); a dotted key sets
    its value whole, so ``{"merge.weights": {"boolq": 0.5}}`` replaces the weights mapping.
    """
    flat: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if "." not in key and isinstance(value, Mapping):
            for k, v in value.items():
                flat[f"{key}.{k}"] = v
        else:
            flat[key] = value
    return flat


def merged_params(current: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``current`` with the overrides applied (a deep copy).

    Every section and key must already exist, so a typo fails here rather than in a stage; only inside a
    value that is itself a mapping (``merge.weights.boolq``) may a new key appear.
    """
    out = yaml.safe_load(yaml.safe_dump(dict(current)))  # deep copy through plain YAML types
    for dotted, value in flatten_overrides(overrides).items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if not isinstance(node, dict) or (part not in node and not (last and i >= 2)):
                known = sorted(map(str, node)) if isinstance(node, dict) else []
                where = ".".join(parts[:i]) or "params.yaml"
                close = difflib.get_close_matches(part, known, n=1)
                raise FlowError(f"unknown params key '{dotted}' ('{part}' is not in {where})",
                                f"did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close
                                else f"keys of {where}: {', '.join(known) or '(none)'}")
            if last:
                node[part] = value
            else:
                node = node[part]
    return out


_KEY_LINE = re.compile(r"^(\s*)[^#\s-][^#]*:\s*(#.*)?$")


def _sequence_indent(text: str) -> tuple[int, int]:
    """How the file indents a block list under its key, as ruamel's ``indent(sequence=, offset=)`` takes it:
    params.yaml's ``tasks:\n  - arc_easy`` is (4, 2), dvc.lock's ``deps:\n- path:`` style (2, 0)."""
    lines = text.splitlines()
    for key, item in zip(lines, lines[1:]):
        found = _KEY_LINE.match(key)
        if found and item.lstrip().startswith("- "):
            dash = len(item) - len(item.lstrip()) - len(found.group(1))
            if dash >= 0:
                return dash + 2, dash
    return 2, 0


@contextlib.contextmanager
def edited_yaml(path: Path) -> Iterator[Any]:
    """Edit a YAML file (params.yaml, dvc.lock) in place as DVC does: ruamel's round trip keeps comments, order
    and quoting; the file is rewritten atomically, and only when the block changed its data (an empty or missing
    file reads as an empty mapping)."""
    from ruamel.yaml import YAML  # ships with dvc, which edits its files the same way

    ryaml = YAML()
    ryaml.preserve_quotes = True
    text = path.read_text() if path.exists() else ""
    sequence, offset = _sequence_indent(text)
    ryaml.indent(mapping=2, sequence=sequence, offset=offset)
    if re.search(r":[ \t]+null[ \t]*(#.*)?$", text, re.M):  # params.yaml: `revision: null`; dvc.lock: empty
        from ruamel.yaml.representer import RoundTripRepresenter

        class NullRepresenter(RoundTripRepresenter):  # a subclass: add_representer edits the class it is called on
            pass

        NullRepresenter.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
        ryaml.Representer = NullRepresenter
    doc = ryaml.load(text) or ryaml.load("{}")
    yield doc
    buf = io.StringIO()
    ryaml.dump(doc, buf)
    if yaml.safe_load(buf.getvalue()) != yaml.safe_load(text):
        atomic_write(path, buf.getvalue())


def write_params(repo: Path, overrides: Mapping[str, Any] | None) -> list[str]:
    """Apply the overrides to params.yaml in place, keeping its comments and order; return the changed keys."""
    flat = flatten_overrides(overrides)
    if not flat:
        return []
    merged_params(read_params(repo), flat)  # validates every key first
    changed = []
    with edited_yaml(repo / "params.yaml") as doc:
        for dotted, value in flat.items():
            *parents, leaf = dotted.split(".")
            node = doc
            for p in parents:
                node = node[p]
            if node.get(leaf) != value:
                node[leaf] = value
                changed.append(dotted)
    return changed


# --- the stage graph ------------------------------------------------------------------------------------

def stage_graph(repo: Path) -> dict[str, list[str]]:
    """The pipeline's stages (foreach instances expanded) with their upstream stages, from DVC's Python API."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo:
            graph = dvc_repo.index.graph                       # edges: stage -> a stage it depends on
            named = [s for s in graph.nodes if getattr(s, "name", None)]  # pipeline stages; .dvc files have none
            parents = {s.name: sorted(d.name for d in graph.successors(s) if getattr(d, "name", None))
                       for s in named}
    except DvcException as e:
        raise FlowError(f"DVC cannot read the pipeline in {repo}: {e}", "fix dvc.yaml or params.yaml") from None
    if not parents:
        raise FlowError(f"{repo / 'dvc.yaml'} defines no stages", "add stages to dvc.yaml")
    return parents


def topological(graph: Mapping[str, list[str]]) -> list[str]:
    """Stages ordered so every stage follows its upstream ones; ties keep DVC's order."""
    order, done = [], set()
    pending = list(graph)
    while pending:
        ready = [s for s in pending if all(p in done for p in graph[s])]
        if not ready:
            raise FlowError(f"the stage graph has a cycle among: {', '.join(pending)}", "fix dvc.yaml")
        for s in ready:
            order.append(s)
            done.add(s)
        pending = [s for s in pending if s not in done]
    return order


def _reach(edges: Mapping[str, list[str]], starts: Iterable[str]) -> set[str]:
    """``starts`` and every stage reachable from them along ``edges``."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        s = stack.pop()
        if s not in seen:
            seen.add(s)
            stack.extend(edges[s])
    return seen


def upstream(graph: Mapping[str, list[str]], targets: Iterable[str]) -> set[str]:
    """``targets`` and every stage they depend on."""
    return _reach(graph, targets)


def downstream(graph: Mapping[str, list[str]], sources: Iterable[str]) -> set[str]:
    """``sources`` and every stage that depends on them."""
    children: dict[str, list[str]] = {s: [] for s in graph}
    for s, ps in graph.items():
        for p in ps:
            children[p].append(s)
    return _reach(children, sources)


def check_stages(graph: Mapping[str, list[str]], names: Iterable[str]) -> None:
    unknown = [n for n in names if n not in graph]
    if unknown:
        raise FlowError(f"unknown stage(s): {', '.join(unknown)}", f"stages of this pipeline: {', '.join(graph)}")


# --- what DVC did ---------------------------------------------------------------------------------------

def read_run_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run log (one JSON object per line, one line per stage run), in order; none when absent."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def read_run_log(path: str | os.PathLike, experiment: str | None = None) -> list[str]:
    """The stage names a run log lists (one JSON object per line), in order, each once; with ``experiment``,
    only those run inside that DVC experiment (the lines' ``experiment``, from ``$DVC_EXP_NAME``)."""
    rows = read_run_rows(path)
    return list(dict.fromkeys(r["stage"] for r in rows if experiment is None or r.get("experiment") == experiment))


def stage_status(result: DvcResult, stages: Iterable[str]) -> dict[str, str]:
    """``{stage: "ran" | "cached"}``: ran when its command ran, else DVC skipped it or restored its outputs."""
    ran = set(result.ran)
    return {s: RAN if s in ran else CACHED for s in stages}


def lock_stages(repo: Path) -> dict[str, Any]:
    """The stages recorded in dvc.lock (empty when there is none)."""
    path = repo / "dvc.lock"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}


def stages_reading(repo: Path, graph: Mapping[str, list[str]], keys: Iterable[str]) -> set[str]:
    """The stages of ``graph`` whose dvc.yaml ``params`` cover any of ``keys`` (``prune`` covers
    ``prune.sparsity`` and the reverse); a ``foreach`` definition stands for all its ``name@item`` stages."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text()) or {}
    keys = list(keys)

    def covers(declared: str, key: str) -> bool:
        return declared == key or key.startswith(declared + ".") or declared.startswith(key + ".")

    found: set[str] = set()
    for name, body in (spec.get("stages") or {}).items():
        body = body.get("do", body) if isinstance(body, dict) else {}
        declared: list[str] = []
        for entry in body.get("params") or []:
            if isinstance(entry, dict):  # {params_file: [keys]}
                for v in entry.values():
                    declared.extend(v or [])
            else:
                declared.append(entry)
        if any(covers(d, k) for d in declared for k in keys):
            found |= {s for s in graph if s == name or s.startswith(name + "@")}
    return found


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (``diet.io.atomic_file``): readers never see half a
    file."""
    from diet.io import atomic_file  # torch-free

    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def default_remote(repo: str | Path) -> tuple[str, str] | None:
    """The name and URL of the repository's default DVC remote (``core.remote`` in DVC's merged config: a
    relative folder comes back absolute), or None when there is none."""
    from dvc.repo import Repo

    with Repo(str(ensure_repo(repo))) as dvc_repo:
        config = dvc_repo.config
        name = config["core"].get("remote")
        url = (config["remote"].get(name) or {}).get("url") if name else None
    return (name, url) if name and url else None
