"""What the budget arithmetic needs to know of a dense model: widths and per-dimension parameter costs."""

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
    widths = {g: adapter.group_widths(g) for g in groups}
    crossings = {}
    for g in groups:
        for o in groups:
            shared = get_group(g).crossing(adapter, get_group(o)) if g != o else None
            if shared is not None:
                crossings.setdefault(g, {})[o] = shared
    return Geometry(widths=widths,
                    costs={g: [adapter.dimension_cost(g, i) for i in range(len(widths[g]))] for g in groups},
                    decoder_params=adapter.decoder_param_count(), crossings=crossings)


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
