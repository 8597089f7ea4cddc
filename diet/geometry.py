"""What the budget arithmetic needs to know of a model: widths, per-dimension parameter costs, parameter counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from diet.config import GROUPS


@dataclass(frozen=True)
class Geometry:
    """What the budget arithmetic needs to know of a dense model."""

    widths: dict[str, list[int]]   # group -> dimensions per mask row (a layer; one row for hidden)
    costs: dict[str, list[int]]    # group -> parameters per dimension, per mask row
    decoder_params: int            # parameters of all decoder layers (the base of sparsity)
    #: group -> other group -> per row of the other, parameters one dimension of each shares
    #: (``DimensionGroup.crossing``; ``diet.merge.shared_params``)
    crossings: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def geometry(model, groups: Sequence[str] = GROUPS) -> Geometry:
    from diet.adapters import get_adapter
    from diet.groups import get_group

    adapter = get_adapter(model)
    adapter.check_groups(groups)
    widths = {g: get_group(g).widths(adapter) for g in groups}
    crossings = {}
    for g in groups:
        for o in groups:
            shared = get_group(g).crossing(adapter, get_group(o)) if g != o else None
            if shared is not None:
                crossings.setdefault(g, {})[o] = shared
    return Geometry(widths=widths,
                    costs={g: [get_group(g).cost(adapter, i) for i in range(len(widths[g]))] for g in groups},
                    decoder_params=parameter_counts(model)["decoder"], crossings=crossings)


def geometry_from_folder(model_dir: str | Path, groups: Sequence[str] = GROUPS) -> Geometry:
    """Geometry from a model folder's config alone (the model is built on the meta device: no weights read).
    Groups the model's family cannot prune are refused from the config, before the model is built."""
    from transformers import AutoModelForCausalLM

    from diet.adapters import adapter_class
    from diet.checkpoint import read_config

    config = read_config(model_dir)
    adapter_class(config.model_type).check_groups(groups)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return geometry(model, groups)


def parameter_counts(model) -> dict:
    """Parameter counts, each shared (tied) tensor counted once.

    ``embedding``: input embeddings plus an untied output head; ``non_embedding`` = total - embedding;
    ``decoder``: the decoder layers (the base of ``prune.sparsity``); ``per_layer``: one count per layer.
    """
    from diet.adapters import get_adapter

    total = sum(p.numel() for p in model.parameters())
    embedding_params = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                        if m is not None}
    embedding = sum(p.numel() for p in embedding_params.values())
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in get_adapter(model).decoder_layers()]
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "decoder": sum(per_layer), "per_layer": per_layer}
