"""The control plane's schema migrations (alembic), run by :mod:`edgefleet.control_plane.db.schema`.

``versions/`` holds one module per revision, oldest first: ``v0001_baseline`` is the schema as
``create_all`` made it before migrations existed, and each later one changes it. There is no
``alembic.ini``: :func:`edgefleet.control_plane.db.schema.alembic_config` points alembic here,
so the migrations ship inside the wheel and run from any working directory.

A new revision (after changing :mod:`edgefleet.control_plane.db.tables`)::

    python -c "from edgefleet.control_plane.db.schema import alembic_config; \\
        from alembic import command; command.revision(alembic_config(), 'what changes', rev_id='0003')"

then rename the file ``vNNNN_<what>.py``, write ``upgrade``/``downgrade`` by hand (data moves
included), and use plain SQLAlchemy types in it: a migration must not change when the
application's classes do.
"""
