"""The generation task: the loss falls on response tokens only, split learning and the batched
engine compute what the plain causal LM computes, and the data keeps every reference."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gen_cfg, tiny_cfg
from fedtune import config
from fedtune.context import build_context
from fedtune.data import collate, prepare, response_targets
from fedtune.errors import DataError
from fedtune.execution import engine
from fedtune.frameworks.split.model import client_forward, part_names, server_forward
from fedtune.generate import score
from fedtune.models import (
    ModelConfig,
    init_trainable_state,
    load_model,
    load_tokenizer,
    load_trainable_state,
)
from fedtune.runtime import simulate
from fedtune.tasks import get as get_task
from test_engine import no_dropout, two_rounds

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
TASK = get_task("generation")


def test_response_targets_by_hand():
    # row 0: 5 tokens, 2 of them prompt -> outputs at 1, 2, 3 predict tokens 12, 13, 14;
    # row 1: 3 tokens, 1 prompt -> outputs at 0, 1 predict 21, 22; padded with 0 / -100.
    t = response_targets([[10, 11, 12, 13, 14], [20, 21, 22]], np.array([2, 1]))
    assert t["target_pos"].tolist() == [[1, 2, 3], [0, 1, 0]]
    assert t["target_ids"].tolist() == [[12, 13, 14], [21, 22, -100]]
    assert t["tokens_per_row"].tolist() == [2.5, 2.5]  # 5 response tokens over 2 rows


def lm_batch(seed=0):
    """Three rows of lengths 9, 6, 4 with prompts of 5, 2, 3 tokens (right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (9, 6, 4)]
    return collate(ids, np.zeros(3, dtype=np.int64), pad_id=256, prompt_len=np.array([5, 2, 3]))


def perturbed_model(name="tiny-gpt2"):
    model, _ = load_model(ModelConfig(name=name, lora_r=4, lora_dropout=0.0), 2, task=TASK)
    state = init_trainable_state(model, 0)
    torch.manual_seed(1)  # non-zero LoRA B, so every LoRA tensor gets a gradient
    load_trainable_state(model, {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})
    model.eval()
    return model


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_prompt_and_padding_contribute_nothing_to_the_loss(name):
    model, b = perturbed_model(name), lm_batch()
    loss = TASK.loss()(TASK.logits(model, b, "off"), b)
    # HF's own causal-LM loss with every prompt and pad position labelled -100.
    labels = b["input_ids"].clone()
    for i, p in enumerate([5, 2, 3]):
        labels[i, :p] = -100
    labels[b["attention_mask"] == 0] = -100
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    # 4 + 4 + 1 response tokens; the per-row losses average to the same value.
    assert int((b["target_ids"] != -100).sum()) == 9
    rows = TASK.loss().rows(TASK.logits(model, b, "off"), b)
    torch.testing.assert_close(rows.mean(), loss, atol=1e-6, rtol=1e-5)
    # Whatever sits in the prompt's last-but-one token or the padding, the loss is computed
    # from the same positions: changing padding ids changes nothing.
    b2 = {k: v.clone() for k, v in b.items()}
    b2["input_ids"][b["attention_mask"] == 0] = 7
    torch.testing.assert_close(TASK.loss()(TASK.logits(model, b2, "off"), b2), loss)


@pytest.mark.parametrize("u_shaped", [False, True])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_split_gradients_equal_the_unsplit_causal_lm(name, u_shaped):
    model, b = perturbed_model(name), lm_batch(1)
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    model.zero_grad()
    TASK.loss()(TASK.logits(model, b, "off"), b).backward()
    ref = {n: params[n].grad.clone() for n in names}
    for k in (1, 2, 3):
        model.zero_grad()
        h = client_forward(model, b["input_ids"], b["attention_mask"], k)
        h_server = h.detach().requires_grad_()
        hidden = TASK.pool(server_forward(model, h_server, b["attention_mask"], k), None)
        if u_shaped:  # the LM head on the client: every position's state crosses both ways
            hc = hidden.detach().requires_grad_()
            TASK.loss()(TASK.head(model, hc, b, "off"), b).backward()
            hidden.backward(hc.grad)
        else:
            TASK.loss()(TASK.head(model, hidden, b, "off"), b).backward()
        h.backward(h_server.grad)
        for side in ("client", "server"):
            for n in part_names(model, k, side, u_shaped):
                torch.testing.assert_close(params[n].grad, ref[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_batched_causal_lm_training_equals_sequential(synth_dir, model, monkeypatch):
    monkeypatch.setattr(engine, "MIN_BUCKET_ROWS", 4)  # also split into sub-batches
    sizes = [20, 37, 9]
    cfg = config.with_overrides(
        gen_cfg(synth_dir, model=model),
        model={"lora_dropout": 0.0},
        data={"partition": "sizes", "client_sizes": sizes},
        train={"group_by_length": True, "grad_clip": 0.5},
    )
    ctx = build_context(cfg)
    no_dropout(ctx.model)
    no_dropout(engine.multinet(ctx.model, len(sizes)).net)
    seq, _, seq_res = two_rounds(ctx, sizes, (False, False))
    bat, _, bat_res = two_rounds(ctx, sizes, (True, True))
    # Float32 rounding differs between the fused and the solo matmuls (other shapes, other
    # padding); Adam divides by sqrt(v), so a coordinate whose gradient is near zero turns a
    # rounding difference into a visible step. Each state must match to 0.1% of how far
    # training moved it; a row using another client's adapter would be off by O(100%).
    for c in range(len(sizes)):
        moved = max((seq[c][k] - ctx.init_state[k]).abs().max().item() for k in seq[c])
        assert moved > 1e-3
        diff = max((bat[c][k] - seq[c][k]).abs().max().item() for k in seq[c])
        assert diff <= 1e-3 * moved, (diff, moved)
        assert bat_res[c].loss == pytest.approx(seq_res[c].loss, rel=1e-4)


def test_scores_by_hand():
    s = score(
        ["the cat sat on the red mat today", "blue"],
        [["the cat sat on the red mat today"], ["red", "blue"]],
    )
    assert s["exact_match"] == 100.0
    assert s["rouge_l"] == pytest.approx(100.0)
    s = score(["a b", "nothing here"], [["a b c"], ["x"]])
    assert s["exact_match"] == 0.0
    # ROUGE-L F of "a b" vs "a b c": P = 1, R = 2/3 -> F = 0.8; second 0 -> mean 40.
    assert s["rouge_l"] == pytest.approx(40.0)


@pytest.mark.parametrize("framework", ["fedllm", "split"])
def test_generation_run_reports_perplexity_and_round_zero(synth_dir, framework):
    cfg = gen_cfg(synth_dir, fed={"framework": framework, "rounds": 3})
    s = simulate(cfg, log=None)
    assert s["task"] == "generation"
    init, final = s["initial"], s["final"]
    assert {"perplexity", "bleu", "rouge_l", "exact_match", "sample"} <= set(final)
    assert final["perplexity"] < init["perplexity"]  # training helps on held-out text
    assert np.isclose(np.log(final["perplexity"]), final["test_loss"])
    assert s["rounds"] == 3  # round 0 is reported, not counted


@pytest.mark.skipif(not E2E.is_dir(), reason="needs ../shared/data/e2e")
def test_e2e_keeps_every_reference_and_partitions_by_name():
    cfg = gen_cfg(E2E).data
    cfg = config.replace(
        cfg,
        path=str(E2E),
        prompt_template="{mr}",
        response_template="{ref}",
        public_size=100,
        partition="column",
        partition_column="mr[name]",
    )
    data = prepare(cfg, load_tokenizer("tiny-gpt2"), 128, 0)
    assert len(data.generate) == 630  # distinct test mrs (README)
    assert sum(len(r) for r in data.generate.refs) == 4693  # every reference kept
    names = [{data.label_names[y] for y in data.train.labels[c]} for c in data.client_idx]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert (data.train.prompt_len < [len(x) for x in data.train.ids]).all()
    bad = config.replace(cfg, partition_column="nope")
    with pytest.raises(DataError, match="no column 'nope'"):
        prepare(bad, load_tokenizer("tiny-gpt2"), 128, 0)


@pytest.mark.parametrize(("topk", "dtype", "value_bytes"), [(4, "float16", 2), (16, "float32", 4)])
def test_per_token_kd_bytes_are_tokens_times_k_times_entry(synth_dir, topk, dtype, value_bytes):
    cfg = gen_cfg(
        synth_dir,
        fed={"framework": "kd", "rounds": 1},
        kd={"topk": topk, "logit_dtype": dtype, "public_samples": 12, "client_eval": False},
    )
    s = simulate(cfg, log=None)
    ctx = build_context(cfg)
    from fedtune.frameworks.kd.common import public_candidates

    public = ctx.data.public()
    rows = public_candidates(ctx.server())
    tokens = sum(len(public.ids[i]) - int(public.prompt_len[i]) for i in rows)  # S x T
    entry = value_bytes + 2  # + an int16 index (vocabulary 257)
    kinds = s["bytes_per_client_per_round_by_kind"]
    for direction in ("up", "down"):  # b3 and b7 carry the same shape
        header = kinds[direction]["logits"] - tokens * topk * entry
        assert 0 < header < 1024, (direction, header)  # envelope + safetensors header


@pytest.mark.parametrize("task", ["generation", "classification"])
def test_saved_adapter_loads_with_peft_by_the_base_name(synth_dir, tmp_path, task, capsys):
    """The run's adapter names its base model (here a local directory standing in for a hub
    name) and loads with PEFT's Auto classes; fedtune predict/generate use it too."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedtune.cli import main
    from fedtune.models import tiny_config, tiny_tokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("tiny-gpt2")).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    make = gen_cfg if task == "generation" else tiny_cfg
    cfg = config.with_overrides(make(synth_dir, fed={"rounds": 1}), model={"name": str(base)})
    simulate(cfg, tmp_path / "run", log=None)
    adapter = tmp_path / "run" / "adapter"
    if task == "generation":
        model = AutoPeftModelForCausalLM.from_pretrained(adapter)
        assert (
            main(["generate", str(tmp_path / "run"), "my card fee", "--max-new-tokens", "3"]) == 0
        )
    else:
        labels = AutoConfig.from_pretrained(adapter).id2label
        assert sorted(labels.values()) == ["card", "cash", "fee", "transfer"]
        model = AutoPeftModelForSequenceClassification.from_pretrained(
            adapter, num_labels=len(labels)
        )
        assert main(["predict", str(tmp_path / "run"), "visa card please"]) == 0
        label, prob = capsys.readouterr().out.split()
        assert label in labels.values() and 0.25 < float(prob) <= 1.0  # 4 classes
    assert model.peft_config["default"].base_model_name_or_path == str(base)


def test_test_subset_keeps_whole_prompts():
    from fedtune.gendata import whole_groups

    order = np.array([3, 0, 4, 1, 2])
    # unique prompts: exactly the classification subset order[:n]
    assert whole_groups(["a", "b", "c", "d", "e"], order, 2).tolist() == [3, 0]
    # rows 0, 2 share prompt "x": taking row 3 ("y") then row 0 brings row 2 along
    assert whole_groups(["x", "z", "x", "y", "w"], order, 2).tolist() == [3, 0, 2]


@pytest.mark.skipif(not E2E.is_dir(), reason="needs ../shared/data/e2e")
def test_e2e_test_subset_is_the_first_prompts_with_all_their_references():
    cfg = config.replace(
        gen_cfg(E2E).data,
        path=str(E2E),
        prompt_template="{mr}",
        response_template="{ref}",
        public_size=100,
        test_size=50,
    )
    data = prepare(cfg, load_tokenizer("tiny-gpt2"), 512, 0)  # no prompt is truncated
    prompts = {tuple(x[:p]) for x, p in zip(data.test.ids, data.test.prompt_len, strict=True)}
    first = data.generate.prompts[: len(prompts)]  # the generation set's order
    assert prompts == {tuple(p) for p in first}
    assert len(data.test) == sum(len(r) for r in data.generate.refs[: len(prompts)]) >= 50


def test_classification_as_generation_scores_the_classifier_test_rows(synth_dir):
    gen = prepare(
        config.replace(gen_cfg(synth_dir).data, test_size=30), load_tokenizer("tiny-gpt2"), 48, 0
    )
    cls = prepare(
        config.replace(tiny_cfg(synth_dir).data, test_size=30), load_tokenizer("tiny-gpt2"), 48, 0
    )
    # the synthetic texts repeat, so compare as multisets of (text tokens, label name)
    want = sorted(
        (tuple(x), cls.label_names[y]) for x, y in zip(cls.test.ids, cls.test.labels, strict=True)
    )
    got = sorted(
        (tuple(load_tokenizer("tiny-gpt2")(t)["input_ids"]), r[0])
        for t, r in zip(gen.generate.texts[:30], gen.generate.refs[:30], strict=True)
    )
    assert len(want) == 30 and got == want


def test_sequence_level_kd_sends_token_ids_and_checks_them(synth_dir):
    from fedtune.errors import ConfigError, MessageError
    from fedtune.frameworks.kd.sequences import SequenceKnowledge
    from fedtune.messages import LOGITS, SERVER, Message

    cfg = gen_cfg(
        synth_dir,
        fed={"framework": "kd", "rounds": 1},
        kd={"level": "sequence", "public_samples": 12, "client_eval": False},
    )
    s = simulate(cfg, log=None)
    # each response holds at most eval.max_new_tokens = 6 ids (int16: vocabulary 257) and
    # one int32 length: at most 12 x (6 x 2 + 4) bytes + the header
    up = s["bytes_per_client_per_round_by_kind"]["up"]["logits"]
    assert up < 12 * (6 * 2 + 4) + 1024
    kn = SequenceKnowledge(build_context(cfg).server())
    rows = np.arange(2)
    good = kn.pack([[5, 256], [7]], rows)
    assert good["tokens"].dtype == torch.int16 and kn.unpack(
        Message(LOGITS, 1, "c", SERVER, good), rows, "c"
    ) == [[5, 256], [7]]
    bad = [
        {**good, "lengths": torch.tensor([2, 2], dtype=torch.int32)},  # do not add up
        {**good, "tokens": torch.tensor([5, 999, 7], dtype=torch.int16)},  # outside vocabulary
        {**good, "lengths": torch.tensor([3], dtype=torch.int32)},  # wrong number of prompts
        {"tokens": good["tokens"].float(), "lengths": good["lengths"]},  # not integers
    ]
    for tensors in bad:
        with pytest.raises(MessageError):
            kn.unpack(Message(LOGITS, 1, "c", SERVER, tensors), rows, "c")
    with pytest.raises(ConfigError, match="kd.level"):
        simulate(tiny_cfg(synth_dir, fed={"framework": "kd"}, kd={"level": "sequence"}), log=None)
    for level in ("logits", "sequence"):  # sharpening is a per-sample class notion
        sharp = config.with_overrides(cfg, kd={"level": level, "sharpen": 0.5})
        with pytest.raises(ConfigError, match="kd.sharpen"):
            simulate(sharp, log=None)


@pytest.mark.parametrize("level", ["logits", "sequence"])
def test_batched_kd_on_generation_equals_sequential(synth_dir, level):
    # tiny-llama with LoRA dropout 0 has no dropout at all, so both engines compute the same;
    # float32 rounding (other shapes) is amplified by Adam, hence a bound relative to how far
    # training moved the held-out perplexity rather than a fixed epsilon.
    runs = {}
    for engine_ in ("sequential", "batched"):
        cfg = gen_cfg(
            synth_dir,
            model="tiny-llama",
            fed={"framework": "kd", "rounds": 2, "engine": engine_},
            kd={"level": level, "topk": 8, "public_samples": 16, "client_eval": False},
        )
        runs[engine_] = simulate(config.with_overrides(cfg, model={"lora_dropout": 0.0}), log=None)
    seq, bat = runs["sequential"], runs["batched"]
    moved = abs(seq["final"]["perplexity"] - seq["initial"]["perplexity"])
    assert moved > 0.1
    assert abs(bat["final"]["perplexity"] - seq["final"]["perplexity"]) <= 1e-2 * moved
    assert bat["bytes_per_client_per_round_by_kind"] == seq["bytes_per_client_per_round_by_kind"]
