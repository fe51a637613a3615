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


GOLDEN_TASK = "disease_classification"  # single-label, four modalities, four classes
GOLDEN_DIM = 8


def _golden_model(fusion: str) -> torch.nn.Module:
    """The task's fusion + head as TaskModels serves it, every parameter redrawn from one seeded
    generator in name order: independent of the initialisers and of the other tasks' draws."""
    model = TaskModels(ModelConfig(embed_dim=GOLDEN_DIM, fusion=fusion)).tasks[GOLDEN_TASK]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _golden_inputs() -> tuple[dict, dict]:
    """Three items: every modality present; xray and text only; mri alone."""
    gen = torch.Generator().manual_seed(1)
    modalities = sorted(CATALOG.task(GOLDEN_TASK).accepted)
    embeddings = {m: torch.randn(3, GOLDEN_DIM, generator=gen) for m in modalities}
    present = {m: torch.tensor([True, m in ("xray", "text"), m == "mri"]) for m in modalities}
    return embeddings, present


# The raw outputs of `_golden_model(fusion)(*_golden_inputs())`, printed once (torch 2.13, CPU) and
# pasted here. They pin the math a bundle's weights are served with (masking, pooling, scaling,
# normalisation): a change in them means the served model computes something else, and a
# deliberate change updates them.
GOLDEN = {
    "attention": [
        [2.343163, 2.351443, 1.298634, 5.037571],
        [1.040287, 4.591081, -5.38129, 4.61636],
        [-0.482288, 1.911303, -5.290323, 0.189561],
    ],
    "early": [
        [0.756995, 0.996947, 0.044155, 0.304057],
        [-1.499956, 0.190591, 0.967158, 0.411148],
        [-0.183677, 0.814158, 0.34926, -0.680555],
    ],
    "late": [
        [2.265423, 0.213097, 0.313766, 0.470726],
        [2.127712, 0.14415, -0.03917, 0.916403],
        [1.64193, -0.01326, 1.096805, 0.13567],
    ],
}


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fused_head_matches_its_golden_values(name):
    out = _golden_model(name)(*_golden_inputs())
    torch.testing.assert_close(out, torch.tensor(GOLDEN[name]), atol=1e-5, rtol=1e-5)
