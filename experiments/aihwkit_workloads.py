"""aihwkit side of the realistic-workload benchmark (run with a Python that has aihwkit).

Torch networks of the same shapes as nvjax's ``models.ResNet()`` (ResNet-20: 3x3 convolutions
16/32/64 channels, 1x1-conv shortcuts, BatchNorm, global average pooling, Linear 64->10; batch 256
of 32x32x3 inputs in [0, 1)) and ``models.Transformer()`` (Linear 12->32 embedding, two pre-LN
encoder layers with 4-head attention from four Linear 32->32 projections and a 32->64->32 GELU
MLP, Linear 32->12 head; batch 256 of 16 one-hot tokens), converted with ``convert_to_analog``
(every Linear and Conv2d analog), ``PCMLikeNoiseModel(g_max=25)``, global drift compensation and
abs-max weight scaling, as ../shared/tools/aihwkit_mc.py does for the MLP workloads. One
instance = ``program_analog_weights()`` + ``drift_analog_weights(1 day)`` + one forward pass.

``python aihwkit_workloads.py [threads]`` prints one JSON line
``{workload: {"instances_per_s", "backend", "all": {backend: rate}}}`` for the workloads
``resnet-pcm-ideal-io``, ``resnet-pcm-default-io``, ``transformer-pcm-ideal-io`` and
``transformer-pcm-default-io`` (ideal: ``forward.is_perfect``; default: aihwkit's default
IOParameters, 7-bit DAC, 9-bit ADC, output noise).
"""
import json
import sys
import time

import torch
from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
from aihwkit.nn.conversion import convert_to_analog
from aihwkit.simulator.configs import InferenceRPUConfig, TorchInferenceRPUConfig
from torch import nn

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2)


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=3, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(c, w, 2 if s > 0 and b == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Encoder(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.m1, self.m2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.n1(x)
        split = lambda a: a.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, n, d))
        return x + self.m2(torch.nn.functional.gelu(self.m1(self.n2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab=12, dim=32, heads=4, layers=2, mlp=64, classes=12, max_len=64):
        super().__init__()
        self.embed = nn.Linear(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, dim))
        self.layers = nn.Sequential(*(Encoder(dim, heads, mlp) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x) + self.pos[:x.shape[1]]
        return self.head(self.norm(self.layers(x)).mean(dim=1))


def inputs(name):
    g = torch.Generator().manual_seed(0)
    if name == "resnet":
        return torch.rand(256, 3, 32, 32, generator=g)
    tokens = torch.randint(0, 12, (256, 16), generator=g)
    return torch.nn.functional.one_hot(tokens, 12).float()


def run(name, cls, perfect, n):
    torch.manual_seed(0)
    rpu = cls()
    rpu.noise_model = PCMLikeNoiseModel(g_max=25.0)
    rpu.drift_compensation = GlobalDriftCompensation()
    rpu.mapping.weight_scaling_omega = 1.0
    rpu.forward.is_perfect = perfect
    net = convert_to_analog(ResNet20() if name == "resnet" else Transformer(), rpu).eval()
    x = inputs(name)
    with torch.no_grad():
        for i in range(n + 1):
            if i == 1:
                t0 = time.perf_counter()
            net.program_analog_weights()
            net.drift_analog_weights(86400.0)
            net(x)
    return n / (time.perf_counter() - t0)


out = {}
for name, n in (("resnet", 3), ("transformer", 10)):
    for io, perfect in (("ideal-io", True), ("default-io", False)):
        rates = {c.__name__: run(name, c, perfect, n)
                 for c in (TorchInferenceRPUConfig, InferenceRPUConfig)}
        best = max(rates, key=rates.get)
        out[f"{name}-pcm-{io}"] = {"instances_per_s": rates[best], "backend": best, "all": rates}
print(json.dumps(out))
