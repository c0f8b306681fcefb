"""Progressive neural networks: a new column per task, earlier columns frozen, lateral adapters.

Rusu et al., "Progressive Neural Networks", arXiv:1606.04671, 2016. Task ``k`` gets a column of
its own; column ``k``'s layer ``i`` reads its own layer ``i-1`` and, through an adapter, layer
``i-1`` of every earlier column (Eq. 2: ``h_i^(k) = f(W_i^(k) h_(i-1)^(k) + U_i^(k:j)
f(V_i^(k:j) alpha_(i-1)^(<k) h_(i-1)^(<k)))``); earlier columns are frozen, so earlier tasks
are never forgotten. A task's label selects its column and head.

The columns, adapters and freezing are Avalanche's ``PNN``. One thing differs (docs/methods/pnn.md):
Avalanche's first layer gives each new column adapters from copies of the input, which the
paper does not have (laterals start at the second layer; the input is no earlier column's
output). On 784-pixel inputs those adapters cost 784 x width parameters per earlier column
and layer; here the first layer's columns have none.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from avalanche.core import SupervisedPlugin
from avalanche.models.pnn import PNN, PNNColumn, PNNLayer
from pydantic import Field

from cl_ext.context import BuildContext
from cl_ext.registry import register


class InputPNNLayer(PNNLayer):
    """The first layer: every column reads the input alone (no lateral adapters)."""

    def _add_column(self):
        for param in self.parameters():
            param.requires_grad = False
        # No earlier modules: Avalanche's MLP adapter over zero columns adds nothing.
        self.columns.append(PNNColumn(self.in_features, self.out_features_per_column, 0, adapter="mlp"))


def column_parameters(model: PNN) -> list[dict[str, int]]:
    """Per column (= task): parameters of its layers (own weights and lateral adapters) and of its head."""
    out = []
    for task, column in sorted(model.layers[-1].task_to_module_idx.items(), key=lambda kv: kv[1]):
        layers = sum(p.numel() for layer in model.layers for p in layer.columns[column].parameters())
        head = sum(p.numel() for p in model.classifier.classifiers[str(task)].parameters())
        out.append({"task": int(task), "column": column, "layers": layers, "head": head, "total": layers + head})
    return out


class ColumnReportPlugin(SupervisedPlugin):
    """Puts the parameters of each PNN column in ``metrics.json`` (``plugins.pnn``)."""

    summary_name = "pnn"

    def __init__(self, model: PNN):
        super().__init__()
        self.model = model

    def summary(self) -> dict[str, Any]:
        columns = column_parameters(self.model)
        return {
            "columns": columns,
            "parameters_per_column": [c["total"] for c in columns],
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {}  # read from the model, which the checkpoint holds

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register("model", "pnn")
def build_pnn(
    ctx: BuildContext,
    layers: Annotated[int, Field(ge=1, description="hidden layers per column")] = 2,
    width: Annotated[int, Field(ge=1, description="units per hidden layer of each column")] = 100,
    adapter: Annotated[
        Literal["mlp", "linear"],
        Field(description="lateral adapter: mlp (the paper's Eq. 2, with learned scales alpha) or linear"),
    ] = "mlp",
) -> PNN:
    """Progressive neural network (Rusu et al. 2016) of fully connected columns, a head per task; strategy pnn."""
    in_features = math.prod(ctx.info.input_shape)
    model = PNN(num_layers=layers, in_features=in_features, hidden_features_per_column=width, adapter=adapter)
    model.layers[0] = InputPNNLayer(in_features, width, adapter=adapter)
    return model
