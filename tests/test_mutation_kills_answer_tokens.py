"""Tests written to kill the survivors of the ``answer_tokens`` mutation stage
(``tools/mutation/answer_tokens.cfg``: laplace/utils/answer_tokens.py). Each test
names the mutants it kills. The oracle is the full LM's vocabulary-sized logits at
the last real position (``tests/test_answer_tokens.py``); the other causal LMs here
are built from GPT-2's blocks behind backbones of other signatures and outputs.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_answer_tokens import (
    ANSWERS,
    DTYPE,
    V,
    batch_last,
    build,
    causal_lm,
    lm_answer_logits,
    padded_batch,
)
from torch import nn

from laplace.utils import AnswerTokenModel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def logits_at_last(lm: nn.Module, batch: dict, ids: list[int]) -> torch.Tensor:
    """The full LM's logits at the last real position of each row, at ``ids``."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = lm(**kwargs).logits
    assert logits.shape[-1] == V
    return torch.stack([logits[n, t, ids] for n, t in enumerate(batch_last(batch))])


class GPT2Backbone(nn.Module):
    """GPT-2's transformer behind a fixed signature that takes no ``use_cache``
    and no other keyword, returning its hidden states ``(batch, seq_len, hidden)``
    as a plain tensor (``layout="tensor"``), as a tuple with its key/value cache
    (``"tuple"``, which then takes ``use_cache``), pooled at the last position
    ``(batch, hidden)`` (``"pooled"``) or time-major ``(seq_len, batch, hidden)``
    (``"time_major"``)."""

    def __init__(self, transformer: nn.Module, layout: str) -> None:
        super().__init__()
        self.transformer, self.layout = transformer, layout

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        if self.layout == "pooled":
            return hidden[:, -1]
        if self.layout == "time_major":
            return hidden.transpose(0, 1)
        return hidden


class CachingBackbone(GPT2Backbone):
    """A backbone that takes ``use_cache`` but no other keyword (no ``**kwargs``),
    returning ``(hidden, key/value cache)``."""

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, use_cache=True
    ):
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values


class OwnLM(nn.Module):
    """A causal LM that is not a ``transformers`` class: a backbone and an output
    embedding, with the attributes ``AnswerTokenModel`` reads."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.lm_head = backbone, head

    @property
    def base_model(self) -> nn.Module:
        return self.backbone

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        out = self.backbone(input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        return transformers.modeling_outputs.CausalLMOutput(logits=self.lm_head(hidden))


def test_the_repr_names_the_answer_ids(device):
    """Mutant: extra_repr 1 (no tests before)."""
    model = AnswerTokenModel(causal_lm("gpt2", device), ANSWERS)
    assert f"answer_ids={ANSWERS}" in repr(model)


def test_an_output_embedding_with_a_bias_gives_the_lms_logits(device):
    """Phi's LM head has a bias: the answer head copies its answer entries, and the
    logits are the LM's. Mutants: answer_head 6 (head built without a bias), 25
    (the bias not copied)."""
    config = transformers.PhiConfig(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
        intermediate_size=12, vocab_size=V, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.PhiForCausalLM(config).to(device, DTYPE).eval()
    bias = lm.get_output_embeddings().bias
    with torch.no_grad():  # a bias that matters (zero at initialization)
        bias.copy_(torch.linspace(-1, 1, V, dtype=DTYPE, device=device))
    model = AnswerTokenModel(lm, ANSWERS)
    torch.testing.assert_close(model.head.bias, bias[ANSWERS])
    for side in ("right", "left"):
        batch = padded_batch(side, device)
        torch.testing.assert_close(model(batch), lm_answer_logits(lm, batch))


def test_answer_ids_at_both_ends_of_the_vocabulary(device):
    """Ids 0 and ``V - 1`` are tokens like any other. Mutants: check_answer_ids 31
    (``1 <= i``), 32 (``0 < i``)."""
    lm = causal_lm("gpt2", device)
    ids = [V - 1, 0]
    model = AnswerTokenModel(lm, ids)
    assert model.answer_ids == (V - 1, 0)
    batch = padded_batch("left", device)
    torch.testing.assert_close(model(batch), logits_at_last(lm, batch, ids))


def test_building_the_wrapper_draws_no_random_numbers(device):
    """The head is built without initialization (its values are copied): the global
    random state is not used. Mutants: answer_head 7 (``device=None``), 12 (no
    ``device="meta"``): an initialized ``nn.Linear``."""
    lm = causal_lm("gpt2", device)
    before = torch.random.get_rng_state()
    AnswerTokenModel(lm, ANSWERS)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    "kind,lora", [("gpt2", False), ("gpt2", True), ("llama", True)]
)
def test_the_backbone_builds_no_key_value_cache(kind, lora, device):
    """The backbone is run without a key/value cache (a copy of every layer's keys
    and values that a single forward never reads). Mutants: __init__ 23, 25-30
    (``use_cache`` not passed as False), features 5 (not passed at all)."""
    lm = build(kind, lora, device)
    model = AnswerTokenModel(lm, ANSWERS)
    outputs = []
    handle = model.backbone.register_forward_hook(
        lambda module, args, out: outputs.append(out)
    )
    try:
        got = model(padded_batch("right", device))
    finally:
        handle.remove()
    assert len(outputs) == 1 and outputs[0].past_key_values is None
    torch.testing.assert_close(got, lm_answer_logits(lm, padded_batch("right", device)))


@pytest.mark.parametrize("backbone", [GPT2Backbone, CachingBackbone])
def test_backbones_of_other_signatures_and_outputs(backbone, device):
    """A backbone that returns a plain tensor and takes no ``use_cache``, and one
    that takes ``use_cache`` but no other keyword, both give the LM's logits.
    Mutants: __init__ 24 (``use_cache`` passed to a backbone without it), 25/26
    (another keyword passed), features 7 (a tensor output indexed as a tuple)."""
    gpt2 = causal_lm("gpt2", device)
    lm = OwnLM(backbone(gpt2.transformer, "tensor"), gpt2.lm_head)
    model = AnswerTokenModel(lm, ANSWERS)  # verified against OwnLM's logits
    for side in ("right", "left"):
        batch = padded_batch(side, device)
        torch.testing.assert_close(model(batch), lm_answer_logits(gpt2, batch))


@pytest.mark.parametrize("layout", ["pooled", "time_major"])
def test_hidden_states_of_another_layout_are_refused(layout, device):
    """Hidden states that are not ``(batch, seq_len, hidden)`` are refused with the
    backbone's name and both shapes. Mutants: features 13 (``and``: a 3-D time-major
    output passes), 18-21 (the message, its backbone and shapes)."""
    gpt2 = causal_lm("gpt2", device)
    lm = OwnLM(GPT2Backbone(gpt2.transformer, layout), gpt2.lm_head)
    model = AnswerTokenModel(lm, ANSWERS, verify=False)
    batch = padded_batch("right", device)  # input ids (5, 6)
    shape = (5, 8) if layout == "pooled" else (6, 5, 8)
    message = (
        f"The backbone GPT2Backbone returned hidden states of shape {shape} for "
        "input ids of shape (5, 6); (batch, seq_len, hidden) was expected."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model(batch)


def test_a_module_without_output_embeddings_is_refused(device):
    """A module with no ``get_output_embeddings`` at all (not a ``transformers``
    model) gets the same ValueError, naming its class. Mutants: causal_lm_parts 70
    (AttributeError), 75 (``None()``), 79 (the class not named)."""
    model = nn.Sequential(nn.Linear(3, 3)).to(device, DTYPE)
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no output embed"):
        AnswerTokenModel(model, [0, 1])


def test_output_embeddings_that_are_no_linear_are_refused(device):
    """Mutants: causal_lm_parts 89 (no message), 90/91 (the LM's and the
    embedding's classes not named)."""
    gpt2 = causal_lm("gpt2", device)
    lm = OwnLM(GPT2Backbone(gpt2.transformer, "tensor"), gpt2.transformer.wte)
    match = "The output embeddings of OwnLM are a Embedding; .* needs an nn.Linear"
    with pytest.raises(TypeError, match=match):
        AnswerTokenModel(lm, ANSWERS)


class NoBackbone(nn.Module):
    """An output embedding but no ``base_model`` (``itself=False``), or a
    ``base_model`` that is the model itself (``itself=True``, as ``transformers``
    gives for a model without its base-model attribute)."""

    def __init__(self, head: nn.Module, itself: bool) -> None:
        super().__init__()
        self.lm_head, self.itself = head, itself

    def __getattr__(self, name: str):
        if name == "base_model" and self.__dict__.get("itself"):
            return self
        return super().__getattr__(name)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


@pytest.mark.parametrize("itself", [False, True])
def test_an_lm_without_a_backbone_of_its_own_is_refused(itself, device):
    """Mutants: causal_lm_parts 97 (AttributeError without a ``base_model``), 100
    (``and``: a model that is its own ``base_model`` passes), 103/104 (the message
    and the model's class)."""
    lm = NoBackbone(nn.Linear(8, V).to(device, DTYPE), itself)
    assert (getattr(lm, "base_model", None) is lm) is itself
    with pytest.raises(ValueError, match=r"model \(NoBackbone\) has no base_model"):
        AnswerTokenModel(lm, ANSWERS)


class Adapted(nn.Module):
    """An adapter wrapper of its own that follows ``peft``'s convention
    (``get_base_model()``) but has no ``peft`` configuration."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def get_base_model(self) -> nn.Module:
        return self.lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


def test_a_wrapper_without_peft_configuration_is_unwrapped(device):
    """A model with ``get_base_model`` and no ``active_peft_config`` is no prompt
    learning: it is unwrapped and gives the LM's logits. Mutants: causal_lm_parts 21
    and 29 (AttributeError for the missing configuration), 32 (refused as prompt
    learning)."""
    lm = causal_lm("gpt2", device)
    model = AnswerTokenModel(Adapted(lm), ANSWERS)
    assert model.backbone is lm.transformer
    batch = padded_batch("right", device)
    torch.testing.assert_close(model(batch), lm_answer_logits(lm, batch))


def test_refusals_name_what_they_got(device):
    """The errors name the type, configuration or model they refuse. Mutants:
    causal_lm_parts 6 (``got NoneType``), 34 (the prompt-learning configuration),
    59 (the model with a logit transform); check_answer_ids 15 (``got NoneType``)."""
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module .*; got str\."):
        AnswerTokenModel("gpt2", ANSWERS)
    lm = causal_lm("gpt2", device)
    with pytest.raises(TypeError, match=r"sequence of token ids \(ints\); got str\."):
        AnswerTokenModel(lm, " A")
    prompt = peft.get_peft_model(
        lm, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(ValueError, match=r"prompt learning \(PromptTuningConfig\)"):
        AnswerTokenModel(prompt, ANSWERS)
    config = transformers.Gemma2Config(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, intermediate_size=12, vocab_size=V,
        max_position_embeddings=16,
    )  # fmt: skip
    gemma = transformers.Gemma2ForCausalLM(config).to(device)
    with pytest.raises(ValueError, match=r"model \(Gemma2ForCausalLM\) transforms"):
        AnswerTokenModel(gemma, ANSWERS)
