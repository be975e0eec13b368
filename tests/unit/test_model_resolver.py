"""The model resolver's pieces: packaged names, local directories, Hub ids found in a Hugging Face
cache by branch, tag or commit, the revision's rules, and the task-fit checks on real configs.
Offline: the cache is built under a temporary HF_HOME (tests/conftest.py:hub_model)."""

import json
import os

import pytest

from conftest import hub_model
from ray_pipeline.config import Config
from ray_pipeline.errors import ConfigError, InputError
from ray_pipeline.finetune.task import task_for
from ray_pipeline.io.models import hub_cache, hub_offline, is_hub_id, loads_with, resolve

ONE, TWO = "1" * 40, "2" * 40


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty HF_HOME, offline; a small model directory (a config only: resolving reads no more)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return tmp_path / "hf", src


def test_a_hub_id_resolves_to_its_cached_snapshot_by_branch_tag_or_commit(home):
    hf, src = home
    first = hub_model(hf / "hub", "org/name", src, ONE, refs=("main", "v1"))
    second = hub_model(hf / "hub", "org/name", src, TWO, refs=("dev",))
    assert resolve("org/name") == str(first)  # the default branch: refs/main
    assert resolve("org/name", revision="v1") == str(first)
    assert resolve("org/name", revision="dev") == str(second)
    assert resolve("org/name", revision=TWO) == str(second)  # a commit needs no ref


def test_a_revision_the_cache_lacks_names_the_download_command(home):
    hf, src = home
    hub_model(hf / "hub", "org/name", src, ONE)
    with pytest.raises(InputError, match=r"at revision 'v9' is not in the Hugging Face cache .* HF_HUB_OFFLINE is "
                                         r"set; download it first with `hf download org/name --revision v9`"):
        resolve("org/name", revision="v9")
    with pytest.raises(InputError, match=r"^embed.model 'nope/does-not-exist' is not in the Hugging Face cache \("
                                         + str(hf / "hub")):
        resolve("nope/does-not-exist", field="embed.model")


def test_the_cache_is_found_where_the_user_put_it(home, tmp_path, monkeypatch):
    hf, src = home
    assert hub_cache() == hf / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # wins over HF_HOME, as in huggingface_hub
    hub_model(hf / "hub", "org/name", src, ONE)
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        resolve("org/name")
    snap = hub_model(tmp_path / "elsewhere", "org/name", src, ONE)
    assert resolve("org/name") == str(snap)


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value, offline):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_resolving_never_sets_the_users_hub_variables(monkeypatch):
    """The packaged models need no hub; the library leaves HF_HUB_OFFLINE (and HF_HOME, HF_TOKEN) alone."""
    for var in ("HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert os.path.isfile(os.path.join(resolve("minilm"), "config.json"))
    assert os.path.isfile(os.path.join(resolve("default", "minilm"), "config.json"))
    assert not {"HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN"} & set(os.environ)


def test_a_directory_wins_over_a_hub_id_and_takes_no_revision(home, monkeypatch):
    hf, src = home
    monkeypatch.chdir(src.parent)
    (src.parent / "org").mkdir()
    (src.parent / "org" / "name").symlink_to(src, target_is_directory=True)
    hub_model(hf / "hub", "org/name", src, ONE)
    assert resolve("org/name") == "org/name"  # the directory, not the cache
    with pytest.raises(InputError, match="is a local directory; a revision .'v1'. belongs to a Hub id"):
        resolve(str(src), revision="v1")
    with pytest.raises(InputError, match="'minilm' is packaged and has no revisions"):
        resolve("minilm", revision="v1")


@pytest.mark.parametrize("name, hub", [("org/name", True), ("BAAI/bge-small-en-v1.5", True), ("minilm", False),
                                       ("a/b/c", False), ("/abs/path", False), ("org/na me", False),
                                       ("org--x/name", False), ("org/name.git", False)])
def test_what_counts_as_a_hub_id(name, hub):
    assert is_hub_id(name) is hub


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "refs/pr/1", "release-2024_01", ONE])
def test_good_revisions(revision):
    cfg = Config.from_dict({"embed": {"model": "org/name", "revision": revision},
                            "finetune": {"model": "org/lm", "revision": revision}})
    assert cfg.embed.revision == cfg.finetune.revision == revision


@pytest.mark.parametrize("revision", ["", "main branch", "../x", "a..b", "x/", "x.lock", "-x", "x//y", "v1.", "a@{1}",
                                      "x" * 300, 1234])
@pytest.mark.parametrize("section", ["embed", "finetune"])
def test_bad_revisions_are_config_errors(section, revision):
    with pytest.raises(ConfigError, match=rf"config field '{section}.revision' is .*allowed"):
        Config.from_dict({section: {"revision": revision}})


def test_the_image_encoder_is_the_packaged_one_only():
    with pytest.raises(ConfigError, match="Hub ids and directories of image models are not supported"):
        Config.from_dict({"embed": {"image_model": "google/vit-base-patch16-224"}})


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    cfg = Config.from_dict({})
    assert cfg.embed.trust_remote_code is False and cfg.finetune.trust_remote_code is False
    cfg = Config.from_dict({"embed": {"trust_remote_code": True}, "finetune": {"trust_remote_code": True}})
    assert cfg.embed.trust_remote_code and cfg.finetune.trust_remote_code
    with pytest.raises(ConfigError, match="true or false"):
        Config.from_dict({"finetune": {"trust_remote_code": "yes"}})


# ---------------------------------------------------------------------------------------------
# the task fit, read from real transformers configs (no weights)


def test_the_causal_lm_task_takes_causal_lms_and_refuses_classifiers():
    from transformers import BertConfig, LlamaConfig, T5Config

    lm = task_for("instruction")
    lm.check_model(LlamaConfig(architectures=["LlamaForCausalLM"]), "org/llama")
    lm.check_model(LlamaConfig(), "org/llama-base")  # a base model of a type AutoModelForCausalLM maps
    with pytest.raises(InputError, match=r"'org/clf' is a saved classifier \(BertForSequenceClassification\), which "
                                         r"cannot generate; .* or tune this one with finetune.task: classification"):
        lm.check_model(BertConfig(architectures=["BertForSequenceClassification"]), "org/clf")
    with pytest.raises(InputError, match=r"model_type 't5'. is not a causal LM"):
        lm.check_model(T5Config(), "google/t5-small")


def test_the_classifier_task_takes_encoders_and_decoders_with_a_classification_head():
    from transformers import BertConfig, LlamaConfig, ViTConfig

    clf = task_for("classification")
    clf.check_model(BertConfig(architectures=["BertModel"]), "minilm")
    clf.check_model(LlamaConfig(architectures=["LlamaForCausalLM"]), "org/llama")
    with pytest.raises(InputError, match=r"model_type 'vit'. has no sequence-classification model"):
        clf.check_model(ViTConfig(), "google/vit")


def test_loads_with_reads_the_auto_classes_mappings():
    from transformers import BertConfig, T5Config

    assert loads_with(BertConfig(), "AutoModel") and loads_with(BertConfig(), "AutoModelForSequenceClassification")
    assert not loads_with(T5Config(), "AutoModelForCausalLM")
    custom = BertConfig(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    assert loads_with(custom, "AutoModelForCausalLM")  # the repository's own code names one
