"""Stand-in package. ``mooncake`` below is SGLang's real dispatcher file, registered by
``sglang_driver.install_client_modules``; ``base`` is a stand-in."""
