"""Laplace on a small transformer text classifier fed Hugging Face-style batches.

Language models from Hugging Face ``transformers`` take their inputs as a mapping
(a ``BatchEncoding``) with keys such as ``input_ids``, ``attention_mask`` and
``labels``. This script shows that Laplace works with such models and batches, on a
tiny transformer built here in plain PyTorch (no ``transformers`` install and no
download needed):

1. a synthetic token task: a sequence is of class 1 when it contains token 3, with
   10% of the labels flipped so that a calibrated model cannot be certain;
2. a 2-layer transformer encoder with a linear head ``classifier``, trained as usual
   (its weights are the MAP estimate);
3. a last-layer Laplace approximation over ``classifier`` (Kronecker-factored and
   diagonal), fitted on the loader of mappings with ``dict_key_x="input_ids"`` and
   ``dict_key_y="labels"`` and with ``feature_reduction="pick_last"`` to match the
   way the model pools its sequence (see ``TinyTransformerClassifier``), its prior
   precision tuned by marginal likelihood;
4. parameter-efficient fine-tuning (PEFT): everything is frozen except the last
   encoder layer and the head, these are fine-tuned, and a diagonal Laplace is
   fitted over the trainable parameters only (``subset_of_weights="all"`` covers the
   parameters with ``requires_grad=True``).

For each model it prints the test accuracy, negative log-likelihood (NLL), Brier
score and expected calibration error (ECE, 10 bins of confidence) of the MAP network
and of the Laplace predictive (linearized, "glm", with the probit approximation),
and saves their reliability diagrams (accuracy against confidence, one panel per
model) to a PNG file whose path it prints. The metrics and the diagrams are those
of ``examples/_calibration.py``.

Run with ``python examples/huggingface_example.py`` (``--help`` for the options).
It runs in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import UserDict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from laplace import Laplace

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration import evaluate, save_reliability_diagram  # noqa: E402
from _common import add_common_arguments, torch_threads  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "huggingface_example.png"
PAD, SIGNAL = 0, 3  # token 0 pads the sequences; token 3 decides the class
LABEL_NOISE = 0.1  # fraction of flipped labels: the best accuracy is about 90%


# ----------------------------------------------------------------------------------
# Hugging Face-style batches
# ----------------------------------------------------------------------------------


class BatchEncoding(UserDict):
    """A mapping of tensors with a ``.to(device)``, like ``transformers.BatchEncoding``.

    ``.to(device)`` moves the whole batch to a device in one call (and returns a new
    mapping). Laplace reads the inputs from ``batch["input_ids"]`` (``dict_key_x``)
    to count the examples, the targets from ``batch["labels"]`` (``dict_key_y``),
    and passes the whole mapping to the model.
    """

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) for k, v in self.data.items()})


class TokenDataset(Dataset):
    """Random token sequences of random lengths; label 1 iff ``SIGNAL`` occurs."""

    def __init__(self, n: int, vocab: int, min_len: int, max_len: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
        self.sequences = [
            torch.randint(1, vocab, (int(k),), generator=g) for k in lengths
        ]
        clean = torch.tensor([bool((s == SIGNAL).any()) for s in self.sequences])
        flip = torch.rand(n, generator=g) < LABEL_NOISE
        self.labels = (clean ^ flip).long()

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i], "labels": self.labels[i]}


def collate(examples: list[dict[str, torch.Tensor]]) -> BatchEncoding:
    """Pad the sequences on the LEFT, as decoder LLMs do, into one ``BatchEncoding``.

    With left padding, the last position of every row is a real token, which is the
    position the classifier reads (and ``feature_reduction="pick_last"`` too).
    """
    max_len = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), max_len), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), max_len, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, max_len - n :] = e["input_ids"]
        attention_mask[row, max_len - n :] = 1
    labels = torch.stack([e["labels"] for e in examples])
    return BatchEncoding(
        {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    )


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """A training loader of ``BatchEncoding`` batches, shuffled by its own generator.

    (So that the order of the batches does not depend on how often Laplace reads
    the loader, nor on any other use of the global random state.)
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size, shuffle=True, collate_fn=collate, generator=generator
    )


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------


class TinyTransformerClassifier(nn.Module):
    """Embedding, transformer encoder and linear head: a ``*ForSequenceClassification``.

    As the sequence classifiers of decoder LLMs in ``transformers`` (GPT-2, Llama...)
    do, the head ``classifier`` is applied at every position, (B, T, D) -> (B, T, C),
    and the logits of the LAST position are returned, (B, C).

    Last-layer Laplace sees the input of ``classifier``: the features (B, T, D). It
    reduces them to (B, D) with ``feature_reduction`` and applies the head to the
    result. ``"pick_last"`` takes position T - 1, so it computes
    ``classifier(h[:, -1])``, which is exactly the model's ``classifier(h)[:, -1]``
    (with left padding, position T - 1 is always a real token). Had the model
    averaged the logits over the positions, ``"average"`` would match instead; a
    BERT-like model reading a first [CLS] token would need ``"pick_first"``.
    """

    def __init__(self, vocab: int, max_len: int, dim: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=layers, enable_nested_tensor=False
        )
        self.classifier = nn.Linear(dim, classes)

    def forward(self, batch) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        return self.classifier(h)[:, -1]


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """AdamW on the cross-entropy, over the parameters with ``requires_grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(batch), batch["labels"])
            loss.backward()
            optimizer.step()
    model.eval()
    return loss.item()


# ----------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------


@torch.no_grad()
def map_probs(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    return torch.cat([model(batch).softmax(-1) for batch in loader])


def laplace_probs(la, loader: DataLoader) -> torch.Tensor:
    """The linearized predictive, with the probit approximation, batch by batch.

    ``la(batch)`` takes the same mappings as the model (the labels in them are
    ignored) and returns class probabilities.
    """
    return torch.cat(
        [la(batch, pred_type="glm", link_approx="probit").detach() for batch in loader]
    )


def labels_of(loader: DataLoader) -> torch.Tensor:
    return torch.cat([batch["labels"] for batch in loader])


def row(name: str, result: dict) -> str:
    return (
        f"  {name:<26} accuracy {result['accuracy']:.3f}   NLL {result['nll']:.4f}   "
        f"Brier {result['brier']:.4f}   ECE {result['ece']:.4f}"
    )


def fit_laplace(model, loader, test_loader, **kwargs) -> dict:
    """Fit, tune the prior precision by marglik, and score a Laplace approximation."""
    clock = time.perf_counter()
    la = Laplace(
        model,
        "classification",
        dict_key_x="input_ids",
        dict_key_y="labels",
        **kwargs,
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    result = evaluate(laplace_probs(la, test_loader), labels_of(test_loader))
    result["prior_precision"] = float(la.prior_precision.mean())
    result["n_params"] = int(la.n_params)
    result["seconds"] = time.perf_counter() - clock
    return result


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1000, help="training sequences")
    parser.add_argument("--n-test", type=int, default=500, help="test sequences")
    parser.add_argument("--vocab", type=int, default=20, help="vocabulary size")
    parser.add_argument("--min-len", type=int, default=6, help="shortest sequence")
    parser.add_argument("--max-len", type=int, default=16, help="longest sequence")
    parser.add_argument("--dim", type=int, default=32, help="transformer width")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs")
    parser.add_argument("--peft-epochs", type=int, default=2, help="PEFT epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the example; returns the scores it prints (and the confidence bins of
    the diagrams), per model."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # initial weights

    # 1. Data: loaders that yield BatchEncoding mappings.
    data = (args.vocab, args.min_len, args.max_len)
    train_set = TokenDataset(args.n_train, *data, seed=args.seed)
    test_set = TokenDataset(args.n_test, *data, seed=args.seed + 1)
    train_loader = shuffled_loader(train_set, args.batch_size, seed=args.seed)
    # Small test batches: the linearized predictive over many weights (PEFT) takes
    # the Jacobian of a whole batch of outputs, whose cost grows with its square.
    test_loader = DataLoader(test_set, batch_size=16, collate_fn=collate)
    print(
        f"data: token sequences of length {args.min_len}-{args.max_len} over "
        f"{args.vocab} tokens, class 1 iff token {SIGNAL} occurs, "
        f"{LABEL_NOISE:.0%} labels flipped; {args.n_train} training and "
        f"{args.n_test} test sequences"
    )

    # 2. The MAP network.
    clock = time.perf_counter()
    model = TinyTransformerClassifier(
        args.vocab, args.max_len, args.dim, args.layers, classes=2
    )
    n_total = sum(p.numel() for p in model.parameters())
    loss = train(model, train_loader, args.epochs, lr=3e-3)
    print(
        f"transformer: {args.layers} layers of width {args.dim}, {n_total} "
        f"parameters, {args.epochs} epochs: last batch loss {loss:.3f} "
        f"({time.perf_counter() - clock:.1f} s)\n"
    )
    results = {"map": evaluate(map_probs(model, test_loader), labels_of(test_loader))}

    # 3. Last-layer Laplace over the head, with two Hessian structures. The loader
    #    gives mappings: dict_key_x names the tensor that counts the examples,
    #    dict_key_y the targets; the model receives the whole mapping.
    for structure in ("kron", "diag"):
        results[f"last_layer_{structure}"] = fit_laplace(
            model,
            train_loader,
            test_loader,
            subset_of_weights="last_layer",
            hessian_structure=structure,
            last_layer_name="classifier",
            feature_reduction="pick_last",  # the model reads the last position
        )

    print("test scores (MAP vs last-layer Laplace, prior precision tuned by marglik):")
    print(row("MAP", results["map"]))
    for structure in ("kron", "diag"):
        result = results[f"last_layer_{structure}"]
        print(row(f"Laplace last layer {structure}", result))
        print(
            f"  {'':<26} {result['n_params']} parameters, prior precision "
            f"{result['prior_precision']:.3g} ({result['seconds']:.1f} s)"
        )

    # 4. Parameter-efficient fine-tuning: only the last encoder layer and the head
    #    are trainable. Laplace with subset_of_weights="all" then covers exactly the
    #    parameters with requires_grad=True.
    model.requires_grad_(False)
    model.encoder.layers[-1].requires_grad_(True)
    model.classifier.requires_grad_(True)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock = time.perf_counter()
    peft_loader = shuffled_loader(train_set, args.batch_size, seed=args.seed + 1)
    loss = train(model, peft_loader, args.peft_epochs, lr=1e-3)
    print(
        f"\nPEFT: last encoder layer + head trainable ({n_trainable} of {n_total} "
        f"parameters), {args.peft_epochs} epochs: last batch loss {loss:.3f} "
        f"({time.perf_counter() - clock:.1f} s)"
    )
    results["peft_map"] = evaluate(
        map_probs(model, test_loader), labels_of(test_loader)
    )
    results["peft_diag"] = fit_laplace(
        model,
        train_loader,
        test_loader,
        subset_of_weights="all",
        hessian_structure="diag",
    )
    results["peft_diag"]["n_trainable"] = n_trainable
    print(row("PEFT MAP", results["peft_map"]))
    print(row("PEFT Laplace diag", results["peft_diag"]))
    print(
        f"  {'':<26} {results['peft_diag']['n_params']} parameters, prior precision "
        f"{results['peft_diag']['prior_precision']:.3g} "
        f"({results['peft_diag']['seconds']:.1f} s)"
    )

    # 5. The reliability diagrams.
    save_reliability_diagram(
        {
            "MAP": results["map"],
            "Laplace last layer kron": results["last_layer_kron"],
            "Laplace last layer diag": results["last_layer_diag"],
            "PEFT MAP": results["peft_map"],
            "PEFT Laplace diag": results["peft_diag"],
        },
        args.out,
    )
    print(f"\nreliability diagrams written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
