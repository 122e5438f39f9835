"""Client-level differential privacy: clipping, noise, adaptive clipping, accounting, runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from fedtune import config
from fedtune.errors import ConfigError
from fedtune.privacy import ClientLevelDP, accountant, dp, outputs
from fedtune.runtime.loop import simulate


def _state(*values: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(values[:2]), "b": torch.tensor(values[2:])}


def _central(ref, states, sampled, bound, z, gen):
    """Central DP-FedAvg as the server runs it: the clipped sum, then the noisy mean."""
    total, norms = dp.clipped_sum(ref, states, bound)
    return dp.noisy_mean(ref, total, sampled, z * bound, gen), norms


def test_clip_scales_to_the_bound_and_keeps_small_updates():
    d, n = dp.clip(_state(3.0, 0.0, 4.0), 1.0)  # ||(3, 0, 4)|| = 5
    assert n == 5.0
    assert torch.allclose(d["a"], torch.tensor([0.6, 0.0])) and torch.allclose(
        d["b"], torch.tensor([0.8])
    )
    d, n = dp.clip(_state(0.3, 0.0, 0.4), 1.0)
    assert n == pytest.approx(0.5) and torch.equal(d["a"], torch.tensor([0.3, 0.0]))


def test_central_mean_without_noise_is_the_clipped_sum_over_the_sampled_count():
    ref = _state(1.0, 1.0, 1.0)
    states = [_state(4.0, 1.0, 5.0), _state(1.0, 2.0, 1.0)]  # deltas (3,0,4) and (0,1,0)
    gen = torch.Generator().manual_seed(0)
    new, norms = _central(ref, states, sampled=3, bound=1.0, z=0.0, gen=gen)
    assert norms == [5.0, 1.0]
    # (0.6, 0, 0.8) + (0, 1, 0) = (0.6, 1, 0.8); / 3 sampled (one dropped out); + reference
    assert torch.allclose(new["a"], torch.tensor([1.2, 1 + 1 / 3])) and torch.allclose(
        new["b"], torch.tensor([1 + 0.8 / 3])
    )


def test_one_clients_influence_is_bounded_by_the_clip():
    ref = {"w": torch.zeros(10)}
    honest = [{"w": torch.full((10,), 0.01)} for _ in range(3)]
    attacker = {"w": torch.full((10,), 1e6)}
    gen = torch.Generator().manual_seed(0)
    with_, _ = _central(ref, [*honest, attacker], 4, 0.5, 0.0, gen)
    without, _ = _central(ref, honest, 4, 0.5, 0.0, gen)
    assert dp.norm_of(dp.delta_of(with_, without)) == pytest.approx(0.5 / 4, rel=1e-6)


def test_noise_has_std_z_times_clip_over_the_sampled_count():
    n = 200_000
    ref = {"w": torch.zeros(n)}
    gen = torch.Generator().manual_seed(1)
    new, _ = _central(ref, [ref, ref], sampled=2, bound=3.0, z=0.5, gen=gen)
    # sample std of n normals: relative standard error 1/sqrt(2n) = 0.0016; 5 of them
    assert float(new["w"].std()) == pytest.approx(0.5 * 3.0 / 2, rel=5 / math.sqrt(2 * n))
    assert abs(float(new["w"].mean())) < 5 * 0.75 / math.sqrt(n)


def test_local_privatize_clips_before_noise():
    ref = {"w": torch.zeros(4)}
    state = {"w": torch.tensor([10.0, 0.0, 0.0, 0.0])}
    out, n = dp.privatize_local(state, ref, 2.0, 0.0, torch.Generator().manual_seed(0))
    assert n == 10.0 and torch.equal(out["w"], torch.tensor([2.0, 0.0, 0.0, 0.0]))


def test_adaptive_clip_moves_toward_the_target_quantile():
    cfg = config.load(None, ["privacy.dp=central", "privacy.adaptive_clip=true"]).privacy
    gen = torch.Generator().manual_seed(0)
    # every update unclipped (fraction 1 > 0.5): C shrinks by exp(-0.2 * 0.5); none: grows
    assert dp.next_clip(1.0, 4, 4, cfg, 0.0, gen) == pytest.approx(math.exp(-0.1))
    assert dp.next_clip(1.0, 0, 4, cfg, 0.0, gen) == pytest.approx(math.exp(0.1))
    # Andrew et al.: z_update = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert dp.update_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="count_noise"):
        dp.update_noise_multiplier(1.0, 0.4)


def test_accountant_matches_published_values():
    """dp_accounting's own test: noise multiplier 4.530877117 is exactly (1, 1e-6)-DP for one
    Gaussian release (central DP's z / 2 per round: z = 2 x 4.530877117). TF Privacy's MNIST DP-SGD table (q = 256/60000, delta 1e-5; noise 1.12
    for 60 epochs: eps 2.92, 0.6 for 30: 9.74, 1.2 for 10: 1.20) came from an older, looser
    RDP-to-DP conversion: today's accountant must not report more."""
    one = accountant.central_epsilon(2 * 4.530877117, 1, accountant.Sampling(3, 3), 1e-6)
    assert one == pytest.approx(1.0, abs=1e-4)
    q = 256 / 60000
    for z, epochs, published in ((1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)):
        eps = accountant.poisson_epsilon(z, q, int(epochs * 60000 / 256), 1e-5)
        assert 0.75 * published < eps <= published


def test_central_accounting_and_calibration():
    everyone = accountant.Sampling(3, 3)
    assert everyone.adjacency == "replace one client's data"
    assert accountant.central_epsilon(1.0, 0, everyone, 1e-5) == 0.0
    assert accountant.central_epsilon(0.0, 3, everyone, 1e-5) == math.inf
    e1, e2 = (accountant.central_epsilon(1.0, r, everyone, 1e-5) for r in (1, 10))
    assert 0 < e1 < e2
    # sampling 2 of 10 clients costs less than taking all 10
    sub = accountant.Sampling(10, 2)
    assert accountant.central_epsilon(1.0, 10, sub, 1e-5) < accountant.central_epsilon(
        1.0, 10, accountant.Sampling(10, 10), 1e-5
    )
    for target in (1.0, 8.0):
        z = accountant.calibrate(target, 5, 1e-5, everyone)
        assert accountant.central_epsilon(z, 5, everyone, 1e-5) == pytest.approx(target, rel=1e-3)
    z = accountant.calibrate(8.0, 5, 1e-5, None)  # local: z / 2 per participation
    assert accountant.local_epsilon(z, 5, 1e-5) == pytest.approx(8.0, rel=1e-3)


def test_config_checks():
    with pytest.raises(ConfigError, match="privacy.adaptive_clip"):
        config.load(None, ["privacy.dp=local", "privacy.adaptive_clip=true"])
    with pytest.raises(ConfigError, match="privacy.dp"):
        config.load(None, ["fed.framework=kd", "privacy.dp=central"])
    with pytest.raises(ConfigError, match="fed.aggregator"):
        config.load(None, ["privacy.dp=central", "fed.aggregator=median"])
    with pytest.raises(ConfigError, match="privacy.secagg"):
        config.load(None, ["fed.framework=kd", "privacy.secagg=true"])
    with pytest.raises(ConfigError, match="split.client_split_layers"):
        config.load(
            None,
            ["fed.framework=split", "privacy.secagg=true", "split.client_split_layers=[2,3,3]"],
        )
    with pytest.raises(ConfigError, match="fed.aggregator"):
        config.load(None, ["privacy.secagg=true", "fed.aggregator=trimmed_mean"])
    with pytest.raises(ConfigError, match="fed.poison_clients"):
        config.load(None, ["privacy.secagg=true", "fed.poison_clients=[0]"])
    with pytest.raises(ConfigError, match="privacy.delta"):
        config.load(None, ["privacy.delta=0"])
    cfg = config.load(None, ["privacy.dp=central", "privacy.adaptive_clip=true", "privacy.noise=1"])
    with pytest.raises(ConfigError, match="privacy.count_noise"):
        ClientLevelDP(cfg)  # 3 clients: sigma_b = 3/20, too little for z = 1


def _run_cfg(cfg, out):
    summary = simulate(cfg, out, log=None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


def _run(tmp_path, synth_dir, name, **privacy):
    cfg = tiny_cfg(synth_dir, privacy={"reproducible_noise": True, **privacy})
    return _run_cfg(cfg, tmp_path / name)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_dp_runs_report_epsilon_every_round(tmp_path, synth_dir, mode):
    summary, lines = _run(tmp_path, synth_dir, mode, dp=mode, noise=2.0)
    eps = [line["dp_epsilon"] for line in lines]
    assert 0 < eps[0] < eps[1] and summary["dp_epsilon"] == eps[1]
    if mode == "central":
        want = accountant.central_epsilon(2.0, 2, accountant.Sampling(3, 3), 1e-5)
    else:
        want = accountant.local_epsilon(2.0, 2, 1e-5)
    assert eps[1] == pytest.approx(want)
    again, _ = _run(tmp_path, synth_dir, mode + "2", dp=mode, noise=2.0)
    assert again["final"] == summary["final"]  # reproducible_noise: the same noise


def test_target_epsilon_is_met_after_the_last_round(tmp_path, synth_dir):
    summary, lines = _run(tmp_path, synth_dir, "t", dp="central", target_epsilon=8.0)
    assert lines[-1]["dp_epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert summary["dp_epsilon"] == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize("framework", ["fedllm", "split"])
def test_central_dp_without_noise_or_clipping_is_fedavg(tmp_path, synth_dir, framework):
    """Equal client sizes, z = 0, C far above any update: DP-FedAvg's unweighted clipped mean
    is FedAvg's (to float32 rounding of the update)."""
    fed = {"framework": framework, "rounds": 1}
    plain = simulate(tiny_cfg(synth_dir, fed=fed), tmp_path / "plain", log=None)
    cfg = tiny_cfg(synth_dir, fed=fed, privacy={"dp": "central", "noise": 0.0, "clip": 1e9})
    private = simulate(cfg, tmp_path / "dp", log=None)
    assert private["dp_epsilon"] is None  # no noise: no finite guarantee
    assert private["final"]["test_loss"] == pytest.approx(plain["final"]["test_loss"], rel=1e-5)
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "dp" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # |values| < 10; float32 ulp there is 1e-6
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_split_local_dp_noises_only_the_client_side(tmp_path, synth_dir):
    fed = {"framework": "split", "rounds": 1}
    cfg = tiny_cfg(synth_dir, fed=fed, privacy={"dp": "local", "noise": 1.0, "clip": 0.1})
    summary, lines = _run_cfg(cfg, tmp_path / "s")
    assert lines[-1]["dp_epsilon"] == pytest.approx(accountant.local_epsilon(1.0, 1, 1e-5))
    assert summary["dp_adjacency"] == "replace one client's data"


def test_noisy_kd_probabilities_and_split_activations():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    same = outputs.noisy_logits(logits, 2.0, 0.0, gen)  # no noise: the same softmax at T
    assert torch.allclose((same / 2.0).softmax(-1), (logits / 2.0).softmax(-1), atol=1e-6)
    h = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])  # two samples [1, 2]: norms 5 and 0.5
    assert torch.allclose(outputs.clip_rows(h, 1.0), torch.tensor([[[0.6, 0.8]], [[0.3, 0.4]]]))
    # one round of S = 50 samples at std 0.1: multiplier 0.1 / sqrt(100) = 0.01
    assert outputs.kd_epsilon(0.1, 50, 1, 1e-5) == accountant.gaussian_epsilon(0.01, 1, 1e-5)
    assert outputs.split_epsilon(1.0, 0.5, 3, 1e-5) == accountant.gaussian_epsilon(1.0, 3, 1e-5)
    with pytest.raises(ConfigError, match="privacy.kd_noise"):
        config.load(None, ["privacy.kd_noise=0.1"])  # fedllm has no probabilities to noise
    with pytest.raises(ConfigError, match="privacy.split_noise"):
        config.load(None, ["fed.framework=kd", "privacy.split_noise=0.1"])


def test_kd_and_split_noise_runs_report_their_epsilon(tmp_path, synth_dir):
    kd = tiny_cfg(
        synth_dir,
        fed={"framework": "kd"},
        kd={"public_samples": 20, "client_eval": False},
        privacy={"kd_noise": 0.05, "reproducible_noise": True},
    )
    summary, lines = _run_cfg(kd, tmp_path / "kd")
    assert lines[-1]["dp_epsilon"] == pytest.approx(outputs.kd_epsilon(0.05, 20, 2, 1e-5))
    assert summary["dp_epsilon"] == lines[-1]["dp_epsilon"]
    split = tiny_cfg(
        synth_dir,
        fed={"framework": "split"},
        privacy={"split_noise": 0.5, "split_clip": 1.0, "reproducible_noise": True},
    )
    summary, lines = _run_cfg(split, tmp_path / "split")  # every sample sent once a round
    assert lines[0]["activation_epsilon"] == pytest.approx(outputs.split_epsilon(0.5, 1.0, 1, 1e-5))
    assert summary["activation_epsilon"] == pytest.approx(outputs.split_epsilon(0.5, 1.0, 2, 1e-5))
    assert math.isfinite(summary["final"]["test_loss"])


def test_report_shows_the_guarantee():
    from fedtune.report import privacy_cell

    assert privacy_cell([{"final_accuracy": 0.5}]) == ""  # no DP: no column entry
    assert privacy_cell([{"dp_epsilon": 7.9996, "dp_delta": 1e-5}]) == "8 (delta 1e-05)"
    assert privacy_cell([{"dp_epsilon": None, "dp_delta": 1e-5}]) == "inf (delta 1e-05)"
    two = [{"dp_epsilon": 1.0, "dp_delta": 1e-5}, {"dp_epsilon": 2.5, "dp_delta": 1e-5}]
    assert privacy_cell(two) == "2.5 (delta 1e-05)"  # the worst seed
    assert privacy_cell([{"activation_epsilon": 9.01}]) == "activations 9.01"


@pytest.mark.parametrize("framework", ["fedllm", "kd"])
def test_dpsgd_runs_report_the_samples_epsilon(tmp_path, synth_dir, framework):
    """Opacus DP-SGD on the clients' private training: a client with n samples at batch 8
    takes ceil(n / 8) Poisson steps of rate 8 / n a round, its noise calibrated to reach the
    target after 2 rounds; the run reports the largest client epsilon, dp-accounting's."""
    kd = {"public_samples": 20, "client_eval": False}
    p = {"dpsgd": True, "dpsgd_target_epsilon": 4.0, "reproducible_noise": True}
    cfg = tiny_cfg(synth_dir, fed={"framework": framework}, kd=kd, privacy=p)
    summary, lines = _run_cfg(cfg, tmp_path / framework)
    after_one = []
    for n in summary["samples_per_client"]:
        q, steps = 8 / n, -(-n // 8)
        z = accountant.calibrate_poisson(4.0, q, 2 * steps, 1e-5)
        after_one.append(accountant.poisson_epsilon(z, q, steps, 1e-5))
    assert lines[0]["sample_epsilon"] == pytest.approx(max(after_one))
    assert summary["sample_epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert math.isfinite(summary["final"]["test_loss"])


def test_dpsgd_clips_each_samples_gradient():
    """With no noise, Opacus's step equals Adam on the mean of per-sample gradients clipped
    to dpsgd_clip: checked against torch.func per-sample gradients on a linear model."""
    from fedtune.privacy import dpsgd

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    p = config.load(None, ["privacy.dpsgd=true", "privacy.dpsgd_clip=0.1"]).privacy
    base = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    per = []
    for i in range(4):  # hand-made per-sample gradients, clipped
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = [q.grad.clone() for q in model.parameters()]
        n = torch.sqrt(sum((t**2).sum() for t in g))
        per.append([t * min(1.0, 0.1 / float(n)) for t in g])
    want = [before[k] - sum(s[j] for s in per) / 4 for j, k in enumerate(before)]
    gen = torch.Generator().manual_seed(0)
    with dpsgd.private_training(model, base, p, 0.0, 4, gen) as opt:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for j, (k, v) in enumerate(model.named_parameters()):
        assert torch.allclose(v, want[j], atol=1e-6), k
    assert not hasattr(next(model.parameters()), "grad_sample")  # nothing left behind
