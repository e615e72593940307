"""export-hf of a model that uses LLaVA's -200 placeholder: transformers and AutoTokenizer load
the result, the image token becomes a real entry, and the logits equal ours."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from tests.models.hf_oracle import hf_logits, random_batch, rel_l2
from vflan_jax.checkpoint import load_model, load_tokenizer, tokenizer_dir
from vflan_jax.convert.hf_export import export_hf
from vflan_jax.convert.image_token import sample_new_rows
from vflan_jax.models.llava import LlavaForConditionalGeneration as FlaxLlava


def test_export_adds_image_token_and_matches_logits(tmp_path, placeholder_checkpoint):
    ckpt, original = placeholder_checkpoint
    params, cfg = load_model(ckpt)
    vocab = cfg.text.vocab_size
    out = tmp_path / "hf"
    export_hf(ckpt, out, progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == vocab and config["pad_token_id"] == vocab + 1
    assert config["text_config"]["vocab_size"] == 192  # 128 + 2 -> next multiple of 64
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<image>") == vocab and tok.pad_token == "<pad>" and tok.pad_token_id == vocab + 1
    assert tok("w5 <image> w7")["input_ids"][-3:] == [5, vocab, 7]
    # the checkpoint's own tokenizer is untouched
    assert load_tokenizer(tokenizer_dir(ckpt)).convert_tokens_to_ids("w9") == 9

    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.image_token_id == vocab
    with safe_open(out / "model.safetensors", "pt") as f:
        embed = f.get_tensor("language_model.model.embed_tokens.weight").numpy()
        head = f.get_tensor("language_model.lm_head.weight").numpy()
    old_embed = np.asarray(params["language_model"]["embed_tokens"]["embedding"])
    old_head = np.asarray(params["language_model"]["lm_head"]["kernel"]).T
    assert np.array_equal(embed[:vocab], old_embed) and np.array_equal(head[:vocab], old_head)
    for new, old in ((embed[vocab:], old_embed), (head[vocab:], old_head)):  # N(mean, 1e-5 cov): near the mean
        assert new.shape == (64, old.shape[1]) and np.all(np.isfinite(new))
        spread = np.abs(new - old.mean(0)).max()
        assert 0 < spread < 0.05 * np.abs(old - old.mean(0)).max()
    assert not np.array_equal(embed[vocab:], head[vocab:])

    batch = random_batch(cfg.replace(image_token_id=vocab - 1), [1, 1], cfg.tokens_per_image + 8, seed=3)
    ours_ids = np.where(batch["ids"] == vocab - 1, -200, batch["ids"])
    ours = np.asarray(jax.jit(FlaxLlava(cfg).apply)({"params": params}, jnp.asarray(ours_ids, jnp.int32),
                                           jnp.asarray(batch["pixels"]), jnp.asarray(batch["image_mask"])))
    batch["ids"] = np.where(batch["ids"] == vocab - 1, vocab, batch["ids"])
    ref = hf_logits(hf, batch)
    assert ref.shape[-1] == 192
    assert rel_l2(ours, ref[..., :vocab]) <= 1e-5
    assert rel_l2(hf_logits(original, {**batch, "ids": np.where(batch["ids"] == vocab, vocab - 1, batch["ids"])}),
                  ref[..., :vocab]) <= 1e-5


def test_sampled_rows_follow_scaled_covariance():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 3.0
    new = sample_new_rows(old.astype(np.float32), 40000, seed=1).astype(np.float64)
    cov = np.cov(old, rowvar=False, bias=True)
    assert np.allclose(new.mean(0), old.mean(0), atol=5e-3)
    assert np.allclose(np.cov(new, rowvar=False), 1e-5 * cov, atol=0.05 * 1e-5 * np.abs(cov).max())
    assert np.array_equal(new, sample_new_rows(old.astype(np.float32), 40000, seed=1))
