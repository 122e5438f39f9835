"""FedLLM's research directions ([fedopt]): server optimizers against hand-computed steps,
FedProx's and SCAFFOLD's drift terms, SCAFFOLD's control variates, FFA-LoRA's exact average,
and runs with each that resume from a checkpoint identically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from fedtune import config
from fedtune.aggregate import weighted_average
from fedtune.errors import ConfigError
from fedtune.fedopt import (
    FedOptConfig,
    ServerOptimizer,
    client_control,
    drift_step,
    server_control,
)
from fedtune.runtime import checkpoint, simulate
from test_checkpoint import resumed_equals_straight

X = {"w": torch.tensor([1.0, 2.0])}


def _opt(kind: str, **kw) -> ServerOptimizer:
    return ServerOptimizer(FedOptConfig(server_opt=kind, **kw))


def _close(a: dict, b: list[float]) -> bool:
    return torch.allclose(a["w"], torch.tensor(b), atol=1e-6, rtol=0)


def test_fedavgm_accumulates_the_pseudo_gradients():
    opt = _opt("avgm", server_momentum=0.9, server_lr=1.0)
    x1 = opt.step(X, {"w": torch.tensor([1.5, 1.0])})  # Δ = [0.5, -1]: v = Δ
    assert _close(x1, [1.5, 1.0])
    x2 = opt.step(x1, {"w": torch.tensor([1.6, 1.1])})  # v = 0.9 [0.5, -1] + [0.1, 0.1]
    assert _close(x2, [1.5 + 0.55, 1.0 - 0.8])


def test_fedadam_yogi_adagrad_match_hand_computed_steps():
    agg = {"w": torch.tensor([1.5, 1.0])}  # Δ = [0.5, -1]
    kw = {"server_lr": 0.1, "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 1e-3}
    # round 1, Adam and Yogi alike (v starts at 0): m = 0.1 Δ, v = 0.01 Δ² -> sqrt v = 0.1 |Δ|
    first = [1.0 + 0.1 * 0.05 / (0.05 + 1e-3), 2.0 - 0.1 * 0.1 / (0.1 + 1e-3)]
    adam, yogi = _opt("adam", **kw), _opt("yogi", **kw)
    x_adam, x_yogi = adam.step(X, agg), yogi.step(X, agg)
    assert _close(x_adam, first) and _close(x_yogi, first)
    # round 2 with Δ = [0.1, 0.2] from each one's x: m = 0.9 m + 0.1 Δ = [0.055, -0.07]
    d = torch.tensor([0.1, 0.2])
    v_adam = [0.99 * 0.0025 + 0.01 * 0.01, 0.99 * 0.01 + 0.01 * 0.04]
    # Yogi: v - 0.01 Δ² sign(v - Δ²), v = [0.0025, 0.01] < Δ² = [0.01, 0.04]: v + 0.01 Δ²
    v_yogi = [0.0025 + 1e-4, 0.01 + 4e-4]
    for opt, x, v in ((adam, x_adam, v_adam), (yogi, x_yogi, v_yogi)):
        new = opt.step(x, {"w": x["w"] + d})
        m = torch.tensor([0.055, -0.07])
        want = x["w"] + 0.1 * m / (torch.tensor(v).sqrt() + 1e-3)
        assert torch.allclose(new["w"], want, atol=1e-6), opt.cfg.server_opt
    # Adagrad: no momentum, v sums Δ²: the first step is eta Δ / (|Δ| + tau)
    ada = _opt("adagrad", **kw)
    assert _close(ada.step(X, agg), [1.0 + 0.1 * 0.5 / 0.501, 2.0 - 0.1 * 1.0 / 1.001])


def test_drift_step_adds_prox_and_scaffold_terms():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    w.grad = torch.tensor([0.5, 0.5])
    anchor = {"w": torch.tensor([0.0, 0.0])}
    correction = {"w": torch.tensor([0.1, -0.1])}
    drift_step([("w", w)], 0.2, anchor, correction)  # 0.5 + 0.2 (w - 0) + (c - c_i)
    assert torch.allclose(w.grad, torch.tensor([0.5 + 0.2 + 0.1, 0.5 - 0.4 - 0.1]))


def test_scaffold_control_variates_follow_the_papers_equations():
    """Option II: c_i+ = c_i - c + (x - y_i) / (K eta); the server adds sum Δc_i / N."""
    x, y = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.8, 1.2])}
    c, c_i = {"w": torch.tensor([0.1, 0.0])}, {"w": torch.tensor([0.0, 0.2])}
    new, change = client_control(x, y, c, c_i, steps=2, lr=0.1)  # (x - y) / 0.2 = [1, -1]
    assert _close(new, [0.9, -0.8]) and _close(change, [0.9, -1.0])
    other = {"w": torch.tensor([0.3, 0.1])}
    assert _close(server_control(c, [change, other], 4), [0.1 + 1.2 / 4, -0.9 / 4])


def test_ffa_average_of_b_is_the_exact_average_update():
    """With A shared, mean(B_i) A = mean(B_i A); with different A's FedIT's product is off."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, generator=g)
    bs = [torch.randn(4, 2, generator=g) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    exact = sum(wi * b @ a for wi, b in zip(w, bs, strict=True)) / sum(w)
    mean_b = weighted_average([{"B": b} for b in bs], w)["B"]
    assert torch.allclose(mean_b @ a, exact, atol=1e-6)
    a_s = [a + 0.5 * torch.randn(2, 5, generator=g) for _ in range(3)]
    states = [{"A": ai, "B": b} for ai, b in zip(a_s, bs, strict=True)]
    avg = weighted_average(states, w)
    products = sum(wi * b @ ai for wi, b, ai in zip(w, bs, a_s, strict=True)) / sum(w)
    assert not torch.allclose(avg["B"] @ avg["A"], products, atol=1e-3)


def test_fedopt_section_is_saved_with_the_run_config():
    """[fedopt] survives the resolved config's round trip (saved with every run, sent to
    Flower nodes) and is part of the resume key."""
    cfg = config.load(None, ["fedopt.server_opt=adam", "fedopt.prox_mu=0.5"])
    assert config.from_dict(config.to_dict(cfg)) == cfg
    assert config.resume_key(cfg)["fedopt"]["prox_mu"] == 0.5


def test_fedopt_config_checks():
    with pytest.raises(ConfigError, match="train.optimizer"):
        config.load(None, ["fedopt.scaffold=true"])
    with pytest.raises(ConfigError, match="fed.engine"):
        config.load(None, ["fedopt.prox_mu=0.1", "fed.engine=batched"])
    with pytest.raises(ConfigError, match="fedopt.server_opt"):
        config.load(None, ["fed.framework=kd", "fedopt.server_opt=adam"])
    with pytest.raises(ConfigError, match="fedopt.scaffold"):
        config.load(None, ["fed.framework=kd", "fedopt.scaffold=true", "train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="fedopt.lora"):
        config.load(None, ["fed.framework=split", "fedopt.lora=ffa"])
    with pytest.raises(ConfigError, match="fedopt.scaffold"):
        config.load(None, ["fedopt.scaffold=true", "train.optimizer=sgd", "privacy.secagg=true"])
    with pytest.raises(ConfigError, match="fedopt.server_tau"):
        config.load(None, ["fedopt.server_tau=0"])


def _run(tmp_path, name, synth_dir, **fedopt):
    cfg = tiny_cfg(synth_dir, fedopt=fedopt)
    summary = simulate(cfg, tmp_path / name, log=None)
    return summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def test_ffa_keeps_a_at_its_init_and_exchanges_only_b(tmp_path, synth_dir):
    plain, a = _run(tmp_path, "plain", synth_dir)
    ffa, b = _run(tmp_path, "ffa", synth_dir, lora="ffa")
    from fedtune.context import build_context

    init = build_context(tiny_cfg(synth_dir)).init_state
    lora_a = [n for n in init if ".lora_A." in n]
    assert lora_a
    for n in lora_a:  # the adapter file drops PEFT's adapter name ("default")
        key = n.replace(".default.", ".")
        assert torch.equal(b[key], init[n]), n
        assert not torch.equal(a[key], init[n]), n  # FedIT trains it
    d = sum(init[n].numel() for n in lora_a)
    assert ffa["trainable_params_exchanged"] == plain["trainable_params_exchanged"] - d
    assert ffa["bytes_down_per_client_per_round"] < plain["bytes_down_per_client_per_round"]


def test_fedsa_keeps_each_clients_b_and_shares_a(tmp_path, synth_dir):
    """FedSA-LoRA: B never leaves a client, so the global B stays at its init (zeros) while A
    trains; client_accuracy tests each client's own B with the global A and head."""
    from fedtune.context import build_context

    init = build_context(tiny_cfg(synth_dir)).init_state
    plain, _ = _run(tmp_path, "plain", synth_dir)
    fedsa, b = _run(tmp_path, "fedsa", synth_dir, lora="fedsa")
    for n, t in init.items():
        key = n.replace(".default.", ".")
        if ".lora_B." in n:
            assert torch.equal(b[key], t) and not t.any(), n
        elif ".lora_A." in n:
            assert not torch.equal(b[key], t), n
    d = sum(t.numel() for n, t in init.items() if ".lora_B." in n)
    assert fedsa["trainable_params_exchanged"] == plain["trainable_params_exchanged"] - d
    rows = [json.loads(x) for x in (tmp_path / "fedsa" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[-1]["client_accuracies"]) == 3
    assert rows[-1]["client_accuracy"] == pytest.approx(sum(rows[-1]["client_accuracies"]) / 3)


def test_prox_pulls_the_update_toward_the_global_adapter(tmp_path, synth_dir):
    from fedtune.context import build_context

    init = build_context(tiny_cfg(synth_dir)).init_state
    _, plain = _run(tmp_path, "plain", synth_dir)
    _, prox = _run(tmp_path, "prox", synth_dir, prox_mu=50.0)

    def moved(state):  # how far the final LoRA factors are from the initial ones
        lora = [n for n in init if ".lora_" in n]
        return sum(float((state[n.replace(".default.", ".")] - init[n]).norm()) for n in lora)

    assert moved(prox) < moved(plain)


@pytest.mark.parametrize("framework", ["fedllm", "split"])
def test_scaffold_server_control_is_the_mean_of_the_clients(synth_dir, tmp_path, framework):
    """Both start at zero and every client takes part: after round 1, c = mean_i c_i (the
    paper's invariant), and the clients' c_i are not all zero (the round did correct)."""
    cfg = tiny_cfg(
        synth_dir,
        fed={"rounds": 1, "framework": framework},
        fedopt={"scaffold": True},
        train={"optimizer": "sgd", "lr": 0.05},
    )
    simulate(cfg, tmp_path / "run", log=None)
    ck = checkpoint.load(tmp_path / "run")
    c = ck["server"]["control"]
    mine = [ck["clients"][str(i)]["control"] for i in range(3)]
    assert c and all(set(m) == set(c) for m in mine)
    for n, t in c.items():
        torch.testing.assert_close(t, sum(m[n] for m in mine) / 3, atol=1e-6, rtol=1e-5)
    assert any(m[n].abs().max() > 0 for m in mine for n in m)


@pytest.mark.parametrize(
    ("framework", "fedopt"),
    [
        ("fedllm", {"server_opt": "adam", "server_lr": 0.01}),
        ("fedllm", {"scaffold": True}),
        ("fedllm", {"server_opt": "avgm", "prox_mu": 0.1, "lora": "ffa"}),
        ("fedllm", {"lora": "fedsa"}),
        ("split", {"server_opt": "yogi", "server_lr": 0.01, "prox_mu": 0.1}),
        ("split", {"scaffold": True}),
    ],
    ids=[
        "fedadam",
        "scaffold",
        "fedavgm-prox-ffa",
        "fedsa",
        "split-fedyogi-prox",
        "split-scaffold",
    ],
)
def test_fedopt_runs_resume_identically(synth_dir, tmp_path, framework, fedopt):
    """The server optimizer's moments and the control variates are in the checkpoint: 4
    rounds straight equal 2, interrupted, and 2 resumed."""
    train = {"optimizer": "sgd", "lr": 0.05} if fedopt.get("scaffold") else {}
    fed = {"rounds": 4, "fraction_fit": 0.67, "framework": framework}
    a = resumed_equals_straight(tiny_cfg(synth_dir, fed=fed, fedopt=fedopt, train=train), tmp_path)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rejected"] == 0
