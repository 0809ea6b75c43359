"""Calibrating a LoRA-fine-tuned causal language model on a multiple-choice task.

A language model answers a multiple-choice question with the next-token logits of
the answer tokens (" A", " B", " C", " D") after the prompt. Fine-tuned on a few
questions, it becomes over-confident; a Laplace approximation over the fine-tuned
weights corrects that. The steps:

1. a GPT-2-architecture causal LM (``transformers.GPT2LMHeadModel``) built from a
   small config (nothing is downloaded) with a toy vocabulary: a padding token, an
   "Answer:" token, the four answer tokens, ``--n-topics`` topic words and
   ``--n-fillers`` filler words. Each topic word belongs to one answer, and the
   model is pretrained here, all weights, on the next tokens of documents that
   list topic words each followed by its answer token: it knows the answers, not
   yet the question format;
2. a synthetic multiple-choice task: a question is filler words with one topic
   word among them, followed by "Answer:", and its answer is the topic word's;
   ``--label-noise`` of the answers are replaced by a random other one, and there
   are few training questions, so that the fine-tuned model over-fits;
3. LoRA adapters (``peft``, on the attention's ``c_attn``) fine-tuned on the
   cross-entropy of the answer tokens: ``laplace.utils.AnswerTokenModel`` wraps the
   LM into a 4-class classifier whose logits are those of the answer tokens at the
   last real position of each (right-padded) prompt, without vocabulary-sized
   logits;
4. Laplace approximations around the fine-tuned weights, each with its prior
   precision tuned by the marginal likelihood: over the LoRA weights only
   (``subset_of_weights="all"``: the base model and the answer head are frozen),
   Kronecker-factored and diagonal, and over the answer head as the last layer
   (``head_requires_grad=True``), Kronecker-factored;
5. on held-out questions: accuracy, negative log-likelihood (NLL), Brier score and
   expected calibration error (ECE, 10 bins of confidence) of the MAP model and of
   the Laplace predictives (linearized, "glm", probit link), and their reliability
   diagrams (the metrics and diagrams of ``examples/_calibration.py``), saved to a
   PNG file whose path it prints.

Run with ``python examples/lora_multiple_choice_example.py`` (``--help`` for the
options); it needs ``transformers`` and ``peft`` (the ``llm`` extra) and runs in
under a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from laplace import Laplace
from laplace.utils import AnswerTokenModel

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration import evaluate, save_reliability_diagram  # noqa: E402
from _common import add_common_arguments, torch_threads  # noqa: E402

DEFAULT_OUT = (
    Path(__file__).resolve().parent / "output" / "lora_multiple_choice_example.png"
)
PAD, ANSWER = 0, 1  # the padding token and the "Answer:" token ending each prompt
ANSWER_TOKENS = (2, 3, 4, 5)  # " A", " B", " C", " D"
FIRST_WORD = 6  # the words are the tokens FIRST_WORD, FIRST_WORD + 1, ...
PAIRS = 8  # (topic word, answer token) pairs per pretraining document
# the Laplace approximations compared: (name, subset_of_weights, hessian_structure)
CONFIGS = (
    ("Laplace LoRA kron", "all", "kron"),
    ("Laplace LoRA diag", "all", "diag"),
    ("Laplace head kron", "last_layer", "kron"),
)


# ----------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------


class MultipleChoice(Dataset):
    """Questions of ``min_len`` to ``max_len`` words and the index of their answer.

    A question is filler words with one topic word at a random position; its answer
    is the group of the topic word, ``groups[topic]``, replaced by a random other
    answer with probability ``label_noise``. Topic words are the tokens
    ``FIRST_WORD + t``, fillers follow them.
    """

    def __init__(self, n, groups, n_fillers, min_len, max_len, label_noise, seed):
        g = torch.Generator().manual_seed(seed)
        n_topics, n_answers = len(groups), len(ANSWER_TOKENS)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
        topics = torch.randint(0, n_topics, (n,), generator=g)
        self.prompts = []
        for length, topic in zip(lengths, topics.tolist()):
            words = torch.randint(0, n_fillers, (length,), generator=g) + n_topics
            words[torch.randint(0, length, (), generator=g)] = topic
            self.prompts.append(torch.cat([words + FIRST_WORD, torch.tensor([ANSWER])]))
        clean = groups[topics]
        shift = torch.randint(1, n_answers, (n,), generator=g)
        noisy = torch.rand(n, generator=g) < label_noise
        self.labels = torch.where(noisy, (clean + shift) % n_answers, clean)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.prompts[i], "labels": self.labels[i]}


def pretraining_documents(n, groups, pairs, seed) -> torch.Tensor:
    """``(n, 2 * pairs)`` token sequences: topic words each followed by the answer
    token of its group (the knowledge the base model is pretrained on)."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randint(0, len(groups), (n, pairs), generator=g)
    answers = torch.tensor(ANSWER_TOKENS)[groups[topics]]
    return torch.stack([topics + FIRST_WORD, answers], dim=2).flatten(1)


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad the prompts on the RIGHT (GPT-2's tokenizers do by default) into a batch
    of ``input_ids``, ``attention_mask`` and ``labels`` (the answer's index)."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = e["input_ids"]
        attention_mask[row, :n] = 1
    labels = torch.stack([e["labels"] for e in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------


def gpt2(args: argparse.Namespace):
    """A GPT-2 causal LM from a small config (no dropout), randomly initialized."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=4,
        vocab_size=FIRST_WORD + args.n_topics + args.n_fillers,
        n_positions=max(args.max_len + 1, 2 * PAIRS),
        pad_token_id=PAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def pretrain(lm, documents: torch.Tensor, epochs: int, batch_size: int) -> float:
    """AdamW on the next-token cross-entropy of the documents, all weights."""
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    shuffle = torch.Generator().manual_seed(0)
    lm.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(documents), generator=shuffle).split(batch_size):
            ids = documents[rows]
            logits = lm(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    lm.eval()
    return loss.item()


def with_lora(lm, args: argparse.Namespace):
    """The LM with LoRA adapters on ``c_attn``: the only trainable weights."""
    import peft

    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        target_modules=["c_attn"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight as (in, out)
        lora_dropout=0.0,
    )
    return peft.get_peft_model(lm, lora)


def fine_tune(model, loader: DataLoader, epochs: int, lr: float) -> float:
    """AdamW on the cross-entropy of the answer tokens, over the parameters that
    require grad (the LoRA weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch), batch["labels"])
            loss.backward()
            optimizer.step()
    model.eval()
    return loss.item()


# ----------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------


@torch.no_grad()
def map_probs(model, loader: DataLoader) -> torch.Tensor:
    return torch.cat([model(batch).softmax(-1) for batch in loader])


def labels_of(loader: DataLoader) -> torch.Tensor:
    return torch.cat([batch["labels"] for batch in loader])


def fit_laplace(model, train_loader, test_loader, subset, structure) -> dict:
    """Fit, tune the prior precision by marglik and score one Laplace predictive."""
    clock = time.perf_counter()
    la = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=structure
    )
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = torch.cat(
        [la(b, pred_type="glm", link_approx="probit").detach() for b in test_loader]
    )
    result = evaluate(probs, labels_of(test_loader))
    result["prior_precision"] = float(la.prior_precision.mean())
    result["n_params"] = int(la.n_params)
    result["seconds"] = time.perf_counter() - clock
    return result


def row(name: str, result: dict) -> str:
    return (
        f"| {name} | {result['accuracy']:.3f} | {result['confidence']:.3f} | "
        f"{result['nll']:.3f} | {result['brier']:.3f} | {result['ece']:.3f} |"
    )


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-topics", type=int, default=40, help="topic words")
    parser.add_argument("--n-fillers", type=int, default=20, help="filler words")
    parser.add_argument(
        "--n-documents", type=int, default=2000, help="pretraining documents"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=200, help="training questions")
    parser.add_argument("--n-test", type=int, default=2000, help="test questions")
    parser.add_argument("--min-len", type=int, default=5, help="shortest question")
    parser.add_argument("--max-len", type=int, default=12, help="longest question")
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 layers")
    parser.add_argument("--width", type=int, default=64, help="GPT-2 width")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--epochs", type=int, default=80, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the example; returns the scores it prints (and the confidence bins of
    the diagrams), per predictive."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the base model's and the adapters' weights

    # 1. Pretraining: the base model learns each topic word's answer token.
    groups = torch.randperm(args.n_topics, generator=torch.Generator().manual_seed(0))
    groups = groups % len(ANSWER_TOKENS)  # the answer of each topic word
    clock = time.perf_counter()
    lm = gpt2(args)
    documents = pretraining_documents(args.n_documents, groups, PAIRS, args.seed)
    loss = pretrain(lm, documents, args.pretrain_epochs, batch_size=32)
    n_weights = sum(p.numel() for p in lm.parameters())
    print(
        f"pretraining: GPT-2 ({args.layers} layers, width {args.width}, {n_weights} "
        f"weights) on {args.n_documents} documents of (topic word, answer) pairs, "
        f"{args.pretrain_epochs} epochs: last batch loss {loss:.3f} "
        f"({time.perf_counter() - clock:.1f} s)"
    )

    # 2. The task: questions whose answer is the group of their topic word.
    data = (groups, args.n_fillers, args.min_len, args.max_len, args.label_noise)
    train_set = MultipleChoice(args.n_train, *data, seed=args.seed + 1)
    test_set = MultipleChoice(args.n_test, *data, seed=args.seed + 2)
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_set, args.batch_size, shuffle=True, collate_fn=collate, generator=shuffle
    )
    fit_loader = DataLoader(train_set, 64, collate_fn=collate)
    test_loader = DataLoader(test_set, 64, collate_fn=collate)
    print(
        f"task: questions of {args.min_len}-{args.max_len} words, one a topic word, "
        f"then 'Answer:'; the answer is the topic's, {args.label_noise:.0%} of the "
        f"answers replaced; {args.n_train} training and {args.n_test} test questions"
    )

    # 3. LoRA fine-tuning, through the wrapper: a 4-class model over the answer
    #    tokens whose only trainable weights are the adapters (peft froze the base
    #    model and its head, and the wrapper's answer head follows the LM's head).
    lm = with_lora(lm, args)
    model = AnswerTokenModel(lm, ANSWER_TOKENS)
    labels = labels_of(test_loader)
    zero_shot = evaluate(map_probs(model, test_loader), labels)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock = time.perf_counter()
    loss = fine_tune(model, train_loader, args.epochs, args.lr)
    print(
        f"before fine-tuning: test accuracy {zero_shot['accuracy']:.3f}\n"
        f"LoRA rank {args.rank} on c_attn ({n_lora} trainable weights), "
        f"{args.epochs} epochs: last batch loss {loss:.3f} "
        f"({time.perf_counter() - clock:.1f} s)\n"
    )
    results = {"MAP": evaluate(map_probs(model, test_loader), labels)}

    # 4. Laplace over the LoRA weights (the parameters that require grad), and over
    #    the answer head: a second wrapper of the same LM whose head requires grad.
    head_model = AnswerTokenModel(lm, ANSWER_TOKENS, head_requires_grad=True)
    for name, subset, structure in CONFIGS:
        wrapper = model if subset == "all" else head_model
        results[name] = fit_laplace(wrapper, fit_loader, test_loader, subset, structure)
        r = results[name]
        print(
            f"{name}: {r['n_params']} weights, prior precision "
            f"{r['prior_precision']:.3g} ({r['seconds']:.1f} s)"
        )

    print(f"\ntest scores on {args.n_test} held-out questions:\n")
    print("| method | accuracy | confidence | NLL | Brier | ECE |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        print(row(name, result))

    save_reliability_diagram(results, args.out, columns=2)
    print(f"\nreliability diagrams written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
