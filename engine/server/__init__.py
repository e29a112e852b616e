"""The HTTP server: FastAPI app and routes, security (token, Host, limits), API models, OpenAI compatibility."""
