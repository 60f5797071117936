"""Model-side performance options give the plain model's numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import rl
from jrlhf.models import forward, init_params

import test_steps

CFG = dataclasses.replace(test_steps.CFG, num_layers=3)
GPT2 = dataclasses.replace(test_steps.GPT2, num_layers=3)


def loss_and_grads(cfg, params, ids, mask):
    def loss(p):
        logits = forward(cfg, p, ids, mask)
        return -rl.masked_mean(rl.logprobs_from_logits(logits[:, :-1], ids[:, 1:]), mask[:, 1:])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
@pytest.mark.parametrize("base", [CFG, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (False, "dots"),
                                        (True, "full"), (True, "dots")])
def test_scan_and_remat_match_plain(base, scan, remat):
    params = init_params(base, 0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 9)))
    mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]))
    ref_loss, ref_grads = loss_and_grads(base, params, ids, mask)
    cfg = dataclasses.replace(base, scan_layers=scan, remat=remat)
    got_loss, got_grads = loss_and_grads(cfg, params, ids, mask)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 got_grads, ref_grads)


def test_scan_compiles_one_layer_body():
    """The number of matmuls in the program grows with depth unrolled, not with scan."""
    def matmuls(num_layers, scan):
        cfg = dataclasses.replace(CFG, num_layers=num_layers, scan_layers=scan)
        params = jax.eval_shape(lambda: init_params(cfg, 0))
        ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        text = jax.jit(lambda p, i: forward(cfg, p, i, jnp.ones_like(i))).lower(
            params, ids).as_text()
        return text.count("dot_general")

    assert matmuls(8, False) - matmuls(2, False) == 6 * (matmuls(3, False) - matmuls(2, False))
    assert matmuls(8, True) == matmuls(2, True)


@pytest.mark.slow
def test_bfloat16_compute_loss_parity():
    """bf16 compute with float32 master weights: loss within 1% of float32, grads finite and
    float32 (they update float32 parameters)."""
    params = init_params(CFG, 0)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 64, (4, 16)))
    mask = jnp.ones_like(ids)
    ref_loss, _ = loss_and_grads(CFG, params, ids, mask)
    loss16, grads16 = loss_and_grads(dataclasses.replace(CFG, dtype="bfloat16"), params, ids,
                                     mask)
    assert abs(float(loss16) - float(ref_loss)) / float(ref_loss) < 0.01
    assert float(loss16) != float(ref_loss)
    assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads16))
