"""What the budget arithmetic needs to know of a dense model: widths and per-dimension parameter costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from diet.config import GROUPS


@dataclass(frozen=True)
class Geometry:
    """What the budget arithmetic needs to know of a dense model."""

    widths: dict[str, list[int]]   # group -> dimensions per layer
    costs: dict[str, list[int]]    # group -> parameters per dimension, per layer
    decoder_params: int            # parameters of all decoder layers (the base of sparsity)


def geometry(model, groups: Sequence[str] = GROUPS) -> Geometry:
    from diet.adapters import get_adapter

    adapter = get_adapter(model)
    return Geometry(widths={g: adapter.group_widths(g) for g in groups},
                    costs={g: [adapter.dimension_cost(g, i) for i in range(adapter.num_layers)] for g in groups},
                    decoder_params=adapter.decoder_param_count())


def geometry_from_folder(model_dir: str | Path, groups: Sequence[str] = GROUPS) -> Geometry:
    """Geometry from a model folder's config alone (the model is built on the meta device: no weights read)."""
    from transformers import AutoModelForCausalLM

    from diet.modeling import read_config

    config = read_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return geometry(model, groups)
