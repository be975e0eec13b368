"""Text encoders through sentence-transformers where the model is one: its own pooling, prompts
and maximum length obeyed; a bare transformers directory pooled with embed.pooling as before.
Real models (the packaged MiniLM and directories derived from it), no network, no Ray."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_pipeline.config import Config, EmbedConfig
from ray_pipeline.embed.encoders import SENTENCE_TRANSFORMERS, TRANSFORMERS, TextEmbedder, text_encoding
from ray_pipeline.embed.stage import stage_key
from ray_pipeline.errors import ConfigError, InputError
from ray_pipeline.io.models import resolve

TEXTS = np.array(["How do I activate my new card?", "My card arrived, how do I turn it on?",
                  "What is the exchange rate for euros?", "The weather is sunny today.",
                  "Why was I charged a fee for withdrawing cash at the ATM abroad last week?"], dtype=object)
PROMPTS = {"query": "query: ", "passage": "passage: "}


def derived(root: Path, name: str, *, modules: bool = True, pooling: dict | None = None,
            st_config: dict | None = None) -> str:
    """A model directory made from the packaged MiniLM: its files linked, some replaced."""
    src, out = Path(resolve("minilm")), root / name
    out.mkdir()
    for f in src.iterdir():
        if f.is_file() and not (f.name == "modules.json" and not modules):
            (out / f.name).symlink_to(f)
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        pooling or json.loads((src / "1_Pooling" / "config.json").read_text())))
    if st_config is not None:
        (out / "config_sentence_transformers.json").unlink()
        (out / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    return {"bare": derived(root, "bare", modules=False),
            "cls": derived(root, "cls", pooling={"embedding_dimension": 384, "pooling_mode": "cls"}),
            "prompts": derived(root, "prompts", st_config={"prompts": PROMPTS, "default_prompt_name": "query"})}


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return TextEmbedder(EmbedConfig(device="cpu"))


def embed(model: str, **kw) -> np.ndarray:
    return TextEmbedder(EmbedConfig(model=model, device="cpu", **kw))({"text": TEXTS})["embedding"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_packaged_minilm_runs_through_sentence_transformers_and_equals_its_encode(minilm):
    from sentence_transformers import SentenceTransformer

    assert minilm.encoding.library == SENTENCE_TRANSFORMERS and minilm.encoding.pooling == "mean"
    assert minilm.encoding.max_length == 256 == minilm.model.max_seq_length  # the model's own, not 128
    ref = SentenceTransformer(resolve("minilm"), device="cpu").encode(list(TEXTS), normalize_embeddings=True)
    x = minilm({"text": TEXTS})["embedding"]
    assert x.dtype == np.float32 and x.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_sentence_transformers_path_equals_the_bare_mean_pooling_path(minilm, models):
    bare = TextEmbedder(EmbedConfig(model=models["bare"], device="cpu"))
    assert (bare.encoding.library, bare.encoding.pooling, bare.encoding.max_length) == (TRANSFORMERS, "mean", 128)
    assert cosines(minilm({"text": TEXTS})["embedding"], bare({"text": TEXTS})["embedding"]).min() > 0.9999


def test_the_models_own_pooling_is_obeyed(minilm, models):
    """A sentence-transformers directory whose Pooling config says CLS gives CLS vectors."""
    assert text_encoding(EmbedConfig(model=models["cls"])).pooling == "cls"
    x = embed(models["cls"])
    cls_by_hand = embed(models["bare"], pooling="cls")
    assert cosines(x, cls_by_hand).min() > 0.9999
    assert cosines(x, minilm({"text": TEXTS})["embedding"]).min() < 0.99  # not mean pooling


def test_legacy_pooling_flags_are_read(tmp_path):
    last = derived(tmp_path, "last", pooling={"word_embedding_dimension": 384, "pooling_mode_cls_token": False,
                                              "pooling_mode_lasttoken": True})
    assert text_encoding(EmbedConfig(model=last)).pooling == "last"


def test_pooling_set_for_a_sentence_transformers_model_must_be_its_own(models):
    assert text_encoding(EmbedConfig(model=models["cls"], pooling="cls")).pooling == "cls"  # agrees: accepted
    with pytest.raises(InputError, match="pools 'cls' itself") as e:
        text_encoding(EmbedConfig(model=models["cls"], pooling="mean"))
    assert "\n" not in str(e.value) and "leave embed.pooling empty" in str(e.value)


def test_a_prompt_changes_the_vectors_and_the_stage_key(minilm):
    from sentence_transformers import SentenceTransformer

    x = embed("minilm", prompt="query: ")
    ref = SentenceTransformer(resolve("minilm"), device="cpu").encode(list(TEXTS), prompt="query: ",
                                                                      normalize_embeddings=True)
    np.testing.assert_allclose(x, ref, atol=1e-5)
    assert cosines(x, minilm({"text": TEXTS})["embedding"]).min() < 0.999
    ids = np.array([f"r{i}" for i in range(len(TEXTS))], dtype=object)

    def key(cfg):
        return stage_key(ids, TEXTS, None, cfg, text_encoding(cfg))

    plain, prompted = EmbedConfig(), EmbedConfig(prompt="query: ")
    assert key(plain) != key(prompted) and key(prompted) == key(EmbedConfig(prompt="query: ", engine="local"))
    assert key(plain) == key(EmbedConfig(pooling="mean"))  # the model's own, said out loud: the same vectors
    enc = text_encoding(plain)
    assert stage_key(ids, TEXTS, None, plain, enc) != stage_key(ids, TEXTS, None, plain,
                                                                replace(enc, library=TRANSFORMERS))


def test_a_prompt_is_put_before_each_text_of_a_bare_model(models):
    x = embed(models["bare"], prompt="query: ")
    by_hand = TextEmbedder(EmbedConfig(model=models["bare"], device="cpu"))(
        {"text": np.array(["query: " + t for t in TEXTS], dtype=object)})["embedding"]
    np.testing.assert_array_equal(x, by_hand)


def test_the_models_default_prompt_and_named_prompts(models):
    from sentence_transformers import SentenceTransformer

    assert text_encoding(EmbedConfig(model=models["prompts"])).prompt == "query: "  # its default_prompt_name
    assert text_encoding(EmbedConfig(model=models["prompts"], prompt_name="passage")).prompt == "passage: "
    assert text_encoding(EmbedConfig(model=models["prompts"], prompt="")).prompt == ""  # turned off
    ref = SentenceTransformer(models["prompts"], device="cpu").encode(list(TEXTS), normalize_embeddings=True)
    np.testing.assert_allclose(embed(models["prompts"]), ref, atol=1e-5)  # the default applied as ST applies it


def test_a_prompt_name_the_model_does_not_have_is_a_one_line_error(models):
    with pytest.raises(InputError, match=r"'qeury' is not one of the prompts .*\['passage', 'query'\]") as e:
        text_encoding(EmbedConfig(model=models["prompts"], prompt_name="qeury"))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="it has none; give the text as embed.prompt"):
        text_encoding(EmbedConfig(prompt_name="query"))
    with pytest.raises(InputError, match="not one \\(no modules.json\\)"):
        text_encoding(EmbedConfig(model=models["bare"], prompt_name="query"))
    with pytest.raises(ConfigError, match="not both"):
        EmbedConfig(prompt="query: ", prompt_name="query")


def test_a_prompt_name_is_checked_before_anything_is_written(tmp_path):
    from ray_pipeline.pipeline import check

    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = Config.from_dict({"data": {"path": str(data)}, "embed": {"prompt_name": "query"},
                            "select": {"budgets": [2]}, "cluster": {"k": [2]}, "output_dir": str(tmp_path / "out")})
    with pytest.raises(InputError, match="prompt_name 'query'"):
        check(cfg, tune=False)
    assert not (tmp_path / "out").exists()
    found = check(cfg.override(["embed.prompt_name=null"]), tune=False)
    assert found["text encoder"]["library"] == SENTENCE_TRANSFORMERS


def test_max_length_only_lowers_the_models_own(minilm):
    short = TextEmbedder(EmbedConfig(device="cpu", max_length=8))
    assert short.encoding.max_length == 8 == short.model.max_seq_length
    assert text_encoding(EmbedConfig(max_length=4096)).max_length == 256
    long_text = np.array([" ".join(["card"] * 40)], dtype=object)
    assert cosines(short({"text": long_text})["embedding"], minilm({"text": long_text})["embedding"]).min() < 0.999
