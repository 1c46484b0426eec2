"""The model repository: its files (``files``) and the registry of the models a server holds (``registry``)."""
