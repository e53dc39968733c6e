"""Moved: the attacks are in test_adversarial.py, the TLS hello builders in proxy_harness.py.

This module only keeps `from tests.test_proxy_adversarial import built_client_hello,
client_hello` in test_network_rules.py working until that line imports from
tests.proxy_harness; delete this file then.
"""

from tests.proxy_harness import built_client_hello, client_hello  # noqa: F401
