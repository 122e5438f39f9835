"""Split-FedLLM (SplitLoRA): the client runs the first blocks, the server the rest; activations
and their gradients cross the network per batch (the paper's workflow c1-c5, cc1-cc4).

Per batch (``split.split_layer = k``, see :mod:`.model` for the cut):

c1  the client runs the embeddings and blocks ``[0, k)`` with its LoRA: ``h [B, L, H]``;
c2  it sends ``h`` (encoded by ``split.compression``) and the attention mask ``[B, L]`` as one
    ACTIVATIONS message. Labels go in one LABELS message per round, holding the labels of all
    the round's batches in batch order (the server takes ``B`` of them per batch): the same
    information as per-batch labels, counted under their own kind;
c3  the server runs blocks ``[k, n)``, the final norm and the head with its own LoRA, computes
    the cross-entropy, back-propagates and updates its LoRA and head (Adam);
c4  it returns ``dL/dh`` (encoded the same way) as a GRADIENTS message;
c5  the client back-propagates ``dL/dh`` through its blocks and updates its LoRA.

U-shaped (``split.u_shaped``): the head stays on the client and labels never leave it. In c3
the server stops after the final norm and returns the pooled last hidden states ``[B, H]``
(ACTIVATIONS, down; pooling at each row's last non-pad token is what HF's classifier does, and
the server knows those positions from the mask); the client runs the head and the loss and
sends the gradient of the pooled states (GRADIENTS, up); the server back-propagates, updates
and returns ``dL/dh`` (c4).

Per round, the client-side LoRA is federated as in the paper's cc1-cc4: the server sends each
client the client-side LoRA of its blocks and its split layer (the previous round's cc3, the
initial state in round 1); the client runs c1-c5 on ``split.samples_per_round`` of its samples
(0 = local epochs) and then:

cc1  uploads its client-side LoRA and the number of samples it processed;
cc2  the server aggregates every tensor by sample count over the parties that trained it: the
     clients that own its block and, for server-side blocks, the server model(s);
cc3  the server redistributes the aggregate to the clients (the next round's first message);
cc4  each client replaces its client-side LoRA with it.

``split.server_mode``: 'shared' trains one server-side model on all clients' batches in turn
(SplitLoRA); 'per_client' trains one server-side copy per client, averaged in cc2.
"""

from __future__ import annotations

from .. import register
from .client import Client
from .config import SplitConfig
from .server import Server

register("split", Server, Client, config=SplitConfig, title="Split-FedLLM")

__all__ = ["Client", "Server", "SplitConfig"]
