"""next_token on hand-made distributions: the filters keep exactly the tokens they should."""
import jax
import jax.numpy as jnp
import numpy as np

from vflan_jax.inference.sampling import SamplingParams, next_token

# probabilities 0.5, 0.3, 0.15, 0.05 over ids 3, 1, 0, 2
PROBS = np.array([0.15, 0.3, 0.05, 0.5])
ROWS = 2000


def _draw(temperature, top_p, top_k, seed=0):
    logits = jnp.asarray(np.log(np.tile(PROBS, (ROWS, 1))), jnp.float32)
    keys = jax.random.split(jax.random.key(seed), ROWS)
    return np.asarray(jax.jit(next_token)(logits, keys, SamplingParams.create(temperature, top_p, top_k)))


def test_filters_keep_the_right_tokens():
    assert set(_draw(0.0, 1.0, 0)) == {3}                      # greedy
    full = _draw(1.0, 1.0, 0)
    assert set(full) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.bincount(full, minlength=4) / ROWS, PROBS, atol=0.04)
    assert set(_draw(1.0, 1.0, 2)) == {3, 1}                   # top-k 2
    assert set(_draw(1.0, 0.7, 0)) == {3, 1}                   # mass before id 0 is 0.8 >= 0.7
    assert set(_draw(1.0, 0.85, 0)) == {3, 1, 0}
    # top-p sees the top-k survivors renormalised (0.625, 0.375), as transformers' warpers do:
    # the mass before id 1 is then 0.625 >= 0.55 (it would be 0.5 < 0.55 without renormalising).
    assert set(_draw(1.0, 0.55, 2)) == {3}
    assert np.array_equal(_draw(1.0, 1.0, 0, seed=5), _draw(1.0, 1.0, 0, seed=5))
