"""Opt-in one-GPU shim for running multi-process GPU clients on a machine with one GPU.

``tools/clients`` puts this folder on ``PYTHONPATH`` (so every process, ``mp.spawn`` children too,
imports it at start-up) and sets:

- ``MOONCAKE_CLIENTS_ONE_GPU=1``: ``torch.cuda.set_device(i)`` selects device 0 for every ``i``
  (the clients call ``torch.cuda.set_device(local_rank)``), and ``torch.cuda.device(i)`` too;
- ``MOONCAKE_CLIENTS_DEVICE_COUNT=N`` (optional): ``torch.cuda.device_count()`` returns ``N``
  (``test_mooncake_backend.py`` sizes its world from it).

Without ``MOONCAKE_CLIENTS_ONE_GPU=1`` it does nothing but run the next ``sitecustomize`` on the
path, if there is one. The client files themselves are not touched.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _install() -> None:
    import torch

    real_set_device = torch.cuda.set_device

    def set_device(device):
        real_set_device(0)

    set_device.__doc__ = "one-GPU shim (tools/clients_support/device_shim): always device 0"
    torch.cuda.set_device = set_device

    real_device_init = torch.cuda.device.__init__

    def device_init(self, device):
        real_device_init(self, device)
        if self.idx is not None and self.idx > 0:
            self.idx = 0

    torch.cuda.device.__init__ = device_init

    count = os.environ.get("MOONCAKE_CLIENTS_DEVICE_COUNT")
    if count:
        fake = int(count)
        torch.cuda.device_count = lambda: fake
        # torch's lazy CUDA init checks the capability of every device it counts: devices past
        # the real one are the real one.
        real_props = torch.cuda.get_device_properties

        def get_device_properties(device=None):
            idx = torch.cuda._utils._get_device_index(device, optional=True)
            return real_props(0 if idx is not None and idx > 0 else device)

        torch.cuda.get_device_properties = get_device_properties


def _chain() -> None:
    """Run the sitecustomize this one shadows (the interpreter's own, if any)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if os.environ.get("MOONCAKE_CLIENTS_ONE_GPU") == "1":
    _install()
_chain()
