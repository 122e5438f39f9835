"""Secure aggregation: the masked sum is the plain sum, the server sees only masked vectors,
dropouts mid-protocol are survived, unsafe requests are refused, and FedLLM and Split-FedLLM's
client LoRA run with it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from fedtune.errors import ConfigError, MessageError
from fedtune.messages import PARAMETERS, SECAGG, Wire, encoded_size
from fedtune.privacy import secagg
from fedtune.runtime.loop import simulate

P = SimpleNamespace(secagg_threshold=0)  # the [privacy] fields the protocol reads (majority)


def _run_protocol(vectors, drop_at=None, wire=None, mangle=None, bad_keys=()):
    """Drive :func:`secagg.server_sum` with in-memory clients. ``drop_at[cid] = stage`` makes
    a client stop answering from that stage on ('shares', 'masked', 'unmask'). Returns the
    result and every message the server received."""
    drop_at, wire = drop_at or {}, wire or Wire()
    cfg = SimpleNamespace(privacy=SimpleNamespace(secagg_threshold=0))
    sessions = {c: secagg.ClientSession(P, 1, c, v) for c, v in vectors.items()}
    received = []

    def deliver(outgoing):
        replies = {}
        for c, msg in outgoing.items():
            msg = wire.transfer(msg)
            if drop_at.get(c) == msg.meta.get("stage") or drop_at.get(c) == "gone":
                drop_at[c] = "gone"
                continue
            try:
                reply = sessions[c].answer(msg)
            except MessageError:
                continue
            if mangle is not None:
                reply = mangle(c, reply)
            replies[c] = wire.transfer(reply)
            received.append(replies[c])
        return replies

    keys = {c: wire.transfer(s.advertise({})) for c, s in sessions.items()}
    for c in bad_keys:  # the all-zero point: every agreement with it would fail
        keys[c].tensors["keys"] = torch.zeros(2, 32, dtype=torch.uint8)
    received += keys.values()
    dim = len(next(iter(vectors.values())))
    gen = secagg.server_sum(cfg, 1, keys, dim)
    try:
        out = next(gen)
        while True:
            out = gen.send(deliver(out))
    except StopIteration as stop:
        return stop.value, received


def _vectors(n, dim=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 2**64, dim, dtype=np.uint64) for c in range(n)}


def test_masked_sum_is_the_plain_sum_and_the_server_sees_only_masks():
    xs = _vectors(4)
    result, received = _run_protocol(xs)
    assert result.clients == [0, 1, 2, 3] and not result.failed
    assert np.array_equal(result.total, sum(xs.values()))  # exact: integers mod 2^64
    masked = [m.tensors["masked"].numpy().view(np.uint64) for m in received if m.kind == PARAMETERS]
    assert len(masked) == 4
    for y in masked:  # no received vector equals (or is close to) any client's input
        for x in xs.values():
            assert np.count_nonzero(y == x) < 3  # 1000 uniform 64-bit draws: ~0 collisions
    kinds = {m.kind for m in received}
    assert kinds == {SECAGG, PARAMETERS}


@pytest.mark.parametrize("stage", ["masked", "unmask"])
def test_dropouts_mid_protocol(stage):
    """Client 1 stops answering at ``stage``: before sending its masked vector (the others'
    pairwise masks with it are removed through its Shamir-shared key) or after (its vector
    counts; its self mask is rebuilt from the others' shares)."""
    xs = _vectors(5)
    result, _ = _run_protocol(xs, drop_at={1: stage})
    if stage == "masked":
        assert result.clients == [0, 2, 3, 4]
        assert np.array_equal(result.total, sum(xs[c] for c in (0, 2, 3, 4)))
    else:
        assert result.clients == [0, 1, 2, 3, 4]
        assert np.array_equal(result.total, sum(xs.values()))


def test_too_many_dropouts_fail_cleanly():
    result, _ = _run_protocol(_vectors(5), drop_at={0: "masked", 1: "masked", 2: "unmask"})
    assert result.total is None and "shares" in result.failed  # 3 of 5 needed, 2 left


def test_clients_refuse_unsafe_requests():
    x = _vectors(1)[0]
    s = secagg.ClientSession(P, 1, 0, x)
    with pytest.raises(MessageError, match="unexpected stage"):
        s.answer(secagg.Message(SECAGG, 1, "server", "client-0", {}, {"stage": "unmask"}))
    with pytest.raises(MessageError, match="too few"):  # alone: its input would be revealed
        keys = s.advertise({}).tensors["keys"].reshape(1, -1)
        ids = torch.tensor([0])
        s.answer(
            secagg.Message(
                SECAGG, 1, "server", "client-0", {"ids": ids, "keys": keys}, {"stage": "shares"}
            )
        )


def test_a_client_asked_to_reveal_both_secrets_of_one_peer_refuses():
    """The server lists client 1 as alive and dropped at once: revealing both its self-mask
    seed and its mask key would unmask its vector. Every client refuses: no sum."""

    def both(c, reply):
        return reply

    xs = _vectors(3)
    sessions = {c: secagg.ClientSession(P, 1, c, v) for c, v in xs.items()}
    # run stages 1-3 by hand, then send a forged unmask request
    keys = {c: s.advertise({}) for c, s in sessions.items()}
    cfg = SimpleNamespace(privacy=P)
    gen = secagg.server_sum(cfg, 1, keys, 1000)
    out = next(gen)
    out = gen.send({c: sessions[c].answer(m) for c, m in out.items()})
    gen.send({c: sessions[c].answer(m) for c, m in out.items()})
    forged = secagg.Message(
        SECAGG,
        1,
        "server",
        "client-0",
        {"alive": torch.tensor([0, 1, 2]), "dropped": torch.tensor([1])},
        {"stage": "unmask"},
    )
    with pytest.raises(MessageError, match="inconsistent"):
        sessions[0].answer(forged)


def test_malformed_replies_are_ignored_not_fatal():
    def mangle(c, reply):
        if c == 2 and reply.kind == PARAMETERS:  # a masked vector of the wrong length
            reply.tensors["masked"] = reply.tensors["masked"][:10]
        return reply

    xs = _vectors(4)
    result, _ = _run_protocol(xs, mangle=mangle)
    assert result.clients == [0, 1, 3]
    assert np.array_equal(result.total, xs[0] + xs[1] + xs[3])


def test_fixed_point_round_trip():
    v = np.array([0.5, -1.25, 3e-8, -100.0])
    enc = secagg.encode(v, 24)
    assert np.allclose(secagg.decode(enc + enc, 24), 2 * v, atol=2 * 2.0**-25)
    c, n = secagg.clamp(np.array([5.0, -7.0, 1.0]), 2.0)
    assert n == 2 and c.tolist() == [2.0, -2.0, 1.0]


def _final_state(tmp_path, name, synth_dir, **sections):
    from safetensors.torch import load_file

    cfg = tiny_cfg(synth_dir, **sections)
    summary = simulate(cfg, tmp_path / name, log=None)
    return summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def test_fedllm_with_secure_aggregation_equals_fedavg(tmp_path, synth_dir):
    plain, a = _final_state(tmp_path, "plain", synth_dir)
    secure, b = _final_state(tmp_path, "secure", synth_dir, privacy={"secagg": True})
    # each encoded value is off by at most 2^-25, so a decoded mean over 3 clients of weight
    # >= 1 by at most 3 x 2^-25 a round; over 2 rounds twice that
    bound = 2 * 3 * 2.0**-25
    for k in a:
        assert torch.allclose(a[k], b[k], atol=bound + 1e-6, rtol=1e-5), k
    by_kind = secure["bytes_per_client_per_round_by_kind"]
    assert by_kind["up"]["secagg"] > 0 and by_kind["down"]["secagg"] > 0
    # the masked upload is one int64 vector: the parameters and the weight, 8 bytes each
    d = secure["trainable_params_exchanged"]
    masked = encoded_size({"masked": torch.zeros(d + 1, dtype=torch.int64)}, round=1)
    assert by_kind["up"]["parameters"] == masked > 8 * d


def test_fedllm_secure_aggregation_survives_a_dropout_mid_protocol(tmp_path, synth_dir):
    from fedtune import config

    cfg = tiny_cfg(synth_dir, privacy={"secagg": True})
    cfg = config.with_overrides(cfg, fed={"dropout": 0.4, "dropout_exchange": 3})
    summary = simulate(cfg, tmp_path / "d", log=None)
    assert summary["rounds"] == 2 and summary["clients_dropped"] >= 1


def test_a_client_with_a_low_order_public_key_is_left_out():
    xs = _vectors(4)
    result, _ = _run_protocol(xs, bad_keys=(2,))
    assert result.clients == [0, 1, 3]
    assert np.array_equal(result.total, xs[0] + xs[1] + xs[3])


def test_a_secure_sum_with_an_impossible_clip_count_is_rejected():
    """Central DP under secure aggregation sums each client's unclipped bit: a sum of two
    clients' bits that is not in [0, 2] (a client sent 1e6) must not move the clip bound."""
    from fedtune import config
    from fedtune.privacy import ClientLevelDP, secure_mean

    cfg = config.load(None, ["privacy.dp=central", "privacy.secagg=true", "privacy.noise=0"])
    ref = {"w": torch.zeros(3)}
    dpc = ClientLevelDP(cfg)

    def mean(bits: float):
        total = secagg.encode(np.array([0.1, 0.2, 0.3, 2.0, bits]), 24)  # update, weights, bits
        return secure_mean(cfg, dpc, 1, ref, secagg.SumResult(total, [0, 1]), 2.0, 2)

    new, metrics = mean(1e6)
    assert new is None and metrics["secagg_failed"] == "the secure sum is out of range"
    new, metrics = mean(2.0)
    assert torch.allclose(new["w"], torch.tensor([0.05, 0.1, 0.15])) and metrics["dp_clipped"] == 0


def test_split_with_secure_aggregation_equals_plain_split(tmp_path, synth_dir):
    """Split-FedLLM's client LoRA (cc1-cc2) through the secure sum: the same adapter as plain
    averaging to the fixed-point precision, and the server received only masked vectors."""
    split = {"fed": {"framework": "split"}, "split": {"split_layer": 1}}
    plain, a = _final_state(tmp_path, "plain", synth_dir, **split)
    secure, b = _final_state(tmp_path, "secure", synth_dir, **split, privacy={"secagg": True})
    bound = 2 * 3 * 2.0**-25  # as for FedLLM: 3 clients, 2 rounds
    for k in a:
        assert torch.allclose(a[k], b[k], atol=bound + 1e-6, rtol=1e-5), k
    by_kind = secure["bytes_per_client_per_round_by_kind"]
    assert by_kind["up"]["secagg"] > 0 and by_kind["down"]["secagg"] > 0
    # the activations and labels are those of plain split; the upload is one masked vector
    for kind in ("activations", "labels"):
        assert by_kind["up"][kind] == plain["bytes_per_client_per_round_by_kind"]["up"][kind]
    d = secure["trainable_params_exchanged"]
    masked = encoded_size({"masked": torch.zeros(d + 1, dtype=torch.int64)}, round=1)
    assert by_kind["up"]["parameters"] == masked


def test_split_secure_aggregation_survives_a_dropout_mid_protocol(tmp_path, synth_dir):
    from fedtune import config

    cfg = tiny_cfg(synth_dir, fed={"framework": "split"}, privacy={"secagg": True})
    cfg = config.with_overrides(cfg, fed={"dropout": 0.4, "dropout_exchange": 3})
    summary = simulate(cfg, tmp_path / "d", log=None)
    assert summary["rounds"] == 2 and summary["clients_dropped"] >= 1


def test_split_secure_aggregation_needs_one_split_layer(tmp_path, synth_dir):
    """The budget policy can give clients different layers: refused when the run starts."""
    cfg = tiny_cfg(
        synth_dir,
        fed={"framework": "split"},
        split={"policy": "budget", "client_compute_budgets": [1.0, 1.0, 0.6]},
        privacy={"secagg": True},
    )
    with pytest.raises(ConfigError, match="privacy.secagg"):
        simulate(cfg, tmp_path / "b", log=None)
