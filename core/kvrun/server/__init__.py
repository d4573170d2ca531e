"""The OpenAI-compatible HTTP server behind `kvrun serve`.

Layout: ``app`` (routes, middleware), ``serving_completion``/``serving_chat`` (the
generation routes), ``engine_client`` + ``transport`` (frontend side of the engine
link), ``engine_core`` (engine side), ``wire`` (typed messages), ``runner`` (process
life cycle). Importing this package imports none of them.
"""

__all__: list[str] = []
