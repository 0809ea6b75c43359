"""The language-model examples run end to end: Hugging Face-style batches and reward
modeling. Small arguments and fixed seeds keep each under a few seconds."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def huggingface():
    return runpy.run_path(str(EXAMPLES / "huggingface_example.py"))


@pytest.fixture(scope="module")
def reward_modeling():
    return runpy.run_path(str(EXAMPLES / "reward_modeling_example.py"))


def test_batch_encoding_moves_to_a_device_as_a_new_mapping(huggingface):
    batch = huggingface["collate"](
        [
            {"input_ids": torch.tensor([5, 3, 7]), "labels": torch.tensor(1)},
            {"input_ids": torch.tensor([4]), "labels": torch.tensor(0)},
        ]
    )
    moved = batch.to("cpu")
    assert type(moved) is type(batch) and moved is not batch
    assert sorted(moved) == ["attention_mask", "input_ids", "labels"]
    # left padding: the last position of every row is a real token
    assert moved["input_ids"].tolist() == [[5, 3, 7], [0, 0, 4]]
    assert moved["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert moved["labels"].tolist() == [1, 0]


def test_huggingface_example(huggingface, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "huggingface.png"
    argv = ["--n-train", "400", "--n-test", "200", "--epochs", "6"]
    result = huggingface["main"](
        [*argv, "--peft-epochs", "1", "--seed", "0", "--out", str(out)]
    )
    printed = capsys.readouterr().out

    assert torch.get_num_threads() == threads  # restored after the run
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"reliability diagrams written to {out}" in printed
    for name in ("MAP", "Laplace last layer kron", "Laplace last layer diag"):
        assert f"  {name} " in printed
    assert "PEFT Laplace diag" in printed and "total time:" in printed
    assert printed.count("Brier ") == 5  # one per model

    # the MAP network learned the task (about 90% is the best: 10% label noise)
    assert result["map"]["accuracy"] > 0.7
    dim, classes = 32, 2
    for key in ("last_layer_kron", "last_layer_diag", "peft_diag"):
        map_key = "peft_map" if key == "peft_diag" else "map"
        la, map_ = result[key], result[map_key]
        assert 0.0 <= la["ece"] <= 1.0 and 0.0 <= la["brier"] <= 2.0
        assert sum(b.count for b in la["bins"]) == 200  # every test sequence
        assert la["accuracy"] >= map_["accuracy"] - 0.02
        assert la["nll"] < map_["nll"] + 0.1  # the Laplace predictive is not worse
        assert la["prior_precision"] > 0
    # last layer: the head's weights and biases
    assert result["last_layer_kron"]["n_params"] == dim * classes + classes
    assert result["last_layer_diag"]["n_params"] == dim * classes + classes
    # PEFT: exactly the trainable parameters (last encoder layer + head)
    peft = result["peft_diag"]
    assert peft["n_params"] == peft["n_trainable"]
    layer = 4 * dim * dim + 4 * dim + 2 * (2 * dim * dim) + 2 * dim + dim + 4 * dim
    assert peft["n_trainable"] == layer + dim * classes + classes
    assert f"{peft['n_trainable']} of " in printed


def test_reward_modeling_example(reward_modeling, tmp_path, capsys):
    out = tmp_path / "plots" / "reward.png"
    argv = ["--n-train", "1000", "--n-test", "200", "--epochs", "10"]
    result = reward_modeling["main"](
        [*argv, "--width", "16", "--seed", "0", "--out", str(out)]
    )
    printed = capsys.readouterr().out

    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"figure written to {out}" in printed
    assert "mean predicted reward std" in printed and "total time:" in printed
    assert result["reward_model"]["pair_accuracy"] > 0.85
    for subset, structure in reward_modeling["CONFIGS"]:
        la = result[f"{subset} {structure}"]
        assert f"{subset} {structure}" in printed
        if subset == "last_layer":
            assert la["n_params"] == 16  # the reward head: no bias
        assert la["prior_precision"] > 0
        stds = [la["in-distribution"]] + [
            la[f"ring |x| = {radius:g}"] for radius in reward_modeling["OOD_RADII"]
        ]
        assert all(std > 0 for std in stds)
        # the reward is more uncertain away from the training data, and more so
        # the farther
        assert stds == sorted(stds)
        assert stds[-1] > 2 * stds[0]
