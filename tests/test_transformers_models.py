"""``lk.optim.LocoProp`` on Hugging Face transformers models (the third round of issues).

Tiny random-init configs, float64, dropout 0, a few tokens / images, seeded; the loss is the
model's own (``model(..., labels=...).loss``). The spec (docs/design.md §9 and the issue):

- every ``nn.Linear``, ``transformers.pytorch_utils.Conv1D`` and ``nn.Conv2d`` with a trainable
  weight is a LocoProp layer: listed in ``opt.layers`` with ``loss == "matched"`` and
  ``module`` "Linear" / "Conv1D" / "Conv2d";
- after one training forward + backward, ``opt.layers`` gives the f that the model applies:
  GPT-2's ``mlp.c_fc`` gelu_tanh (``NewGELUActivation``), Llama's ``mlp.gate_proj`` silu, BERT's
  ``intermediate.dense`` gelu and ``pooler.dense`` tanh, ViT's ``mlp.fc1`` gelu, and softmax
  for the heads whose logits feed the model's own cross-entropy (with or without
  ``output_activation="softmax"``); every other layer identity, with a reason;
- 3 outer steps equal the independent oracle (tests/locoprop_oracle.py) given those f;
- at W0 every local gradient is gamma p.grad;
- a ``torch.compile``d model gives the same ``opt.layers`` as the eager one.

Module names as they are in transformers 5.25 (checked): ViT's layers are
``vit.layers.N.mlp.fc1`` (not ``vit.encoder.layer.N.intermediate.dense``), its attention
projections ``vit.layers.N.attention.{q,k,v,o}_proj``; ResNet's head is ``classifier.1`` (an
``nn.Sequential(Flatten, Linear)``). GPT-2's ``lm_head.weight`` IS ``transformer.wte.weight``.
"""
import copy
import re
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import locoprop_kernels as lk  # noqa: E402
from locoprop_oracle import LocoPropOracle, oracle_steps  # noqa: E402

GAMMA = 10.0
OPTIONS = dict(lr=1e-3, inner_steps=3)
#: The criterion of the oracle comparisons, per parameter p (after the same steps on two copies
#: of one model):  max |p_package - p_oracle| <= TOL * scale(p),
#: scale(p) = max(max |p_oracle|, SCALE_FLOOR). The floor is for parameters that stay near 0
#: because their true gradient is 0 (attention key biases: softmax ignores a constant per
#: row), whose own max |p| (~1e-9) is rounding-sized; every weight here is ~1e-2 or larger.
TOL = 1e-9
SCALE_FLOOR = 1e-3
#: And the steps must matter: every LocoProp layer's weight moved by more than MOVED x its
#: scale (100 x TOL at least), the median parameter by more than MEDIAN_MOVED.
MOVED = 1e-7
MEDIAN_MOVED = 1e-4

VOCAB, SEQ, BATCH = 50, 6, 2


# ---------------------------------------------------------------- tiny models

def gpt2(n_layer=2):
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=VOCAB,
                                  n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16,
                                   attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=24,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                    depths=[1, 1], layer_type="basic", num_labels=3)
    return transformers.ResNetForImageClassification(cfg)


def token_batch(g, labels="lm"):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if labels == "lm":
        return dict(input_ids=ids, labels=ids.clone())
    return dict(input_ids=ids, labels=torch.randint(0, 3, (BATCH,), generator=g))


def image_batch(g, size):
    x = torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64)
    return dict(pixel_values=x, labels=torch.randint(0, 3, (BATCH,), generator=g))


#: name: (factory, batch maker, {full-match pattern of a layer name: expected f})
MODELS = {
    "gpt2": (gpt2, lambda g: token_batch(g),
             {r"transformer\.h\.\d+\.mlp\.c_fc": "gelu_tanh", r"lm_head": "softmax"}),
    "llama": (llama, lambda g: token_batch(g),
              {r"model\.layers\.\d+\.mlp\.gate_proj": "silu", r"lm_head": "softmax"}),
    "bert": (bert, lambda g: token_batch(g, labels="class"),
             {r"bert\.encoder\.layer\.\d+\.intermediate\.dense": "gelu",
              r"bert\.pooler\.dense": "tanh", r"classifier": "softmax"}),
    "vit": (vit, lambda g: image_batch(g, 8),
            {r"vit\.layers\.\d+\.mlp\.fc1": "gelu", r"classifier": "softmax"}),
    "resnet": (resnet, lambda g: image_batch(g, 16), {r"classifier\.1": "softmax"}),
}
NAMES = sorted(MODELS)
KINDS = ((Conv1D, "Conv1D"), (nn.Conv2d, "Conv2d"), (nn.Linear, "Linear"))


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().double().train()


def batches(name: str, n: int = 3, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [MODELS[name][1](g) for _ in range(n)]


def model_loss(model, batch):
    """The model's own loss (cross-entropy computed inside its forward)."""
    return model(**batch).loss


def affine_layers(model: nn.Module) -> dict:
    """{name: "Linear" | "Conv1D" | "Conv2d"} of every affine layer with a trainable weight."""
    found = {}
    for name, m in model.named_modules():
        for cls, kind in KINDS:
            if isinstance(m, cls) and m.weight.requires_grad:
                found[name] = kind
                break
    return found


def expected_activations(name: str, model: nn.Module) -> dict:
    """{layer name: f} from the spec; every pattern must match at least one layer."""
    patterns = MODELS[name][2]
    layers = affine_layers(model)
    want = {}
    for layer in layers:
        hits = [f for p, f in patterns.items() if re.fullmatch(p, layer)]
        want[layer] = hits[0] if hits else "identity"
    for p in patterns:
        assert any(re.fullmatch(p, layer) for layer in layers), f"{p} matches no layer of {name}"
    return want


def train_once(model, opt, batch):
    opt.zero_grad()
    model_loss(model, batch).backward()


def infos(opt) -> dict:
    return {info.name: info for info in opt.layers}


def compare(start: nn.Module, ours: nn.Module, theirs: nn.Module, layers) -> None:
    """Assert the criterion above: ``theirs`` (package) equals ``ours`` (oracle), and both moved
    from ``start`` (``layers``: the LocoProp layers' names)."""
    start_p, ours_p = dict(start.named_parameters()), dict(ours.named_parameters())
    worst, moved = {}, {}
    for n, p in theirs.named_parameters():  # a tied weight once, under its first name
        scale = max(ours_p[n].abs().max().item(), SCALE_FLOOR)
        worst[n] = (p - ours_p[n]).abs().max().item() / scale
        moved[n] = (ours_p[n] - start_p[n]).abs().max().item() / scale
    start_m, ours_m = dict(start.named_modules()), dict(ours.named_modules())
    for layer in layers:
        w0, w = start_m[layer].weight, ours_m[layer].weight
        layer_moved = (w - w0).abs().max().item() / max(w.abs().max().item(), SCALE_FLOOR)
        assert layer_moved > MOVED, (layer, layer_moved)
    assert sorted(moved.values())[len(moved) // 2] > MEDIAN_MOVED, moved
    assert max(worst.values()) <= TOL, {n: e for n, e in worst.items() if e > TOL}


def _strip_compile_prefix(name: str) -> str:
    return name[len("_orig_mod."):] if name.startswith("_orig_mod.") else name


# ---------------------------------------------------------------- the models themselves

def test_models_are_as_this_file_assumes():
    """Facts of transformers 5.25 the expectations rest on (a failure here means the library
    moved, not that LocoProp is wrong)."""
    m = build("gpt2")
    assert m.lm_head.weight is m.transformer.wte.weight
    assert isinstance(m.transformer.h[0].mlp.c_fc, Conv1D)
    assert tuple(m.transformer.h[0].mlp.c_fc.weight.shape) == (16, 64)  # (in, out)
    assert type(m.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    m = build("llama")
    assert type(m.model.layers[0].mlp.act_fn).__name__ == "SiLUActivation"
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    m = build("bert")
    assert type(m.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == \
        "GELUActivation"
    assert isinstance(m.bert.pooler.activation, nn.Tanh)
    m = build("vit")
    assert isinstance(m.vit.layers[0].mlp.fc1, nn.Linear)
    assert isinstance(m.vit.embeddings.patch_embeddings.projection, nn.Conv2d)


# ---------------------------------------------------------------- which layers, which f

@pytest.mark.parametrize("name", NAMES)
def test_every_affine_layer_is_a_matched_locoprop_layer(name):
    model = build(name)
    want = affine_layers(model)
    opt = lk.optim.LocoProp(model, backend="reference", **OPTIONS)
    for when in ("at construction", "after one forward + backward"):
        got = infos(opt)
        assert set(got) == set(want), (when, sorted(set(want) ^ set(got)))
        for layer, kind in want.items():
            assert got[layer].module == kind, (when, layer, got[layer])
            assert got[layer].loss == "matched", (when, layer, got[layer])
            module = dict(model.named_modules())[layer]
            assert tuple(got[layer].shape) == tuple(module.weight.shape), (when, layer)
            assert got[layer].bias == (module.bias is not None), (when, layer)
        train_once(model, opt, batches(name, n=1)[0])


@pytest.mark.parametrize("output_activation", [None, "softmax"])
@pytest.mark.parametrize("name", NAMES)
def test_activations_after_one_forward_backward(name, output_activation):
    model = build(name)
    want = expected_activations(name, model)
    opt = lk.optim.LocoProp(model, backend="reference", output_activation=output_activation,
                            **OPTIONS)
    train_once(model, opt, batches(name, n=1)[0])
    got = infos(opt)
    assert {k: got[k].activation for k in want if k in got} == want
    assert set(got) == set(want)
    for layer, f in want.items():
        if f == "identity":
            reason = got[layer].reason
            assert isinstance(reason, str) and reason.strip(), (layer, got[layer])


# ---------------------------------------------------------------- the steps: the oracle

@pytest.mark.parametrize("name", NAMES)
def test_oracle_first_local_gradient_is_gamma_grad(name):
    """The oracle on these models (tied weights, Conv1D, gelu/silu): at W0 its local gradient
    is gamma p.grad for every parameter (a check of the oracle, not of the package)."""
    model = build(name)
    oracle = LocoPropOracle(model, expected_activations(name, model), lr=1e-3, gamma=GAMMA)
    batch = batches(name, n=1)[0]
    got = oracle.local_gradients(lambda m: model_loss(m, batch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(got) == len(trainable)
    for p, g in got.items():
        torch.testing.assert_close(g, GAMMA * p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_three_outer_steps_equal_the_oracle(name):
    start = build(name)
    data = batches(name)
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    if name == "gpt2":  # deepcopy keeps the tie, so both sides train one shared matrix
        assert theirs.lm_head.weight is theirs.transformer.wte.weight
    acts = expected_activations(name, start)

    opt = lk.optim.LocoProp(theirs, backend="reference", **OPTIONS)
    for batch in data:
        train_once(theirs, opt, batch)
        opt.step()
    oracle_steps(ours, data, model_loss, acts, **OPTIONS)
    compare(start, ours, theirs, acts)


@pytest.mark.parametrize("name", NAMES)
def test_three_outer_steps_equal_the_oracle_given_the_packages_choices(name):
    """The step math alone: the oracle given the layers and f that the package reports in
    ``opt.layers`` (whatever it decided; linearized layers are no oracle layers) takes the same
    3 outer steps. Independent of detection, so it also holds where detection is incomplete."""
    start = build(name)
    data = batches(name)
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    opt = lk.optim.LocoProp(theirs, backend="reference", **OPTIONS)
    for batch in data:
        train_once(theirs, opt, batch)
        opt.step()
    acts = {i.name: i.activation for i in opt.layers if i.loss == "matched"}
    oracle_steps(ours, data, model_loss, acts, **OPTIONS)
    compare(start, ours, theirs, acts)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_first_local_gradient_is_gamma_grad(name):
    """docs/design.md §9: right after the backward pass (W = W0) the local gradient of every trainable
    parameter is gamma p.grad (Conv1D on GPT-2, silu / gelu layers on Llama / BERT)."""
    model = build(name)
    opt = lk.optim.LocoProp(model, backend="reference", gamma=GAMMA, **OPTIONS)
    train_once(model, opt, batches(name, n=1)[0])
    got = opt.local_gradients()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(got) == len(trainable)
    assert all(any(p is q for q in got) for p in trainable)
    for p, g in got.items():
        err = ((g - GAMMA * p.grad).abs().max() / (GAMMA * p.grad).abs().max()
               .clamp_min(1e-30)).item()
        assert err <= 1e-10, (tuple(p.shape), err)


# ---------------------------------------------------------------- torch.compile

def _cpu_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _cpu_compiler(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_model_has_the_eager_activations():
    """``lk.optim.LocoProp(torch.compile(model))``: the same layers and f as the eager model
    (names compared without the ``_orig_mod.`` prefix of the compiled wrapper's modules).
    One GPT-2 block, to keep the compile short."""
    torch.manual_seed(0)
    eager = gpt2(n_layer=1).double().train()
    compiled_model = torch.compile(copy.deepcopy(eager))
    batch = batches("gpt2", n=1)[0]
    opt = lk.optim.LocoProp(eager, backend="reference", **OPTIONS)
    train_once(eager, opt, batch)
    copt = lk.optim.LocoProp(compiled_model, backend="reference", **OPTIONS)
    train_once(compiled_model, copt, batch)
    want = {i.name: (i.activation, i.module) for i in opt.layers}
    got = {_strip_compile_prefix(i.name): (i.activation, i.module) for i in copt.layers}
    assert got == want
    assert want == {k: (f, affine_layers(eager)[k])
                    for k, f in expected_activations("gpt2", eager).items()}
