"""Instruction tuning with the packaged SmolLM2-135M-Instruct: the response-only loss mask, one
worker training under Ray Train + DeepSpeed, and generation with the saved model."""

import numpy as np
import pytest

from ray_pipeline.finetune.infer import predict
from ray_pipeline.finetune.task import CausalLM, instruction_batch
from ray_pipeline.io.models import smollm2_path

pytestmark = pytest.mark.slow  # SmolLM2 conversion and training: not in the fast lane


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_path()  # converted from the GGUF once, then cached


def test_loss_only_on_response_tokens(smollm2):
    _, tok = CausalLM().load(smollm2)
    b = instruction_batch(tok, ["Add 2 and 3.\n", "Say hi.\n"], ["5", "hi there"], max_length=64)
    for i, (p, r) in enumerate([("Add 2 and 3.\n", "5"), ("Say hi.\n", "hi there")]):
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        resp = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = b["labels"][i].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:n_prompt + len(resp)] == resp
        assert all(v == -100 for v in labels[n_prompt + len(resp):])  # padding
        assert int(b["attention_mask"][i].sum()) == n_prompt + len(resp)


def fit_worker(smollm2, data: dict, max_length: int, out, lr: float = 1e-4):
    """Four steps of the Ray Train + DeepSpeed worker on ``data`` (train and eval alike): the
    metrics and the FinetuneConfig; the best model is saved in ``out / "best"``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_pipeline.config import FinetuneConfig, ResourceSettings, TrainSettings
    from ray_pipeline.finetune.train import TrialLoop, train_loop_per_worker

    ft = FinetuneConfig(task="instruction", resources=ResourceSettings(threads_per_worker=2),
                        train=TrainSettings(lr=lr, batch_size=2, eval_batch_size=2, max_steps=4, eval_every=2, patience=5,
                                            max_length=max_length, zero_stage=0, precision="fp32"))
    loop = TrialLoop(finetune=ft, seed=0, use_gpu=False, steps=4, model_path=smollm2, label_names=None, train=data,
                     eval=data, best_model_dir=str(out / "best"))
    result = TorchTrainer(train_loop_per_worker, train_loop_config={"loop": loop},
                          scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          torch_config=TorchConfig(backend="gloo"),
                          run_config=ray.train.RunConfig(name="instr", storage_path=str(out / "s"))).fit()
    return result.metrics_dataframe, ft


def test_instruction_worker_learns_and_the_model_generates(smollm2, tmp_path, local_ray):
    data = {"prompts": ["What is the capital of France?\n", "What colour is the sky?\n"],
            "responses": ["Paris.", "Blue."]}
    h, _ = fit_worker(smollm2, data, 32, tmp_path)
    assert h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0]
    assert np.isclose(h["perplexity"].iloc[-1], np.exp(h["eval_loss"].iloc[-1]))
    out = predict(str(tmp_path / "best"), ["What is the capital of France?\n"], max_new_tokens=8)
    assert isinstance(out[0]["generation"], str) and out[0]["generation"].strip()


def test_chat_data_trains_through_the_worker(smollm2, tmp_path, local_ray):
    """Conversations (loss on the assistant turns) through the same Ray Train + DeepSpeed worker."""
    from ray_pipeline.finetune.infer import per_sample_values

    chats = [[{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
              {"role": "assistant", "content": "Blue."}]]
    h, ft = fit_worker(smollm2, {"chats": chats}, 64, tmp_path)
    assert CausalLM().uses_lora(ft)  # the default for a causal LM
    assert h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0]
    values = per_sample_values(str(tmp_path / "best"), ft, {"chats": chats})  # the test part's per-sample losses
    assert values.shape == (2, 2) and (values[:, 1] > 0).all() and (values[:, 0] < 0).all()


def test_lora_model_is_saved_merged_and_as_an_adapter_that_agree(smollm2, tmp_path, local_ray):
    """The saved target loads with from_pretrained (merged); base + adapter gives the same logits;
    only the adapters were trained (the base weights in the adapter's base are untouched)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = {"prompts": ["What is the capital of France?\n", "What colour is the sky?\n"],
            "responses": ["Paris.", "Blue."]}
    fit_worker(smollm2, data, 32, tmp_path, lr=5e-3)
    best = tmp_path / "best"
    assert (best / "adapter" / "adapter_config.json").is_file() and (best / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(best).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    adapted = PeftModel.from_pretrained(base, best / "adapter").eval()
    ids = torch.tensor([[1, 422, 314, 260, 3575, 282, 4649, 47]])
    with torch.inference_mode():
        a, b = merged(ids).logits, adapted(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(smollm2).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter did learn something


def test_smollm2_as_an_encoder_with_last_and_mean_pooling():
    from ray_pipeline.config import EmbedConfig
    from ray_pipeline.embed.stage import TextEmbedder

    texts = np.array(["How do I reset my card PIN?", "How can I change the PIN of my card?",
                      "Tell me a poem about the sea."], dtype=object)
    for pooling in ("last", "mean"):
        e = TextEmbedder(EmbedConfig(model="smollm2", pooling=pooling, device="cpu"))({"text": texts})["embedding"]
        assert e.shape == (3, 576)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        assert e[0] @ e[1] > e[0] @ e[2]  # the two PIN questions are closer than the poem


def test_a_sharegpt_pool_runs_through_the_chat_config_with_lora(smollm2, tmp_path, shared_data, local_ray):
    """configs/chat.yaml end to end on conversations made from the Alpaca demo set (ShareGPT form):
    selection, LoRA fine-tuning of the candidates and baselines, the merged target with its adapter,
    and the subset exported as the pool's own records."""
    import json
    from pathlib import Path

    from ray_pipeline.cli import main

    src = json.loads((shared_data / "instruct" / "dataflex_alpaca_en_demo.json").read_text())
    conv = [{"id": f"a{i}", "conversations": [{"from": "human", "value": r["instruction"] + "\n" + r["input"]},
                                              {"from": "gpt", "value": r["output"]}]} for i, r in enumerate(src)]
    for name, rows in (("pool.jsonl", conv[:40]), ("held.jsonl", conv[900:920])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Path(__file__).resolve().parents[2] / "configs" / "chat.yaml"
    sets = [f"data.path={tmp_path / 'pool.jsonl'}", "data.id_column=id",
            f"finetune.heldout.eval_path={tmp_path / 'held.jsonl'}", "finetune.heldout.eval_limit=20",
            "select.budgets=[8]", "select.method=[centroid]", "select.random_seeds=[0]", "finetune.sweep.include_full=false",
            "finetune.train.max_steps=4", "finetune.train.eval_every=2", "finetune.train.max_length=64",
            "embed.engine=local"]
    args = ["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "candidates.json").read_text())["summary"]
    target = tmp_path / "run" / summary["target"]["model"]  # relative to the run directory
    assert (target / "adapter" / "adapter_config.json").is_file() and (target / "config.json").is_file()
    subset = [json.loads(line) for line in (tmp_path / "run" / summary["target"]["subset"]).read_text().splitlines()]
    assert len(subset) == 8 and all(r["conversations"][1]["from"] == "gpt" for r in subset)
    proxy = json.loads((tmp_path / "run" / "proxy.json").read_text())  # no labels: held-out coverage
    assert set(proxy) == {"centroid_k8_m8", "random_m8_s0"} and all(0 < v["coverage"] <= 1 for v in proxy.values())
    # the tuned model answers the held-out conversations through the CLI, rendered with its chat template
    assert main(["predict", "--model", str(target), "--input", str(tmp_path / "held.jsonl"), "--id-column", "id",
                 "--output", str(tmp_path / "pred.jsonl")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 20 and preds[0]["id"] == "a900" and all(isinstance(p["generation"], str) for p in preds)
