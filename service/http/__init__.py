"""The HTTP side below the routes: the uvicorn runner, client connections (slots, header bounds), admission, the app's wiring."""
