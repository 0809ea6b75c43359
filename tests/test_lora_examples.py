"""The LoRA multiple-choice example runs end to end: a reduced size in a few
seconds, and (slow) the default size, whose calibration the docs report."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = [
    "--n-topics", "20", "--n-documents", "1000", "--pretrain-epochs", "2",
    "--n-train", "100", "--n-test", "300", "--epochs", "40", "--width", "32",
    "--rank", "4", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLES / "lora_multiple_choice_example.py"))


def run(example, argv, out, capsys):
    threads = torch.get_num_threads()
    result = example["main"]([*argv, "--out", str(out)])
    printed = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # restored after the run
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"reliability diagrams written to {out}\n" in printed
    return result, printed


def test_collate_pads_on_the_right(example):
    batch = example["collate"](
        [
            {"input_ids": torch.tensor([7, 8, 1]), "labels": torch.tensor(2)},
            {"input_ids": torch.tensor([9, 1]), "labels": torch.tensor(0)},
        ]
    )
    assert batch["input_ids"].tolist() == [[7, 8, 1], [9, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [2, 0]


def test_questions_end_with_the_answer_token_and_carry_their_noise(example):
    groups = torch.arange(20) % 4
    data = example["MultipleChoice"](2000, groups, 10, 3, 6, 0.25, seed=0)
    first, answer = example["FIRST_WORD"], example["ANSWER"]
    clean = []
    for prompt in data.prompts:
        assert prompt[-1] == answer and 4 <= len(prompt) <= 7
        words = prompt[:-1] - first
        topics = words[words < 20]
        assert len(topics) == 1 and (words[words >= 20] < 30).all()
        clean.append(groups[topics[0]])
    noisy = (torch.stack(clean) != data.labels).float().mean().item()
    assert abs(noisy - 0.25) < 0.03


def test_lora_multiple_choice_example(example, tmp_path, capsys):
    result, printed = run(example, SMALL, tmp_path / "mc.png", capsys)
    assert "| method | accuracy | confidence | NLL | Brier | ECE |" in printed
    assert "total time:" in printed
    names = ["MAP"] + [name for name, _, _ in example["CONFIGS"]]
    assert list(result) == names
    for name in names:
        assert f"| {name} | " in printed
    map_ = result["MAP"]
    assert map_["accuracy"] > 0.5  # learnt (chance 0.25; at most ~0.8 with noise)
    lora_weights = 2 * (4 * 32 + 3 * 32 * 4)  # 2 layers of c_attn: A (r, d), B (3d, r)
    for name, subset, _ in example["CONFIGS"]:
        la = result[name]
        assert la["n_params"] == (lora_weights if subset == "all" else 4 * 32)
        assert la["prior_precision"] > 0
        assert sum(b.count for b in la["bins"]) == 300  # every test question
        assert la["accuracy"] >= map_["accuracy"] - 0.03
        assert la["nll"] < map_["nll"] + 0.05  # not worse than the MAP's


@pytest.mark.slow  # ~1 min: the default size, whose table docs/examples.md shows
def test_lora_multiple_choice_example_at_its_default_size(example, tmp_path, capsys):
    result, _ = run(example, [], tmp_path / "mc.png", capsys)
    map_ = result["MAP"]
    assert map_["confidence"] > map_["accuracy"] + 0.1  # over-confident
    for name, _, _ in example["CONFIGS"]:
        assert result[name]["ece"] < map_["ece"] - 0.03
        assert result[name]["nll"] < map_["nll"] - 0.1
