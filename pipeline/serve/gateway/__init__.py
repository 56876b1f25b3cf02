"""The one endpoint clients call: an authenticated OpenAI-compatible gateway in front of vLLM.

Clients use stable model names (the registered model's name); the gateway maps each to the internal
adapter name vLLM serves right now, fills the generation settings the client left out from the task's
config (the behaviour the gate measured), forwards the request with vLLM's own key (vLLM listens on
127.0.0.1 only), streams the answer back and appends a PII-redacted record of every request to a rotated
log. Refused requests (no or bad key: 401, unknown model: 404, malformed body: 400) never reach vLLM.

A small gateway of our own rather than an existing proxy (LiteLLM and the like): it must share the
pipeline's PII redactor and task configs, switch routes atomically when the registry's alias moves, and
count in-flight requests per adapter so an old adapter is unloaded only once they finished; a proxy would
need all of that bolted on through its plugin API and brings a large dependency set of its own.

Where things are: ``auth.py`` (client keys, per-key limits), ``routes.py`` (the routing table),
``requestlog.py`` (the redacted request log), ``webhooks.py`` (MLflow webhook checks), ``app.py`` (the
ASGI app and the server thread).
"""

from pipeline.serve.gateway.app import GatewayServer, build_app
from pipeline.serve.gateway.auth import KEYS_ENV, KeyLimiter, env_keys, load_keys
from pipeline.serve.gateway.requestlog import RequestLog
from pipeline.serve.gateway.routes import Route, Routes
from pipeline.serve.gateway.webhooks import WEBHOOK_MAX_AGE_S, verify_webhook

__all__ = ["GatewayServer", "build_app", "KEYS_ENV", "KeyLimiter", "env_keys", "load_keys", "RequestLog", "Route",
           "Routes", "WEBHOOK_MAX_AGE_S", "verify_webhook"]
