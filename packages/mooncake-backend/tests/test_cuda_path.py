"""The direct CUDA path's selection, options and device fold, on the CPU (runs in CI)."""

import pytest
import torch
from ops_cases import FLOATS, INTS, REDUCE_OPS, data, reference

from mooncake import pg
from mooncake.backend import cuda_direct, cuda_ipc


@pytest.mark.timeout(30)
def test_mode_from_argument_env_and_default(monkeypatch):
    monkeypatch.delenv(cuda_direct.ENV, raising=False)
    assert pg.MooncakeBackendOptions().cuda_path == cuda_direct.DEFAULT == "staged"
    assert pg.MooncakeBackendOptions(cuda_path=" Direct ").cuda_path == "direct"
    monkeypatch.setenv(cuda_direct.ENV, "staged")
    assert pg.MooncakeBackendOptions().cuda_path == "staged"
    assert pg.MooncakeBackendOptions(cuda_path="auto").cuda_path == "auto"  # argument first


@pytest.mark.timeout(30)
def test_bad_mode_names_the_value_and_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"cuda_path='fast'.*auto.*direct.*staged"):
        pg.MooncakeBackendOptions(cuda_path="fast")
    with pytest.raises(TypeError, match="cuda_path must be a str"):
        pg.MooncakeBackendOptions(cuda_path=1)
    monkeypatch.setenv(cuda_direct.ENV, "nvlink")
    with pytest.raises(ValueError, match=r"MOONCAKE_BACKEND_CUDA_PATH='nvlink'"):
        pg.MooncakeBackendOptions()


def _info(host="h1", mode="auto", err=""):
    return {"host": host, "uuid": "GPU-0", "mode": mode, "err": err}


@pytest.mark.timeout(30)
def test_choose_direct_only_on_one_host_with_working_ipc():
    two = {0: _info(), 1: _info()}
    assert cuda_direct.choose(two) == (True, "pending the mapping check")
    ok, why = cuda_direct.choose(two, {0: "", 1: ""})
    assert ok, why
    ok, why = cuda_direct.choose({0: _info(), 1: _info(host="h2")})
    assert not ok
    assert "2 hosts" in why
    ok, why = cuda_direct.choose({0: _info(), 1: _info(err="expandable segments")})
    assert not ok
    assert "rank 1 cannot export" in why
    assert "expandable" in why
    ok, why = cuda_direct.choose(two, {0: "", 1: "rank 0: RuntimeError: invalid handle"})
    assert not ok
    assert "rank 1 cannot map" in why
    ok, why = cuda_direct.choose({0: _info(), 1: _info(mode="staged")})
    assert not ok
    assert "staged" in why
    # One member (e.g. the survivor of world 2): every op is local, direct stays usable.
    ok, why = cuda_direct.choose({0: _info()}, {0: ""})
    assert ok
    assert "one member" in why
    ok, why = cuda_direct.choose({0: _info(err="no IPC")})
    assert not ok
    ok, why = cuda_direct.choose(two, {0: ""})
    assert not ok
    assert "changed" in why


@pytest.mark.timeout(30)
def test_capture_check_is_silent_outside_a_capture():
    cuda_direct.check_capture("allreduce")  # no CUDA here, or not capturing: no error


@pytest.mark.timeout(30)
def test_malformed_ipc_blob_is_a_value_error():
    with pytest.raises(ValueError, match="malformed CUDA IPC blob"):
        cuda_ipc.import_blob(b"\x80not json")
    with pytest.raises(ValueError, match="malformed CUDA IPC blob"):
        cuda_ipc.import_blob(b'{"numel": 1}')
    rec = (
        b'{"numel":10,"t_off":0,"uuid":"x","h":"00","s_size":4,"s_off":0,"rc":null,'
        b'"rc_off":0,"ev":null,"ev_sync":false}'
    )
    with pytest.raises(ValueError, match="out of range"):
        cuda_ipc.import_blob(rec)
    assert cuda_ipc.parse_blob_field(b"abc\0\0\0") == b"abc"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_device_fold_matches_the_cpu_reference(world):
    """The fold the direct path runs on the GPU, here on CPU tensors: the same bits as the CPU
    suite's reference for every reduce op and dtype (the GPU run repeats it on CUDA)."""
    n = 1000
    for opname in REDUCE_OPS:
        for dtype in FLOATS + INTS:
            if opname in ("BAND", "BOR", "BXOR") and dtype.is_floating_point:
                continue
            parts = [data(r, n, dtype, opname) for r in range(world)]
            out = torch.empty(n, dtype=dtype)
            cuda_direct.device_reduce(out, parts, opname)
            assert torch.equal(out, reference(world, n, dtype, opname)), (opname, dtype)
    fp8 = torch.float8_e4m3fn
    parts = [data(r, 64, fp8) for r in range(world)]
    out = torch.empty(64, dtype=fp8)
    cuda_direct.device_reduce(out, parts, "SUM")
    exp = sum(p.float() for p in parts).to(fp8)
    assert torch.equal(out.float(), exp.float())
    b = [data(r, 64, torch.bool) for r in range(world)]
    out = torch.empty(64, dtype=torch.bool)
    cuda_direct.device_reduce(out, b, "BXOR")
    assert torch.equal(out, torch.stack(b).sum(0) % 2 == 1)


@pytest.mark.timeout(60)
def test_cpu_group_has_no_cuda_path():
    """``mooncake-cpu`` groups never construct the CUDA path (no CUDA calls on CPU hosts)."""
    from harness import run_world

    assert run_world(_cpu_body, 2, timeout=50) == {0: 2.0, 1: 2.0}


def _cpu_body(rank, world, port):
    import torch.distributed as dist
    from harness import init

    init(rank, world, port)
    assert dist.group.WORLD._cuda is None
    t = torch.ones(4)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return float(t[0])
