"""One router per resource; ``ROUTERS`` is what the app includes."""

from service.routes import (
    demo,
    detect,
    embed,
    embed_batch,
    galleries,
    gallery_persons,
    gallery_search,
    health,
    models,
    quality,
    verify,
)

ROUTERS = [verify.router, quality.router, embed.router, embed_batch.router, detect.router, models.router,
           health.router, demo.router, galleries.router, gallery_persons.router, gallery_search.router]
