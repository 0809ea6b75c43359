"""A LoRA reward model on a transformer, with uncertainty: Laplace over the adapters.

Reward models of language models are usually a pretrained transformer fine-tuned on
preference pairs with low-rank adapters (LoRA): the backbone stays frozen, small
matrices ``B A`` are added to some of its weights, and a linear head reads the
reward off the last token. This script builds such a model in miniature and puts a
Laplace approximation over exactly the weights that were fine-tuned:

1. a tiny GPT-2 backbone (``transformers.GPT2Model`` from a small config, nothing
   downloaded), first trained as a causal language model on sequences of the tokens
   ``1 .. N_SEEN`` (a stand-in for pretraining), then frozen;
2. LoRA adapters on its attention projections (``peft.LoraConfig(r=...,
   target_modules=["c_attn"], fan_in_fan_out=True)``: GPT-2's ``Conv1D`` stores its
   weight as (in, out)) and a reward head without bias (preferences fix a reward
   up to a constant only) on the last real token, trained on Bradley-Terry
   preference pairs drawn from a hidden true reward: how often the "good" tokens
   occur minus how often the "bad" ones do;
3. ``Laplace(model, "reward_modeling", subset_of_weights="all",
   hessian_structure="kron")``: Kronecker-factored, over the parameters that
   require grad, the LoRA matrices and the head; and a last-layer one over the head
   alone; each with its prior precision tuned by marginal likelihood.

The model takes both shapes ``likelihood="reward_modeling"`` needs (see
``LoraRewardModel``): pairs ``input_ids`` of shape (batch, 2, T) at ``fit``, whose
two rewards (batch, 2) are the logits of "which item is preferred", and single items
(batch, T) at prediction, whose rewards are (batch, 1); ``la(batch)`` then returns a
Gaussian over the reward, mean (batch, 1) and variance (batch, 1, 1). Batches are
mappings (``input_ids``, ``attention_mask``, ``labels``), as Hugging Face models take
them.

It prints a table of the predicted reward's standard deviation on items like the
training ones and on items out of distribution: longer sequences (positions the
model never read) and sequences of tokens that never occur in training, where the
uncertainty grows. It saves a figure of the same to a PNG file whose path it prints:
the mean predicted std against the share of unseen tokens and against the sequence
length.

Run with ``python examples/lora_reward_model_example.py`` (``--help`` for the
options). It runs in about half a minute on one CPU thread.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import peft
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset

from laplace import Laplace

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, torch_threads  # noqa: E402

matplotlib.use("Agg")  # draw into files only: no display needed
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "lora_reward_model.png"
PAD = 0  # token 0 pads the sequences (on the right)
N_SEEN = 15  # training uses the tokens 1 .. N_SEEN ...
VOCAB = 32  # ... and never the tokens N_SEEN + 1 .. VOCAB - 1
GOOD, BAD = (1, 2, 3), (4, 5, 6)  # the hidden reward counts these
REWARD_SCALE = 1.0  # the true reward is REWARD_SCALE * (#good - #bad)
MAX_POSITIONS = 64  # the longest sequence the model can read

#: the Laplace approximations shown: (subset_of_weights, hessian_structure)
CONFIGS = [("all", "kron"), ("last_layer", "kron")]


# ----------------------------------------------------------------------------------
# Data: token sequences, preference pairs, batches that are mappings
# ----------------------------------------------------------------------------------


def true_reward(sequence: torch.Tensor) -> torch.Tensor:
    """The hidden reward of a sequence of tokens (..., T) -> (...)."""
    good = sum((sequence == t).sum(-1) for t in GOOD)
    bad = sum((sequence == t).sum(-1) for t in BAD)
    return REWARD_SCALE * (good - bad).float()


def random_sequences(
    n: int,
    lengths: tuple[int, int],
    generator: torch.Generator,
    unseen: float = 0.0,
) -> list[torch.Tensor]:
    """``n`` sequences of lengths drawn from ``lengths`` (inclusive), their tokens from
    ``1 .. N_SEEN``, each replaced by one of the unseen tokens with probability
    ``unseen``."""
    low, high = lengths
    out = []
    for k in torch.randint(low, high + 1, (n,), generator=generator).tolist():
        seq = torch.randint(1, N_SEEN + 1, (k,), generator=generator)
        swap = torch.rand(k, generator=generator) < unseen
        other = torch.randint(N_SEEN + 1, VOCAB, (k,), generator=generator)
        out.append(torch.where(swap, other, seq))
    return out


class PreferencePairs(Dataset):
    """Pairs of sequences and the index (0 or 1) of the preferred one.

    Bradley-Terry: item 0 is preferred with probability sigmoid(r(x0) - r(x1)) for
    the true reward ``r``.
    """

    def __init__(self, n: int, lengths: tuple[int, int], generator: torch.Generator):
        # n pairs of two sequences each
        self.pairs = [random_sequences(2, lengths, generator) for _ in range(n)]
        rewards = torch.stack(
            [torch.stack([true_reward(s) for s in pair]) for pair in self.pairs]
        )
        p_first = torch.sigmoid(rewards[:, 0] - rewards[:, 1])
        self.preferred = (torch.rand(n, generator=generator) >= p_first).long()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {"items": self.pairs[i], "labels": self.preferred[i]}


def pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences into ``input_ids`` (n, T) and ``attention_mask`` (n, T)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return input_ids, mask


def collate_pairs(examples: list[dict]) -> dict[str, torch.Tensor]:
    """A batch of pairs: ``input_ids`` and ``attention_mask`` (batch, 2, T) and the
    ``labels`` (batch,), the index of each pair's preferred item."""
    input_ids, mask = pad([s for e in examples for s in e["items"]])
    shape = (len(examples), 2, input_ids.shape[-1])
    return {
        "input_ids": input_ids.reshape(shape),
        "attention_mask": mask.reshape(shape),
        "labels": torch.stack([e["labels"] for e in examples]),
    }


def item_batches(sequences: list[torch.Tensor], batch_size: int) -> list[dict]:
    """Batches of single items: ``input_ids`` and ``attention_mask`` (batch, T)."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        input_ids, mask = pad(sequences[start : start + batch_size])
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------


def gpt2_config(width: int, layers: int, heads: int) -> transformers.GPT2Config:
    """A tiny GPT-2 over ``VOCAB`` tokens, every dropout 0."""
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_POSITIONS,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
    )


def pretrain(
    config: transformers.GPT2Config,
    sequences: list[torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[transformers.GPT2Model, float]:
    """A GPT-2 trained as a causal language model on ``sequences`` (the stand-in for
    a pretrained backbone); returns its body (without the LM head, in eval mode)
    and the last batch's loss (NaN without epochs).

    The sequences are uniform over the tokens ``1 .. N_SEEN``: the best loss is
    ``log N_SEEN``. What the backbone learns is which tokens occur; the embeddings
    of the others are never inputs, only pushed down as outputs (GPT-2 ties its
    output layer to its embedding), as those of rare tokens in a real LM.
    """
    lm = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    lm.train()
    for _ in range(epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [sequences[i] for i in order[start : start + batch_size]]
            input_ids, mask = pad(chunk)
            logits = lm(input_ids=input_ids, attention_mask=mask).logits
            # predict token t + 1 from the tokens up to t; no loss on the padding
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100
            )
            loss.backward()
            optimizer.step()
    return lm.transformer.eval(), loss.item()


class LoraRewardModel(nn.Module):
    """A reward model: a (LoRA-adapted) transformer body and a linear head without bias
    on the hidden state of each sequence's last real token.

    ``forward`` takes a mapping with ``input_ids`` and ``attention_mask`` of shape
    (batch, 2, T), pairs, and returns their two rewards (batch, 2), the logits of
    "which item is preferred"; or of shape (batch, T), single items, and returns
    their rewards (batch, 1). The head sees the last-token features as (batch, 2,
    width) or (batch, width), so last-layer Laplace uses the same head for both.
    """

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 1, bias=False)

    def forward(self, batch) -> torch.Tensor:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        leading = input_ids.shape[:-1]  # (batch, 2) or (batch,)
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        mask = mask.reshape(-1, mask.shape[-1])
        hidden = self.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        last = mask.sum(-1) - 1  # right padding: the last real token
        features = hidden[torch.arange(len(hidden), device=hidden.device), last]
        rewards = self.head(features.reshape(*leading, -1))  # (..., 1)
        return rewards.squeeze(-1) if len(leading) == 2 else rewards


def with_lora(body: nn.Module, rank: int) -> nn.Module:
    """``body`` with LoRA adapters of rank ``rank`` on its attention projections;
    every other weight frozen."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["c_attn"],
        fan_in_fan_out=True,  # GPT-2's Conv1D keeps its weight as (in, out)
    )
    return peft.get_peft_model(body, config)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """AdamW on the Bradley-Terry negative log-likelihood (the cross-entropy of the
    pair's two rewards), over the parameters that require grad."""
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


@torch.no_grad()
def pair_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """How often the model ranks a pair of different true rewards as the true reward
    does (noise-free)."""
    right = total = 0
    for batch in loader:
        truth = true_reward(batch["input_ids"] * batch["attention_mask"])
        keep = truth[:, 0] != truth[:, 1]
        ranked = model(batch).argmax(-1) == truth.argmax(-1)
        right += int(ranked[keep].sum())
        total += int(keep.sum())
    return right / max(total, 1)


# ----------------------------------------------------------------------------------
# Laplace and the figure
# ----------------------------------------------------------------------------------


def reward_std(la, batches: list[dict]) -> torch.Tensor:
    """The std (n,) of the predicted reward of the items of ``batches``."""
    stds = []
    for batch in batches:
        f_mu, f_var = la(batch)  # (b, 1) rewards and their (b, 1, 1) variances
        assert f_mu.shape == (len(batch["input_ids"]), 1)
        stds.append(f_var.detach().reshape(-1).sqrt())
    return torch.cat(stds)


def save_figure(approximations: dict, args, generator: torch.Generator) -> None:
    """The mean predicted reward std against the share of unseen tokens (training
    lengths) and against the sequence length (seen tokens), one curve per
    approximation, each relative to its in-distribution mean."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    shares = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    lengths = [4, 8, 12, 16, 24, 32, 40, 48, MAX_POSITIONS]
    n = max(args.n_test // 4, 16)
    for name, la in approximations.items():
        by_share = [
            reward_std(
                la, item_batches(random_sequences(n, args.lengths, generator, s), 64)
            ).mean()
            for s in shares
        ]
        by_length = [
            reward_std(
                la, item_batches(random_sequences(n, (k, k), generator), 64)
            ).mean()
            for k in lengths
        ]
        left.plot(shares, by_share, marker="o", label=name)
        right.plot(lengths, by_length, marker="o", label=name)
    left.set(
        xlabel="share of tokens never seen in training",
        ylabel="mean predicted reward std",
        yscale="log",
        title=f"Unseen tokens (lengths {args.lengths[0]}-{args.lengths[1]})",
    )
    right.axvspan(*args.lengths, color="0.85", label="training lengths")
    right.set(
        xlabel="sequence length (tokens seen in training)",
        ylabel="mean predicted reward std",
        yscale="log",
        title="Longer sequences than in training",
    )
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.suptitle("LoRA reward model (tiny GPT-2): the reward's uncertainty")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000, help="training pairs")
    parser.add_argument("--n-test", type=int, default=400, help="test items per set")
    parser.add_argument(
        "--lengths", type=int, nargs=2, default=(8, 16), help="training lengths"
    )
    parser.add_argument("--width", type=int, default=64, help="transformer width")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=3, help="language-model epochs"
    )
    parser.add_argument("--epochs", type=int, default=6, help="reward epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the example; returns the reward model's scores and, per Laplace
    approximation ("all kron", "last_layer kron"), its number of parameters, tuned
    prior precision and mean predicted reward std on each test set."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # initial weights
    generator = torch.Generator().manual_seed(args.seed)  # data and shuffling
    lengths = tuple(args.lengths)

    # 1. A backbone "pretrained" as a language model on sequences of seen tokens.
    clock = time.perf_counter()
    config = gpt2_config(args.width, args.layers, args.heads)
    corpus = random_sequences(2 * args.n_train, lengths, generator)
    body, lm_loss = pretrain(
        config, corpus, args.pretrain_epochs, args.batch_size, args.seed
    )
    print(
        f"backbone: GPT-2, {args.layers} layers of width {args.width}, trained as a "
        f"language model on {len(corpus)} sequences of tokens 1-{N_SEEN}, "
        f"{args.pretrain_epochs} epochs: last batch loss {lm_loss:.3f} (at best "
        f"log {N_SEEN} = {math.log(N_SEEN):.3f}) "
        f"({time.perf_counter() - clock:.1f} s)"
    )

    # 2. The reward model: LoRA adapters on the frozen backbone, a reward head.
    train_set = PreferencePairs(args.n_train, lengths, generator)
    test_set = PreferencePairs(args.n_test, lengths, generator)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate_pairs,
        generator=torch.Generator().manual_seed(args.seed),
    )
    test_loader = DataLoader(test_set, batch_size=64, collate_fn=collate_pairs)
    clock = time.perf_counter()
    model = LoraRewardModel(with_lora(body, args.rank), args.width)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    loss = train(model, loader, args.epochs, lr=3e-3)
    accuracy = pair_accuracy(model, test_loader)
    print(
        f"reward model: LoRA rank {args.rank} on c_attn + head, {n_trainable:,} of "
        f"{n_total:,} weights trainable, {args.epochs} epochs on {args.n_train} "
        f"preference pairs: last batch loss {loss:.3f}; {accuracy:.1%} of the test "
        f"pairs ranked as by the true reward ({time.perf_counter() - clock:.1f} s)\n"
    )

    # 3. Test sets of SINGLE items: like the training ones, longer, of unseen
    #    tokens.
    long = (2 * lengths[1], MAX_POSITIONS)
    test_sets = {
        "in-distribution": random_sequences(args.n_test, lengths, generator),
        f"longer ({long[0]}-{long[1]})": random_sequences(args.n_test, long, generator),
        "half unseen tokens": random_sequences(args.n_test, lengths, generator, 0.5),
        "unseen tokens": random_sequences(args.n_test, lengths, generator, 1.0),
    }
    test_batches = {name: item_batches(s, 64) for name, s in test_sets.items()}

    # 4. Laplace over the trainable weights (the LoRA matrices and the head) and over
    #    the head alone: fitted on the loader of pairs, queried on single items.
    results: dict[str, dict[str, float]] = {}
    approximations = {}
    for subset, structure in CONFIGS:
        clock = time.perf_counter()
        la = Laplace(
            model,
            "reward_modeling",
            subset_of_weights=subset,
            hessian_structure=structure,
        )
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
        result = {
            "n_params": int(la.n_params),
            "prior_precision": float(la.prior_precision.mean()),
        }
        for name, batches in test_batches.items():
            result[name] = reward_std(la, batches).mean().item()
        result["seconds"] = time.perf_counter() - clock
        results[f"{subset} {structure}"] = result
        approximations[f"{subset} {structure}"] = la

    # 5. The table.
    print("mean predicted reward std (Laplace, prior precision tuned by marglik):")
    print(f"  {'test items':<22}" + "".join(f"{key:>18}" for key in results))
    for name in test_sets:
        print(f"  {name:<22}" + "".join(f"{r[name]:>18.3f}" for r in results.values()))
    for label, key, fmt in [
        ("parameters", "n_params", ",d"),
        ("prior precision", "prior_precision", ".3g"),
        ("time (s)", "seconds", ".1f"),
    ]:
        cells = "".join(f"{r[key]:>18{fmt}}" for r in results.values())
        print(f"  {label:<22}{cells}")

    # 6. The figure.
    save_figure(approximations, args, generator)
    print(f"\nfigure written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return {
        "reward_model": {"loss": loss, "pair_accuracy": accuracy},
        "backbone": {"lm_loss": lm_loss, "n_trainable": n_trainable},
        **results,
    }


if __name__ == "__main__":
    main()
