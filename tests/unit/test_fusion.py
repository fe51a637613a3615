import pytest
import torch

from multimed.models.catalog import CATALOG
from multimed.models.config import ModelConfig
from multimed.models.fusion import FUSIONS
from multimed.models.modalities.base import EncoderOutput
from multimed.models.outputs import output_of
from multimed.models.tasks import TaskModels

MODALITIES = ("xray", "ct", "mri", "text")


@pytest.fixture(params=sorted(FUSIONS))
def fusion(request):
    torch.manual_seed(0)
    return FUSIONS[request.param](MODALITIES, 16).eval()


def test_absent_modality_is_masked_not_zero_filled(fusion):
    emb = {m: torch.randn(3, 16) for m in MODALITIES}
    present = {m: torch.tensor([True, True, False]) for m in MODALITIES}
    present["xray"] = torch.tensor([True, True, True])
    full = fusion(emb, present)
    # An absent modality's values must not matter at all...
    changed = dict(emb, ct=emb["ct"] + 100)
    absent = {**present, "ct": torch.tensor([False, False, False])}
    assert torch.allclose(fusion(emb, absent), fusion(changed, absent), atol=1e-5)
    # ...and leaving it out of the mapping is the same as marking it absent.
    without = {m: e for m, e in emb.items() if m != "ct"}
    assert torch.allclose(fusion(emb, absent), fusion(without, absent), atol=1e-5)
    assert full.shape == (3, 16)


def test_fusion_is_batch_invariant(fusion):
    emb = {m: torch.randn(4, 16) for m in MODALITIES}
    present = {m: torch.rand(4) > 0.3 for m in MODALITIES}
    present["xray"] = torch.ones(4, dtype=torch.bool)
    batched = fusion(emb, present)
    for i in range(4):
        one = fusion(
            {m: e[i : i + 1] for m, e in emb.items()}, {m: p[i : i + 1] for m, p in present.items()}
        )
        assert torch.allclose(one, batched[i : i + 1], atol=1e-5)


def test_nothing_present_is_refused(fusion):
    emb = {"xray": torch.randn(1, 16)}
    with pytest.raises(ValueError, match="at least one present modality"):
        fusion(emb, {"xray": torch.tensor([False])})


@pytest.mark.parametrize("task", sorted(CATALOG.tasks))
def test_every_task_predicts_its_output_kind(task):
    spec = CATALOG.task(task)
    models = TaskModels(ModelConfig(embed_dim=16)).eval()
    outputs = {}
    for m in spec.all_of + spec.any_of[:1]:
        tokens = mask = None
        if CATALOG.modality(m).emits_tokens:
            tokens = torch.randn(2, 7, 16)
            mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
        outputs[m] = EncoderOutput(torch.randn(2, 16), tokens, mask)
    predictions = models.predict(task, outputs)
    assert len(predictions) == 2
    for p in predictions:
        assert p.kind is spec.output and p.labels == spec.labels
    if spec.token_modality:
        assert [len(p.predicted) for p in predictions] == [7, 4]


def test_predictions_convert_scores():
    spec = CATALOG.task("radiographic_findings_classification")
    raw = torch.tensor([[10.0, -10.0, 10.0, -10.0, -10.0]])
    (p,) = output_of(spec).predictions(spec.labels, raw)
    assert p.predicted == ["cardiomegaly", "nodule"]
