"""Shared helper of the stubs: a callable that says which GPU-only function was reached."""


def unavailable(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} is GPU-only and stubbed in the sr3d-plugin VILA harness; this path must not run")

    call.__name__ = name.rsplit(".", 1)[-1]
    return call
