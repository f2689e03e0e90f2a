"""One router per resource; ``ROUTERS`` is what the app includes."""

from service.routes import (
    demo,
    detect,
    embed,
    galleries,
    health,
    models,
    quality,
    verify,
)

ROUTERS = [verify.router, quality.router, embed.router, detect.router, models.router, health.router,
           demo.router, galleries.router]
