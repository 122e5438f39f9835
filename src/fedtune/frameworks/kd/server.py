"""KD-FedLLM's server: aggregates client knowledge (b4), distils it into the global model (b5),
computes the global logits (b6) and broadcasts them (b7). See the package docstring."""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np
import torch

from ... import seeds
from ...aggregate import finite, meta_problem
from ...context import ServerContext
from ...errors import MessageError
from ...execution.executors import execute
from ...execution.jobs import Train
from ...execution.train import train
from ...messages import LOGITS, METADATA, SERVER, Message, Notices, client_name
from ...privacy import largest_reported, outputs
from .common import (
    distill_batch_size,
    public_candidates,
)
from .knowledge import knowledge
from .ops import (
    alignment_weights,
    label_distribution,
    prune_public,
    tv_distance,
)


def pick(outputs, sel: np.ndarray):
    """Rows ``sel`` of a party's outputs (a tensor, or a list of sequences)."""
    return outputs[sel] if isinstance(outputs, torch.Tensor) else [outputs[i] for i in sel]


class Server:
    """The global model (state + optimizer state), the last global logits on the public set
    and the clients' label histograms (alignment only)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.candidates = public_candidates(ctx)
        self.knowledge = knowledge(ctx)  # class logits, or per-token (generation)
        self.state = {k: v.clone() for k, v in ctx.init_state.items()}
        # privacy.kd_noise: rounds each client's noisy logits were used, the most samples sent
        self.noisy: dict[int, int] = {}
        self.noisy_samples = 0
        self.opt_state: dict | None = None
        self.global_logits: torch.Tensor | None = None  # [N, ...] outputs of the last b6
        self.histograms: dict[int, np.ndarray] = {}  # cid -> [C] private label counts

    def round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]:
        ctx, kd = self.ctx, self.ctx.cfg.kd
        c, n = ctx.data.num_labels, len(self.candidates)
        metrics: dict = {}
        rejected: dict[str, str] = {}  # client id -> why its reply was not used
        # Alignment: ask each client for its label histogram the first time it is sampled.
        missing = [cid for cid in clients if cid not in self.histograms]
        if kd.align != "none" and missing:
            replies = yield {
                cid: Message(METADATA, rnd, SERVER, client_name(cid), meta={"request": "labels"})
                for cid in missing
            }
            for cid, msg in replies.items():
                t = msg.tensors.get("histogram", torch.zeros(0))
                hist = np.zeros(0) if t.is_floating_point() else t.numpy().astype(np.int64)
                if hist.shape != (c,) or (hist < 0).any() or hist.sum() == 0:
                    rejected[str(cid)] = "malformed label histogram"  # asked again next round
                else:
                    self.histograms[cid] = hist
        # Pruning: this round's selection by the global model's logits (the initial model's in
        # round 1, computed here); clients learn it from a bitmask in the start message.
        start: dict[str, torch.Tensor] = {}
        sel = np.arange(n)
        if kd.prune != "none":
            if self.global_logits is None:
                self.global_logits = self.public_outputs()
            sel = prune_public(self.global_logits, kd.prune, kd.prune_keep)
            mask = np.zeros(n, dtype=bool)
            mask[sel] = True
            start["keep"] = torch.from_numpy(np.packbits(mask))
        metrics["public_samples"] = len(sel)

        # b1-b3 happen in Client.handle; the replies are the uploaded client logits.
        replies = yield {
            cid: Message(METADATA, rnd, SERVER, client_name(cid), start, {"step": "start"})
            for cid in clients
        }
        # b4: global knowledge = weighted mean of the clients' softened probabilities, over the
        # clients that replied (dropout, deadline) with valid logits and metadata.
        logits, cids = [], []
        for i in sorted(replies):
            try:
                if why := meta_problem(replies[i].meta, float(ctx.data.client_sizes[i])):
                    raise MessageError(why)
                if kd.align != "none" and i not in self.histograms:
                    raise MessageError("no valid label histogram")
                rows = self.candidates[sel]
                logits.append(self.knowledge.unpack(replies[i], rows, client_name(i)))
                cids.append(i)
            except MessageError as e:
                rejected[str(i)] = str(e)
        metrics.update(rejected=len(rejected), rejected_reasons=rejected)
        if not cids:  # nothing usable: the global model stays as it was
            return metrics
        sizes = [int(float(replies[i].meta["num_samples"])) for i in cids]
        teacher, kept = self.knowledge.aggregate(logits, sizes, self.candidates[sel])
        if not finite(teacher):  # checked inputs cannot do this; a bug must not train on it
            rejected["teacher"] = "the aggregated knowledge is not finite"
            return metrics
        metrics["train_loss"] = float(
            np.average([float(replies[i].meta["loss"]) for i in cids], weights=sizes)
        )
        metrics["knowledge_kept"] = float(kept.float().mean())
        metrics.update(self.kd_privacy(cids, len(sel)))
        if ctx.cfg.privacy.dpsgd:
            metas = [replies[i].meta for i in cids]
            metrics["sample_epsilon"] = largest_reported(metas, "sample_epsilon")
        weights = kept.numpy().astype(np.float64)  # samples every client was unsure of: 0
        public_y = ctx.data.public.labels[self.candidates[sel]]
        # A measurement only, like the test accuracy: training never reads public labels
        # unless kd.server_uses_public_labels says so.
        if (agree := self.knowledge.accuracy(teacher, public_y)) is not None:
            metrics["teacher_accuracy"] = agree
        labels = public_y if kd.server_uses_public_labels else None
        if kd.align != "none":
            # Public labels are unknown by default: use the teacher's argmax (the clients'
            # consensus), available from round 1 on, unlike the untrained global model's.
            pseudo = public_y if kd.server_uses_public_labels else teacher.argmax(-1).numpy()
            target = sum(self.histograms[i] for i in cids)
            weights = weights * alignment_weights(pseudo, target)
            goal = target / target.sum()
            metrics["align_tv_before"] = tv_distance(label_distribution(pseudo, c), goal)
            metrics["align_tv_after"] = tv_distance(label_distribution(pseudo, c, weights), goal)
        resample = weights / weights.sum() if kd.align == "resample" and weights.sum() > 0 else None
        # b5: distil the global knowledge into the global model (the server's own optimizer).
        if resample is None:  # weighted rows; rows of weight 0 are skipped
            rows, w = np.flatnonzero(weights > 0), torch.as_tensor(weights, dtype=torch.float32)
        else:  # each epoch draws S rows with these probabilities
            rows, w = np.arange(len(sel)), None
        y = None if labels is None else torch.as_tensor(labels)
        job = Train(
            self.state,
            self.opt_state,
            self.knowledge.train_data(teacher, self.candidates[sel]),
            rows,
            self.knowledge.loss(teacher, self.candidates[sel], w, y),
            (ctx.cfg.seed, rnd, seeds.KD_SERVER),
            epochs=kd.server_epochs,
            batch_size=distill_batch_size(ctx),
            resample=resample,
        )
        result = train(ctx, job)
        metrics["server_distill_loss"] = result.loss
        if finite(result.state):
            self.state, self.opt_state = result.state, result.opt_state
        else:  # the global model is never non-finite: keep the last one
            rejected["distill"] = "server distillation diverged; the global model is unchanged"
        # b6: the global model's logits on all candidates (the next round prunes with them).
        self.global_logits = self.public_outputs()
        # b7: broadcast them on this round's selection; b8 happens in Client.handle.
        down = self.knowledge.pack(pick(self.global_logits, sel), self.candidates[sel])
        # No reply: a transport may carry them with each client's next message.
        yield Notices(
            {cid: Message(LOGITS, rnd, SERVER, client_name(cid), down) for cid in replies}
        )
        return metrics

    def public_outputs(self):
        """b6: the global model's outputs on every public candidate (in candidate order):
        logits, or generated sequences (``kd.level = "sequence"``)."""
        return execute(self.ctx, self.knowledge.predict(self.state, self.candidates))

    def eval_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def kd_privacy(self, cids: list[int], samples: int) -> dict:
        """``privacy.kd_noise``: the clients' noisy uploads were used this round; epsilon so
        far, the largest over the clients (:mod:`fedtune.privacy.outputs`)."""
        p = self.ctx.cfg.privacy
        if p.kd_noise == 0:
            return {}
        for c in cids:
            self.noisy[c] = self.noisy.get(c, 0) + 1
        self.noisy_samples = max(self.noisy_samples, samples)
        n, most = self.noisy_samples, max(self.noisy.values(), default=0)
        eps = outputs.kd_epsilon(p.kd_noise, n, most, p.delta)
        return {
            "dp_epsilon": eps if math.isfinite(eps) else None,
            "dp_delta": p.delta,
            "dp_noise_multiplier": p.kd_noise / math.sqrt(2 * n),
            "dp_adjacency": "replace one client's data",
        }

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume (tensors and small JSON-able values)."""
        return {
            "state": self.state,
            "opt_state": self.opt_state,
            "global_logits": self.global_logits,
            "histograms": self.histograms,
            "noisy": {"rounds": dict(self.noisy), "samples": self.noisy_samples},
        }

    def load_state_dict(self, d: dict) -> None:
        self.state = {k: v.to(self.ctx.device) for k, v in d["state"].items()}
        self.opt_state, self.global_logits = d["opt_state"], d["global_logits"]
        self.histograms = {int(k): np.asarray(v) for k, v in d["histograms"].items()}
        noisy = d.get("noisy", {"rounds": {}, "samples": 0})
        self.noisy = {int(k): int(v) for k, v in noisy["rounds"].items()}
        self.noisy_samples = int(noisy["samples"])

    def params_exchanged(self) -> int:
        return 0  # only logits travel; see the module docstring
