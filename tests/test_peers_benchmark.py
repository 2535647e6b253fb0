"""``benchmarks/peers.py`` on tiny maps: the DeepFill port from a checkout or an "n/a" cell, the
comparison table, the goals, thread counts and PEN-Net's dense attention."""
from __future__ import annotations

import io
import textwrap

import pytest
import torch

from benchmarks import peers
from benchmarks.cases import LayerConfig

TINY = LayerConfig(8, 8, 16, gpu_batch=2, cpu_batch=2, paper_layer=None)

FAKE_PORT = textwrap.dedent('''
    import torch

    class ContextualAttention(torch.nn.Module):
        """Stand-in with the port's constructor and call: (f, b, mask) -> (y, flow)."""

        def __init__(self, ksize=3, stride=1, rate=1, fuse_k=3, softmax_scale=10, fuse=False,
                     use_cuda=False, device_ids=None):
            super().__init__()
            self.settings = (ksize, stride, rate, fuse_k, softmax_scale, fuse)

        def forward(self, f, b, mask=None):
            return f * 2 + b, None
''')


def _tiny_case(backward=False):
    case = peers.Case("module tiny", peers.module_contenders(TINY, 2, backward), "dsa[cpu]")
    goal = peers.Goal("dsa vs port", "module tiny", lambda t: t["deepfill-port"] / t["dsa[cpu]"], 0.0)
    return case, goal


def test_without_the_port_its_cells_say_how_to_get_it(monkeypatch):
    monkeypatch.delenv(peers.DEEPFILL_PORT_VARIABLE, raising=False)
    with pytest.raises(peers.NotAvailable, match="set DSA_BENCH_DEEPFILL_PORT to a checkout of "
                                                 "daa233/generative-inpainting-pytorch"):
        peers.load_deepfill_port()
    case, goal = _tiny_case()
    out = io.StringIO()
    timings = peers.run([case], [goal], [1], rounds=1, out=out)
    table = out.getvalue()
    assert timings[1]["module tiny"]["deepfill-port"] == peers.DEEPFILL_PORT_MISSING
    assert f"| module tiny | deepfill-port | {peers.DEEPFILL_PORT_MISSING} |" in table
    assert "| dsa vs port | n/a |" in table  # not a failure
    assert isinstance(timings[1]["module tiny"]["dsa[cpu]"], float)


def test_a_checkout_without_the_port_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(peers.DEEPFILL_PORT_VARIABLE, str(tmp_path))
    with pytest.raises(peers.NotAvailable, match="has no model/networks.py"):
        peers.load_deepfill_port()


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_the_port_from_a_checkout_is_timed_beside_dsa(tmp_path, monkeypatch, backward):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "model" / "networks.py").write_text(FAKE_PORT)
    monkeypatch.setenv(peers.DEEPFILL_PORT_VARIABLE, str(tmp_path))
    case, goal = _tiny_case(backward)
    out = io.StringIO()
    timings = peers.run([case], [goal], [1, 2], rounds=2, out=out)
    for threads in (1, 2):
        assert all(isinstance(timings[threads]["module tiny"][name], float)
                   for name in ("dsa[cpu]", "deepfill-port", "oracleface-ca",
                                "dsa adapter (DeepFill v1, flow)"))
    table = out.getvalue()
    assert "| 1 thread | 2 threads |" in table
    assert table.count(" met") >= 2 and "NOT met" not in table  # target 0: always met


FAKE_PENNET = textwrap.dedent('''
    import torch

    class AtnConv(torch.nn.Module):
        """Stand-in with AtnConv's constructor and call: (x1, x2, mask) -> y."""

        def __init__(self, input_channels=128, output_channels=64, groups=4, ksize=3, stride=1,
                     rate=2, softmax_scale=10., fuse=True, rates=[1, 2, 4, 8]):
            super().__init__()
            self.conv = torch.nn.Conv2d(input_channels, output_channels, 1)

        def forward(self, x1, x2, mask=None):
            return self.conv(x1)
''')


def test_pennet_levels_time_the_adapter_beside_atnconv(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pennet.py").write_text(FAKE_PENNET)
    monkeypatch.setenv(peers.PENNET_PORT_VARIABLE, str(tmp_path))
    cases = [peers.Case(level, peers.pennet_level_contenders(level, 2, True), "dsa adapter (PENNetAtnConv)")
             for level in peers.PENNET_LEVELS]
    timings = peers.run(cases, [], [1], rounds=1, out=io.StringIO())
    assert all(isinstance(seconds, float) for case in timings[1].values() for seconds in case.values())
    monkeypatch.delenv(peers.PENNET_PORT_VARIABLE)
    with pytest.raises(peers.NotAvailable, match="set DSA_BENCH_PENNET_PORT to a checkout of "
                                                 "researchmm/PEN-Net-for-Inpainting"):
        peers.load_pennet()


def test_op_cases_time_every_contender_and_the_matmul():
    contenders = peers.op_contenders(TINY, 2, True, ["dsa_ops[cpu]", "reference", "pennet-dense"])
    case = peers.Case("op tiny", contenders + [peers.matmul_contender(64)], "dsa_ops[cpu]")
    out = io.StringIO()
    timings = peers.run([case], [], [1], rounds=1, out=out)
    assert all(isinstance(seconds, float) for seconds in timings[1]["op tiny"].values())
    assert "| op tiny | torch.mm 64² |" in out.getvalue()


def test_module_and_its_op_alone_run():
    case = peers.Case("outside", peers.module_op_contenders(TINY, 2), "module")
    timings = peers.run([case], [], [1], rounds=1, out=io.StringIO())
    assert set(timings[1]["outside"]) == {"module", "its dual op"}


def test_pennet_dense_attention_is_a_softmax_over_every_pixel_with_hole_keys_zeroed():
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 6, 4, generator=generator) for _ in range(2))
    v = torch.randn(2, 6, 5, generator=generator)
    everything = torch.ones(2, 6, dtype=torch.bool)
    expected = torch.softmax(0.5 * q @ k.transpose(1, 2), dim=2) @ v
    torch.testing.assert_close(peers.pennet_dense_attention(q, k, v, everything, everything, 0.5),
                               expected)
    keys = everything.clone()
    keys[:, :2] = False
    queries = ~keys
    out = peers.pennet_dense_attention(q, k, v, queries, keys, 0.5)
    assert (out[keys] == 0).all()  # rows outside the queries
    v_hole_changed = v.clone()
    v_hole_changed[:, :2] = 100.0  # hole keys carry no weight
    torch.testing.assert_close(peers.pennet_dense_attention(q, k, v_hole_changed, queries, keys, 0.5), out)


def test_thread_counts_and_bad_arguments(capsys):
    assert peers.thread_counts("1,2,1") == [1, 2]
    assert peers.thread_counts("all")[0] >= 1
    with pytest.raises(ValueError, match="must be positive"):
        peers.thread_counts("0")
    with pytest.raises(SystemExit):
        peers.main(["--rounds", "0"])
    assert "--rounds must be at least 1; got 0" in capsys.readouterr().err


def test_render_marks_cases_that_get_slower_with_more_threads():
    case = peers.Case("c", [peers.Contender("a", lambda: None)], "a")
    timings = {1: {"c": {"a": 0.010}}, 2: {"c": {"a": 0.020}}}
    text = peers.render([case], [], [1, 2], timings)
    assert "c / a: 10.0 → 20.0 ms" in text
    assert "| c | a | 10.0 ms (1.00×) | 20.0 ms (1.00×) |" in text
