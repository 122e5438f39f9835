"""Use a finished run: the base model with the run's adapter, as a classifier or a generator.

>>> run = load_run("runs/demo-gen")  # configs/demo-gen.toml
>>> run.generate(["name[Alimentum], area[city centre], familyFriendly[no]"])
['Alimentum is a family-friendly restaurant in the city centre.']
>>> load_run("runs/b77-head").predict(["I still have not received my new card"])
[('card_arrival', 0.1072...)]

(measured: demo-gen.toml and demo-fedllm.toml with fed.rounds=3 data.test_size=300)

The base model is loaded as the run loaded it (``model.name`` of ``RUN_DIR/config.toml``: the
offline SmolLM2, or a hub name); ``RUN_DIR/adapter`` holds the adapter (PEFT format), the
tokenizer and the label names. Elsewhere, PEFT loads the same adapter by the hub name it
records: ``AutoPeftModelForCausalLM.from_pretrained("RUN_DIR/adapter")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config, gendata, tasks
from .context import resolve_device
from .errors import ConfigError, ModelError
from .fedopt.flora import RESIDUAL_FILE, load_residual
from .generate import generate
from .models import load_model, set_residual


@dataclass
class TrainedRun:
    cfg: config.RunConfig
    model: torch.nn.Module
    tokenizer: object
    task: tasks.Task
    labels: list[str]  # class names by index (classification)

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """Each text's most probable label and its probability (classification runs)."""
        if self.task.model_kind != "classify":
            raise ConfigError("this run fine-tuned a generator: use generate, not predict")
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.cfg.model.max_length,
            padding=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
        self.model.eval()
        with torch.inference_mode():
            probs = self.task.logits(self.model, batch, "off").softmax(-1).cpu()
        best = probs.max(-1)
        return [(self.labels[i], float(p)) for p, i in zip(best.values, best.indices, strict=True)]

    def generate(
        self, prompts: list[str], max_new_tokens: int | None = None, raw: bool = False
    ) -> list[str]:
        """Greedy responses to ``prompts`` (generation runs). Each prompt fills the run's
        ``data.prompt_template`` when that has one field (``"Describe ...: {mr}"``: give the
        ``mr``), unless ``raw``; then the chat template (or the plain one) wraps it."""
        if self.task.model_kind != "causal":
            raise ConfigError("this run fine-tuned a classifier: use predict, not generate")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        template = self.cfg.data.prompt_template
        names = set(gendata.fields_of(template))
        if not raw and len(names) == 1:
            field = next(iter(names))
            prompts = [template.format(**{field: p}) for p in prompts]
        chat = gendata.uses_chat(self.tokenizer, self.cfg.data.chat_template)
        ids = gendata.encode_prompts(self.tokenizer, prompts, chat)
        n = max_new_tokens or self.cfg.eval.max_new_tokens
        return generate(self.model, self.tokenizer, ids, n, self.cfg.eval.generate_batch_size)


def load_run(run_dir: str | Path, device: str = "cpu") -> TrainedRun:
    """The base model with ``run_dir``'s adapter loaded; one-line errors for a folder that is
    not a finished run, and for an adapter or label file that does not fit the run's model
    (names, shapes, finite values) before anything of it is used."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config.check_device_name(device, "--device")
    path = Path(run_dir)
    adapter = path / "adapter" / "adapter_model.safetensors"
    if not (path / "config.toml").is_file():
        raise ConfigError(f"{path} is not a run directory (no config.toml)")
    if not adapter.is_file():
        raise ConfigError(f"{path} has no trained adapter (the run did not finish)")
    cfg = config.load(path / "config.toml", ["progress=false"])
    task = tasks.get(cfg.data.task)
    try:
        weights = load_file(adapter)
    except Exception as e:  # a truncated or foreign file
        raise ModelError(f"cannot read {adapter}: {str(e).splitlines()[0]}") from None
    bad = next((k for k, w in weights.items() if not torch.isfinite(w).all()), None)
    if bad is not None:
        raise ModelError(f"{adapter}: tensor {bad!r} holds NaN or Inf")
    labels = read_labels(path) if task.model_kind == "classify" else []
    model, tok = load_model(cfg.model, max(len(labels), 2), resolve_device(device), task)
    trainable = sum(p.requires_grad for p in model.parameters())
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # shapes that do not fit: name the first tensor, on one line
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        why = (lines or [str(e).splitlines()[0]])[0][:200]
        raise ModelError(f"{adapter} does not fit {cfg.model.name!r}: {why}") from None
    if result.unexpected_keys or len(weights) != trainable:
        raise ModelError(f"{adapter} does not hold the {trainable} trained tensors of this model")
    residual = adapter.parent / RESIDUAL_FILE  # a FLoRA run's merged stacks
    set_residual(model, load_residual(residual, model) if residual.is_file() else {})
    return TrainedRun(cfg, model, tok, task, labels)


def read_labels(path: Path) -> list[str]:
    """The class names of a classification run, by index, from ``adapter/config.json``'s
    ``id2label`` (``{"0": name, "1": name, ...}``: every index from 0, each a name)."""
    where = path / "adapter" / "config.json"
    try:
        id2label = json.loads(where.read_text())["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{where} holds no label names (id2label)") from None
    if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise ConfigError(f"{where}: id2label must name 2 or more classes")
    return labels
