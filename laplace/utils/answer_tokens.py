"""The answer tokens of a causal language model as a classifier.

A multiple-choice or yes/no question put to a causal language model is answered by
the next-token logits of a few answer tokens (" A", " B", " C", " D"; " yes",
" no") at the last position of the prompt: ``logits[n, last_n, ids]``, a
``(batch, n_answers)`` classifier. ``AnswerTokenModel`` computes exactly these
logits without the vocabulary: the backbone's last hidden state at the last real
position, times the answer rows of the output embedding. A Laplace approximation
of it (over LoRA weights, or over the answer head as its last layer) then never
forms a vocabulary-sized tensor: its Jacobians are ``(batch, n_answers, P)``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
from torch import nn

from laplace.utils.feature_extractor import _last_kept

Tensor = torch.Tensor

__all__ = ["AnswerTokenModel"]

#: the keys of a mapping batch that are passed on to the backbone (``labels`` and
#: anything else are not)
BACKBONE_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")

#: configuration attributes of ``transformers`` models that transform the logits
#: after the output embedding (Gemma 2's soft-capping, Cohere's and Granite's
#: scales), with their neutral value: a model with another value is refused
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
}


class AnswerTokenModel(nn.Module):
    """The logits of a causal LM's answer tokens at the last real position.

    ``AnswerTokenModel(lm, answer_ids)(x)`` equals ``lm(x).logits[n, last_n,
    answer_ids]`` for every row ``n``, where ``last_n`` is the last position whose
    ``attention_mask`` is 1 (left and right padding alike), but computes it as
    ``head(h[n, last_n])`` from the backbone's last hidden states ``h`` ``(batch,
    seq_len, hidden)``: no ``(batch, seq_len, vocab)`` logits are formed, and the
    Jacobians of a Laplace approximation are ``(batch, n_answers, P)``.

    Parameters
    ----------
    model : nn.Module
        a ``transformers`` causal language model (``*ForCausalLM``), possibly
        wrapped by ``peft`` (LoRA and the other adapters that modify the model's
        layers; prompt learning, which adds virtual tokens, is refused). Its
        logits must be its output embedding (``get_output_embeddings()``, an
        ``nn.Linear``) applied to its backbone's (``base_model``) last hidden
        state, as in GPT-2, Llama, Mistral, GPT-NeoX or OPT; this is checked when
        ``verify`` is True.
    answer_ids : sequence of int or 1-D integer tensor
        the token ids of the answers, distinct and within the vocabulary; the
        outputs follow their order (class ``k`` is ``answer_ids[k]``).
    head_requires_grad : bool, optional
        whether the answer head's parameters require grad; by default as the LM's
        output embedding does (frozen under ``peft``, trainable in a model whose
        weights all are).
    verify : bool, default=True
        compare, once, the wrapper's logits with the LM's own on a two-token input
        and refuse a model that computes its logits otherwise (a logit scale or
        soft-capping, a backbone that is not the one of the head). This forms
        vocabulary-sized logits of that one input.

    Attributes
    ----------
    backbone : nn.Module
        the LM's ``base_model`` (the ``peft`` adapters are in its layers): input ids
        to hidden states.
    head : nn.Linear
        ``(n_answers, hidden)``: a **copy** of the output embedding's rows (and bias
        entries) of ``answer_ids``, with parameters of its own. A last-layer
        Laplace treats exactly these ``n_answers * hidden`` weights; the LM's
        output embedding (often tied to its input embedding) is not touched.
    answer_ids : tuple of int
        the answer token ids.

    Notes
    -----
    Which parameters a Laplace approximation treats:

    - ``subset_of_weights="last_layer"``: the head (found as the last layer, or
      named with ``last_layer_name="head"``); its parameters must require grad,
      so pass ``head_requires_grad=True`` for a ``peft`` model.
    - ``subset_of_weights="all"``: the parameters of the wrapper that require grad:
      with ``peft``, the adapter weights only (and the head if
      ``head_requires_grad=True``); otherwise every trainable weight of the
      backbone and the head. An untied LM head is not part of the wrapper.

    The wrapper leaves the LM as it found it: no hooks, attributes or flags are
    added (``verify`` runs the LM in eval mode and restores each module's mode).
    Inputs are a mapping with ``input_ids`` and optionally ``attention_mask`` and
    ``position_ids`` (only these go to the backbone, so the ``labels`` of a batch
    are ignored) or a tensor of input ids ``(batch, seq_len)`` (the last position
    of each row is then the last real one). A row with no real token is refused.

    Examples
    --------
    >>> model = AnswerTokenModel(lm, tokenizer.convert_tokens_to_ids(["ĠA", "ĠB"]))
    >>> la = Laplace(model, "classification", subset_of_weights="all",
    ...              hessian_structure="kron")
    >>> la.fit(loader)  # batches: input_ids, attention_mask, labels (answer index)
    >>> probs = la(batch)  # (batch, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        answer_ids: Sequence[int] | Tensor,
        head_requires_grad: bool | None = None,
        verify: bool = True,
    ) -> None:
        super().__init__()
        backbone, output_embeddings = causal_lm_parts(model)
        ids = check_answer_ids(answer_ids, output_embeddings.out_features)
        if head_requires_grad is None:
            head_requires_grad = output_embeddings.weight.requires_grad
        self.backbone = backbone
        self.head = answer_head(output_embeddings, ids)
        self.head.requires_grad_(bool(head_requires_grad))
        self.answer_ids = ids
        accepted = inspect.signature(backbone.forward).parameters
        self._backbone_kwargs = {"use_cache": False} if "use_cache" in accepted else {}
        if verify:
            self._verify(model)

    def extra_repr(self) -> str:
        return f"answer_ids={list(self.answer_ids)}"

    def forward(self, x: Tensor | Mapping[str, Any]) -> Tensor:
        """Answer logits ``(batch, n_answers)`` of input ids ``(batch, seq_len)`` or
        of a mapping holding them (see the class notes)."""
        return self.head(self.features(x))

    def features(self, x: Tensor | Mapping[str, Any]) -> Tensor:
        """The backbone's last hidden state at the last real position of each
        row, ``(batch, hidden)``: the head's input."""
        inputs = backbone_inputs(x)
        out = self.backbone(**inputs, **self._backbone_kwargs)
        hidden = out if isinstance(out, Tensor) else out[0]
        ids = inputs["input_ids"]
        if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
            raise ValueError(
                f"The backbone {type(self.backbone).__name__} returned hidden states "
                f"of shape {tuple(hidden.shape)} for input ids of shape "
                f"{tuple(ids.shape)}; (batch, seq_len, hidden) was expected."
            )
        mask = inputs.get("attention_mask")
        if mask is None:
            return hidden[:, -1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, _last_kept(mask).to(hidden.device)]

    @torch.no_grad()
    def _verify(self, model: nn.Module) -> None:
        """Refuse ``model`` unless its logits at the answer ids equal the wrapper's
        on a two-token input (each module's train/eval mode is restored)."""
        weight = self.head.weight
        probe = torch.tensor([[self.answer_ids[0], self.answer_ids[-1]]])
        probe = probe.to(weight.device)
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            out = model(input_ids=probe)
            logits = out.logits if hasattr(out, "logits") else out[0]
            expected = logits[:, -1, list(self.answer_ids)]
            try:
                got = self(probe)
            except RuntimeError as error:
                raise ValueError(
                    f"The answer head (hidden size {weight.shape[1]}, from the output "
                    "embedding) does not apply to the hidden states of the backbone "
                    f"{type(self.backbone).__name__}: {error}"
                ) from error
        finally:
            for module, training in modes:
                module.training = training
        tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(weight.dtype, 5e-2)
        gap = (got - expected).abs().max().item()
        if not gap <= tol * (1 + expected.abs().max().item()):
            raise ValueError(
                f"{type(model).__name__}'s logits at the answer ids differ from its "
                f"output embedding applied to its base_model's last hidden state (by "
                f"up to {gap:.3g}): the model transforms its logits further (a scale, "
                "soft-capping) or its base_model is not what feeds its head. "
                "AnswerTokenModel supports causal LMs whose logits are "
                "get_output_embeddings()(base_model(...).last_hidden_state)."
            )


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(backbone, output_embeddings)`` of a causal LM, ``peft`` unwrapped.

    Raises
    ------
    TypeError
        for a model that is no ``nn.Module`` or whose output embedding is no
        ``nn.Linear``.
    ValueError
        for a ``peft`` prompt-learning model, a model whose configuration
        transforms its logits (``LOGIT_TRANSFORMS``), a model without output
        embeddings, or one whose ``base_model`` is the model itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module (a causal LM); got "
            f"{type(model).__name__}."
        )
    lm = model
    peft = sys.modules.get("peft")  # imported if model is a peft model
    mixed = getattr(peft, "PeftMixedModel", None) if peft is not None else None
    if mixed is not None and isinstance(model, mixed):  # its tuner wraps the LM
        lm = model = model.base_model.model
    if callable(getattr(model, "get_base_model", None)):  # a peft model
        config = getattr(model, "active_peft_config", None)
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"model is a peft model with prompt learning ({type(config).__name__}),"
                " whose virtual tokens AnswerTokenModel cannot reproduce; adapters "
                "that modify the layers (LoRA, IA3, ...) are supported."
            )
        lm = model.get_base_model()
    config = getattr(lm, "config", None)
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value != neutral:
            raise ValueError(
                f"model ({type(lm).__name__}) transforms its logits after the output "
                f"embedding (config.{name}={value!r}): its answer-token logits are "
                "not the answer rows of the output embedding, which AnswerTokenModel "
                "computes."
            )
    get_output_embeddings = getattr(lm, "get_output_embeddings", None)
    embeddings = get_output_embeddings() if callable(get_output_embeddings) else None
    if embeddings is None:
        raise ValueError(
            f"model ({type(lm).__name__}) has no output embeddings "
            "(get_output_embeddings() gives none): AnswerTokenModel needs a causal "
            "language model with a head over the vocabulary, e.g. a "
            "transformers *ForCausalLM."
        )
    if not isinstance(embeddings, nn.Linear):
        raise TypeError(
            f"The output embeddings of {type(lm).__name__} are a "
            f"{type(embeddings).__name__}; AnswerTokenModel needs an nn.Linear."
        )
    backbone = getattr(lm, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is lm:
        raise ValueError(
            f"model ({type(lm).__name__}) has no base_model apart from itself: "
            "AnswerTokenModel needs a transformers causal LM whose base_model maps "
            "input ids to the hidden states that its output embeddings read."
        )
    return backbone, embeddings


def check_answer_ids(
    answer_ids: Sequence[int] | Tensor, vocab_size: int
) -> tuple[int, ...]:
    """``answer_ids`` as a tuple of distinct ints in ``[0, vocab_size)``, else a
    ``TypeError`` or ``ValueError`` naming the argument."""
    if isinstance(answer_ids, Tensor):
        if answer_ids.ndim != 1 or answer_ids.is_floating_point():
            raise TypeError(
                "answer_ids must be a sequence of ints or a 1-D integer tensor; got "
                f"a tensor of shape {tuple(answer_ids.shape)}, {answer_ids.dtype}."
            )
        answer_ids = answer_ids.tolist()
    if isinstance(answer_ids, (str, bytes)) or not isinstance(answer_ids, Sequence):
        raise TypeError(
            "answer_ids must be a sequence of token ids (ints); got "
            f"{type(answer_ids).__name__}."
        )
    bad = [i for i in answer_ids if isinstance(i, bool) or not isinstance(i, Integral)]
    if bad:
        raise TypeError(
            f"answer_ids must be token ids (ints); got {bad!r} among them (convert "
            "answer strings with the tokenizer first)."
        )
    ids = tuple(int(i) for i in answer_ids)
    if not ids:
        raise ValueError("answer_ids must name at least one answer token; got none.")
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(
            f"answer_ids {outside} are outside the vocabulary: ids must be in "
            f"[0, {vocab_size})."
        )
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(
            f"answer_ids must be distinct; {repeated} occur more than once in "
            f"{list(ids)}."
        )
    return ids


def answer_head(output_embeddings: nn.Linear, answer_ids: Sequence[int]) -> nn.Linear:
    """A new ``nn.Linear(hidden, len(answer_ids))`` holding copies of the rows (and
    bias entries) ``answer_ids`` of ``output_embeddings``, on its device and dtype.
    The global random state is not used."""
    weight, bias = output_embeddings.weight, output_embeddings.bias
    head = nn.Linear(
        weight.shape[1],
        len(answer_ids),
        bias=bias is not None,
        device="meta",
        dtype=weight.dtype,
    ).to_empty(device=weight.device)
    rows = torch.tensor(answer_ids, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight[rows])
        if bias is not None:
            head.bias.copy_(bias[rows])
    return head


def backbone_inputs(x: Tensor | Mapping[str, Any]) -> dict[str, Tensor]:
    """The keyword arguments of the backbone from input ids ``(batch, seq_len)`` or
    a mapping (its ``input_ids``, ``attention_mask`` and ``position_ids``), checked:
    integer ids of two dimensions, a mask of their shape with a real token in every
    row."""
    if isinstance(x, Mapping):
        if "input_ids" not in x:
            raise KeyError(
                "The batch has no 'input_ids'; its keys are "
                f"{sorted(map(str, x.keys()))}."
            )
        inputs = {k: x[k] for k in BACKBONE_INPUT_KEYS if x.get(k) is not None}
    elif isinstance(x, Tensor):
        inputs = {"input_ids": x}
    else:
        raise TypeError(
            "Inputs must be a tensor of input ids or a mapping with 'input_ids' (and "
            f"'attention_mask'); got {type(x).__name__}."
        )
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            "input_ids must be an integer tensor of shape (batch, seq_len); got "
            f"shape {tuple(ids.shape)}, {ids.dtype}."
        )
    mask = inputs.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, input_ids "
                f"{tuple(ids.shape)}: they must be equal."
            )
        empty = ~(mask != 0).any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                "Every row needs a real token (attention_mask 1); rows "
                f"{empty.nonzero().flatten().tolist()} have none."
            )
    return inputs
