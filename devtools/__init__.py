"""Development tools: test clips, a local Ray graph and the demo; not part of the shipped package."""
