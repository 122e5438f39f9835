import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from fedtune import config, frameworks
from fedtune.context import build_context
from fedtune.errors import ConfigError, MessageError
from fedtune.frameworks import kd
from fedtune.frameworks.kd.common import public_subset, received_logits
from fedtune.frameworks.kd.ops import (
    Distill,
    aggregate_knowledge,
    alignment_weights,
    label_distribution,
    pack_logits,
    prune_public,
    sharpen,
    tv_distance,
    unpack_logits,
)
from fedtune.messages import DOWN, LOGITS, METADATA, SERVER, UP, Message, client_name, encode
from fedtune.runtime import simulate
from fedtune.runtime.inprocess import InProcess
from fedtune.runtime.loop import run_round


def kd_loss(student, teacher, temperature, weights=None):
    """The distillation loss of a batch whose rows are the teacher's rows."""
    rows = {"labels": torch.arange(len(student))}
    return Distill(teacher, temperature, weights)(student, rows)


def kd_cfg(synth_dir, rounds=2, **kd_opts):
    # One thread: a tiny model gains nothing from two, and loses a lot when the cores are busy.
    return tiny_cfg(synth_dir, fed={"framework": "kd", "rounds": rounds}, kd=kd_opts, threads=1)


# ----------------------------------------------------------------------------- pure functions


def test_kd_loss_is_zero_only_when_student_matches_teacher():
    torch.manual_seed(0)
    student = torch.randn(6, 5)
    for t in (1.0, 2.0, 4.0):
        teacher = (student / t).softmax(-1)
        assert kd_loss(student, teacher, t).abs() < 1e-6
        assert kd_loss(student + 3.0, teacher, t).abs() < 1e-6  # softmax is shift-invariant
        assert kd_loss(torch.randn(6, 5), teacher, t) > 1e-3
    w = torch.tensor([1.0, 0, 0, 0, 0, 0])  # weights select rows
    other = student.clone()
    other[1:] = torch.randn(5, 5)
    assert kd_loss(other, (student / 2).softmax(-1), 2.0, w).abs() < 1e-6


def test_mean_aggregation_of_identical_client_logits_returns_them():
    torch.manual_seed(0)
    x = torch.randn(7, 4)
    for how in ("mean", "samples", "confidence"):
        teacher, kept = aggregate_knowledge([x, x.clone(), x.clone()], 2.0, how, [10, 20, 30])
        assert torch.allclose(teacher, (x / 2).softmax(-1), atol=1e-6) and kept.all()
    a, b = torch.randn(7, 4), torch.randn(7, 4)
    teacher, _ = aggregate_knowledge([a, b], 1.0, "samples", [1, 3])
    assert torch.allclose(teacher, 0.25 * a.softmax(-1) + 0.75 * b.softmax(-1), atol=1e-6)


def test_entropy_filter_drops_unsure_clients():
    sure = torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 0.0]])  # confident, then uniform
    unsure = torch.zeros(2, 4)  # uniform: normalized entropy 1
    teacher, kept = aggregate_knowledge([sure, unsure], 1.0, "mean", entropy_threshold=0.5)
    assert torch.allclose(teacher[0], sure[0].softmax(-1))  # the unsure client is ignored
    assert kept.tolist() == [True, False]  # nobody is sure about sample 1


def test_alignment_moves_public_labels_toward_the_clients():
    rng = np.random.default_rng(0)
    public = rng.choice(4, size=400, p=[0.55, 0.25, 0.15, 0.05])
    target = np.array([10, 20, 30, 40])  # the clients' aggregate private histogram
    goal = target / target.sum()
    before = tv_distance(label_distribution(public, 4), goal)
    w = alignment_weights(public, target)
    after = tv_distance(label_distribution(public, 4, w), goal)
    assert before > 0.3 and after < before and after < 1e-9 and np.isclose(w.mean(), 1.0)
    draws = rng.choice(len(public), size=4000, p=w / w.sum())  # kd.align=resample
    assert tv_distance(label_distribution(public[draws], 4), goal) < before / 4


def test_public_subset_is_a_seeded_nested_sample_not_a_prefix():
    # A class-grouped file (as Banking77's train.csv is): a prefix would hold one class.
    labels = np.repeat(np.arange(10), 50)  # [500], sorted by class
    pub = np.arange(0, 500, 2)  # 250 public indices, sorted
    small, large = public_subset(pub, 20, seed=0), public_subset(pub, 100, seed=0)
    assert len(np.unique(labels[pub[:20]])) == 1  # what "the first 20" used to give
    assert len(np.unique(labels[small])) >= 6 and len(np.unique(labels[large])) == 10
    assert set(small) <= set(large) <= set(pub) and np.all(np.diff(large) > 0)
    assert np.array_equal(small, public_subset(pub, 20, seed=0))
    assert not np.array_equal(small, public_subset(pub, 20, seed=1))
    assert np.array_equal(public_subset(pub, 0, seed=0), pub)


def test_int8_quantization_error_is_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(50, 77) * 5
    packed = pack_logits(x, dtype="int8")
    assert packed["values"].dtype == torch.int8 and packed["scale"].shape == (50,)
    y = unpack_logits(packed, 77)
    # the per-row offset is not sent (softmax ignores it): compare after centring the rows
    centre = (x.amax(-1, keepdim=True) + x.amin(-1, keepdim=True)) / 2
    err = (y - (x - centre)).abs()
    assert (err <= packed["scale"].unsqueeze(-1) / 2 + 1e-5).all()
    assert torch.allclose(y.softmax(-1), x.softmax(-1), atol=0.02)
    half = unpack_logits(pack_logits(x, dtype="float16"), 77)
    assert (half - x).abs().max() < 5e-3 * x.abs().max()


def test_topk_keeps_the_largest_and_renormalises():
    x = torch.tensor([[1.0, 5.0, 3.0, -2.0], [0.0, -1.0, 2.0, 4.0]])
    packed = pack_logits(x, topk=2)
    assert packed["indices"].dtype == torch.uint8 and packed["values"].shape == (2, 2)
    p = unpack_logits(packed, 4).softmax(-1)
    assert p[0, 0] == p[0, 3] == 0 and p[1, 0] == p[1, 1] == 0
    assert torch.allclose(p[0, [1, 2]], x[0, [1, 2]].softmax(-1))
    q = unpack_logits(pack_logits(x, topk=2, dtype="int8"), 4).softmax(-1)
    assert (q.argmax(-1) == torch.tensor([1, 3])).all()


def test_logits_wire_format_is_pinned():
    """Names, dtypes and shapes of KD's logits on the wire for every logit_dtype and topk."""
    x = torch.randn(6, 77)
    for dtype, values_dtype in (
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("int8", torch.int8),
    ):
        for topk in (0, 5):
            t = pack_logits(x, topk, dtype)
            k = topk or 77
            want = {"values": (values_dtype, (6, k))}
            if topk:
                want["indices"] = (torch.uint8, (6, k))
            if dtype == "int8":
                want["scale"] = (torch.float32, (6,))
            assert {n: (v.dtype, tuple(v.shape)) for n, v in t.items()} == want, (dtype, topk)
    assert pack_logits(torch.randn(2, 300), 3)["indices"].dtype == torch.int16


def test_malformed_logits_name_their_sender():
    packed = pack_logits(torch.randn(3, 4), topk=2)
    packed["indices"][0, 0] = 9  # a class the receiver does not have
    msg = Message(LOGITS, 1, client_name(2), SERVER, packed)
    with pytest.raises(MessageError, match=r"logits from client-2 are malformed: .*range"):
        received_logits(msg, 3, 4, client_name(2), topk=2)
    ok = Message(LOGITS, 1, client_name(2), SERVER, pack_logits(torch.randn(3, 4), topk=2))
    with pytest.raises(MessageError, match=r"expected \[2, 4\]"):
        received_logits(ok, 2, 4, client_name(2), topk=2)  # 3 rows where 2 were expected
    # -inf (a class not sent) only under top-k: top-k rows when the run sends whole rows are
    # refused, and so are whole rows when it sends top-k, or another k
    for sent, want in ((2, 0), (0, 2), (3, 2)):
        m = Message(LOGITS, 1, client_name(2), SERVER, pack_logits(torch.randn(3, 4), topk=sent))
        with pytest.raises(MessageError, match="logits from client-2"):
            received_logits(m, 3, 4, client_name(2), topk=want)


def test_pruning_keeps_the_least_confident_samples():
    logits = torch.tensor([[9.0, 0, 0], [0.1, 0, 0], [3.0, 2.9, 0], [5.0, 0, 0]])
    assert prune_public(logits, "entropy", 0.5).tolist() == [1, 2]
    assert prune_public(logits, "margin", 0.25).tolist() == [1]
    assert prune_public(logits, "none", 0.25).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- config


def test_kd_config_is_validated_and_presets_load(tmp_path):
    for override, key in (
        ("kd.temperature=0", "kd.temperature"),
        ("kd.prune_keep=0", "kd.prune_keep"),
        ("kd.entropy_threshold=1.5", "kd.entropy_threshold"),
        ("kd.server_epochs=0", "kd.server_epochs"),
        ("kd.topk=-1", "kd.topk"),
        ("kd.sharpen=0", "kd.sharpen"),
        ("kd.sharpen=1.5", "kd.sharpen"),
    ):
        with pytest.raises(ConfigError, match=f"config key {key}:"):
            config.load(None, [override])
    with pytest.raises(ConfigError, match="kd.prune: 'x' is not one of"):
        config.load(None, ["kd.prune=x"])
    for name in ("demo-kd", "paper-kd"):
        cfg = config.load(f"configs/{name}.toml")
        assert cfg.fed.framework == "kd"
        (tmp_path / "c.toml").write_text(config.to_toml(cfg))
        assert config.load(tmp_path / "c.toml") == cfg
    paper = config.load("configs/paper-kd.toml")
    m, d, t = paper.model, paper.data, paper.train
    assert (m.name, m.lora_alpha, m.lora_dropout, m.max_length) == ("gpt2", 32.0, 0.1, 80)
    assert (d.public_size, d.num_clients, d.samples_per_client) == (5002, 3, 1667)
    assert (t.lr, paper.fed.rounds, paper.kd.public_samples) == (1e-3, 100, 0)


def test_topk_must_be_below_the_number_of_classes(synth_dir):
    ctx = build_context(kd_cfg(synth_dir, topk=4))
    with pytest.raises(ConfigError, match="kd.topk"):
        kd.Server(ctx.server())


# ----------------------------------------------------------------------------- on the wire


def one_round(cfg):
    ctx, transport = build_context(cfg), InProcess()
    sctx = transport.prepare(cfg, ctx)
    server = kd.Server(sctx)
    transport.start(sctx, frameworks.get("kd"), server)
    metrics = run_round(sctx, server, transport, 1, [0, 1, 2]).metrics
    return ctx, server, transport.clients, transport.wire.ledger.round_totals(1), metrics


def upload_size(values: dict[str, torch.Tensor], cid: int, num_samples: int) -> int:
    meta = {"num_samples": num_samples, "loss": f"{0.0:.6e}"}  # the loss is fixed-width
    return len(encode(Message(LOGITS, 1, client_name(cid), SERVER, values, meta)))


def test_bytes_up_are_the_public_logits_and_topk_cuts_them(synth_dir):
    ctx, server, clients, totals, metrics = one_round(kd_cfg(synth_dir, public_samples=40))
    s, c, n = 40, ctx.data.num_labels, len(ctx.data.client_idx[0])
    full = upload_size({"values": torch.zeros(s, c)}, 0, n)
    header = full - s * c * 4
    assert 0 < header < 400  # routing + metadata JSON; the payload is S x C float32
    for cid in range(3):
        assert totals[client_name(cid)][UP] == {LOGITS: full}
        down = totals[client_name(cid)][DOWN]
        assert set(down) == {METADATA, LOGITS} and down[METADATA] < 400
        assert down[LOGITS] == len(
            encode(Message(LOGITS, 1, SERVER, client_name(cid), {"values": torch.zeros(s, c)}))
        )
    assert metrics["public_samples"] == s and server.params_exchanged() == 0

    k = 2
    _, _, _, totals_k, _ = one_round(kd_cfg(synth_dir, public_samples=40, topk=k))
    up_k = totals_k[client_name(0)][UP][LOGITS]
    expected = upload_size(
        {"values": torch.zeros(s, k), "indices": torch.zeros(s, k, dtype=torch.uint8)}, 0, n
    )
    assert up_k == expected
    assert up_k - s * k * (4 + 1) < 400  # k fp32 values + k uint8 indices per sample + header

    _, _, _, totals_q, _ = one_round(kd_cfg(synth_dir, public_samples=40, logit_dtype="int8"))
    expected = upload_size(
        {"values": torch.zeros(s, c, dtype=torch.int8), "scale": torch.zeros(s)}, 0, n
    )
    assert totals_q[client_name(0)][UP][LOGITS] == expected  # S x C int8 + S fp32 scales


def test_every_option_runs_and_is_counted(synth_dir):
    cfg = kd_cfg(
        synth_dir,
        topk=2,
        logit_dtype="int8",
        prune="entropy",
        prune_keep=0.5,
        align="resample",
        aggregate="confidence",
        entropy_threshold=0.99,
        server_uses_public_labels=True,
    )
    ctx, server, clients, totals, metrics = one_round(cfg)
    n = len(ctx.data.public_idx)
    assert metrics["public_samples"] == math.ceil(n / 2)
    assert all(len(cl.selection) == math.ceil(n / 2) for cl in clients.values())
    up = totals[client_name(0)][UP]
    assert set(up) == {"labels", LOGITS} and up["labels"] < 400  # the histogram, sent once
    assert "align_tv_after" in metrics and metrics["align_tv_after"] <= metrics["align_tv_before"]
    assert set(server.histograms) == {0, 1, 2}


def test_clients_keep_their_own_models(synth_dir):
    ctx, server, clients, _, _ = one_round(kd_cfg(synth_dir, public_samples=16))
    assert not any(
        isinstance(v, torch.nn.Module) for cl in clients.values() for v in vars(cl).values()
    )
    states = [server.state, *(cl.state for cl in clients.values())]
    name = next(iter(ctx.init_state))
    for i, a in enumerate(states):  # everyone moved away from the shared start, differently
        assert not torch.equal(a[name], ctx.init_state[name])
        assert all(not torch.equal(a[name], b[name]) for b in states[i + 1 :])
    assert all(cl.opt_state is not None for cl in clients.values()) and server.opt_state is not None


def test_kd_learns_and_is_deterministic(synth_dir, tmp_path):
    cfg = kd_cfg(synth_dir, rounds=6, server_epochs=3)
    a = simulate(cfg, tmp_path / "a", log=None)
    assert a["final_accuracy"] > 0.45  # the global model; 4 classes: chance is 0.25
    assert a["trainable_params_exchanged"] == 0 and a["server_flops_per_round"] > 0
    # the same seed replays the same rounds (a shorter run, to keep the test fast)
    simulate(config.with_overrides(cfg, fed={"rounds": 2}), tmp_path / "b", log=None)
    a_lines, b_lines = (
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("a", "b")
    )
    keys = (
        "accuracy",
        "client_accuracy",
        "train_loss",
        "server_distill_loss",
        "bytes_up_per_client",
        "bytes_down_per_client",
        "client_flops",
        "server_flops",
    )
    assert [[r[k] for k in keys] for r in a_lines[:2]] == [[r[k] for k in keys] for r in b_lines]
    assert 0 <= a_lines[-1]["client_accuracy"] <= 1


def test_sharpening_squares_at_one_half_and_keeps_the_argmax():
    """kd.sharpen s: p^(1/s) per row, renormalized; s = 1/2 squares the probabilities."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert torch.equal(sharpen(p, 1.0), p)
    want = torch.tensor([[25.0, 9.0, 4.0], [1.0, 1.0, 64.0]])
    assert torch.allclose(sharpen(p, 0.5), want / want.sum(-1, keepdim=True), atol=1e-6)
    hard = sharpen(p, 0.01)
    assert torch.equal(hard.argmax(-1), p.argmax(-1)) and (hard.max(-1).values > 0.99).all()
    assert torch.allclose(hard.sum(-1), torch.ones(2), atol=1e-6)


def test_teacher_accuracy_is_the_aggregate_argmax_against_the_public_labels(synth_dir):
    """``teacher_accuracy`` (a measurement; training does not read public labels): the
    share of this round's public samples whose aggregated teacher's argmax is the true label;
    sharpening keeps the argmax, so it keeps the figure."""
    cfg = kd_cfg(synth_dir, public_samples=16)
    ctx, server, clients, _, metrics = one_round(cfg)
    assert metrics["public_samples"] == 16 and (metrics["teacher_accuracy"] * 16).is_integer()
    sharp = one_round(config.with_overrides(cfg, kd={"sharpen": 0.2}))[4]
    assert sharp["teacher_accuracy"] == metrics["teacher_accuracy"]
    assert sharp["server_distill_loss"] != metrics["server_distill_loss"]


def test_median_knowledge_hand_computed():
    from fedtune.frameworks.kd.ops import aggregate_knowledge

    # T = 1, three clients, one sample, two classes; log-probabilities give exact softmaxes
    probs = [[0.8, 0.2], [0.6, 0.4], [0.01, 0.99]]  # the third client is an outlier
    logits = [torch.tensor([p]).log() for p in probs]
    teacher, kept = aggregate_knowledge(logits, 1.0, "median")
    # per class medians 0.6 and 0.4 already sum to 1
    assert torch.allclose(teacher, torch.tensor([[0.6, 0.4]]), atol=1e-6) and kept.all()
    # two clients: mean of the two middle values -> (0.7, 0.3)
    teacher, _ = aggregate_knowledge(logits[:2], 1.0, "median")
    assert torch.allclose(teacher, torch.tensor([[0.7, 0.3]]), atol=1e-6)
    # the entropy filter drops the unsure client (normalized entropy of (0.6, 0.4) = 0.971)
    teacher, kept = aggregate_knowledge(logits, 1.0, "median", entropy_threshold=0.9)
    assert torch.allclose(teacher, torch.tensor([[0.405, 0.595]]), atol=1e-6) and kept.all()
    # nobody survives: uniform and not kept
    teacher, kept = aggregate_knowledge(logits, 1.0, "median", entropy_threshold=0.01)
    assert torch.equal(teacher, torch.tensor([[0.5, 0.5]])) and not kept.any()
