"""The REST API: ``routes/`` (one module per resource), ``schemas`` (its shapes), ``deps``
(what a route may ask for), ``access`` (who may call each route: tokens, roles, device
credentials), ``auditing`` (every change into the audit log), ``errors`` (errors as HTTP
answers), ``uploads`` (streamed bodies)."""
