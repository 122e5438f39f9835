"""KD-FedLLM: federated knowledge distillation through logits on a shared public set.

Every party keeps its own model (a trainable state: LoRA + head); only logits on the public
set (``ctx.data.public``, or a seeded subset of ``kd.public_samples``) cross the wire.

b1  each client fine-tunes its persistent local model on its private data;
b2  each client computes its logits on the public selection (public labels are never used);
b3  each client uploads them (LOGITS, compressed by ``kd.topk`` / ``kd.logit_dtype``);
b4  the server aggregates them into global knowledge: a weighted mean of softened
    probabilities, after an optional entropy filter (``kd.aggregate``, ``kd.entropy_threshold``);
b5  the server distils that knowledge into the global model (KL at temperature T);
b6  the server computes the global model's logits on the public set;
b7  the server sends them to every client (LOGITS, same compression);
b8  each client distils them into its local model.

What goes on the wire, per sampled client and round:
  down  METADATA  "start" (b1-b3 trigger); with ``kd.prune`` also a bitmask of the kept
                  public samples (N/8 bytes), since the selection changes every round;
  up    LOGITS    the client's packed logits [S, C] + its sample count and training loss;
  down  LOGITS    the global model's packed logits [S, C];
  b8 sends no reply: nothing the server needs, and the next upload acknowledges it. So b7 is
  a :class:`~fedtune.messages.Notices`: on Flower it travels with the client's next message
  (one exchange per round), and the client runs b8 before that message's b1.
With ``kd.align`` a client answers a METADATA request once, with its label histogram (LABELS,
[C] int32): private data does not change, so resending it every round would only cost bytes.
The public texts themselves are not counted: like the backbone, every party has them before
training starts. ``params_exchanged()`` is 0: no trainable parameter ever crosses the wire;
the logits are what is counted, in bytes.
"""

from __future__ import annotations

from .. import register
from .client import Client, client_eval
from .config import KDConfig
from .server import Server

register("kd", Server, Client, config=KDConfig, title="KD-FedLLM", client_eval=client_eval)

__all__ = ["Client", "KDConfig", "Server"]
