"""ZeRO-3 through the Trainer engine, on the CPU: two Ray Train workers (gloo, DeepSpeed's CPU
accelerator), the weights sharded from load, the tuned model gathered whole when saved. The
saved model loads with ``from_pretrained`` and scores the validation samples exactly as the
trial reported."""

import json

import numpy as np
import pytest
from conftest import fit_trial

from ray_pipeline.config import FinetuneConfig, ResourceSettings, TrainSettings


@pytest.mark.slow
def test_zero3_with_two_workers_saves_a_whole_model_that_scores_as_reported(tmp_path, local_ray):
    import torch
    from safetensors.numpy import load_file

    from ray_pipeline.finetune.task import task_for
    from ray_pipeline.finetune.train import TrialLoop
    from ray_pipeline.io.models import resolve

    texts = [f"sample {i}: {'card' if i % 2 else 'transfer'} question number {i * 7}" for i in range(24)]
    data = {"texts": texts, "labels": np.arange(24) % 2}
    ft = FinetuneConfig(resources=ResourceSettings(num_workers=2, threads_per_worker=1),
                        train=TrainSettings(engine="trainer", zero_stage=3, precision="fp32", lr=1e-3, batch_size=4,
                                            eval_batch_size=8, max_steps=2, eval_every=1, max_length=16))
    loop = TrialLoop(finetune=ft, seed=0, use_gpu=False, steps=2, model_path=resolve("minilm"), label_names=["a", "b"],
                     train=data, eval=data, best_model_dir=str(tmp_path / "best"))
    result = fit_trial(loop, tmp_path / "zero3", workers=2, cpus=0.5)
    history = result.metrics_dataframe
    assert list(history["step"]) == [1, 2]

    best = tmp_path / "best"
    saved = json.loads((best / "metrics.json").read_text())
    reported = history[history["step"] == saved["step"]].iloc[0]
    task = task_for("classification")
    # whole tensors, not the empty placeholders a ZeRO-3 module holds outside a gather
    # (saved under the checkpoint's own names, e.g. LayerNorm.gamma, which from_pretrained maps)
    base = task.load(resolve("minilm"), ["a", "b"])[0]
    tensors = load_file(str(best / "model.safetensors"))
    assert sum(t.size for t in tensors.values()) == sum(p.numel() for p in base.parameters())

    model, tok = task.load(str(best))
    model.eval()
    with torch.inference_mode():
        batch = task.batch(tok, data, range(len(texts)), 16)
        out = model(**batch)
    preds = out.logits.argmax(-1).numpy()
    assert float((preds == data["labels"]).mean()) == pytest.approx(reported["accuracy"])
    assert float(out.loss) == pytest.approx(reported["eval_loss"], rel=1e-4, abs=1e-5)
