"""Instruction tuning with the packaged SmolLM2-135M-Instruct: the response-only loss mask, one
worker training under Ray Train + DeepSpeed, and generation with the saved model."""

import numpy as np
import pytest

from ray_pipeline.finetune import instruction_batch, predict
from ray_pipeline.models import load_for_task, smollm2_path

pytestmark = pytest.mark.slow  # SmolLM2 conversion and training: not in the fast lane


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_path()  # converted from the GGUF once, then cached


def test_loss_only_on_response_tokens(smollm2):
    _, tok = load_for_task(smollm2, "instruction")
    b = instruction_batch(tok, ["Add 2 and 3.\n", "Say hi.\n"], ["5", "hi there"], max_length=64)
    for i, (p, r) in enumerate([("Add 2 and 3.\n", "5"), ("Say hi.\n", "hi there")]):
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        resp = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = b["labels"][i].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:n_prompt + len(resp)] == resp
        assert all(v == -100 for v in labels[n_prompt + len(resp):])  # padding
        assert int(b["attention_mask"][i].sum()) == n_prompt + len(resp)


def fit_worker(smollm2, data: dict, max_length: int, out):
    """Four steps of the Ray Train + DeepSpeed worker on ``data`` (train and eval alike): the
    metrics and the FinetuneConfig; the best model is saved in ``out / "best"``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_pipeline.config import FinetuneConfig
    from ray_pipeline.finetune import train_loop_per_worker

    ft = FinetuneConfig(task="instruction", lr=1e-4, batch_size=2, eval_batch_size=2, max_steps=4, eval_every=2,
                        patience=5, max_length=max_length, zero_stage=0, precision="fp32", threads_per_worker=2)
    loop = {"finetune": ft, "seed": 0, "use_gpu": False, "steps": 4, "model_path": smollm2, "train": data, "eval": data,
            "best_model_dir": str(out / "best")}
    result = TorchTrainer(train_loop_per_worker, train_loop_config=loop,
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
    from ray_pipeline.finetune import per_sample_values

    chats = [[{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
              {"role": "assistant", "content": "Blue."}]]
    h, ft = fit_worker(smollm2, {"chats": chats}, 64, tmp_path)
    assert h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0]
    values = per_sample_values(str(tmp_path / "best"), ft, {"chats": chats})  # the test part's per-sample losses
    assert values.shape == (2, 2) and (values[:, 1] > 0).all() and (values[:, 0] < 0).all()


def test_smollm2_as_an_encoder_with_last_and_mean_pooling():
    from ray_pipeline.config import EmbedConfig
    from ray_pipeline.embed import TextEmbedder

    texts = np.array(["How do I reset my card PIN?", "How can I change the PIN of my card?",
                      "Tell me a poem about the sea."], dtype=object)
    for pooling in ("last", "mean"):
        e = TextEmbedder(EmbedConfig(model="smollm2", pooling=pooling, device="cpu"))({"text": texts})["embedding"]
        assert e.shape == (3, 576)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        assert e[0] @ e[1] > e[0] @ e[2]  # the two PIN questions are closer than the poem
