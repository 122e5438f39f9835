"""Greedy generation with the KV cache, and its scores against references with maintained
libraries: sacrebleu (multi-reference corpus BLEU and chrF), rouge-score (ROUGE-L, the best
reference per prompt) and exact match (a class name as the response: accuracy)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import compute
from .models import load_trainable_state


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    state: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (templated), decoded without special
    tokens and stripped; ``state`` (the trainable tensors) is loaded first when given."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, state)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    state: dict[str, torch.Tensor] | None = None,
) -> list[list[int]]:
    """The new token ids of greedy continuations of ``prompts``, cut after the first
    end-of-sequence token (kept: it ends the response).

    Prompts run ``batch_size`` at a time, longest first, left-padded (a decoder continues
    from the last position of every row)."""
    from transformers import GenerationConfig

    if state is not None:
        load_trainable_state(model, state)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[j, width - len(prompts[i]) :] = 1
        with compute.counted():  # a client generating (sequence-level KD) counts its FLOPs
            seqs = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
        for i, new in zip(rows, seqs[:, width:].tolist(), strict=True):
            out[i] = new[: new.index(eos) + 1] if eos in new else new
    if was_training:
        model.train()
    return out


def score(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """``bleu`` and ``chrf`` (sacrebleu corpus scores with every reference of each prompt),
    ``rouge_l`` (rouge-score F-measure against the best reference, averaged) and
    ``exact_match`` (the hypothesis equals a reference), all in percent."""
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]
    exact = [h.strip() in {x.strip() for x in r} for h, r in zip(hyps, refs, strict=True)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hyps, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, streams).score),
        "rouge_l": 100.0 * float(np.mean(rouge)),
        "exact_match": 100.0 * float(np.mean(exact)),
    }


def eval_prompts(n: int, available: int) -> np.ndarray:
    """The first ``n`` of the ``available`` evaluation prompts. They come in a seeded order
    (:func:`fedtune.data.prepare`), the one the test subset ``data.test_size`` is drawn in:
    a classification dataset run as generation scores the rows the classifier is tested on."""
    return np.arange(min(n, available))
