"""Models with BatchNorm (a ``batch_stats`` collection) through the mitigations: hardware-aware
training holds the running statistics fixed and returns them, the sensitivities see the model in
inference mode. Checked against the same computations written out by hand with Flax."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nvjax import data as data_mod
from nvjax import sensitivity, training


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


@pytest.fixture(scope="module")
def bn_model():
    model = TinyBN()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    # non-trivial running statistics (init gives mean 0, var 1)
    variables = {"params": variables["params"], "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jnp.arange(s.size, dtype=s.dtype).reshape(s.shape) / s.size,
        variables["batch_stats"])}
    ds = data_mod.Dataset(x[:40], y[:40], x[40:], y[40:])
    return model, variables, ds


def test_loss_and_saliency_use_the_running_statistics(bn_model):
    model, variables, ds = bn_model
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

    def by_hand(p):
        logits = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss = sensitivity.loss_fn(model, x, y, state={"batch_stats": variables["batch_stats"]})
    assert float(loss(variables["params"])) == pytest.approx(float(by_hand(variables["params"])),
                                                             rel=1e-6)
    # the whole variables dict is accepted as well
    assert float(sensitivity.loss_fn(model, x, y)(variables)) == pytest.approx(
        float(by_hand(variables["params"])), rel=1e-6)
    imp = sensitivity.importance(jax.random.key(1), model, variables, x, y)
    g = jax.grad(by_hand)(variables["params"])
    for name in ("Dense_0", "Dense_1"):
        expect = np.abs(np.asarray(variables["params"][name]["kernel"] * g[name]["kernel"]))
        np.testing.assert_allclose(np.asarray(imp[name]), expect, rtol=1e-5, atol=1e-9)
    fisher = sensitivity.importance(jax.random.key(1), model, variables, x, y, method="fisher")
    assert set(fisher) == {"Dense_0", "Dense_1"}
    assert all(np.all(np.asarray(v) >= 0) for v in fisher.values())
    reads = sensitivity.activation_stats(model, variables, x)
    assert set(reads) == {"Dense_0", "Dense_1"}


def test_train_holds_batch_stats_fixed_and_matches_a_hand_written_step(bn_model):
    model, variables, ds = bn_model
    out, hist = training.train(jax.random.key(2), model, ds, params=variables, epochs=1,
                               batch_size=40, learning_rate=1e-2)
    assert set(out) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, out["batch_stats"], variables["batch_stats"])
    # one full-batch Adam step on the inference-mode loss, written out with optax
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    # (one minibatch of the whole training set: the shuffled order does not matter)

    def loss(p):
        logits = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    tx = optax.adam(1e-2)
    p0 = variables["params"]
    upd, _ = tx.update(jax.grad(loss)(p0), tx.init(p0), p0)
    expect = optax.apply_updates(p0, upd)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 out["params"], expect)
    assert len(hist["test_accuracy"]) == 1
