"""`keel serve`: the API process (this one) and the engine process it starts."""

from __future__ import annotations

import logging
import types
from typing import Optional

import uvicorn

from keel.config import EngineConfig, ServerConfig
from keel.models.loader import load_tokenizer
from keel.models.source import resolve_model
from keel.server.app import AppOptions, create_app
from keel.server.engine_client import EngineClient
from keel.server.metrics import ServerMetrics
from keel.server.openai_api import ServerContext


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Run until Ctrl-C or SIGTERM: requests in flight then finish (or are cut off with an error after
    --shutdown-timeout), the engine process stops, and nothing is left running."""
    logging.getLogger("keel").setLevel(logging.INFO)
    source = resolve_model(engine_config.model)  # materialises presets and keel-demo once, before the engine
    url = f"http://{server_config.host}:{server_config.port}"
    ctx = ServerContext(EngineClient(engine_config), load_tokenizer(source), ServerMetrics(),
                        server_config.served_model_name or engine_config.model)
    app = create_app(ctx, AppOptions(url, server_config.health_timeout))
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="info",
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout) + 5)
    server = _Server(config, ctx.client, server_config.shutdown_timeout)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C once its graceful shutdown is done: nothing is left to do


class _Server(uvicorn.Server):
    """uvicorn, plus: once a shutdown signal arrives, requests still running after the grace period are ended
    with an error by keel itself (before uvicorn would cut their connections)."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self.client = client
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: Optional[types.FrameType]) -> None:
        if not self.should_exit:
            self.client.fail_pending_after(self.grace_s, "the server is shutting down")
        super().handle_exit(sig, frame)
