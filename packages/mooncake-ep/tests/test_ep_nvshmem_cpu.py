"""The NVSHMEM mode's host side, on CPU (no GPU needed; the kernels run in test_cuda_nvshmem.py).

The NVSHMEM-mode library is a separate build of the kernels linked with NVSHMEM (present only where
CMake found the nvidia-nvshmem wheel); the production library never depends on NVSHMEM. The
library loads without a GPU (dlopen only), so its ABI, layout hash and NVSHMEM calls are checked
here; so are the mode's verdicts and the clear error of ``update_ep_member``.
"""

from __future__ import annotations

import os

import pytest

from mooncake.ep import _cuda, nvshmem_path
from mooncake.ep.path import PathUnavailable, RecoveryUnsupported


def _production_built() -> bool:
    return os.path.exists(_cuda.library_path())


def _needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF shared library (64-bit little endian), read directly."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2
    assert data[5] == 1
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link: its string table
    names = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + value
            names.append(data[start : data.index(b"\0", start)].decode())
    return names


@pytest.mark.timeout(30)
def test_production_library_does_not_link_nvshmem() -> None:
    if not _production_built():
        pytest.skip("the CUDA library was not built (no nvcc)")
    needed = _needed_libraries(_cuda.library_path())
    assert needed, "no DT_NEEDED entry read"
    assert not any("nvshmem" in n for n in needed), needed
    lib = _cuda.load()
    assert lib.mep_has_nvshmem() == 0


@pytest.mark.timeout(60)
def test_nvshmem_library_when_the_wheel_is_there() -> None:
    """Built next to the production library when the wheel was found at build time: NVSHMEM
    linked, the same ABI and MepOpArgs layout, transport kind 3, the headers' version equal to the
    wheel's."""
    if not _production_built():
        pytest.skip("the CUDA library was not built (no nvcc)")
    lib_dir = nvshmem_path.wheel_lib_dir()
    path = nvshmem_path.library_path()
    if lib_dir is None:
        pytest.skip("nvidia-nvshmem-cu12/-cu13 is not installed")
    assert os.path.exists(path), f"{path}: not built although the NVSHMEM wheel is installed"
    assert "libnvshmem_host.so.3" in _needed_libraries(path)
    lib = nvshmem_path.load()
    assert lib.mep_has_nvshmem() == 1
    assert lib.mep_abi_version() == _cuda.ABI_VERSION
    assert lib.mep_args_layout_hash() == _cuda.ARGS_LAYOUT_HASH
    assert lib.mep_nvshmem_uniqueid_bytes() == 128
    assert nvshmem_path.nvshmem_state(lib)[0] == 0  # never initialised here
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12"):
        try:
            wheel = version(dist)
        except PackageNotFoundError:
            continue
        major, minor, patch = (int(x) for x in wheel.split(".")[:3])
        assert lib.mep_nvshmem_version() == major * 10000 + minor * 100 + patch, wheel
        break
    # The production library refuses kind 3 (checked by its launcher; here: it says so).
    assert _cuda.TRANSPORT_NVSHMEM == 3


@pytest.mark.timeout(30)
def test_verdicts_across_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across hosts NVSHMEM needs a remote transport; a missing library is a reason, not an
    error."""
    infos = [{"host": "a"}, {"host": "b"}]
    monkeypatch.setenv("MOONCAKE_EP_NVSHMEM_LIB", "/nonexistent/_mooncake_ep_nvshmem.so")
    monkeypatch.setattr(nvshmem_path, "_lib", None)
    reason = nvshmem_path.nvshmem_unavailable(infos, 0, 2)
    assert reason is not None
    assert "does not exist" in reason
    monkeypatch.setattr(nvshmem_path, "load", lambda: FakeLib())
    monkeypatch.setenv("NVSHMEM_REMOTE_TRANSPORT", "none")
    reason = nvshmem_path.nvshmem_unavailable(infos, 0, 2)
    assert reason == "ranks are on several hosts and NVSHMEM_REMOTE_TRANSPORT=none"
    monkeypatch.delenv("NVSHMEM_REMOTE_TRANSPORT")
    monkeypatch.setattr(nvshmem_path, "has_rdma_device", lambda: False)
    reason = nvshmem_path.nvshmem_unavailable(infos, 0, 2)
    assert reason is not None
    assert "no RDMA device" in reason
    monkeypatch.setattr(nvshmem_path, "has_rdma_device", lambda: True)
    assert nvshmem_path.nvshmem_unavailable(infos, 0, 2) is None
    assert nvshmem_path.nvshmem_unavailable([{"host": "a"}] * 2, 1, 2) is None  # one host
    FakeLib.state = (1, 0, 2, 0)  # initialised earlier as rank 0 of 2
    try:
        reason = nvshmem_path.nvshmem_unavailable(infos, 1, 3)
        assert reason is not None
        assert "already initialised" in reason
        assert nvshmem_path.nvshmem_unavailable(infos, 0, 2) is None
    finally:
        FakeLib.state = (0, -1, 0, -1)
    monkeypatch.setenv("MOONCAKE_EP_NVSHMEM_DIRECT", "sometimes")
    reason = nvshmem_path.nvshmem_unavailable(infos, 0, 2)
    assert reason is not None
    assert "MOONCAKE_EP_NVSHMEM_DIRECT='sometimes'" in reason


class FakeLib:
    state = (0, -1, 0, -1)

    def mep_nvshmem_state(self, rank, nranks, device) -> int:
        rank._obj.value, nranks._obj.value, device._obj.value = self.state[1:]
        return self.state[0]


@pytest.mark.timeout(30)
def test_update_ep_member_names_the_proxy_mode() -> None:
    """NVSHMEM cannot re-admit a process: update_ep_member raises RecoveryUnsupported (not a
    PathUnavailable, so Buffer does not silently fall back) before any collective, naming
    MOONCAKE_EP_TRANSPORT=proxy."""
    path = nvshmem_path.NvshmemPath.__new__(nvshmem_path.NvshmemPath)
    path._ctx = 1  # a live context; nothing is called on it
    with pytest.raises(RecoveryUnsupported) as info:
        path.update_ep_member()
    assert not isinstance(info.value, PathUnavailable)
    text = str(info.value)
    assert "MOONCAKE_EP_TRANSPORT=proxy" in text
    assert "NVSHMEM" in text
    assert "cuda-nvshmem" in text
    path._ctx = None
    with pytest.raises(RuntimeError, match="destroyed"):
        path.update_ep_member()
    path._ctx_arg = None
