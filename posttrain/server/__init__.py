"""An OpenAI-compatible HTTP server over any ``RolloutEngine`` (``posttrain serve``).

``create_app`` lives in ``posttrain.server.app``; it is not imported here so that importing the
package does not need the optional ``serve`` extra (fastapi, uvicorn)."""
