"""Sharded loading and conversion under JAX's multi-controller runtime: 2 local processes x 4 CPU devices
(coordinator on 127.0.0.1, gloo collectives), each checking its shards against a whole load and reading
about its share of the files."""

from __future__ import annotations

import re

import pytest
from checkpoints import bnb_llama, dense_llama, fp8_llama, torchao_llama

from qbridge._multiprocess import check_multiprocess_load

pytest.importorskip("flax")
pytest.importorskip("bitsandbytes")

# 4-bit: every split below leaves each device whole 64-element blocks (a block is the smallest piece that
# can be read); FP8 reads exact slices, and 704 = 5.5 tiles of 128 gives partial tiles at the edges
BNB_SIZES = dict(hidden_size=512, intermediate_size=1024, vocab_size=512, num_key_value_heads=2)
FP8_SIZES = dict(hidden_size=256, intermediate_size=704, vocab_size=512, num_key_value_heads=2)
ROWS_AND_COLUMNS = [  # as tensor parallelism splits a Llama
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", [None, "x"]),  # torch rows
    (r"(o_proj|down_proj)\.kernel$", ["x", None]),  # torch columns
    (r"embed_tokens\.embedding$", ["x", None]),
    (r"lm_head\.kernel$", [None, "x"]),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    dense_llama(root / "dense", sizes=BNB_SIZES)
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True)
    torchao_llama(root / "dense", root / "ao")
    dense_llama(root / "dense-fp8", sizes=FP8_SIZES)
    fp8_llama(root / "dense-fp8", root / "fp8")
    return root


def _check_reads(load):
    """Its own byte ranges: its share, plus its rows' absmax and the small tables and scales."""
    read, share, stored = load["read_bytes"], load["share_bytes"], load["stored_bytes"]
    assert share < 0.6 * stored, load
    assert read <= 1.05 * share + 16 * 1024, load


def test_two_processes_one_dimensional_mesh(made):
    ckpts = [made / "nf4", made / "fp8", made / "ao" / "model.pt", made / "ao" / "st" / "model.safetensors"]
    reports = check_multiprocess_load(
        ckpts, processes=2, cpu_devices=4, mesh_shape=(8,), rules=ROWS_AND_COLUMNS, timeout=600
    )
    assert [r.process_index for r in reports] == [0, 1]
    for r in reports:
        assert len(r.local_devices) == 4 and r.ok, r
        for load in r.loads:
            assert load["leaves"] == 21 and load["shards"] == 21 * 4 and not load["mismatched"], load
            _check_reads(load)


def test_two_processes_two_dimensional_mesh_and_orbax(made, tmp_path):
    reports = check_multiprocess_load(
        [made / "nf4", made / "fp8"],
        processes=2,
        cpu_devices=4,
        mesh_shape=(2, 4),
        convert_dir=tmp_path,
        timeout=600,
    )
    for r in reports:
        assert r.ok, r
        for load in r.loads:
            _check_reads(load)
        assert r.convert["restored_shards"] == 21 * 4 and not r.convert["mismatched"]
    out = tmp_path / "nf4.orbax"
    assert (out / "_CHECKPOINT_METADATA").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["nf4.orbax"]  # no partial directory left behind


def test_a_failing_process_stops_them_all(made):
    # a partition that does not divide its axis fails inside every process; the first to exit stops the
    # other (killed, exit -9, if it has not exited by itself within the runner's next look)
    with pytest.raises(RuntimeError) as failure:
        check_multiprocess_load(
            str(made / "fp8"), processes=2, cpu_devices=3, rules=[("gate_proj.kernel$", ["x", None])]
        )
    message = str(failure.value)
    assert re.search(r"the 2-process load process (0|1|0, 1) failed", message), message[:300]
    exits = re.findall(r"--- process ([01]) \(exit (-?\d+)\) ---\n", message)
    assert sorted(i for i, _ in exits) == ["0", "1"] and {code for _, code in exits} <= {"1", "-9"}, exits
    assert "1" in {code for _, code in exits} and "its Flax shape is (256, 704)" in message


@pytest.mark.parametrize("after", ["abort", "hang"])
def test_a_process_that_ends_badly_after_its_result_keeps_its_checks(made, tmp_path, monkeypatch, after):
    """XLA's coordination service can abort in jax.distributed.shutdown() (a gRPC check on requests still
    in flight, seen once on the 2-core CI machine) after every check is done and printed: the run returns
    the processes' reports with a warning naming the process (it failed as a whole). A process still ending
    its shutdown SHUTDOWN_GRACE seconds after all reported is stopped, likewise. One that fails before
    printing its result still fails the run. The processes here are stand-ins printing what a process
    prints (the real ones are the tests above)."""
    import sys

    from qbridge import _multiprocess

    report = {"local_devices": ["cpu:0"], "loads": [], "convert": None, "mesh": "x=2"}
    stand_in = tmp_path / "python"
    stand_in.write_text(f"""#!{sys.executable}
import json, os, sys, time
spec = json.loads(sys.argv[-1])
i = spec["process_id"]
if i == 1 and {after!r} == "fail":
    sys.exit(3)
print({_multiprocess.RESULT!r} + json.dumps(dict({report!r}, process_index=i)), flush=True)
if i == 0:
    print("F1207 server.cc:584] Check failed: queue.Pop() == nullptr", flush=True)
    os.abort() if {after!r} == "abort" else time.sleep(600)
""")
    stand_in.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stand_in))
    monkeypatch.setattr(_multiprocess, "SHUTDOWN_GRACE", 1.0)
    with pytest.warns(RuntimeWarning, match="process 0 reported its result, then") as caught:
        reports = check_multiprocess_load(str(made / "fp8"), processes=2, timeout=60)
    assert [r.process_index for r in reports] == [0, 1] and all(r.ok for r in reports)
    said = str(caught[0].message)
    assert ("exited -6" if after == "abort" else "was stopped after 1 s") in said and "Check failed" in said
    # process 1 fails before its result: the run fails, as before
    stand_in.write_text(stand_in.read_text().replace("'abort'", "'fail'").replace("'hang'", "'fail'"))
    with pytest.raises(RuntimeError, match=r"the 2-process load process 1 failed"):
        check_multiprocess_load(str(made / "fp8"), processes=2, timeout=60)


def test_bad_arguments_are_refused_before_any_process_starts(made, tmp_path):
    import qbridge

    with pytest.raises(qbridge.CheckpointError, match="missing"):
        check_multiprocess_load([made / "nf4", tmp_path / "missing"], processes=2, cpu_devices=1)
    with pytest.raises(ValueError, match="mesh shape 3x3 holds 9 devices; 2 processes x 4 device"):
        check_multiprocess_load(made / "nf4", mesh_shape=(3, 3))
    with pytest.raises(
        ValueError, match=r"P\('nope', None\) names 'nope', which the mesh lacks \(its axes: 'x'\)"
    ):
        check_multiprocess_load(made / "nf4", rules=[("kernel$", ["nope", None])])
    # an axis named twice: refused here, as load_checkpoint refuses it (each process printed a traceback)
    with pytest.raises(
        ValueError, match=r"rule 'kernel\$': P\('model', 'model'\) names 'model' more than once"
    ):
        check_multiprocess_load(made / "nf4", mesh_shape=(2, 4), rules=[("kernel$", ["model", "model"])])
    # a rule that matches no leaf: said here, as each checkpoint is opened (the processes' own warnings are
    # not shown); a missing second checkpoint stops it before any process starts
    with pytest.warns(UserWarning, match=r"rule 'down_proj.*weight.*' matched no leaf; .* dotted Flax path"):
        with pytest.raises(qbridge.CheckpointError, match="missing"):
            check_multiprocess_load(
                [made / "nf4", tmp_path / "missing"],
                processes=2,
                cpu_devices=1,
                rules=[(r"down_proj\.weight$", ["x"])],
            )
    with pytest.raises(ValueError, match="must hold positive ints"):
        check_multiprocess_load(made / "nf4", mesh_shape=(-2, -4))
    with pytest.raises(ValueError, match="is no regular expression"):
        check_multiprocess_load(made / "nf4", rules=[("kernel[", ["x", None])])
    with pytest.raises(TypeError, match="list of axis names"):
        check_multiprocess_load(made / "nf4", rules=[("kernel$", "x")])


def test_a_terminated_caller_leaves_no_process_behind(made, tmp_path):
    """SIGTERM to the process that started the others: they are killed with it, as on any other exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "marker-ckpt"
    marker.symlink_to(made / "nf4", target_is_directory=True)  # names the children's command lines
    code = (
        "from qbridge._multiprocess import check_multiprocess_load\n"
        f"check_multiprocess_load({str(marker)!r}, processes=2, cpu_devices=1, timeout=300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])

    def children():
        out = subprocess.run(
            ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True
        ).stdout
        return [line for line in out.splitlines() if "qbridge._process" in line and str(marker) in line]

    deadline = time.monotonic() + 120
    while len(children()) < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.2)
    assert len(children()) == 2, "the processes did not start"
    os.kill(parent.pid, signal.SIGTERM)
    parent.wait(timeout=60)
    time.sleep(0.5)
    assert children() == [], children()


def test_the_command(made, capsys):
    from qbridge._cli import main

    rc = main(["multiprocess", str(made / "fp8"), "--processes", "2", "--cpu-devices", "2", "--mesh", "2x2",
               "--rule", r"proj\.kernel$=data,model", "--timeout", "300"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert out.count("42 shards of 21 leaves equal") == 2, out  # 2 processes x 2 devices x 21 leaves
