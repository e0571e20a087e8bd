"""The database: ``tables`` (the SQLModel tables), ``engine`` (SQLite or PostgreSQL),
``schema`` (upgrading to this release's schema) over ``migrations/`` (alembic revisions)."""
