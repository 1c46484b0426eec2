"""Real servers for tests: ``codedsmooth serve`` child processes on 127.0.0.1 with 2 torch threads."""

from codedsmooth.service.launcher import LocalServer, free_port, local_server


class ServerProcess(LocalServer):
    def __init__(self, checkpoint, **settings):
        super().__init__(checkpoint, threads=settings.pop("threads", 2), **settings)


def running_server(checkpoint, **settings):
    return local_server(checkpoint, threads=settings.pop("threads", 2), **settings)


__all__ = ["ServerProcess", "running_server", "free_port"]
