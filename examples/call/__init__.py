"""The video-call demo (``make demo``): see docs/demo.md."""
