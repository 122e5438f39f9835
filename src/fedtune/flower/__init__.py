"""Real deployment on Flower (``flwr`` 1.42): the same frameworks, messages and byte counting
as the simulation, across machines.

* :mod:`.server_app` - the ServerApp: the round loop of :mod:`fedtune.runtime.loop` (the one
  ``fedtune run`` uses) over :mod:`.transport`, which ships every encoded
  :class:`~fedtune.messages.Message` inside a Flower ``ConfigRecord``;
* :mod:`.client_app` - the ClientApp: forwards each message's bytes to the node's worker;
* :mod:`.node` - the worker inside the SuperNode process (model loaded once, client state kept);
* :mod:`.split_link` - Split-FedLLM's per-batch exchange over a direct gRPC stream;
* :mod:`.rpc` - the bytes-only gRPC stream both use;
* :mod:`.deploy` - app folder, certificates, keys, starting SuperLink / SuperNodes, ``flwr run``.

Install with ``pip install -e '.[flower]'``.
"""
