"""FedLLM: federated averaging of LoRA adapters (the paper's workflow a1-a4).

a1  the server sends the global LoRA + head tensors to each sampled client;
a2  each client fine-tunes them on its private data (Adam, lr 1e-3 by default);
a3  each client uploads its updated tensors and its sample count;
a4  the server checks every upload (names, shapes, dtypes, NaN/Inf, ``fed.max_update_norm``),
    drops the invalid ones and combines the rest with the ``fed.aggregator`` strategy (FedAvg
    weighted by sample count by default; median or trimmed mean against poisoned clients).
    Clients that did not reply (dropout, deadline) are simply absent from the replies.

``[fedopt]`` (:mod:`fedtune.fedopt`): a server optimizer steps the global adapter along the
aggregate's pseudo-gradient; FedProx and SCAFFOLD add drift terms to a2's gradients (SCAFFOLD's
control variates travel with a1 and a3 as ``scaffold.*`` tensors); FFA-LoRA keeps every A at
the shared initialization, so a1 and a3 carry only B and the head; FLoRA
(``rank_aggregation=flora``, :mod:`fedtune.fedopt.flora`) sends the stacked factors in a1
instead of the adapter, and every client starts from a fresh LoRA on its merged weights.

With ``privacy.dp=central`` a4 is DP-FedAvg instead (clip, sum, Gaussian noise, divide by the
sampled count; the norm screens are off: clipping bounds every client); with ``local`` each
client clips and noises its upload after a2 (:mod:`fedtune.privacy`).
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from .. import seeds
from ..aggregate import build, finite, screen_updates, update_problem
from ..context import ClientContext, ServerContext
from ..execution.jobs import Train
from ..execution.train import LocalResult, clients_mean, evaluate, num_local_steps
from ..fedopt import (
    client_control,
    frozen_names,
    personal_names,
    server_control,
    server_optimizer,
    split_control,
    with_control,
)
from ..fedopt.flora import Merged, Stacking, dense_part, lora_part
from ..fedopt.ranks import choose_ranks, flexlora, rank_pad, rank_slice, received_rank
from ..messages import PARAMETERS, SECAGG, SERVER, Message, client_name
from ..models import num_params
from ..privacy import (
    ClientLevelDP,
    dpsgd,
    largest_reported,
    privatize,
    secagg,
    secure_aggregate,
    secure_session,
)
from . import register


class Server:
    """Holds the global trainable state; one ``round`` = a1 (send) then a4 (aggregate)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.global_state = {k: v.clone() for k, v in ctx.init_state.items()}
        self.strategy = build(ctx.cfg.fed)
        self.dp = ClientLevelDP(ctx.cfg) if ctx.cfg.privacy.dp != "off" else None
        self.central = self.dp is not None and self.dp.central
        f = ctx.cfg.fedopt
        # what a1 and a3 carry: not FFA-LoRA's frozen A, not FedSA-LoRA's personal B
        kept = {"ffa": frozen_names, "fedsa": personal_names}.get(f.lora, lambda s: [])
        self.names = [n for n in self.global_state if n not in set(kept(self.global_state))]
        self.opt = server_optimizer(ctx.cfg, self.exchanged())
        # SCAFFOLD's server control variate c (float32, like the exchanged tensors)
        zeros = {n: torch.zeros_like(t) for n, t in self.exchanged().items()}
        self.control = zeros if f.scaffold else {}
        self.ranks = choose_ranks(ctx)  # per-client LoRA ranks (HetLoRA, FlexLoRA), or ()
        flora = f.rank_aggregation == "flora"
        self.stacking = Stacking(ctx.data.num_clients) if flora else None

    def exchanged(self) -> dict[str, torch.Tensor]:
        """The global tensors a1 sends and a3 returns (not FFA-LoRA's A, not FedSA-LoRA's B)."""
        return {n: self.global_state[n] for n in self.names}

    def sent_to(self, cid: int) -> dict[str, torch.Tensor]:
        """a1's adapter for client ``cid``: the first ``r`` ranks at its rank ``r``."""
        return rank_slice(self.exchanged(), self.ranks[cid]) if self.ranks else self.exchanged()

    def a1(self, rnd: int, cid: int, sent: dict[str, torch.Tensor]) -> Message:
        """a1's message: the adapter (and SCAFFOLD's c), or under FLoRA the head and the
        stacks client ``cid`` has not merged, with its rank."""
        tensors, meta = with_control(sent, self.control), {}
        if self.stacking is not None:
            rank = self.ranks[cid] if self.ranks else self.ctx.cfg.model.lora_r
            stacks, meta = self.stacking.downlink(cid, rank)
            tensors = {**dense_part(sent), **stacks}
        return Message(PARAMETERS, rnd, SERVER, client_name(cid), tensors, meta)

    def adopt(self, new: dict[str, torch.Tensor]) -> bool:
        """Make the round's aggregate of the exchanged tensors global, through the server
        optimizer if any; False (and nothing changes) when the result is not finite."""
        ref = self.exchanged()
        new = self.opt.step(ref, new) if self.opt is not None else new
        if not finite(new):  # finite updates can still overflow: keep the last state
            return False
        self.global_state.update(new)
        return True

    def round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]:
        if self.ctx.cfg.privacy.secagg:
            return (yield from self.secure_round(rnd, clients))
        # a1: broadcast the global adapter (and SCAFFOLD's c), at each client's rank.
        ref = self.exchanged()
        sent = {cid: self.sent_to(cid) for cid in clients}
        replies: dict[int, Message] = yield {cid: self.a1(rnd, cid, sent[cid]) for cid in clients}
        # a4: validate the uploads (a3), then aggregate the accepted ones.
        uploads, controls = {}, {}
        for c, m in replies.items():
            uploads[c], controls[c] = split_control(m.tensors)
        fed = self.ctx.cfg.fed
        ok, rejected = screen_updates(
            uploads,
            {cid: sent[cid] for cid in replies},
            0.0 if self.central else fed.max_update_norm,
            {c: m.meta for c, m in replies.items()},
            0.0 if self.central else fed.max_update_ratio,
            {c: float(self.ctx.data.client_sizes[c]) for c in replies},  # a3 sends len(data)
        )
        for c in list(ok) if self.control else []:  # SCAFFOLD: each client's change of c_i
            why = update_problem(controls[c], self.control)
            if why:
                ok.remove(c)
                rejected[str(c)] = f"control variates: {why}"
        for c in replies if self.stacking else []:  # FLoRA: trained on this round's weights
            why = self.stacking.note(c, replies[c].meta)  # (and what each client has merged)
            if why and c in ok:
                ok.remove(c)
                rejected[str(c)] = why
        metrics: dict = {"rejected": len(rejected), "rejected_reasons": rejected}
        if self.ranks:
            metrics["client_ranks"] = [self.ranks[c] for c in clients]
        if not ok:  # nothing usable: the global state stays as it was
            return {**metrics, **(self.dp.metrics() if self.dp else {})}
        weights = [float(replies[c].meta["num_samples"]) for c in ok]
        states = [rank_pad(uploads[c], ref) for c in ok] if self.ranks else [uploads[c] for c in ok]
        if self.central:
            new, dp_metrics = self.dp.aggregate(rnd, ref, states, len(clients))
            metrics.update(dp_metrics)
        elif self.ranks and self.ctx.cfg.fedopt.rank_aggregation == "flexlora":
            new = flexlora(ref, states, weights)
        elif self.stacking is not None:  # the head by FedAvg; the LoRA factors stacked below
            new = self.strategy(dense_part(ref), [dense_part(t) for t in states], weights)
        else:
            new = self.strategy(ref, states, weights)
            if self.dp is not None:
                self.dp.count_local(ok)
        if self.dp is not None:
            metrics.update(self.dp.metrics())
        if self.ctx.cfg.privacy.dpsgd:
            metrics["sample_epsilon"] = largest_reported(
                [replies[c].meta for c in ok], "sample_epsilon"
            )
        if not self.adopt(new):
            metrics["rejected_reasons"] = {**rejected, "aggregate": "non-finite result"}
            return metrics
        if self.stacking is not None:
            self.stacking.absorb(self.ctx.model, [lora_part(uploads[c]) for c in ok], weights)
        if self.control:
            n = self.ctx.data.num_clients
            self.control = server_control(self.control, [controls[c] for c in ok], n)
        losses = [float(replies[c].meta["loss"]) for c in ok]
        return {"train_loss": float(np.average(losses, weights=weights)), **metrics}

    def secure_round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]:
        """a1-a4 under secure aggregation: a1 as usual; each client answers with its keys
        and metadata; the secure sum (:mod:`fedtune.privacy.secagg`) of the clients' weighted,
        fixed-point updates replaces a3's plaintext upload; a4 divides by the summed weight
        (central DP: adds the noise to the sum of clipped updates)."""
        meta = {"clip": self.dp.clip} if self.central else {}
        ref = self.exchanged()
        replies: dict[int, Message] = yield {
            cid: Message(PARAMETERS, rnd, SERVER, client_name(cid), ref, meta) for cid in clients
        }
        sizes = {c: float(self.ctx.data.client_sizes[c]) for c in replies}
        new, metrics, metas = yield from secure_aggregate(
            self.ctx.cfg, self.dp, rnd, ref, replies, sizes, len(clients)
        )
        if self.ctx.cfg.privacy.dpsgd:
            metrics["sample_epsilon"] = largest_reported(list(metas.values()), "sample_epsilon")
        if new is None or not self.adopt(new):
            return metrics
        weights = [float(m["num_samples"]) for m in metas.values()]
        losses = [float(m["loss"]) for m in metas.values()]
        return {"train_loss": float(np.average(losses, weights=weights)), **metrics}

    def eval_state(self) -> dict[str, torch.Tensor]:
        """The global model: the adapter, and under FLoRA the merged weights' residual."""
        return {**self.global_state, **(self.stacking.residual if self.stacking else {})}

    def params_exchanged(self) -> int:
        """Trainable parameters a client exchanges per round (the mean over client ranks)."""
        ranks = self.ranks or [0]
        return int(np.mean([num_params(self.sent_to(c)) for c in range(len(ranks))]))

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume (tensors and small JSON-able values)."""
        d = {"global_state": self.global_state, "aggregator": self.strategy.state_dict()}
        if self.opt is not None:
            d["server_opt"] = self.opt.state_dict()
        if self.control:
            d["control"] = self.control
        if self.stacking is not None:
            d["flora"] = self.stacking.state_dict()
        return {**d, "dp": self.dp.state_dict()} if self.dp is not None else d

    def load_state_dict(self, d: dict) -> None:
        dev = self.ctx.device
        self.global_state = {k: v.to(dev) for k, v in d["global_state"].items()}
        self.strategy.load_state_dict(d["aggregator"])
        if self.opt is not None:
            self.opt.load_state_dict(d["server_opt"], dev)
        if self.control:
            self.control = {k: v.to(dev) for k, v in d["control"].items()}
        if self.stacking is not None:
            args = (self.ctx.model, lora_part(self.ctx.init_state), max_stack(self.ctx.cfg))
            self.stacking.load_state_dict(d["flora"], *args)
        if self.dp is not None:
            self.dp.load_state_dict(d["dp"])


class Client:
    """A simulated client is its data indices and optimizer state, never a model copy."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx, self.cid = ctx, ctx.cid
        self.opt_state: dict | None = None
        self.session: secagg.ClientSession | None = None  # this round's secure sum
        self.rounds_trained = 0  # privacy.dpsgd's accounting
        # SCAFFOLD's c_i, zero at the start (it needs FedIT's tensors: every trainable one)
        zeros = {n: torch.zeros_like(t) for n, t in ctx.init_state.items()}
        self.control = zeros if ctx.cfg.fedopt.scaffold else {}
        own = personal_names(ctx.init_state) if ctx.cfg.fedopt.lora == "fedsa" else []
        self.own = {n: ctx.init_state[n].clone() for n in own}  # FedSA-LoRA: this client's B
        self.flora = Merged() if ctx.cfg.fedopt.rank_aggregation == "flora" else None

    def state_dict(self) -> dict:
        d = {"opt_state": self.opt_state, "rounds_trained": self.rounds_trained}
        if self.own:
            d["own"] = self.own
        if self.flora is not None:
            d["flora"] = self.flora.state_dict()
        return {**d, "control": self.control} if self.ctx.cfg.fedopt.scaffold else d

    def load_state_dict(self, d: dict) -> None:
        self.opt_state = d["opt_state"]
        self.rounds_trained = int(d.get("rounds_trained", 0))
        self.control = dict(d.get("control") or self.control)
        self.own = dict(d.get("own") or self.own)
        if self.flora is not None:
            self.flora.load_state_dict(d["flora"], self.ctx.model)

    def handle(self, msg: Message, link=None) -> Generator[Train, LocalResult, Message | None]:
        cfg, idx, f = self.ctx.cfg, self.ctx.data.samples, self.ctx.cfg.fedopt
        if msg.kind == SECAGG:  # a later step of this round's secure sum
            return self.session.reply(msg) if self.session else None
        sent, c = split_control(msg.tensors)
        start, frozen, correction = sent, (), None
        if f.lora == "ffa":  # A stays at the shared initialization, whatever the server sent
            frozen = tuple(frozen_names(self.ctx.init_state))
            start = {**sent, **{n: self.ctx.init_state[n] for n in frozen}}
        if self.own:  # FedSA-LoRA: the shared A and head, with this client's own B
            start = {**sent, **self.own}
        rank, opt_state = 0, self.opt_state
        if self.flora is not None:  # merge the stacks; a fresh LoRA and optimizer each round
            args = (msg.tensors, msg.meta, self.ctx.init_state, max_stack(cfg))
            got = self.flora.receive(self.ctx.model, *args)
            if got is None:
                return None
            (start, rank), opt_state = got, None
        elif f.client_ranks or f.rank_policy == "budget":  # the server's choice: first r ranks
            rank = received_rank(sent, self.ctx.init_state)
            if not rank:
                return None
            start = rank_pad(sent, self.ctx.init_state)  # trained zero-padded to the top rank
        if f.scaffold:
            if update_problem(c, sent) or update_problem(self.control, sent):
                return None  # c must match the adapter it came with, and our c_i
            correction = {n: c[n] - self.control[n] for n in c}
        # a2: local fine-tuning starting from the received global adapter.
        result = yield Train(
            start,
            opt_state,
            self.ctx.data.train,
            idx,
            self.ctx.task.loss(),
            seeds.client(cfg.seed, msg.round, self.cid),
            steps=num_local_steps(len(idx), cfg.train),
            private=True,
            prox_mu=f.prox_mu,
            correction=correction,
            frozen=frozen,
        )
        self.opt_state = result.opt_state if self.flora is None else None  # FLoRA: fresh
        self.rounds_trained += 1
        state = result.state
        if self.own:
            self.own = {n: state[n] for n in self.own}
            state = {n: t for n, t in state.items() if n not in self.own}
        if rank:
            state = rank_slice(state, rank)
        meta = {"num_samples": len(idx), "loss": result.loss, "steps": result.steps}
        if self.flora is not None:
            meta["merged"] = self.flora.merged
        meta.update(dpsgd.report(cfg, len(idx), self.rounds_trained))
        if cfg.privacy.secagg:  # a3 happens inside the secure sum; first, the keys
            args = (state, sent, msg.meta, len(idx), msg.round, self.cid)
            self.session = secure_session(cfg, *args)
            return self.session.advertise(meta) if self.session else None
        if cfg.privacy.dp == "local":  # clipped and noised before it leaves the client
            state, _ = privatize(cfg, state, sent, msg.round, self.cid)
        if f.scaffold:  # c_i moves; its change travels with the adapter
            args = (sent, state, c, self.control, result.steps, cfg.train.lr)
            self.control, change = client_control(*args)
            state = with_control(state, change)
        # a3: the trained adapter with the sample count used as its FedAvg weight.
        return Message(PARAMETERS, msg.round, client_name(self.cid), SERVER, state, meta)


def max_stack(cfg) -> int:
    """The most ranks one FLoRA stack can hold: every client at ``model.lora_r``."""
    return cfg.data.num_clients * cfg.model.lora_r


def client_eval(ctx: ServerContext, server: Server, clients: dict[int, Client]) -> dict:
    """FedSA-LoRA: the mean test accuracy of the clients' own models (the global A and head
    with each client's B); the headline accuracy is the shared part alone (B at its init)."""
    if ctx.cfg.fedopt.lora != "fedsa":
        return {}
    evals = [
        evaluate(ctx, {**server.global_state, **cl.own}, ctx.data.test)
        for _, cl in sorted(clients.items())
    ]
    return clients_mean(evals)


register("fedllm", Server, Client, title="FedLLM", client_eval=client_eval)
