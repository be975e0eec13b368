"""The in-process text embedder with the packaged MiniLM weights (real model, no network); against
sentence-transformers' own encode and with derived models: test_encoders.py."""

import numpy as np
import pytest
import torch

from ray_pipeline.config import EmbedConfig
from ray_pipeline.embed.encoders import TextEmbedder, pool_hidden
from ray_pipeline.embed.stage import plan_shards
from ray_pipeline.errors import InputError

TEXTS = np.array(["How do I activate my new card?", "My card arrived, how do I turn it on?",
                  "What is the exchange rate for euros?", "The weather is sunny today."], dtype=object)


@pytest.fixture(scope="module")
def embedder():
    torch.set_num_threads(1)
    return TextEmbedder(EmbedConfig(device="cpu"))


def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    np.testing.assert_allclose(pool_hidden(hidden, mask, "cls").numpy(), [[1.0, 0.0]])
    np.testing.assert_allclose(pool_hidden(hidden, mask, "last").numpy(), [[0.6, 0.8]])
    np.testing.assert_allclose(pool_hidden(hidden, mask, "mean").numpy(), [[2 / 8 ** 0.5, 2 / 8 ** 0.5]], rtol=1e-6)


def test_call_on_a_plain_batch_dict(embedder):
    out = embedder({"text": TEXTS, "id": np.arange(4)})
    e = out["embedding"]
    assert e.shape == (4, 384) and e.dtype == np.float32 and (out["id"] == np.arange(4)).all()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > sim[0, 3]  # two ways of asking to activate a card vs the weather


def test_padding_in_a_batch_does_not_change_a_vector(embedder):
    batched = embedder({"text": TEXTS})["embedding"]  # padded to the longest text
    one_by_one = np.concatenate([embedder({"text": TEXTS[i:i + 1]})["embedding"] for i in range(4)])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)  # padding does not change a vector


def test_shards_hold_rows_of_similar_length_and_cover_every_row_once():
    shards = plan_shards(np.array(["abc", "abcdefghij", "a", "abcdefg", "abcdefg"], dtype=object), 5, 2)
    assert [s.tolist() for s in shards] == [[1, 3], [4, 0], [2]]  # longest first, ties in row order


def test_model_that_is_not_a_model_directory(tmp_path):
    with pytest.raises(InputError, match="not a local model directory"):
        TextEmbedder(EmbedConfig(model=str(tmp_path)))
