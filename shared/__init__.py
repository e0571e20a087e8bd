"""Code used by both the control plane and the agent: bundle format, signing, topics, schemas."""
