"""``AnswerTokenModel``: the answer-token logits of a causal LM, and Laplace on them.

Oracles: the full LM's vocabulary-sized logits gathered at the last real position
(found by a Python loop over the mask) and the answer ids; ``torch.func.jacrev`` of
those through the full LM; the dense GGN, posterior and probit predictive from
these Jacobians. Everything in float64, on every device of the ``device`` fixture.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

from laplace import Laplace
from laplace.curvature.native import NativeGGN
from laplace.utils import AnswerTokenModel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# jacrev of scaled-dot-product attention's backward: slow, not wrong
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

V = 997  # a vocabulary size no other dimension has
ANSWERS = [11, 3, 42, 7]  # " A", " B", " C", " D": not sorted, not contiguous
DTYPE = torch.float64


def causal_lm(kind: str, device, vocab: int = V) -> nn.Module:
    """A tiny causal LM from a config, float64, eval mode, on ``device``."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=8, n_head=2, vocab_size=vocab, n_positions=16
        )
        lm = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=8, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=12, vocab_size=vocab,
            max_position_embeddings=16,
        )  # fmt: skip
        lm = transformers.LlamaForCausalLM(config)
    elif kind == "gpt-neox":
        config = transformers.GPTNeoXConfig(
            num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            intermediate_size=12, vocab_size=vocab, max_position_embeddings=16,
        )  # fmt: skip
        lm = transformers.GPTNeoXForCausalLM(config)
    elif kind == "opt":  # its decoder projects the hidden states down to 4
        config = transformers.OPTConfig(
            num_hidden_layers=1, hidden_size=8, num_attention_heads=2, ffn_dim=12,
            vocab_size=vocab, max_position_embeddings=16, word_embed_proj_dim=4,
        )  # fmt: skip
        lm = transformers.OPTForCausalLM(config)
    else:
        raise ValueError(kind)
    return lm.to(device, DTYPE).eval()


def with_lora(lm: nn.Module) -> nn.Module:
    """LoRA adapters (rank 2, random: not the zero init of B) on the attention."""
    gpt2 = isinstance(lm, transformers.GPT2LMHeadModel)
    config = peft.LoraConfig(
        r=2,
        target_modules=["c_attn"] if gpt2 else ["q_proj", "v_proj"],
        fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores (in, out)
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    return peft.get_peft_model(lm, config).eval()


def build(kind: str, lora: bool, device) -> nn.Module:
    lm = causal_lm(kind, device)
    return with_lora(lm) if lora else lm


def padded_batch(side: str, device, n: int = 5, seed: int = 0) -> dict:
    """Rows of 2 to 6 real tokens padded on ``side`` to 6, with answer labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = [2 + (i * 3 + seed) % 5 for i in range(n)]
    T = max(lengths)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.zeros(n, T, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, T - length :] = 1
    labels = torch.randint(0, len(ANSWERS), (n,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def last_real_positions(mask: torch.Tensor) -> list[int]:
    return [
        max(t for t in range(mask.shape[1]) if mask[n, t]) for n in range(len(mask))
    ]


def lm_answer_logits(lm: nn.Module, batch: dict) -> torch.Tensor:
    """The oracle: the full LM's (batch, seq_len, V) logits at the last real
    position of each row, at the answer ids."""
    logits = lm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    assert logits.shape[-1] == V
    rows = [logits[n, t, ANSWERS] for n, t in enumerate(batch_last(batch))]
    return torch.stack(rows)


def batch_last(batch: dict) -> list[int]:
    return last_real_positions(batch["attention_mask"].cpu())


def oracle_jacobian(lm: nn.Module, model: AnswerTokenModel, batch: dict):
    """``(batch, n_answers, P)`` by ``jacrev`` of the full LM's gathered logits, over
    the wrapper's trainable parameters in the wrapper's order."""
    names = {id(p): name for name, p in lm.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    theta = {names[id(p)]: p.detach() for p in params}

    def f(theta):
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = functional_call(lm, theta, (), kwargs).logits
        return torch.stack(
            [logits[n, t, ANSWERS] for n, t in enumerate(batch_last(batch))]
        )

    jac = jacrev(f)(theta)
    return torch.cat([jac[k].flatten(2) for k in theta], dim=2)


def loader_of(batches: list[dict]) -> DataLoader:
    rows = [
        {k: v[i] for k, v in batch.items()}
        for batch in batches
        for i in range(len(batch["labels"]))
    ]
    return DataLoader(rows, batch_size=len(batches[0]["labels"]))


# ---------------------------------------------------------------------- the logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "kind,lora",
    [("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True),
     ("gpt-neox", False), ("opt", False)],
)  # fmt: skip
def test_logits_equal_the_lms_at_the_last_real_position(kind, lora, side, device):
    lm = build(kind, lora, device)
    model = AnswerTokenModel(lm, ANSWERS)
    batch = padded_batch(side, device)  # with labels, which the LM must not see
    got = model(batch)
    assert got.shape == (5, len(ANSWERS)) and got.dtype == DTYPE
    torch.testing.assert_close(got, lm_answer_logits(lm, batch))


def test_a_mixed_peft_model_is_unwrapped_to_its_lm(device):
    """``get_peft_model(..., mixed=True)`` has no ``get_base_model``: its tuner's
    ``model`` is the LM (with the adapters in its layers)."""
    lm = causal_lm("gpt2", device)
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    mixed = peft.get_peft_model(lm, config, mixed=True)
    model = AnswerTokenModel(mixed, ANSWERS)
    batch = padded_batch("left", device)
    torch.testing.assert_close(model(batch), lm_answer_logits(mixed, batch))
    assert any("lora" in name for name, _ in model.backbone.named_parameters())


def test_a_tensor_of_ids_is_read_at_its_last_position(device):
    lm = causal_lm("gpt2", device)
    model = AnswerTokenModel(lm, ANSWERS)
    ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    expected = lm(input_ids=ids).logits[:, -1, ANSWERS]
    torch.testing.assert_close(model(ids), expected)


def test_the_head_is_a_copy_of_the_answer_rows(device):
    lm = causal_lm("gpt2", device)  # its head is tied to the token embedding
    model = AnswerTokenModel(lm, torch.tensor(ANSWERS))
    embedding = lm.get_output_embeddings().weight
    torch.testing.assert_close(model.head.weight, embedding[ANSWERS])
    assert model.head.bias is None and model.answer_ids == tuple(ANSWERS)
    before = embedding.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)  # its own parameters: the LM is not touched
    torch.testing.assert_close(embedding, before, rtol=0, atol=0)
    # the untied or tied LM head is no parameter of the wrapper
    assert all(p is not embedding for p in model.head.parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_which_parameters_require_grad(lora, device):
    """The head follows the LM's output embedding unless told; with LoRA the
    trainable parameters of the wrapper are exactly the adapters."""
    lm = build("gpt2", lora, device)
    lora_params = {id(p) for n, p in lm.named_parameters() if "lora_" in n}
    model = AnswerTokenModel(lm, ANSWERS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lora:
        assert {id(p) for p in trainable} == lora_params
        assert not model.head.weight.requires_grad
    else:
        assert model.head.weight.requires_grad
        assert len(trainable) == len(list(model.parameters()))
    forced = AnswerTokenModel(
        lm, ANSWERS, head_requires_grad=not model.head.weight.requires_grad
    )
    assert forced.head.weight.requires_grad is not model.head.weight.requires_grad


def test_the_jacobian_wrt_the_lora_weights_is_the_lms(device):
    lm = build("gpt2", True, device)
    model = AnswerTokenModel(lm, ANSWERS).eval()
    batch = padded_batch("right", device)
    Js, f = NativeGGN(model, "classification").jacobians(batch)
    expected = oracle_jacobian(lm, model, batch)
    assert Js.shape == expected.shape == (5, len(ANSWERS), 2 * (2 * 8 + 24 * 2))
    assert expected.abs().max() > 1e-3  # the LoRA weights matter
    torch.testing.assert_close(Js, expected)
    torch.testing.assert_close(f, lm_answer_logits(lm, batch))


# ---------------------------------------------------------------------- Laplace


class VocabularySizedTensors(TorchDispatchMode):
    """Record every operator (forward and backward) whose result has a dimension of
    the vocabulary's size."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and V in t.shape:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_a_kron_fit_forms_no_vocabulary_sized_tensor(subset, device):
    lm = build("gpt2", True, device)
    model = AnswerTokenModel(lm, ANSWERS, head_requires_grad=subset == "last_layer")
    batch = padded_batch("right", device)
    loader = loader_of([padded_batch("right", device, seed=s) for s in range(3)])
    with VocabularySizedTensors() as spy:  # the check sees the full LM's logits
        lm(input_ids=batch["input_ids"])
    assert spy.seen
    with VocabularySizedTensors() as spy:
        la = Laplace(model, "classification", subset, "kron")
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
        probs = la(batch)
        la(batch, link_approx="mc", n_samples=10)
    assert spy.seen == []
    assert probs.shape == (5, len(ANSWERS))


def test_glm_predictive_equals_the_dense_oracle(device):
    """Full Laplace over the LoRA weights: ``P = sum_n J_n^T Lambda_n J_n + d I``,
    ``f_var = J P^-1 J^T``, the probit and Monte-Carlo predictives."""
    lm = build("gpt2", True, device)
    model = AnswerTokenModel(lm, ANSWERS)
    train = [padded_batch("right", device, seed=s) for s in range(2)]
    la = Laplace(model, "classification", "all", "full", prior_precision=0.7)
    la.fit(loader_of(train))

    J = torch.cat([oracle_jacobian(lm, model, b) for b in train])
    f = torch.cat([lm_answer_logits(lm, b) for b in train]).detach()
    p = f.softmax(-1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    P = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
    P = P + 0.7 * torch.eye(len(P), dtype=DTYPE, device=device)
    torch.testing.assert_close(la.posterior_precision, P)

    test = padded_batch("left", device, seed=7)
    Jt = oracle_jacobian(lm, model, test)
    ft = lm_answer_logits(lm, test).detach()
    f_var = Jt @ torch.linalg.inv(P) @ Jt.transpose(1, 2)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(la(test, link_approx="probit"), (ft * kappa).softmax(-1))

    # Monte Carlo: 20,000 samples each; the two estimates differ by their noise
    g = torch.Generator(device=device).manual_seed(0)
    samples = torch.randn(20_000, *ft.shape, dtype=DTYPE, device=device, generator=g)
    L = torch.linalg.cholesky(f_var)
    oracle_mc = (ft + torch.einsum("ncd,snd->snc", L, samples)).softmax(-1).mean(0)
    mc = la(test, link_approx="mc", n_samples=20_000)
    torch.testing.assert_close(mc, oracle_mc, rtol=0, atol=0.01)


def test_last_layer_posterior_is_the_closed_form(device):
    """Last-layer Full Laplace on the answer head: ``P = sum_n Lambda_n (x)
    phi_n phi_n^T + d I`` over the head's weight, and the probit predictive."""
    lm = build("gpt2", True, device)
    model = AnswerTokenModel(lm, ANSWERS, head_requires_grad=True)
    train = [padded_batch("left", device, seed=s) for s in range(2)]
    la = Laplace(model, "classification", "last_layer", "full", prior_precision=0.7)
    la.fit(loader_of(train))
    assert la.model.last_layer is model.head and la.n_params == 8 * len(ANSWERS)

    def features(batch):  # the LM's last hidden state at the last real position
        hidden = lm(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                    output_hidden_states=True).hidden_states[-1]  # fmt: skip
        return torch.stack([hidden[n, t] for n, t in enumerate(batch_last(batch))])

    phi = torch.cat([features(b) for b in train]).detach()
    p = torch.cat([lm_answer_logits(lm, b) for b in train]).detach().softmax(-1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    P = torch.einsum("ncd,ni,nj->cidj", Lam, phi, phi).reshape(32, 32)
    P = P + 0.7 * torch.eye(32, dtype=DTYPE, device=device)
    torch.testing.assert_close(la.posterior_precision, P)

    test = padded_batch("right", device, seed=7)
    phi_t = features(test).detach()
    ft = lm_answer_logits(lm, test).detach()
    Jt = torch.einsum("cd,ni->ncdi", torch.eye(4, dtype=DTYPE, device=device), phi_t)
    Jt = Jt.reshape(len(phi_t), 4, 32)
    f_var = Jt @ torch.linalg.inv(P) @ Jt.transpose(1, 2)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(la(test, link_approx="probit"), (ft * kappa).softmax(-1))


def test_diag_over_the_lora_weights_is_the_exact_ggn_diagonal(device):
    lm = build("gpt2", True, device)
    model = AnswerTokenModel(lm, ANSWERS)
    train = [padded_batch("right", device, seed=s) for s in range(2)]
    la = Laplace(model, "classification", "all", "diag")
    la.fit(loader_of(train))
    J = torch.cat([oracle_jacobian(lm, model, b) for b in train])
    p = torch.cat([lm_answer_logits(lm, b) for b in train]).detach().softmax(-1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(la.H, torch.einsum("ncp,ncd,ndp->p", J, Lam, J))
    probs = la(padded_batch("left", device, seed=7))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=DTYPE, device=device))


# ---------------------------------------------------------------------- the LM


def snapshot(module: nn.Module) -> dict:
    """Everything a wrapper could change: values, flags, hooks, attributes."""
    return {
        name: (
            type(m),
            m.training,
            sorted(vars(m)),
            [len(getattr(m, h)) for h in vars(m) if h.endswith("hooks")],
            {
                k: (v.detach().clone(), v.requires_grad)
                for k, v in m._parameters.items()
                if v is not None
            },
            {k: v.clone() for k, v in m._buffers.items() if v is not None},
        )
        for name, m in module.named_modules()
    }


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        b, a = before[name], after[name]
        assert b[:4] == a[:4], name
        for k in b[4]:
            torch.testing.assert_close(a[4][k][0], b[4][k][0], rtol=0, atol=0)
            assert a[4][k][1] == b[4][k][1], (name, k)
        for k in b[5]:
            torch.testing.assert_close(a[5][k], b[5][k], rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True])
def test_the_lm_is_left_as_found(training, device):
    lm = build("gpt2", True, device).train(training)
    before = snapshot(lm)
    model = AnswerTokenModel(lm, ANSWERS)  # verify runs the LM in eval mode
    model(padded_batch("right", device))
    assert_same(before, snapshot(lm))
    if not training:  # Laplace puts the model in eval mode for its fit
        la = Laplace(model, "classification", "all", "kron")
        la.fit(loader_of([padded_batch("left", device)]))
        la(padded_batch("right", device))
        assert_same(before, snapshot(lm))


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "answer_ids,error,match",
    [
        ([], ValueError, "at least one answer token"),
        ([3, V], ValueError, rf"\[{V}\] are outside the vocabulary.*\[0, {V}\)"),
        ([-1, 3], ValueError, r"\[-1\] are outside the vocabulary"),
        ([3, 5, 3], ValueError, r"distinct; \[3\] occur more than once"),
        ([3.0, 5], TypeError, "token ids \\(ints\\)"),
        (" A", TypeError, "sequence of token ids"),
        (torch.zeros(2, 2, dtype=torch.long), TypeError, "1-D integer tensor"),
    ],
)
def test_bad_answer_ids_are_refused(answer_ids, error, match, device):
    lm = causal_lm("gpt2", device)
    with pytest.raises(error, match=match):
        AnswerTokenModel(lm, answer_ids)


def test_models_that_are_no_causal_lm_are_refused(device):
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V)
    for model in (
        transformers.GPT2Model(config),
        transformers.GPT2ForSequenceClassification(config),
    ):
        with pytest.raises(ValueError, match="has no output embeddings"):
            AnswerTokenModel(model.to(device), ANSWERS)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        AnswerTokenModel("gpt2", ANSWERS)


def test_prompt_learning_and_transformed_logits_are_refused(device):
    lm = causal_lm("gpt2", device)
    prompt = peft.get_peft_model(
        lm, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(ValueError, match="prompt learning"):
        AnswerTokenModel(prompt, ANSWERS)
    config = transformers.Gemma2Config(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, intermediate_size=12, vocab_size=V,
        max_position_embeddings=16,
    )  # fmt: skip
    gemma = transformers.Gemma2ForCausalLM(config).to(device)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        AnswerTokenModel(gemma, ANSWERS)


class ScaledLogits(nn.Module):
    """A causal LM whose logits are its head's output, doubled."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.transformer, self.lm_head = lm.transformer, lm.lm_head

    @property
    def base_model(self) -> nn.Module:
        return self.transformer

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        hidden = self.transformer(input_ids, attention_mask=attention_mask)[0]
        return transformers.modeling_outputs.CausalLMOutput(
            logits=2 * self.lm_head(hidden)
        )


def test_verify_refuses_logits_that_are_not_the_heads(device):
    model = ScaledLogits(causal_lm("gpt2", device))
    with pytest.raises(ValueError, match="logits at the answer ids differ"):
        AnswerTokenModel(model, ANSWERS)
    AnswerTokenModel(model, ANSWERS, verify=False)  # taken on trust


@pytest.mark.parametrize(
    "inputs,error,match",
    [
        (lambda b: {"attention_mask": b["attention_mask"]}, KeyError, "no 'input_ids'"),
        (lambda b: [b["input_ids"]], TypeError, "got list"),
        (lambda b: b["input_ids"][0], ValueError, r"shape \(batch, seq_len\)"),
        (lambda b: b["input_ids"].double(), ValueError, "integer tensor"),
        (lambda b: {**b, "attention_mask": b["attention_mask"][:, 1:]}, ValueError,
         "attention_mask has shape"),
        (lambda b: {**b, "attention_mask": b["attention_mask"] * torch.tensor(
            [1, 0, 1, 0, 1], device=b["input_ids"].device)[:, None]}, ValueError,
         r"rows \[1, 3\] have none"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused(inputs, error, match, device):
    model = AnswerTokenModel(causal_lm("gpt2", device), ANSWERS)
    with pytest.raises(error, match=match):
        model(inputs(padded_batch("right", device)))
