"""The OpenAI-compatible server: protocol models, the ASGI app, the engine loop, a chat page."""
