"""The web layer: app factory and lifespan, routers, protocol schemas, middleware, settings, CLI, metrics."""
