"""The HTTP APIs: the v1 and v2 routers, model control, request codecs, bodies (pydantic), the OpenAPI document, error answers."""
