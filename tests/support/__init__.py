"""Fakes shared by unit tests: an in-memory MQTT broker behind the link seam (:mod:`support.memory_link`)."""
