"""Workers without a shared disk: every worker runs its stages in a clone of its own and exchanges data
through the DVC remote.

The coordinator (the process running the flow) checks that a worker can rebuild its workspace: its commit is
a branch or tag tip (or an ancestor of one) at a git URL the workers can clone, no tracked file but
params.yaml, dvc.lock and .dvc/config differs from that commit, no stage dependency is untracked, and a
default DVC remote exists. It pushes the outputs its dvc.lock records there, then submits one task per
stage, which receives the results of the tasks of the stage's upstream stages (so it starts after them).
The task, on whichever worker runs it:

1. takes a clone folder of its own (``<workdir>/<repo>-<url hash>/<worker>``; a lock file keeps two tasks
   out of one clone), clones the URL there once, checks out the coordinator's commit and removes every
   untracked or ignored file but the DVC cache, so no output of an earlier run lingers;
2. writes the coordinator's params.yaml and dvc.lock, with the lock entries its upstream tasks returned laid
   over it, and the coordinator's default remote into ``.dvc/config.local``;
3. pulls the outputs of the stage's upstream stages by those entries (``dvc pull <stages>``: from the
   clone's own cache when it has them, else from the remote);
4. runs ``dvc repro --single-item <stage> --pull --allow-missing``: unchanged (its deps and params match its
   lock entry), DVC skips it without fetching its outputs; changed, DVC pulls the run-cache and restores the
   outputs when it knows them (another worker or team computed them), and runs the command otherwise;
5. when the stage's lock entry changed, pushes its outputs and the run-cache (``dvc push --run-cache``);
6. returns the stage's lock entry, the run-log rows of the stages whose command ran (``$DIET_RUN_LOG``), the
   worker's name and its clone folder.

The coordinator then appends the run-log rows to its own ``$DIET_RUN_LOG`` when set, records the returned
entries in its dvc.lock with DVC's YAML writer, pulls the stages' outputs (``dvc pull``), lets ``dvc
commit`` hash them (which writes their .gitignore entries, as a local run does) and checks that DVC computes
the same entries and that ``dvc status`` finds every stage up to date.

Why lock entries travel, and not only run-cache records: DVC keeps no run-cache record for a stage with a
``persist`` output (``prepare@``), so ``dvc repro --pull`` on the coordinator would run those stages again.
Why the worker pulls the upstream outputs itself: ``dvc repro --pull`` pulls a missing dependency by its
path, which fails for a folder that holds the outputs of several stages (``merge`` reads ``scores/``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.repo import (RUN_LOG, DvcCommandError, FlowError, child_env, default_remote, dvc_executable, edited_yaml,
                        lock_stages, retry_unless_input_error, run_dvc, stage_status)

#: tracked files that may differ from the commit: the workers get their content from the coordinator
#: (params.yaml, dvc.lock) or do not need it (.dvc/config: the default remote is passed along)
CARRIED = ("params.yaml", "dvc.lock", ".dvc/config")
#: the clones' parent folder under the worker's temporary folder when no ``workdir`` is given
DEFAULT_WORKDIR = "diet-workers"


@dataclass(frozen=True)
class CloneSpec:
    """What a worker needs to rebuild the coordinator's workspace in a clone of its own."""

    git_url: str
    commit: str
    params: str              # the coordinator's params.yaml, verbatim
    lock: str | None         # the coordinator's dvc.lock (None: it has none)
    remote: str              # the coordinator's default DVC remote: its name ...
    remote_url: str          # ... and URL, reachable from every worker
    workdir: str | None = None  # where the clones live on a worker (default: <tmp>/diet-workers)


def git(repo: str | os.PathLike, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``git <args>`` in ``repo``; with ``check`` a failure raises a FlowError with git's message."""
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise FlowError(f"`git {' '.join(args)}` failed in {repo}: {proc.stderr.strip() or proc.stdout.strip()}",
                        "check the repository and the git URL")
    return proc


# --- the coordinator's checks ---------------------------------------------------------------------------

def required_remote(root: Path) -> tuple[str, str]:
    """The name and URL of the default DVC remote (``flows.repo.default_remote``), or a FlowError saying how to
    add one."""
    remote = default_remote(root)
    if remote is None:
        raise FlowError("no default DVC remote: workers without a shared disk take their inputs from it and push "
                        "their outputs to it",
                        "add one that every worker can reach: diet-flow push --add-remote URL "
                        "(or dvc remote add -d shared URL; s3://, ssh://, or a folder mounted on every machine)")
    return remote


def stage_dep_paths(root: Path, stages: list[str]) -> set[str]:
    """The files and folders (relative to ``root``) that ``stages`` declare as deps, params files included."""
    from dvc.repo import Repo

    wanted = set(stages)
    with Repo(str(root)) as dvc_repo:
        return {os.path.relpath(dep.fs_path, root) for s in dvc_repo.index.stages
                if getattr(s, "name", None) in wanted for dep in s.deps}


def check_clean(root: Path, dep_paths: set[str]) -> None:
    """Fail unless the workers' clones at HEAD see what this workspace sees: no tracked file changed but
    params.yaml, dvc.lock and .dvc/config, and no untracked file among the stages' deps."""
    out = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all").stdout
    changed, untracked = [], []
    entries = out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":  # a rename or copy: the next entry is the original path
            i += 1
        if code == "??":
            if any(path == d or path.startswith(d.rstrip("/") + "/") for d in dep_paths):
                untracked.append(path)
        elif path not in CARRIED:
            changed.append(path)
    if changed:
        raise FlowError(f"uncommitted changes to tracked files: {', '.join(sorted(changed))}; workers clone the "
                        "commit and would run other code",
                        "commit them and push the commit where the workers clone from (git commit -am ...; "
                        "git push), or stash them (git stash); only params.yaml, dvc.lock and .dvc/config "
                        "travel from this workspace")
    if untracked:
        raise FlowError(f"stage dependencies not committed to git: {', '.join(sorted(untracked))}; the workers' "
                        "clones would not have them",
                        "git add and commit them, and push the commit where the workers clone from")


def check_reachable(root: Path, git_url: str, commit: str) -> None:
    """Fail unless ``commit`` is a branch or tag tip at ``git_url``, or an ancestor of one known here."""
    proc = git(root, "ls-remote", "--heads", "--tags", git_url, check=False)
    if proc.returncode != 0:
        raise FlowError(f"cannot read the git repository {git_url}: {proc.stderr.strip()}",
                        "pass a git URL every worker can clone (--git-url URL), with its credentials set up")
    tips = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    for tip in tips:
        if tip == commit or (git(root, "cat-file", "-e", f"{tip}^{{commit}}", check=False).returncode == 0
                             and git(root, "merge-base", "--is-ancestor", commit, tip, check=False).returncode == 0):
            return
    raise FlowError(f"commit {commit[:12]} (HEAD) is not on any branch or tag of {git_url}: the workers' clones "
                    "cannot check it out",
                    f"push it: git push {git_url} HEAD:refs/heads/<branch> (or git fetch, if {git_url} has it "
                    "on commits this clone has not fetched)")


def check_workspace(repo: str | os.PathLike, git_url: str | None = None) -> dict[str, str]:
    """Check what workers without a shared disk need from ``repo``: the root of a git repository with a commit
    that ``git_url`` (default: ``repo`` itself) serves, no tracked file changed but those that travel, and a
    default DVC remote. Changes nothing; returns ``{"commit", "git_url", "remote", "remote_url"}``."""
    root = Path(repo).resolve()
    top = git(root, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        raise FlowError(f"{root} is not the top folder of a git repository: workers rebuild it with git clone",
                        "run from the root of the project's git repository")
    commit = git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).stdout.strip()
    if not commit:
        raise FlowError(f"{root} has no commit to clone", "commit the project: git add -A && git commit")
    remote, remote_url = required_remote(root)
    check_clean(root, set())
    url = git_url or str(root)
    check_reachable(root, url, commit)
    return {"commit": commit, "git_url": url, "remote": remote, "remote_url": remote_url}


def prepare(repo: str | os.PathLike, stages: list[str], git_url: str | None = None, workdir: str | None = None,
            checked: Mapping[str, str] | None = None) -> CloneSpec:
    """``check_workspace`` (unless ``checked`` holds its result), and no untracked file among the deps of
    ``stages``; then describe this workspace for the workers: commit, git URL, params.yaml, dvc.lock, default
    remote. Changes nothing."""
    root = Path(repo).resolve()
    found = dict(checked) if checked else check_workspace(root, git_url)
    check_clean(root, stage_dep_paths(root, stages))
    lock = root / "dvc.lock"
    return CloneSpec(params=(root / "params.yaml").read_text(), lock=lock.read_text() if lock.is_file() else None,
                     workdir=workdir, **found)


def push_local_outputs(root: Path, stages: list[str]) -> None:
    """Push the outputs of ``stages`` recorded in this dvc.lock, and the run-cache, so that a worker can pull
    what this workspace computed before (files already on the remote are skipped; an output that is in no
    cache here is left to the remote)."""
    locked = [s for s in stages if s in lock_stages(root)]
    if locked:
        res = run_dvc(["push", "--run-cache", *locked], root, check=False)
        if res.returncode != 0:
            get_run_logger().warning("dvc push of this workspace's outputs did not complete; the workers will rerun "
                                     "what the remote lacks\n%s", res.output.rstrip()[-3000:])


# --- the worker's side ----------------------------------------------------------------------------------

def worker_name() -> str:
    """The Dask worker's name, else ``<host>-<pid>``, as a folder name."""
    name = None
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):
        pass
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or f"{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def worker_clone(spec: CloneSpec) -> Iterator[tuple[Path, str]]:
    """A clone folder that this task alone uses until it exits: ``<workdir>/<repo>-<url hash>/<worker>``, or
    ``<worker>.N`` when another task of the same worker holds that one (a worker with several threads)."""
    workdir = Path(spec.workdir or Path(tempfile.gettempdir()) / DEFAULT_WORKDIR).expanduser()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.git_url.rstrip("/")).name.removesuffix(".git")) or "repo"
    base = workdir / f"{slug}-{hashlib.sha1(spec.git_url.encode()).hexdigest()[:8]}"
    base.mkdir(parents=True, exist_ok=True)
    name = worker_name()
    for n in range(1024):
        folder = f"{name}.{n}" if n else name
        handle = open(base / f".{folder}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield base / folder, name
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    raise FlowError(f"no free clone folder under {base}", "run fewer tasks per worker")


def checkout_commit(clone: Path, spec: CloneSpec) -> None:
    """Clone ``spec.git_url`` into ``clone`` once; check out ``spec.commit`` and remove every untracked or
    ignored file outside ``.dvc`` (earlier outputs), keeping the clone's DVC cache."""
    if not (clone / ".git").is_dir():
        if clone.exists():
            shutil.rmtree(clone)
        cloned = git(clone.parent, "clone", "--quiet", "--no-checkout", spec.git_url, clone.name, check=False)
        if cloned.returncode != 0:
            raise FlowError(f"worker {worker_name()} cannot clone {spec.git_url}: {cloned.stderr.strip()}",
                            "pass a git URL that every worker can clone (--git-url URL; the default, the "
                            "coordinator's own folder, serves only workers on its machine)")
    if git(clone, "cat-file", "-e", f"{spec.commit}^{{commit}}", check=False).returncode != 0:
        git(clone, "fetch", "--quiet", "--tags", spec.git_url, "+refs/heads/*:refs/remotes/origin/*", check=False)
    if git(clone, "cat-file", "-e", f"{spec.commit}^{{commit}}", check=False).returncode != 0:
        raise FlowError(f"commit {spec.commit[:12]} is not in {spec.git_url} as this worker sees it",
                        f"push it: git push {spec.git_url} HEAD:refs/heads/<branch>")
    git(clone, "checkout", "--quiet", "--force", "--detach", spec.commit)
    git(clone, "clean", "-q", "-ffdx", "--", ".", ":(exclude).dvc")


def write_workspace(clone: Path, spec: CloneSpec, entries: Mapping[str, Any]) -> None:
    """The coordinator's params.yaml and dvc.lock (with ``entries``, ``{stage: lock entry}``, laid over it)
    and its default remote, in the clone's untracked local config."""
    (clone / "params.yaml").write_text(spec.params)
    lock = clone / "dvc.lock"
    if spec.lock is None:
        lock.unlink(missing_ok=True)
    else:
        lock.write_text(spec.lock)
    if entries:
        record_lock_entries(clone, entries)
    run_dvc(["remote", "add", "--local", "--default", "--force", spec.remote, spec.remote_url], clone)


def record_lock_entries(root: Path, entries: Mapping[str, Any]) -> list[str]:
    """Write ``{stage: lock entry}`` into ``root/dvc.lock`` (edited in place as DVC edits it, the new stages
    appended); return the stages whose entry changed."""
    changed = []
    with edited_yaml(root / "dvc.lock") as data:
        if not data:
            data["schema"] = "2.0"
        if not data.get("stages"):
            data["stages"] = {}
        for stage, entry in entries.items():
            if data["stages"].get(stage) != entry:
                data["stages"][stage] = entry
                changed.append(stage)
    return changed


@task(name="dvc-repro-clone", task_run_name="{stage}", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_input_error)
def repro_in_clone(spec: CloneSpec, stage: str, parent_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Run ``stage`` in this worker's clone, from the remote's data; push what it produced.

    ``parent_rows`` are the results of the tasks of the stage's direct upstream stages. Returns ``{"stage",
    "status", "seconds", "lock", "runs", "worker", "clone", "pushed"}``: ``lock`` is the stage's dvc.lock
    entry, ``runs`` the run log rows of the stages whose command ran here.
    """
    logger = get_run_logger()
    with worker_clone(spec) as (clone, worker):
        checkout_commit(clone, spec)
        write_workspace(clone, spec, {r["stage"]: r["lock"] for r in parent_rows if r.get("lock")})
        parents = [r["stage"] for r in parent_rows]
        if parents:  # the deps, by the parents' entries (from the clone's own cache when it has them)
            pulled = run_dvc(["pull", *parents], clone)
            logger.info("[%s: %s] dvc pull %s\n%s", worker, clone, " ".join(parents), pulled.output.rstrip())
        before = lock_stages(clone).get(stage)
        args = ["repro", "--single-item", stage, "--pull", "--allow-missing"]
        res = run_dvc(args, clone, check=False)
        if res.output.strip():
            logger.info("[%s: %s] dvc %s\n%s", worker, clone, " ".join(args), res.output.rstrip())
        if res.returncode != 0:
            raise DvcCommandError(args, res.returncode, res.output)
        after = lock_stages(clone).get(stage)
        pushed = after is not None and after != before
        if pushed:  # ran, or restored from the run-cache: the coordinator and later workers pull it
            push = run_dvc(["push", "--run-cache", stage], clone)
            logger.info("dvc push --run-cache %s\n%s", stage, push.output.rstrip())
        runs = [{**r, "worker": worker, "clone": str(clone)} for r in res.runs]
        return {"stage": stage, "status": stage_status(res, [stage])[stage], "seconds": round(res.seconds, 2),
                "lock": after, "runs": runs, "worker": worker, "clone": str(clone), "pushed": pushed}


# --- the coordinator collects ---------------------------------------------------------------------------

def dvc_status(root: Path, stages: list[str]) -> dict[str, Any]:
    """``dvc status --json <stages>``: what DVC finds out of date (empty: every stage is up to date)."""
    proc = subprocess.run([dvc_executable(), "status", "--json", *stages], cwd=root, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise DvcCommandError(["status", "--json", *stages], proc.returncode, proc.stdout + proc.stderr)
    return json.loads(proc.stdout or "{}")


def collect(root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Bring the workers' results into ``root``: append their run-log rows to ``$DIET_RUN_LOG`` (when set),
    record their lock entries in dvc.lock, pull the stages' outputs, let ``dvc commit`` hash them here (which
    also writes their .gitignore entries, as a local run does) and check that it finds the same entries and
    that ``dvc status`` finds every stage up to date. Returns the stages whose entry changed."""
    log = os.environ.get(RUN_LOG)
    if log:  # the workers' run logs, joined into this process's one
        with open(log, "a") as f:
            for r in rows:
                for line in r.get("runs") or []:
                    f.write(json.dumps(line) + "\n")
    entries = {r["stage"]: r["lock"] for r in rows if r.get("lock")}
    changed = record_lock_entries(root, entries) if entries else []
    stages = [r["stage"] for r in rows]
    if not stages:
        return changed
    for args in (["pull", *stages], ["commit", "--force", *stages]):
        res = run_dvc(args, root)
        if res.ran:
            raise FlowError(f"`dvc {args[0]}` ran stages here: {', '.join(res.ran)}", "report this as a bug")
    here = lock_stages(root)
    differ = [s for s in entries if here.get(s) != entries[s]]
    stale = dvc_status(root, stages)
    if differ or stale:
        raise FlowError("the workers' results do not describe this workspace: "
                        + (f"dvc commit hashes {', '.join(differ)} differently here; " if differ else "")
                        + (f"dvc status: {json.dumps(stale)[:2000]}" if stale else ""),
                        "the workers ran other code or data than this workspace: commit, push and rerun")
    return changed


@flow(name="diet-stages-no-shared-disk")
def run_stages_in_clones(root: str, spec: CloneSpec, graph: dict[str, list[str]], stages: list[str],
                         retries: int = 1) -> list[dict[str, Any]]:
    """Submit every stage once, with the results of its upstream stages as an argument (so it starts after
    them); collect what completed into ``root``, then raise the first failure (in graph order)."""
    repro = repro_in_clone.with_options(retries=retries)
    futures: dict[str, Any] = {}
    for stage in stages:  # topological: every upstream future already exists
        futures[stage] = repro.submit(spec, stage, [futures[p] for p in graph[stage] if p in futures])
    rows, failure = [], None
    for stage in stages:
        try:
            rows.append(futures[stage].result())
        except Exception as e:  # noqa: BLE001 - collect what completed first
            failure = failure or e
    collect(Path(root), rows)
    if failure is not None:
        raise failure
    return [{"stage": r["stage"], "status": r["status"], "seconds": r["seconds"], "worker": r["worker"],
             "clone": r["clone"], "runs": len(r["runs"])} for r in rows]

