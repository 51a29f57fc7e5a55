"""Stand-in for the ``sglang`` package: only the names that SGLang's Mooncake files import.

Not SGLang. ``tools/clients_support/sglang_driver.py`` puts this folder on ``sys.path`` and loads
the real, unmodified ``token_dispatcher/mooncake.py`` and ``elastic_ep/elastic_ep.py`` from the
clients folder under their SGLang module names (see ``sglang_driver.install_client_modules``).
"""
