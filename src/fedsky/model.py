"""Causal language models: built from a small config or loaded from a local directory.

Only trainable parameters are federated; with LoRA that is the adapters alone, so a site
exchanges megabytes instead of the whole model.
"""

from __future__ import annotations

import logging
import re
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from fedsky.config import ModelConfig
from fedsky.errors import FedskyError

log = logging.getLogger("fedsky.model")
# transformers' own warnings and progress bars would drown the round lines.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedskyError("training.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int,
                device: torch.device | None = None) -> PreTrainedModel:
    """The same config and seed give the same initial weights on every site and coordinator.

    With `device`, the model is placed there (a quantized base is loaded straight onto it:
    bitsandbytes models cannot be moved after loading).
    """
    torch.manual_seed(seed)
    if cfg.pretrained is not None:
        model = load_pretrained(cfg, device)
    elif cfg.arch == "gpt2":
        model = AutoModelForCausalLM.from_config(
            GPT2Config(
                vocab_size=vocab_size,
                n_positions=cfg.context,
                n_embd=cfg.n_embd,
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                resid_pdrop=cfg.dropout,
                embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.dropout,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    else:
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(
                vocab_size=vocab_size,
                max_position_embeddings=cfg.context,
                hidden_size=cfg.n_embd,
                intermediate_size=4 * cfg.n_embd,
                num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.n_head,
                attention_dropout=cfg.dropout,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    rows = model.get_input_embeddings().num_embeddings
    if cfg.pretrained is not None and rows < vocab_size:
        raise FedskyError(f"model.pretrained: the model has {rows} token embeddings but the "
                          f"tokenizer {vocab_size} ids; use the model's own tokenizer")
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* deprecated")
            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules),
                    task_type="CAUSAL_LM",
                ),
                autocast_adapter_dtype=True,  # adapters in fp32 even on a bf16 or 4-bit base
            )
    if device is not None and cfg.quantize is None:
        model = model.to(device)
    return model


def load_pretrained(cfg: ModelConfig, device: torch.device | None) -> PreTrainedModel:
    """A causal LM from a local directory (or the Hub by name, when online), frozen when LoRA
    trains adapters on it; with `quantize`, the base in 8 or 4 bits (QLoRA)."""
    assert cfg.pretrained is not None
    source, local = resolve_pretrained(cfg.pretrained, "model.pretrained")
    kwargs: dict = {"dtype": DTYPES[cfg.dtype]}
    if cfg.quantize is not None:
        kwargs.update(quantized_loading(cfg, device))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, **kwargs)
    except (OSError, ValueError) as err:
        raise FedskyError(f"model.pretrained: cannot load a causal LM from {source}: "
                          f"{err}") from None
    if cfg.quantize is not None:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and head, input gradients on, so adapters train stably on a k-bit base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def resolve_pretrained(name: str, field: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local only?): an existing directory is used offline;
    `org/name` that is no directory here is fetched from the Hugging Face Hub (or its cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if _HUB_NAME.match(name) and not name.startswith((".", "/", "~")):
        return name, False
    raise FedskyError(f"{field}: no such directory: {name} (nor a Hub name like org/model)")


def quantized_loading(cfg: ModelConfig, device: torch.device | None) -> dict:
    """from_pretrained arguments for a bitsandbytes base; a clear error without GPU or package."""
    if find_spec("bitsandbytes") is None:
        raise FedskyError(f"model.quantize = {cfg.quantize!r} needs bitsandbytes: "
                          "pip install bitsandbytes (on a machine with an NVIDIA GPU)")
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        raise FedskyError(f"model.quantize = {cfg.quantize!r} (QLoRA) needs a CUDA GPU; "
                          "drop model.quantize to train LoRA on an unquantized base")
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    index = device.index if device is not None and device.index is not None else 0
    return {"quantization_config": bnb, "device_map": {"": index}}


def merge_adapters(cfg: ModelConfig, adapter_dir: Path, out_dir: Path, vocab_size: int,
                   seed: int) -> Path:
    """The adapters in `adapter_dir` merged into a fresh full-precision copy of the base, saved
    as a plain transformers model. A quantized base is reloaded unquantized for this."""
    from peft import PeftModel

    base_cfg = cfg.model_copy(update={"lora": None, "quantize": None})
    base = build_model(base_cfg, vocab_size, seed)  # same seed: the same base a run trained on
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    return out_dir


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The federated tensors: detached fp32 CPU copies of every trainable parameter."""
    return {
        name: p.detach().to("cpu", torch.float32).clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def trainable_delta(model: torch.nn.Module, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """new - old for every trainable tensor, one tensor at a time: the site never holds a
    second full copy of the trained weights, only the update (fp32, on the CPU)."""
    delta = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                new = p.detach().to("cpu", torch.float32, copy=True)  # one tensor's copy
                delta[name] = new.sub_(old[name])
    if delta.keys() != old.keys():
        raise FedskyError(f"trainable tensors changed during the round: "
                          f"{sorted(delta.keys() ^ old.keys())[:3]}")
    return delta


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy federated tensors into the model; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing = sorted(params.keys() - state.keys())[:3]
        extra = sorted(state.keys() - params.keys())[:3]
        raise FedskyError(f"parameter names differ: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise FedskyError(f"{name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
            p.copy_(state[name].to(p.device, p.dtype))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
