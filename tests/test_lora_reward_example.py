"""The LoRA reward-model example: its model scores pairs and single items alike, and
the example runs end to end in a reduced size, its Laplace approximations more
uncertain about the reward out of distribution than in it."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLES / "lora_reward_model_example.py"))


def small_model(example, device):
    torch.manual_seed(0)
    body = example["transformers"].GPT2Model(example["gpt2_config"](16, 1, 2))
    model = example["LoraRewardModel"](example["with_lora"](body, 2), 16)
    with torch.no_grad():  # the adapters' B starts at zero: make them count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.to(device=device, dtype=torch.float64).eval()


def test_the_reward_model_scores_pairs_and_single_items_alike(example, device):
    model = small_model(example, device)
    g = torch.Generator().manual_seed(0)
    sequences = example["random_sequences"](6, (3, 9), g)
    batch = example["collate_pairs"](
        [{"items": sequences[i : i + 2], "labels": torch.tensor(0)} for i in (0, 2, 4)]
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    pairs = model(batch)
    assert pairs.shape == (3, 2)

    # each sequence alone, padded to its own length (no padding at all): the same
    # reward as within its pair, padded to the batch's longest
    alone = torch.cat(
        [
            model(
                {k: v.to(device) for k, v in example["item_batches"]([s], 1)[0].items()}
            )
            for s in sequences
        ]
    )
    assert alone.shape == (6, 1)
    torch.testing.assert_close(pairs.reshape(6, 1), alone)

    # a batch of single items gives (batch, 1)
    items = {
        k: v.to(device) for k, v in example["item_batches"](sequences, 6)[0].items()
    }
    torch.testing.assert_close(model(items), alone)


def test_only_the_adapters_and_the_head_are_trainable(example, device):
    model = small_model(example, device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "head.weight",
        "body.base_model.model.h.0.attn.c_attn.lora_A.default.weight",
        "body.base_model.model.h.0.attn.c_attn.lora_B.default.weight",
    }


def test_the_true_reward_counts_good_minus_bad_tokens(example):
    good, bad = example["GOOD"], example["BAD"]
    seq = torch.tensor([[good[0], good[1], bad[0], 10, 0, 0], [bad[2]] * 3 + [0] * 3])
    torch.testing.assert_close(
        example["true_reward"](seq), example["REWARD_SCALE"] * torch.tensor([1.0, -3.0])
    )


def test_lora_reward_model_example(example, tmp_path, capsys):
    out = tmp_path / "plots" / "lora_reward.png"
    argv = ["--n-train", "500", "--n-test", "100", "--width", "32", "--layers", "2"]
    argv += ["--heads", "2", "--rank", "4", "--pretrain-epochs", "2", "--epochs", "6"]
    threads = torch.get_num_threads()
    result = example["main"]([*argv, "--seed", "0", "--out", str(out)])
    printed = capsys.readouterr().out

    assert torch.get_num_threads() == threads  # restored after the run
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"figure written to {out}" in printed
    assert "mean predicted reward std" in printed and "total time:" in printed
    # the reward model learned the preferences (about 70% at this size)
    assert result["reward_model"]["pair_accuracy"] > 0.6
    width, layers, rank = 32, 2, 4
    lora = layers * rank * (width + 3 * width)  # A (r x w) and B (3w x r) per block
    assert result["backbone"]["n_trainable"] == lora + width  # and the head
    names = ["in-distribution", "longer (32-64)", "half unseen tokens", "unseen tokens"]
    for name in names:
        assert f"  {name} " in printed
    for subset, structure in example["CONFIGS"]:
        la = result[f"{subset} {structure}"]
        assert f"{subset} {structure}" in printed
        # all weights: the adapters and the head; last layer: the head (no bias)
        assert la["n_params"] == (lora + width if subset == "all" else width)
        assert la["prior_precision"] > 0
        inside = la["in-distribution"]
        assert inside > 0
        # more uncertain out of distribution, by far with unseen tokens
        assert all(la[name] > inside for name in names[1:])
        assert la["half unseen tokens"] > 1.5 * inside
        assert la["unseen tokens"] > 1.5 * inside
