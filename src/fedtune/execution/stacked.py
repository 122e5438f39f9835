"""N clients' optimizers as one: Adam / AdamW / SGD over a multi-client network's ``[N, P]`` buffer.

Used by the batched engine (:mod:`.engine`). Optimizer state converts to and from torch's
``state_dict()`` format per client, so a client's saved optimizer state is the same whichever
executor trained it.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from . import multilora
from .train import make_optimizer, trainable_params


class StackedOptimizer:
    """N clients' Adam / AdamW / SGD (as :func:`fedtune.execution.train.make_optimizer` builds them) over
    the multi-client network's ``flat [N, P]`` buffer, with per-client step counts, masks and
    gradient clipping: about 15 kernels per step, however many tensors a client trains.

    Optimizer state converts to and from torch's ``state_dict()`` format per client, so a
    client's saved optimizer state is the same whichever engine trained it."""

    def __init__(self, mnet: multilora.MultiNet, cfg: TrainConfig, template: dict) -> None:
        self.mnet, self.cfg, self.template = mnet, cfg, template
        group = template["param_groups"][0]
        self.lr, self.wd = cfg.lr, cfg.weight_decay
        self.betas, self.eps = group.get("betas", (0.9, 0.999)), group.get("eps", 1e-8)
        self.adam = cfg.optimizer in ("adam", "adamw")
        flat = mnet.flat
        self.m = torch.zeros_like(flat) if self.adam else None
        self.v = torch.zeros_like(flat) if self.adam else None
        self.steps = torch.zeros(mnet.n, dtype=torch.float64, device=flat.device)

    @torch.no_grad()
    def load(self, slot: int, opt_state: dict | None) -> None:
        """Set slot ``slot`` from a torch optimizer ``state_dict()`` (None = fresh)."""
        if not self.adam:
            return
        st = (opt_state or {}).get("state", {})
        self.steps[slot] = float(st[0]["step"]) if 0 in st else 0.0
        for i, name in enumerate(self.mnet.layout):
            s = st.get(i)
            self.mnet.view(self.m, slot, name).copy_(s["exp_avg"] if s else 0.0)
            self.mnet.view(self.v, slot, name).copy_(s["exp_avg_sq"] if s else 0.0)

    @torch.no_grad()
    def state_dict(self, slot: int) -> dict:
        """Slot ``slot`` in torch's optimizer ``state_dict()`` format."""
        state, names = {}, list(self.mnet.layout)
        if self.adam:
            step = torch.tensor(float(self.steps[slot]), dtype=torch.float32)
            for i, name in enumerate(names):
                dtype = self.mnet.layout[name][2]
                state[i] = {
                    "step": step.clone(),
                    "exp_avg": self.mnet.view(self.m, slot, name).to(dtype, copy=True),
                    "exp_avg_sq": self.mnet.view(self.v, slot, name).to(dtype, copy=True),
                }
        groups = [dict(g, params=list(range(len(names)))) for g in self.template["param_groups"]]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One update of every client whose ``active [N]`` (bool) is set; others are untouched.

        The arithmetic of torch's single-tensor Adam/AdamW/SGD and ``clip_grad_norm_``, in
        place with per-client coefficients ``[N, 1]`` (0/1 masks make inactive rows exact
        no-ops), so the peak is about three ``[N, P]`` temporaries."""
        p, g = self.mnet.flat, self.mnet.flat_grad()  # [N, P]
        self.zero_grad()  # the per-tensor gradients are copied into g: free them now
        if self.cfg.grad_clip > 0:  # each client's own gradient norm
            norm = g.pow(2).sum(1, keepdim=True).sqrt()
            g.mul_((self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        on = active.view(-1, 1).to(p.dtype)
        self.steps += active.to(self.steps.dtype)
        if self.wd and self.cfg.optimizer != "adamw":  # coupled L2 (Adam, SGD)
            g.add_(p, alpha=self.wd)
        if not self.adam:  # plain SGD (make_optimizer builds it without momentum)
            p.sub_(g.mul_(self.lr * on))
            return
        b1, b2 = self.betas
        if self.cfg.optimizer == "adamw":
            p.mul_(1 - self.lr * self.wd * on)
        # m <- b1 m + (1 - b1) g and v <- b2 v + (1 - b2) g^2, for active clients only
        self.m.mul_(1 - (1 - b1) * on).add_(g * ((1 - b1) * on))
        self.v.mul_(1 - (1 - b2) * on).add_(g.mul_(g).mul_((1 - b2) * on))
        t = self.steps.clamp(min=1).view(-1, 1)
        step_size = (self.lr / (1 - b1**t)).to(p.dtype) * on
        bc2_sqrt = (1 - b2**t).sqrt().to(p.dtype)
        denom = self.v.sqrt().div_(bc2_sqrt).add_(self.eps)
        p.sub_(denom.reciprocal_().mul_(self.m).mul_(step_size))

    def zero_grad(self) -> None:
        for p in self.mnet.params():
            p.grad = None


def optimizer_template(model, cfg: TrainConfig) -> dict:
    """``state_dict()`` of a fresh torch optimizer over ``model``'s trainable parameters (its
    ``param_groups`` are copied into every saved client state)."""
    return make_optimizer(trainable_params(model), cfg).state_dict()
