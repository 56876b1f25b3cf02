"""The MLflow registry webhook receiver's check: HMAC signature, age, replays."""

from __future__ import annotations

import hmac
import time

WEBHOOK_MAX_AGE_S = 300  # older (or future) MLflow webhook timestamps are replays or clock trouble


def verify_webhook(secret: str, headers, body: bytes, seen: set[str]) -> str | None:
    """Why an MLflow webhook delivery is not authentic, or None. MLflow signs
    ``<delivery id>.<unix time>.<body>`` with HMAC-SHA256 and sends ``X-MLflow-Signature: v1,<base64>``."""
    import base64
    import hashlib

    signature = headers.get("x-mlflow-signature", "")
    delivery = headers.get("x-mlflow-delivery-id", "")
    stamp = headers.get("x-mlflow-timestamp", "")
    if not signature or not delivery or not stamp:
        return "unsigned delivery"
    try:
        age = time.time() - int(stamp)
    except ValueError:
        return "malformed timestamp"
    if abs(age) > WEBHOOK_MAX_AGE_S:
        return f"stale delivery ({age:.0f}s old)"
    version, _, given = signature.partition(",")
    expected = base64.b64encode(hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    if version != "v1" or not hmac.compare_digest(given, expected):
        return "bad signature"
    if delivery in seen:
        return "replayed delivery"
    seen.add(delivery)
    return None
