"""Every registered modality, through the one contract: wire -> decode -> preprocess -> encode."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.cohort.synthetic import generate_cohort
from multimed.models.cohort.writer import to_wire
from multimed.models.config import ModelConfig
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import channel_stats
from multimed.models.modalities.registry import PIPELINES, build_pipeline

CONFIG = ModelConfig(embed_dim=32)


@pytest.fixture(scope="module")
def patients():
    return generate_cohort(3, seed=7)


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline(request):
    torch.manual_seed(0)
    return build_pipeline(request.param, CONFIG).setup("cpu")


@pytest.fixture
def work(monkeypatch) -> Counter[str]:
    """Counts the slow work a pipeline can do: torch modules constructed (its encoder, a
    backbone), and Hugging Face loads (the backbone, its tokenizer, its config), by class."""
    import transformers

    seen: Counter[str] = Counter()
    module_init = nn.Module.__init__

    def counted_init(self, *args, **kwargs):
        seen["modules"] += 1
        module_init(self, *args, **kwargs)

    def counted_load(auto):
        load = auto.from_pretrained

        def from_pretrained(*args, **kwargs):
            seen[auto.__name__] += 1
            return load(*args, **kwargs)

        return from_pretrained

    monkeypatch.setattr(nn.Module, "__init__", counted_init)
    for auto in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", counted_load(auto))
    return seen


@pytest.mark.parametrize("modality", sorted(PIPELINES))
def test_construction_is_cheap(modality, work):
    """Constructing a pipeline builds no torch module and loads nothing from Hugging Face;
    setup does both (the text pipeline's frozen backbone), which shows the count sees them."""
    pipeline = build_pipeline(modality, CONFIG)
    assert not work, work
    pipeline.setup("cpu")
    assert work["modules"] > 0
    assert (work["AutoModel"] > 0) == (modality == "text"), work


def test_wire_round_trip_matches_decoded(pipeline, patients):
    """The file format a client sends decodes to what the generator rendered."""
    m = pipeline.modality
    decoded = patients[0].inputs[m]
    direct = pipeline.preprocess(decoded)
    via_wire = pipeline.prepare(to_wire(m, decoded))
    for key, value in direct.items():
        assert torch.allclose(value.float(), via_wire[key].float(), atol=0.05), key


def test_encode_shape_determinism_and_batch_invariance(pipeline, patients):
    m = pipeline.modality
    raws = [to_wire(m, p.inputs[m]) for p in patients]
    batched = pipeline.encode(raws)
    assert batched.pooled.shape == (3, 32)
    assert torch.isfinite(batched.pooled).all()
    assert torch.equal(pipeline.encode(raws).pooled, batched.pooled)  # deterministic
    # The OOD score's descriptor: finite, per item, whatever the batch (batch norm in eval).
    assert batched.descriptor.shape[0] == 3 and torch.isfinite(batched.descriptor).all()
    for i, raw in enumerate(raws):
        single = pipeline.encode([raw])
        assert torch.allclose(single.pooled[0], batched.pooled[i], atol=1e-4)
        assert torch.allclose(single.descriptor[0], batched.descriptor[i], atol=1e-4)
        assert torch.equal(pipeline.unbatch(batched)[i].descriptor[0], batched.descriptor[i])
    if CATALOG.modality(m).emits_tokens:
        items = pipeline.unbatch(batched)
        for i, raw in enumerate(raws):
            alone = pipeline.encode([raw]).tokens[0]
            assert torch.allclose(items[i].tokens[0], alone, atol=1e-4)


def test_unaccepted_form_is_refused_by_name(pipeline):
    m = pipeline.modality
    wrong = next(f for f in InputForm if f not in CATALOG.modality(m).forms)
    with pytest.raises(InputError, match=rf"^{m}: input form {wrong}"):
        pipeline.prepare(RawInput(m, wrong, b"x"))


def test_model_ready_tensor_gives_the_same_embedding(pipeline, patients):
    """The Open Inference Protocol's tensor input (model-ready, after features) encodes as the
    raw input does, alone or batched with raw items' tensors."""
    decoded = [p.inputs[pipeline.modality] for p in patients[:2]]
    items = [pipeline.preprocess(d) for d in decoded]
    want = pipeline.forward(pipeline.collate(items)).pooled
    tensors = pipeline.model_tensor(pipeline.features(pipeline.collate(items)))
    spec = pipeline.model_input()
    assert str(tensors.dtype).removeprefix("torch.") == spec.dtype
    ready = [
        pipeline.prepare(RawInput(pipeline.modality, InputForm.PREPROCESSED, t.numpy()))
        for t in tensors
    ]
    got = pipeline.forward(pipeline.collate(ready)).pooled
    assert torch.allclose(got, want, atol=1e-5)


def test_model_ready_tensor_is_checked(pipeline):
    spec = pipeline.model_input()
    shape = tuple(12 if d == -1 else d for d in spec.shape)

    def prepare(array):
        return pipeline.prepare(RawInput(pipeline.modality, InputForm.PREPROCESSED, array))

    with pytest.raises(InputError, match=f"must be {spec.dtype}"):
        prepare(np.zeros(shape, dtype=np.float16))
    with pytest.raises(InputError, match="must have shape"):
        prepare(np.zeros((*shape, 2), dtype=spec.dtype))
    if spec.dtype == "float32":
        bad = np.zeros(shape, dtype=np.float32)
        bad.flat[0] = np.nan
        with pytest.raises(InputError, match="NaN"):
            prepare(bad)
    else:  # token ids: trailing padding is stripped, padding inside or out of range is not
        pad = pipeline.pad_id()
        ids = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, pad, pad], dtype=np.int64)
        assert prepare(ids)["tokens"].shape == (10,)
        with pytest.raises(InputError, match="token ids must lie"):
            prepare(np.array([0, 1, pad, 2, 0, 1, 2, 3, 0, 1], dtype=np.int64))


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_channel_stats_are_each_channels_mean_and_sample_std(offset):
    """The OOD descriptor's statistics, as torch defines them (the fast form must not drift),
    also where the mean dwarfs the spread (a one-pass E[x^2] - E[x]^2 loses that)."""
    x = offset + torch.randn(4, 6, 9, 7, generator=torch.Generator().manual_seed(0)) * 0.01
    flat = x.double().flatten(2)
    expected = torch.cat([flat.mean(-1), flat.std(-1)], 1).float()
    assert torch.allclose(channel_stats(x), expected, rtol=1e-3, atol=1e-5)
