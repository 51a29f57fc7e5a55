"""Stand-in package. ``elastic_ep`` below is SGLang's real file, registered by
``sglang_driver.install_client_modules``."""
