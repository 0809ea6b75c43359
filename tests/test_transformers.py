"""Laplace over all weights of the models people use: transformers (torch's own layers
and ``transformers`` models built from small configs, nothing downloaded), CNNs with
normalization layers, an LSTM classifier and a weight-tied language-model head.

For each: the engine's diagonal equals the diagonal of the dense GGN from
``torch.func`` Jacobians (float64), and Kron, Diag and LowRank Laplace fit and
predict.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace import Laplace
from laplace.curvature.native import NativeGGN
from tests import oracles

transformers = pytest.importorskip("transformers")

N_CLASSES = 3


class Logits(nn.Module):
    """A ``transformers`` model returning its logits."""

    def __init__(self, model: nn.Module, key: str = "input_ids") -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


class EncoderClassifier(nn.Module):
    """Embedding, ``nn.TransformerEncoderLayer`` (attention, LayerNorm), mean pool,
    linear head."""

    def __init__(self, batch_first: bool, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(
            dim, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first
        )
        self.head = nn.Linear(dim, N_CLASSES)

    def forward(self, idx):
        h = self.emb(idx)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, 4, batch_first=True)
        self.head = nn.Linear(4, N_CLASSES)

    def forward(self, idx):
        out, _ = self.lstm(self.emb(idx))
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Next-token logits of the last position, the head tied to the embedding."""

    def __init__(self, vocab: int = 9, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.block(self.emb(idx))[:, -1])


def _cnn(norm: str) -> nn.Module:
    layer = nn.BatchNorm2d(4) if norm == "batchnorm" else nn.GroupNorm(2, 4)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        layer,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, N_CLASSES),
    )


def build(name: str, device):
    """``(model, x, n_outputs)`` in float64 and eval mode."""
    torch.manual_seed(0)
    N, T, V = 4, 5, 11
    tokens = torch.randint(1, V, (N, T))
    if name == "torch-encoder-batch-first":
        m, x = EncoderClassifier(batch_first=True), tokens
    elif name == "torch-encoder-seq-first":
        m, x = EncoderClassifier(batch_first=False), tokens
    elif name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=8, n_head=2, vocab_size=V, n_positions=8,
            num_labels=N_CLASSES, pad_token_id=0,
        )  # fmt: skip
        m, x = Logits(transformers.GPT2ForSequenceClassification(config)), tokens
    elif name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            intermediate_size=12, vocab_size=V, max_position_embeddings=8,
            num_labels=N_CLASSES,
        )  # fmt: skip
        m, x = Logits(transformers.BertForSequenceClassification(config)), tokens
    elif name == "vit":
        config = transformers.ViTConfig(
            num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            intermediate_size=12, image_size=4, patch_size=2, num_channels=2,
            num_labels=N_CLASSES,
        )  # fmt: skip
        model = transformers.ViTForImageClassification(config)
        m, x = Logits(model, "pixel_values"), torch.randn(N, 2, 4, 4)
    elif name in ("cnn-batchnorm", "cnn-groupnorm"):
        m, x = _cnn(name.split("-")[1]), torch.randn(N, 2, 5, 5)
    elif name == "lstm":
        m, x = LSTMClassifier(), tokens
    elif name == "tied-lm":
        m, x = TiedLM(), torch.randint(0, 9, (N, T))
    else:
        raise ValueError(name)
    m = m.to(device, torch.float64).eval()
    if x.is_floating_point():
        x = x.to(torch.float64)
    x = x.to(device)
    with torch.no_grad():
        for module in m.modules():  # trained-looking normalization layers
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                module.weight.normal_()
                module.bias.normal_()
        n_out = m(x).shape[-1]
    return m, x, n_out


MODELS = [
    "torch-encoder-batch-first",
    "torch-encoder-seq-first",
    "gpt2",
    "bert",
    "vit",
    "cnn-batchnorm",
    "cnn-groupnorm",
    "lstm",
    "tied-lm",
]


def _oracle_diag(m, x):
    J = oracles.jacobian(m, x)
    with torch.no_grad():
        f = m(x)
    L = oracles.output_hessian("classification", f)
    return torch.einsum("ncp,ncd,ndp->p", J, L, J)


@pytest.mark.parametrize("name", MODELS)
def test_diagonal_equals_the_dense_ggn(name, device):
    m, x, n_out = build(name, device)
    y = torch.randint(0, n_out, (len(x),), device=device)
    _, d = NativeGGN(m, "classification").diag(x, y)
    torch.testing.assert_close(d, _oracle_diag(m, x))


@pytest.mark.parametrize("structure", ["kron", "diag", "lowrank"])
@pytest.mark.parametrize("name", MODELS)
def test_every_structure_fits_and_predicts(name, structure, device):
    m, x, n_out = build(name, device)
    y = torch.randint(0, n_out, (len(x),), device=device)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=2
    )
    kwargs = {"rank": 3} if structure == "lowrank" else {}
    la = Laplace(
        m,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        **kwargs,
    )
    la.fit(loader)
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la(x, pred_type="glm", link_approx="probit")
    assert probs.shape == (len(x), n_out)
    torch.testing.assert_close(
        probs.sum(-1), torch.ones(len(x), dtype=probs.dtype, device=device)
    )
    # every parameter of the model is served by a rule (no torch.func fallback)
    # except the position and class embeddings of the ViT
    fallbacks = [r for r in la.structure_table if r["rules"] == "fallback"]
    expected = 2 if name == "vit" else 0
    assert len(fallbacks) == expected


def test_kron_of_one_position_is_exact_for_the_encoder(device):
    """One datum and one position: no weight sharing, so KFAC is the exact GGN
    block of every parameter."""
    m, x, n_out = build("torch-encoder-batch-first", device)
    x = x[:1, :1]
    y = torch.zeros(1, dtype=torch.long, device=device)
    _, K = NativeGGN(m, "classification").kron(x, y, N=1)
    ggn = oracles.ggn(m, x, "classification")
    params = [p for p in m.parameters() if p.requires_grad]
    start = 0
    for p, block in zip(params, K.kfacs, strict=True):
        stop = start + p.numel()
        dense = [torch.diag(f) if f.ndim == 1 else f for f in block]
        got = torch.kron(*dense) if len(dense) == 2 else dense[0]
        torch.testing.assert_close(got, ggn[start:stop, start:stop])
        start = stop
