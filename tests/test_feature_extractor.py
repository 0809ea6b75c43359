"""Last-layer features in one forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace.utils import FeatureExtractor


class Branchy(nn.Module):
    """Not a Sequential; the head is registered before the body."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.body = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_finds_the_layer_that_produces_the_output(device):
    torch.manual_seed(0)
    model = Branchy().to(device)
    x = torch.randn(5, 3, device=device)
    out, phi = FeatureExtractor(model).forward_with_features(x)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(phi, torch.relu(model.body(x)))


def test_named_last_layer_and_unknown_name(device):
    model = Branchy().to(device)
    extractor = FeatureExtractor(model, last_layer_name="head")
    assert extractor.last_layer is model.head
    with pytest.raises(ValueError, match=r"nn.Linear modules are \['head', 'body'\]"):
        FeatureExtractor(model, last_layer_name="classifier")


@pytest.mark.parametrize(
    "reduction,expected",
    [
        ("pick_first", lambda h: h[:, 0]),
        ("pick_last", lambda h: h[:, -1]),
        ("average", lambda h: h.mean(1)),
    ],
)
def test_feature_reduction(reduction, expected, device):
    """Sequence features ``(batch, seq_len, dim)`` are reduced to ``(batch, dim)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(device)
    x = torch.randn(5, 7, 3, device=device)
    extractor = FeatureExtractor(model, feature_reduction=reduction)
    out, phi = extractor.forward_with_features(x)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(phi, expected(model[0](x)).detach())


def test_3d_features_without_reduction_are_refused(device):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(device)
    x = torch.randn(5, 7, 3, device=device)
    with pytest.raises(ValueError, match="feature_reduction"):
        FeatureExtractor(model).forward_with_features(x)


# -- Hugging Face sequence classifiers: a head at every position, the last token kept --
class _SeqClassifier(nn.Module):
    """What ``GPT2ForSequenceClassification`` does after its body: ``score`` (no bias)
    at every position, then the logits of the last token that is not padding."""

    def __init__(self, vocab=20, dim=6, n_labels=3, pad=0):
        super().__init__()
        self.pad = pad
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.score = nn.Linear(dim, n_labels, bias=False)

    def forward(self, batch):
        ids = batch["input_ids"]
        logits = self.score(self.body(self.emb(ids)))  # (B, T, C)
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = (positions * (ids != self.pad)).argmax(-1)
        return logits[torch.arange(ids.shape[0], device=ids.device), last]


def _padded_batch(device):
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 0], [3, 4, 0, 0, 0]])
    return {
        "input_ids": ids.to(device),
        "attention_mask": (ids != 0).long().to(device),
        "labels": torch.tensor([0, 2, 1], device=device),
    }


def _hf_loader(batch):
    n = batch["labels"].shape[0]
    items = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=n)


@pytest.mark.parametrize("last_layer_name", [None, "score"])
def test_sequence_classifier_head_is_found_and_pick_last_skips_padding(
    last_layer_name, device
):
    """The score head is found (with or without its name) and ``pick_last`` takes
    the last non-pad token's features: the last-layer GGN equals the oracle
    ``sum_n (phi_n phi_n^T) (x) Lambda_n`` on features picked by hand."""
    from laplace import Laplace

    torch.manual_seed(0)
    model = _SeqClassifier().to(device, torch.float64)
    batch = _padded_batch(device)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="full",
        feature_reduction="pick_last",
        last_layer_name=last_layer_name,
    )
    la.fit(_hf_loader(batch))
    assert la.model.last_layer_name == "score"
    ids = batch["input_ids"]
    hidden = model.body(model.emb(ids)).detach()
    last = torch.tensor([2, 3, 1], device=device)
    phi = hidden[torch.arange(3, device=device), last]  # picked by hand
    f = phi @ model.score.weight.detach().T
    torch.testing.assert_close(f, model(batch).detach())
    p = torch.softmax(f, -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    # parameter order of W (C, D) flattened row-major: index c * D + d
    H = torch.einsum("ncd,ni,nj->cidj", Lam, phi, phi).reshape(3 * 6, 3 * 6)
    torch.testing.assert_close(la.H, H)


@pytest.mark.parametrize("last_layer_name", [None, "hf.score"])
def test_gpt2_for_sequence_classification(last_layer_name, device):
    transformers = pytest.importorskip("transformers")
    from laplace import Laplace

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=20,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        num_labels=3,
        pad_token_id=0,
    )
    hf = transformers.GPT2ForSequenceClassification(config).to(device, torch.float64)
    hf.eval()

    class Wrapped(nn.Module):  # as laplace-torch's Hugging Face example
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, batch):
            return self.hf(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits

    batch = _padded_batch(device)
    la = Laplace(
        Wrapped(),
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="full",
        feature_reduction="pick_last",
        last_layer_name=last_layer_name,
    )
    la.fit(_hf_loader(batch))
    assert la.model.last_layer_name == "hf.score"
    with torch.no_grad():
        hidden = hf.transformer(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    phi = hidden[torch.arange(3, device=device), torch.tensor([2, 3, 1], device=device)]
    f = phi @ hf.score.weight.detach().T
    p = torch.softmax(f, -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    H = torch.einsum("ncd,ni,nj->cidj", Lam, phi, phi).reshape(3 * 8, 3 * 8)
    torch.testing.assert_close(la.H, H)
