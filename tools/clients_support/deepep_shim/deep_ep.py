"""``deep_ep`` for DeepEP's own tests: Mooncake EP's DeepEP drop-in under DeepEP's module name.

``tools/clients`` puts this folder on ``PYTHONPATH`` for ``DeepEP-567632d/test_low_latency.py``,
which does ``import deep_ep``. Everything comes from ``mooncake.ep.deep_ep_compat``; nothing is
added here, so a name the test needs and the compat module lacks fails as it would for a user.
"""

from mooncake.ep import deep_ep_compat as _compat
from mooncake.ep.deep_ep_compat import *  # noqa: F403

# Re-export every public name, including ones missing from the compat module's __all__.
globals().update({k: v for k, v in vars(_compat).items() if not k.startswith("_")})
