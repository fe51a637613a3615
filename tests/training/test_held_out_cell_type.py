"""A real cell type held out of training is flagged out of distribution: an scRNA model trained
without B cells (synthetic and real), then every real B cell scored against the real test cells
of the other types. `multimed report` runs this for every type with enough cells; this is one of
them at the default budget (about a minute)."""

from multimed.models.catalog import CATALOG
from multimed.models.config import ModelConfig
from multimed.models.modalities.registry import build_pipelines
from multimed.models.report import held_out_cell_type
from multimed.models.train import TrainSettings, prepare

TASK = "cell_type_classification"


def test_real_b_cells_held_out_of_training_are_flagged():
    settings = TrainSettings(tasks=(TASK,), modalities=("scrna",))
    config = ModelConfig()
    prep = prepare(settings, build_pipelines(config))
    k = CATALOG.task(TASK).labels.index("CD19+ B")
    result = held_out_cell_type(prep, settings, config, k)
    print(result)
    assert result["cells"] == 95
    assert result["auroc"] > 0.8 and result["flagged"] > 0.5, result
