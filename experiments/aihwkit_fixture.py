"""aihwkit 1.2's PCM statistics for a few fixed networks: the fixture ``tests/data/aihwkit_pcm.json``.

Run with aihwkit's Python (``../shared/tools/setup-aihwkit.sh`` builds it into
``~/.cache/nvjax-aihwkit``)::

    ~/.cache/nvjax-aihwkit/bin/python experiments/aihwkit_fixture.py [--instances 2000] \\
        [--out tests/data/aihwkit_pcm.json]

Networks (weights and inputs are drawn here from a fixed numpy seed by :func:`network`, which
needs only numpy, so ``tests/test_aihwkit_fixture.py`` regenerates exactly the same arrays and
checks them against the checksums stored in the fixture):

* ``mlp``: ``nvjax.models.MLP((128, 10))`` on 64 inputs (Dense 64-128-10, ReLU), 256 input
  vectors uniform in [0, 1);
* ``cnn``: Conv 3×3 1→8 (SAME), ReLU, avg-pool 2×2, flatten in NHWC order, Dense 128-10
  (``Conv_0``, ``Dense_0``; the test's Flax twin), on 64 images 8×8×1 uniform in [0, 1).

Two layers each keep the test's compilation short; the conv layer checks that a kernel unrolled to
the im2col matrix [kh·kw·c_in, c_out] (nvjax) and aihwkit's ``AnalogConv2d`` tile
[c_out, c_in·kh·kw] give the same statistics (with an ideal periphery only the set of weights of a
tile matters, not their order). The trained digits MLP and LeNet are compared through their
accuracy by ``experiments/e_aihwkit.py``.

aihwkit side: every Linear/Conv2d is converted to an analog layer (``convert_to_analog``) with
``InferenceRPUConfig``: ``PCMLikeNoiseModel(g_max=25)``, ``GlobalDriftCompensation()``,
``forward.is_perfect = True`` (ideal periphery: no DAC/ADC/output noise), ``mapping.
weight_scaling_omega = 1`` and one tile per layer (``max_input_size = max_output_size = 0``),
biases digital. One instance = ``program_analog_weights()`` once, then for each time t
``drift_analog_weights(t)`` and a forward pass. Per network and time the fixture holds the mean
and standard deviation over instances of the relative output error ``||y − y_ideal||_F /
||y_ideal||_F`` (Frobenius norm over the whole batch of outputs of one instance; ``y_ideal`` the
digital network), the number of instances and a few quantiles.

This file holds no aihwkit code: it calls aihwkit's public API (imported only in :func:`main`).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

SEED = 1234
TIMES_S = (1.0, 3600.0, 86400.0, 365.0 * 86400.0)
NETWORKS = ("mlp", "cnn")
MLP_FEATURES = (128, 10)
BATCH = {"mlp": 256, "cnn": 64}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "tests", "data", "aihwkit_pcm.json")


def _layers(name):
    """(layer name, kernel shape in Flax layout) of network ``name``, in order."""
    if name == "mlp":
        dims = (64,) + MLP_FEATURES
        return [(f"Dense_{i}", (dims[i], dims[i + 1])) for i in range(len(MLP_FEATURES))]
    if name == "cnn":
        return [("Conv_0", (3, 3, 1, 8)), ("Dense_0", (128, 10))]
    raise ValueError(f"network: expected one of {NETWORKS}, got {name!r}")


def network(name, seed=SEED):
    """Weights and inputs of network ``name``, regenerated identically from ``seed``.

    Kernels ~ N(0, 2/fan_in) (He), biases ~ N(0, 0.05²), in Flax layout (Dense ``[n_in, n_out]``,
    Conv ``[kh, kw, c_in, c_out]``); inputs uniform in [0, 1): ``[256, 64]`` (mlp) or
    ``[64, 8, 8, 1]`` NHWC (cnn). All float32.

    Returns:
        ``(params, x)``: ``params`` a dict layer → {'kernel', 'bias'} of numpy arrays.
    """
    rng = np.random.default_rng([seed, NETWORKS.index(name)])
    params = {}
    for layer, shape in _layers(name):
        fan_in = int(np.prod(shape[:-1]))
        params[layer] = {
            "kernel": (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
            "bias": (0.05 * rng.standard_normal(shape[-1])).astype(np.float32)}
    xshape = (BATCH[name], 64) if name == "mlp" else (BATCH[name], 8, 8, 1)
    x = rng.random(xshape, dtype=np.float32)
    return params, x


def checksum(params, x):
    """Σ|kernel| + Σ|bias| + Σx in float64: a fingerprint of the regenerated arrays."""
    tot = float(np.sum(np.abs(x), dtype=np.float64))
    for p in params.values():
        tot += float(np.sum(np.abs(p["kernel"]), dtype=np.float64))
        tot += float(np.sum(np.abs(p["bias"]), dtype=np.float64))
    return tot


def relative_error(y, y_ideal):
    """||y − y_ideal||_F / ||y_ideal||_F of one instance (arrays ``[B, 10]``)."""
    y, y_ideal = np.asarray(y, np.float64), np.asarray(y_ideal, np.float64)
    return float(np.linalg.norm(y - y_ideal) / np.linalg.norm(y_ideal))


def summary(errors):
    """Statistics of the per-instance errors ``[n]``: mean, std (ddof 1), n, quantiles."""
    e = np.asarray(errors, np.float64)
    return {"mean": float(e.mean()), "std": float(e.std(ddof=1)), "n": int(e.size),
            "p01": float(np.percentile(e, 1)), "p50": float(np.percentile(e, 50)),
            "p99": float(np.percentile(e, 99))}


# --------------------------------------------------------------------------------------------
# aihwkit side (torch models equivalent to nvjax.models.MLP / LeNet)
# --------------------------------------------------------------------------------------------
def _torch_model(params):
    """The torch twin of ``nvjax.models.MLP`` (layers ``Dense_0..``), of ``nvjax.models.LeNet``
    (``Conv_0``, ``Conv_1``, ``Dense_0``, ``Dense_1``) or of the fixture's small CNN (``Conv_0``,
    ``Dense_0``), holding ``params`` (Flax layout). Images enter NCHW and are flattened in NHWC
    order, as the Flax models do."""
    import torch
    from torch import nn

    class NHWCFlatten(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    dense = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    convs = sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:]))
    order = convs + dense
    mods = []
    if convs:    # Conv_0 → ReLU → avg-pool 2×2 [→ Conv_1 → ReLU] → flatten (NHWC)
        for i, layer in enumerate(convs):
            kh, kw, c_in, c_out = params[layer]["kernel"].shape
            mods += [nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2)), nn.ReLU()]
            if i == 0:
                mods.append(nn.AvgPool2d(2))
        mods.append(NHWCFlatten())
    for i, layer in enumerate(dense):
        mods.append(nn.Linear(*params[layer]["kernel"].shape))
        if i < len(dense) - 1:
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods)
    weighted = [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m, layer in zip(weighted, order):
            k = params[layer]["kernel"]
            # Flax Dense [in, out] -> torch [out, in]; Conv [kh, kw, in, out] -> [out, in, kh, kw]
            w = k.T if k.ndim == 2 else k.transpose(3, 2, 0, 1)
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            m.bias.copy_(torch.from_numpy(params[layer]["bias"]))
    return net


def _torch_input(x):
    """Flax inputs (``[B, n]`` or NHWC ``[B, H, W, C]``) as a torch tensor (NCHW for images)."""
    import torch
    x = np.asarray(x, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x if x.ndim == 2 else x.transpose(0, 3, 1, 2)))


def rpu_config():
    """aihwkit's configuration of the fixture (see the module docstring)."""
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig
    rpu = InferenceRPUConfig()
    rpu.noise_model = PCMLikeNoiseModel(g_max=25.0)
    rpu.drift_compensation = GlobalDriftCompensation()
    rpu.forward.is_perfect = True
    rpu.mapping.weight_scaling_omega = 1.0
    rpu.mapping.max_input_size = 0
    rpu.mapping.max_output_size = 0
    return rpu


def simulate(params, x, instances, times, seed, metric, log=None, label=""):
    """``metric(y, y_ideal)`` of every aihwkit instance at every time: ``[len(times), instances]``.

    One instance = ``program_analog_weights()`` once, then per time ``drift_analog_weights(t)``
    and a forward pass of ``x`` (Flax layout) through the analog twin of ``params``.
    """
    import torch
    from aihwkit.nn.conversion import convert_to_analog
    xt = _torch_input(x)
    with torch.no_grad():
        y_ideal = _torch_model(params).eval()(xt).numpy()
    torch.manual_seed(seed)
    net = convert_to_analog(_torch_model(params), rpu_config()).eval()
    out = np.empty((len(times), instances))
    t_start = time.time()
    with torch.no_grad():
        # before programming the analog network must reproduce the digital one
        err0 = relative_error(net(xt).numpy(), y_ideal)
        assert err0 < 1e-5, f"analog twin differs from the digital network: {err0:.3g}"
        for i in range(instances):
            net.program_analog_weights()
            for j, t in enumerate(times):
                net.drift_analog_weights(float(t))
                out[j, i] = metric(net(xt).numpy(), y_ideal)
            if log and (i + 1) % max(instances // 10, 1) == 0:
                log(f"{label}: {i + 1}/{instances} instances, {time.time() - t_start:.0f} s")
    return out


def run_aihwkit(name, instances, times=TIMES_S, seed=SEED, log=None):
    """Per-instance relative output errors ``[len(times), instances]`` of network ``name``."""
    params, x = network(name, seed)
    return simulate(params, x, instances, times, seed, relative_error, log, name)


def accuracy_worker(npz_path, out_path, instances, times, seed, log=None):
    """The aihwkit side of ``experiments/e_aihwkit.py``: test accuracy per instance and time.

    ``npz_path`` holds ``x`` (test inputs, Flax layout), ``y`` (labels) and the parameters as
    ``<layer>/kernel``, ``<layer>/bias``; writes ``{"aihwkit_version", "times_s",
    "accuracy": [[per instance] per time], "seconds"}`` to ``out_path``.
    """
    import aihwkit
    data = np.load(npz_path)
    params = {}
    for key in data.files:
        if "/" in key:
            layer, leaf = key.rsplit("/", 1)
            params.setdefault(layer, {})[leaf] = data[key]
    labels = data["y"]
    t0 = time.time()
    acc = simulate(params, data["x"], instances, times, seed,
                   lambda y, _: float(np.mean(np.argmax(y, axis=1) == labels)), log, npz_path)
    with open(out_path, "w") as f:
        json.dump({"aihwkit_version": aihwkit.__version__, "times_s": list(times),
                   "accuracy": acc.tolist(), "seconds": time.time() - t0}, f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--accuracy", metavar="NPZ",
                    help="instead of the fixture: the accuracy worker of e_aihwkit.py on NPZ")
    ap.add_argument("--times", type=float, nargs="+", default=list(TIMES_S))
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    import aihwkit
    import torch
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.accuracy:
        accuracy_worker(args.accuracy, args.out, args.instances, args.times, args.seed, log)
        return 0
    doc = {
        "description": "aihwkit PCMLikeNoiseModel + GlobalDriftCompensation statistics of the "
                       "relative output error ||y - y_ideal||_F/||y_ideal||_F per instance "
                       "(written by experiments/aihwkit_fixture.py)",
        "aihwkit_version": aihwkit.__version__, "torch_version": torch.__version__,
        "config": {"noise_model": "PCMLikeNoiseModel(g_max=25.0)",
                   "drift_compensation": "GlobalDriftCompensation()",
                   "rpu_config": "InferenceRPUConfig", "forward.is_perfect": True,
                   "mapping.weight_scaling_omega": 1.0, "mapping.max_input_size": 0,
                   "mapping.max_output_size": 0},
        "seed": SEED, "times_s": list(TIMES_S), "networks": {}}
    for name in NETWORKS:
        params, x = network(name)
        t0 = time.time()
        err = run_aihwkit(name, args.instances, log=log)
        doc["networks"][name] = {
            "checksum": checksum(params, x), "input_shape": list(x.shape),
            "seconds": round(time.time() - t0, 1),
            "stats": [dict(t_s=t, **summary(e)) for t, e in zip(TIMES_S, err)]}
        log(json.dumps(doc["networks"][name]["stats"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
