"""Pretrained models with LoRA, QLoRA's clear refusal without a GPU, and instruction data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config

from fedsky.config import ModelConfig, load_job, parse_job
from fedsky.data import IGNORE, Rows, as_hf_tokenizer, encode_example, train_bpe
from fedsky.errors import FedskyError
from fedsky.evaluation import evaluate
from fedsky.metrics import read_metrics
from fedsky.model import build_model, trainable_state
from fedsky.runner import run_federated
from fedsky.site import handle_task, make_setup, open_site
from fedsky.wire import pack, unpack
from fedsky.workload import eval_sequences, job_tokenizer, load_job_corpus

LORA = ['model.lora={r=4, alpha=8, target_modules=["c_attn", "c_fc"]}']


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A small GPT-2 saved as a user's pretrained model would be: weights and tokenizer."""
    path = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    texts = corpus_file.read_text().split("\n\n")
    tok = as_hf_tokenizer(train_bpe(texts, 400, path.parent / "bpe"))
    torch.manual_seed(123)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _pretrained_job(tmp_path: Path, corpus: Path, model_dir: Path, *extra: str):
    return load_job(tiny_job(tmp_path, corpus, sites=("a", "b")),
                    [f'model.pretrained="{model_dir}"', "training.threads=1", *LORA, *extra])


def test_lora_on_a_pretrained_model_federates_only_the_adapters(
    tmp_path: Path, corpus_file: Path, pretrained_dir: Path
) -> None:
    job, job_dir = _pretrained_job(tmp_path, corpus_file, pretrained_dir)
    corpus = load_job_corpus(job, job_dir)
    tok = job_tokenizer(job, job_dir, corpus)  # the model's own tokenizer, by default
    site = open_site("a", make_setup(job, job_dir, tok))
    adapters = {n: p for n, p in site.model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in site.model.parameters())
    n_adapter = sum(p.numel() for p in adapters.values())
    assert adapters and all("lora_A" in n or "lora_B" in n for n in adapters)
    assert n_adapter < total / 10

    global_params = trainable_state(site.model)
    assert global_params.keys() == adapters.keys()
    task = pack(global_params, {"round": 0})
    reply = handle_task(site, task)
    tensors, header = unpack(reply)
    # the update on the wire is the adapters' values and nothing else: 4 bytes each plus headers
    assert tensors["v"].numel() == n_adapter and tensors["v"].dtype == torch.float32
    assert header["site"] == "a" and header["tokens"] == 2 * 4 * 32
    assert 4 * n_adapter < len(reply) < 4 * n_adapter + 4096
    assert 4 * n_adapter < len(task) < 4 * n_adapter + 16 * len(adapters) * 8 + 4096
    base = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    frozen = dict(base.named_parameters())
    for name, p in site.model.named_parameters():  # the base did not move
        if not p.requires_grad:
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, frozen[plain]), name


def test_the_saved_adapter_loads_with_peft_and_reproduces_the_final_loss(
    tmp_path: Path, corpus_file: Path, pretrained_dir: Path
) -> None:
    job, job_dir = _pretrained_job(tmp_path, corpus_file, pretrained_dir,
                                   "model.save_merged=true", "training.lr=0.01")
    summary = run_federated(job, job_dir, "inprocess")
    records = read_metrics(Path(summary["output_dir"]))
    out = Path(summary["output_dir"])
    n_adapter = sum(t.numel() for t in trainable_state(build_model(
        job.model, 400, job.seed)).values())
    for rec in records:  # every payload, both ways, is the adapters' size
        for sent in (*rec["bytes_up"].values(), *rec["bytes_down"].values()):
            assert 4 * n_adapter < sent < 4 * n_adapter + 8192

    corpus = load_job_corpus(job, job_dir)
    eval_data = eval_sequences(job, corpus, job_tokenizer(job, job_dir, corpus))
    base = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    before = evaluate(base, eval_data, 8, torch.device("cpu")).loss
    tuned = PeftModel.from_pretrained(base, out / "model")
    loss = evaluate(tuned, eval_data, 8, torch.device("cpu")).loss
    assert loss == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    assert loss < before - 0.01  # the adapters changed the model
    merged = AutoModelForCausalLM.from_pretrained(out / "model-merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert evaluate(merged, eval_data, 8, torch.device("cpu")).loss == pytest.approx(loss, abs=1e-4)


def test_qlora_without_gpu_or_bitsandbytes_is_a_clear_error(pretrained_dir: Path) -> None:
    cfg = ModelConfig(pretrained=str(pretrained_dir), quantize="4bit",
                      lora={"target_modules": ["c_attn"]})
    with pytest.raises(FedskyError, match="bitsandbytes|CUDA"):
        build_model(cfg, 400, 0, torch.device("cpu"))
    with pytest.raises(FedskyError, match="quantize"):
        parse_job({"sites": [{"name": "a"}], "model": {"pretrained": "x", "quantize": "8bit"}})


def test_a_missing_pretrained_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FedskyError, match="no such directory"):
        build_model(ModelConfig(pretrained=str(tmp_path / "absent")), 400, 0)


# ---- instruction data -------------------------------------------------------------------------

EXAMPLES = [
    {"prompt": "Question: what is the capital of France?\nAnswer: ", "response": "Paris."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a prime number."},
                  {"role": "assistant", "content": "Seven."},
                  {"role": "user", "content": "Another one?"},
                  {"role": "assistant", "content": "Eleven."}]},
]


def _trained_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_instruction_examples_mask_everything_but_the_responses(
    pretrained_dir: Path
) -> None:
    from fedsky.data import load_pretrained_tokenizer
    from fedsky.data.corpus import _turns

    tok = load_pretrained_tokenizer(str(pretrained_dir))
    ids, labels = encode_example(tok, _turns(EXAMPLES[0]))
    prompt_len = len(tok(EXAMPLES[0]["prompt"], add_special_tokens=False).input_ids)
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tok.eos_token_id
    assert _trained_text(tok, ids, labels) == "Paris.<|endoftext|>"

    ids, labels = encode_example(tok, _turns(EXAMPLES[1]))  # no chat template: plain headers
    assert _trained_text(tok, ids, labels) == "Seven.\nEleven.\n<|endoftext|>"
    assert "Name a prime" in tok.decode(ids)

    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ids, labels = encode_example(tok, _turns(EXAMPLES[1]))
    assert _trained_text(tok, ids, labels) == "Seven.<|end|>Eleven.<|end|>"
    assert tok.decode(ids).startswith("<|system|>Be brief.<|end|><|user|>")


def test_an_instruction_tuning_job_takes_the_loss_on_responses_only(
    tmp_path: Path, corpus_file: Path, pretrained_dir: Path
) -> None:
    data = tmp_path / "chat.jsonl"
    lines = [EXAMPLES[i % 2] if i % 3 else
             {"prompt": f"Say the number {i} twice: ", "response": f"{i} {i}"} for i in range(60)]
    data.write_text("\n".join(json.dumps(x) for x in lines))
    job, job_dir = _pretrained_job(tmp_path, corpus_file, pretrained_dir,
                                   'data.format="jsonl"', f'data.train="{data}"', "rounds=1",
                                   "training.seq_len=48")
    corpus = load_job_corpus(job, job_dir)
    tok = job_tokenizer(job, job_dir, corpus)
    rows = eval_sequences(job, corpus, tok)
    assert isinstance(rows, Rows) and rows.shape[1] == 48
    masked = rows.labels == IGNORE
    assert masked.any() and (~masked).any()
    assert torch.equal(rows.labels[~masked], rows.ids[~masked])

    # the loss the site trains on is the mean over response tokens alone
    model = build_model(job.model, len(tok), job.seed).eval()
    with torch.no_grad():
        logits = model(input_ids=rows.ids).logits[:, :-1]
        trained = model(input_ids=rows.ids, labels=rows.labels).loss
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), rows.ids[:, 1:].reshape(-1), reduction="none")
    keep = (rows.labels[:, 1:] != IGNORE).reshape(-1)
    torch.testing.assert_close(trained, per_token[keep].mean())
    assert abs(float(trained) - float(per_token.mean())) > 1e-3  # and not over every token
    ev = evaluate(model, rows, 4, torch.device("cpu"))
    assert ev.tokens == int(keep.sum())
    assert ev.loss == pytest.approx(float(per_token[keep].mean()), abs=1e-4)

    summary = run_federated(job, job_dir, "inprocess")  # the whole job runs on it
    assert summary["rounds_completed"] == 1
    rec = read_metrics(Path(summary["output_dir"]))[0]
    assert set(rec["sites"]) == {"a", "b"}


def test_malformed_jsonl_names_the_line(tmp_path: Path, corpus_file: Path) -> None:
    from fedsky.data import load_documents

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"text": "no roles"}) + "\n")
    job = parse_job({"sites": [{"name": "a"}], "data": {"format": "jsonl"}})
    with pytest.raises(FedskyError, match=r"bad.jsonl:2: expected"):
        load_documents(str(bad), job.data, None)
