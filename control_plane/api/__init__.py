"""The REST API: ``routes/`` (one module per resource), ``schemas`` (its shapes), ``deps``
(what a route may ask for), ``errors`` (errors as HTTP answers), ``uploads`` (streamed bodies)."""
