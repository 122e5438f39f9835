"""Sequence-level KD-FedLLM (``kd.level = "sequence"``, generation only): the bandwidth-cheap
variant (Kim & Rush's sequence-level distillation). Knowledge is what a model *writes*, not its
distributions: every party answers the public prompts greedily and sends the token ids.

b2  each client generates a response to every public prompt of the selection;
b3  uploads the token ids: ``tokens [T]`` (int16 up to a 32767-token vocabulary, else int32)
    and ``lengths [S]`` (int32), T = the tokens it wrote: 2-4 bytes per generated token;
b4  the server's teacher set is the union: each prompt with every client's response;
b5  the global model trains on it with the task's loss (next-token cross-entropy on the
    responses), ``kd.server_epochs`` passes;
b6  the server generates its own responses to the prompts;
b7  and sends them (same encoding);
b8  each client trains on the prompts with the server's responses.

Generation is capped at ``eval.max_new_tokens``; the public responses themselves are never
used (the teacher forcing targets are the parties' own outputs).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ... import codec
from ...context import Context
from ...data import Tokenized
from ...errors import ConfigError, MessageError
from ...execution.jobs import Generate, Loss
from ...models import vocab_size


class SequenceKnowledge:
    """Generated token ids per public prompt (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        kd = ctx.cfg.kd
        if ctx.data.public.prompt_len is None:
            raise ConfigError("config key kd.level: 'sequence' needs a generation task")
        for key, value, default in (
            ("kd.prune", kd.prune, "none"),
            ("kd.align", kd.align, "none"),
            ("kd.sharpen", kd.sharpen, 1.0),
        ):
            if value != default:
                raise ConfigError(f"config key {key}: not with kd.level=sequence")
        self.ctx, self.kd = ctx, kd
        self.vocab = vocab_size(ctx.model)
        self.max_new = ctx.cfg.eval.max_new_tokens

    def predict(self, state, rows) -> Generate:
        return Generate(state, self.ctx.data.public, rows, self.max_new)

    def pack(self, outputs: list[list[int]], rows) -> dict[str, torch.Tensor]:
        flat = [t for seq in outputs for t in seq]
        return {
            "tokens": torch.tensor(flat, dtype=codec.index_dtype(self.vocab)),
            "lengths": torch.tensor([len(s) for s in outputs], dtype=torch.int32),
        }

    def unpack(self, msg, rows, sender) -> list[list[int]]:
        t = msg.tensors
        if set(t) != {"tokens", "lengths"}:
            raise MessageError(f"sequences from {sender}: tensors {sorted(t)}")
        tokens, lengths = t["tokens"], t["lengths"]
        for name, x in (("tokens", tokens), ("lengths", lengths)):
            if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
                raise MessageError(f"sequences from {sender}: {name} must be 1-D integers")
        n = lengths.long()
        if len(n) != len(rows):
            raise MessageError(f"sequences from {sender}: {len(n)} lengths, expected {len(rows)}")
        if (n < 0).any() or (n > self.max_new).any():
            raise MessageError(f"sequences from {sender}: a length outside [0, {self.max_new}]")
        if int(n.sum()) != len(tokens):
            raise MessageError(f"sequences from {sender}: lengths do not add up to the tokens")
        tokens = tokens.long()
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise MessageError(f"sequences from {sender}: token ids outside the vocabulary")
        return [s.tolist() for s in tokens.split(n.tolist())]

    def aggregate(self, received, sizes, rows):
        """b4: every client's response to every prompt, as a training set."""
        teacher = self.pairs([seq for r in received for seq in r], np.tile(rows, len(received)))
        return teacher, torch.ones(len(teacher), dtype=torch.bool)

    def teacher(self, received: list[list[int]]) -> list[list[int]]:
        return received

    def train_data(self, teacher, rows) -> Tokenized:
        """What b5 (``teacher``: the union) and b8 (the server's responses) train on."""
        return teacher if isinstance(teacher, Tokenized) else self.pairs(teacher, rows)

    def pairs(self, responses: list[list[int]], rows: np.ndarray) -> Tokenized:
        """Public prompts ``rows`` with ``responses`` as a generation dataset (empty
        responses dropped; they teach nothing)."""
        public, ids, plen = self.ctx.data.public, [], []
        limit = self.ctx.cfg.model.max_length  # prompts are shorter: a response token stays
        for i, resp in zip(rows, responses, strict=True):
            if resp:
                prompt = public.ids[i][: int(public.prompt_len[i])]
                ids.append((prompt + resp)[:limit])
                plen.append(len(prompt))
        labels = np.zeros(len(ids), dtype=np.int64)
        return replace(public, ids=ids, labels=labels, prompt_len=np.asarray(plen, dtype=np.int64))

    def accuracy(self, teacher, labels) -> None:
        return None  # generated texts, not class predictions

    def loss(self, teacher, rows, weights=None, labels=None) -> Loss:
        return self.ctx.task.loss()
