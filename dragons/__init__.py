"""dragons: distributed batch image classification on Ray."""

from dragons.rayauth import enable_token_auth as _enable_token_auth

__version__ = "0.1.0"

# Before anything imports ray: Ray reads RAY_AUTH_MODE once, at import.
_enable_token_auth()
