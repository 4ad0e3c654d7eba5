"""Causal language models: built from a small config or loaded from a local directory.

Only trainable parameters are federated; with LoRA that is the adapters alone, so a site
exchanges megabytes instead of the whole model.
"""

from __future__ import annotations

import logging
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


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedskyError("training.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> PreTrainedModel:
    """The same config and seed give the same initial weights on every site and coordinator."""
    torch.manual_seed(seed)
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained)
        if not path.is_dir():
            raise FedskyError(f"model.pretrained: no model directory at {path}")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
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
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The federated tensors: detached fp32 CPU copies of every trainable parameter."""
    return {
        name: p.detach().to("cpu", torch.float32).clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


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
