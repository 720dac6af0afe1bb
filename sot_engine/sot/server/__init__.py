"""`sot serve`: the OpenAI-compatible server (FastAPI + uvicorn), above both the engine and the SoT driver."""
from sot_engine.sot.server.app import Server, create_app

__all__ = ["Server", "create_app"]
