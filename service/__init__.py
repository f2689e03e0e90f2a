"""facerec's REST service (FastAPI): ``create_app(settings)``, or ``facerec-serve`` from a shell.

See docs/service.md. The service imports ``facerec`` and never ``training``.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Lazy: `import service.settings` must not pull in FastAPI and the model runtime.
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(name)
