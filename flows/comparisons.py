"""Paired comparisons of sweep rows: each row's accuracy, fidelity (flip rate, KL) and perplexity against the
dense model, the task-agnostic mask and the best field baseline, as mean differences with paired bootstrap
intervals over items (or held-out passages), added to a sweep table as columns (``flows.tables`` renders them).
"""

from __future__ import annotations

from flows.experiments import Items, fidelity_values
from flows.points import TASK_AGNOSTIC, row_label


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



#: the largest difference (nats) in a choice's log-likelihood between two evaluations of the same model on the
#: same items that still counts as the same: another kind of CPU sums the same float32 products in another order
#: (1.6e-4 at most over SmolLM2's 2,276 items of the 300-item tables, between an AMD EPYC and an Intel Xeon)
SAME_LL_ATOL = 1e-3


def same_items(a: Items, b: Items, atol: float = SAME_LL_ATOL) -> bool:
    """Whether two per-item results are one model's on the same items: the same tasks and item ids, the same
    acc and acc_norm on each item, and each choice's log-likelihood within ``atol`` (so that the sweeps of two
    machines pair with each other, while another model or other items do not)."""
    if a.keys() != b.keys():
        return False
    for task, by_id in a.items():
        other = b[task]
        if by_id.keys() != other.keys():
            return False
        for key, x in by_id.items():
            y = other[key]
            if len(x) != len(y) or list(x[:2]) != list(y[:2]):
                return False
            if len(x) > 2 and (len(x[2]) != len(y[2]) or any(abs(u - v) > atol for u, v in zip(x[2], y[2]))):
                return False
    return True


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
    from diet.registry import MERGE_METHODS  # the field's baselines (wanda_sp, flap) are facts of their entries

    field_baselines = MERGE_METHODS.names(lambda f: f.field_baseline)
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
        field = plain[plain["method"].isin(field_baselines)].sort_values("acc", ascending=False, kind="stable")
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
