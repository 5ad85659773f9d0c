"""A local Stripe-compatible provider: the ``stripe`` SDK works against it unchanged.

Start a ``SandboxServer`` and point the SDK at it with
``stripe.StripeClient("sk_test_...", base_addresses={"api": server.base_url})``.
"""

from sandbox.app import create_app
from sandbox.forms import decode_form
from sandbox.server import SandboxServer, serve
from sandbox.state import SandboxState
from sandbox.webhooks import sign_payload

__all__ = ["SandboxServer", "SandboxState", "create_app", "decode_form", "serve", "sign_payload"]
