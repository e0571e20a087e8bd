"""The control plane's business rules, one module per concern; the API routes and the CLI call them.

- :mod:`.desired_states`: what each device should run (deployments, unassignments, shadows),
  signed and published; re-signing before expiry.
- :mod:`.publishing`: a model file or an externally signed bundle becomes a published version.
- :mod:`.enrollment`: one-time tokens, and the broker credentials a token buys once.
- :mod:`.keyring`: the keyring's versions and keys, and their rotation.
- :mod:`.devices`, :mod:`.catalog`, :mod:`.deployments`, :mod:`.shadows`: reading them back.
- :mod:`.auth`: API tokens (stored hashed) and their roles; :mod:`.audit`: the audit log.
- :mod:`.keys`: the keys the control plane holds; :mod:`.signing_local`: signing a bundle on the
  publisher's side (CI, a laptop) so the key never reaches the control plane.

A service takes a database session and values (time passed in as ``now``), and raises errors
from the one tree in :mod:`edgefleet.shared.errors`; it knows nothing of HTTP. Rollouts (waves
over deployments) and telemetry are new modules here beside these.
"""
