"""One GPU, emulated on the CPU, so that CI runs every GPU-only branch but the CUDA calls themselves: train.py's GPU
layout (`train.on_gpu` true: bf16 autocast on the CPU, checkpointed layers, the bf16 sampler, fused AdamW) and
FastDecode's CUDA-graph branch through fake streams and graphs. A fake graph records, at capture, each call of a
compiled function with the tensors it reads (its arguments and its module's weights), undoes what the call wrote (a
capture runs nothing) and, at every replay, checks that each of those tensors is the same object at the same address
before running the call again and writing its results into the outputs of the capture, as a graph does."""

import contextlib
import functools

import pytest
import torch

import train


def tensors_of(*objs):
    """Every tensor an argument reaches: tensors, lists, KV caches (their attributes), partials and bound methods
    (their module's parameters and buffers)."""
    out = []
    for x in objs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += tensors_of(*x)
        elif isinstance(x, torch.nn.Module):
            out += list(x.parameters()) + list(x.buffers())
        elif isinstance(x, functools.partial):
            out += tensors_of(x.func, *x.args, *x.keywords.values())
        elif hasattr(x, "__self__"):
            out += tensors_of(x.__self__)
        elif hasattr(x, "__dict__") and not callable(x):
            out += tensors_of(*vars(x).values())
    return out


class Emulation:
    def __init__(self):
        self.device, self.capturing, self.bf16 = 0, None, True
        self.streams, self.graphs, self.replays, self.set_devices = [], [], 0, []


class FakeStream:
    def __init__(self, emu):
        self.device = emu.device  # a stream belongs to the device current when it is made
        emu.streams.append(self)

    def wait_stream(self, other):
        pass


class FakeGraph:
    def __init__(self, emu):
        self.emu, self.device, self.calls = emu, emu.device, []
        emu.graphs.append(self)

    def record(self, fn, original, args, kw, outs):
        reads = tensors_of(args, original)
        self.calls.append((fn, args, kw, outs, reads, [t.data_ptr() for t in reads], original))

    def replay(self):
        assert self.calls, "a graph replayed with nothing recorded (the captured function was not compiled)"
        for fn, args, kw, outs, reads, ptrs, original in self.calls:
            now = tensors_of(args, original)
            assert len(now) == len(reads) and all(a is b for a, b in zip(now, reads)), "a tensor was replaced"
            assert [t.data_ptr() for t in now] == ptrs, "a tensor moved since the capture"
            new = fn(*args, **kw)
            for o, n in zip(outs, new if isinstance(new, tuple) else (new,)):
                o.copy_(n)
        self.emu.replays += 1


def recording(emu, compiled, original):
    """A compiled function that, during a fake capture, is recorded and leaves no trace."""
    def call(*args, **kw):
        if emu.capturing is None:
            return compiled(*args, **kw)
        before = [t.clone() for t in tensors_of(args)]
        out = compiled(*args, **kw)
        for t, b in zip(tensors_of(args), before):
            t.copy_(b)
        emu.capturing.record(compiled, original, args, kw, out if isinstance(out, tuple) else (out,))
        return out
    return call


@pytest.fixture
def emulated_gpu(monkeypatch):
    """train.py and FastDecode take their GPU branches on CPU tensors. -> the Emulation (streams, graphs, replays)."""
    emu, compile = Emulation(), torch.compile

    @contextlib.contextmanager
    def graph(g, **kw):
        emu.capturing = g
        try:
            yield
        finally:
            emu.capturing = None

    current = {}
    monkeypatch.setattr(train, "on_gpu", lambda device: True)
    # dynamo's own backend: the same graphs and guards (recompiles) as inductor's, compiled in no time
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: recording(emu, compile(fn, **{**kw, "backend": "eager"}), fn))
    for name, fake in {"Stream": lambda *a, **k: FakeStream(emu), "CUDAGraph": lambda: FakeGraph(emu),
                       "current_stream": lambda *a: current.get(emu.device) or current.setdefault(emu.device, FakeStream(emu)),
                       "stream": lambda s: contextlib.nullcontext(), "graph": graph,
                       "set_device": lambda d: (emu.set_devices.append(d), setattr(emu, "device", torch.device(d).index or 0)),
                       "current_device": lambda: emu.device, "is_bf16_supported": lambda *a, **k: emu.bf16,
                       "max_memory_allocated": lambda *a: 0}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    return emu
